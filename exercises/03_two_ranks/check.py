"""Exercise 3: best_split against exhaustive search; LIMIT_FRACTION against the exact limit."""
import math

from grade import Fail, load
from partition import CostModel

ATTENTION_ONLY = dict(lin=0, comm_per_token=0, latency=0, head=0)
CASES = [  # (C, cost model, what it stands for)
    (1000, CostModel(), "the default model (Llama-2-7B on H100s)"),
    (4096, CostModel(), "the default model (Llama-2-7B on H100s)"),
    (3000, CostModel(**ATTENTION_ONLY), "attention only"),
    (2000, CostModel(comm_per_token=1e-4), "a slow link"),
    (500, CostModel(**ATTENTION_ONLY, n_layers=1), "attention only, one layer"),
    (2, CostModel(), "two tokens"),
]


def check(path):
    s = load(path)
    for C, cost, what in CASES:
        ttft = {c0: cost.ttft([c0, C - c0]) for c0 in range(1, C)}
        best = min(ttft, key=ttft.get)
        got = s.best_split(C, cost)
        if got not in ttft:
            raise Fail(f"best_split({C}, {what}) returned {got!r}: expected an int in 1..{C - 1}")
        if ttft[got] > ttft[best] * (1 + 1e-12):
            raise Fail(f"best_split({C}, {what}) returned {got}, TTFT {ttft[got] * 1e3:.6f} ms; "
                       f"but c0 = {best} gives {ttft[best] * 1e3:.6f} ms")
    exact, x = (math.sqrt(5) - 1) / 2, s.LIMIT_FRACTION
    C = 4096
    seen = s.best_split(C, CostModel(**ATTENTION_ONLY)) / C
    if not isinstance(x, (int, float)) or abs(x - exact) > 1e-3:
        raise Fail(f"LIMIT_FRACTION = {x!r} is not the limit; your best_split gives c0/C = {seen:.4f} at "
                   f"C = {C} with attention only. Derive the exact number: per layer, rank 0 does c0 * c0 "
                   "dot products and rank 1 does (C - c0) * C; what must hold when neither waits?")
    return f"attention only, c0/C -> {exact:.6f} (at C = {C}: {seen:.4f}), the golden ratio"
