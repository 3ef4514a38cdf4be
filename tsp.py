"""TSP (tensor/sequence parallel), the paper's baseline: split the prompt evenly, all-gather every
layer's K/V on every rank.

Each rank computes Q/K/V for its C/p tokens; every layer all ranks all-gather K and V (one collective,
a global synchronisation point), so each holds all C keys; each computes a dense (C/p x C) QK^T and
masks the future away, wasting the masked part. The rank holding the last token emits the first token.
Control flows as in runahead.py: the model calls `GatherKV.update` in every layer.

`--zigzag` is the stronger baseline modern context parallelism uses: 2p chunks, rank r holds chunks
r and 2p-1-r (early and late tokens: balanced causal work), and attention skips what the mask hides.

    mpirun -n 4 python tsp.py [--zigzag] [same options as runahead.py]
"""
import sys
import time

import cli


def tsp_layout(C, p, zigzag=False):
    """TSP's split, per rank its spans of positions [(start, length), ...], and the rank that emits
    the first token. Plain TSP: the even split, one span each, the last rank emits. Zigzag: 2p even
    chunks, rank r holds chunks r and 2p-1-r, so rank 0 holds the last token and emits."""
    if zigzag and C < 2 * p:
        raise ValueError(f"--zigzag needs at least 2 tokens per rank: {C} tokens for {p} ranks")
    if p > C:
        raise ValueError(f"{p} ranks but only {C} prompt tokens")
    n = 2 * p if zigzag else p
    c = [C // n + (i < C % n) for i in range(n)]       # even: chunks differ by at most one token
    start = [sum(c[:i]) for i in range(n)]
    if not zigzag:
        return [[(start[r], c[r])] for r in range(p)], p - 1
    return [[(start[r], c[r]), (start[n - 1 - r], c[n - 1 - r])] for r in range(p)], 0


if __name__ == "__main__":                             # --help and bad options answer before torch loads
    ARGS = cli.tsp().parse_args()
    cli.check_early(ARGS, lambda C, p: tsp_layout(C, p, ARGS.zigzag))

import torch  # noqa: E402

from generate import sync  # noqa: E402
from kvcache import cache_for, split  # noqa: E402
from program import Done, abort_on_error, done, report, setup  # noqa: E402


class GatherKV:
    """TSP's K/V exchange: each layer this rank's K/V go to their positions in a buffer of all C (the
    emitter's cache, or one layer's worth), the all-gather fills the others' in place, all C attend."""

    def __init__(self, transport, spans, dense, cache, buffer, n_layers):
        self.t, self.spans, self.dense, self.cache, self.buffer = transport, spans, dense, cache, buffer
        self.C, self.last_layer = sum(n for s in spans for _, n in s), n_layers - 1

    def update(self, layer, k, v):
        """This rank's own k, v (B, n_kv, its tokens, hs) in; the K, V of all C positions out."""
        out = self.buffer if self.cache is None else self.cache.claim(layer, self.C)   # (B, C, 2, n_kv, hs)
        put(out, self.spans[self.t.rank], k, v)
        self.t.allgather_into(out, self.spans, dim=1)
        if self.cache is None and layer == self.last_layer:
            raise Done                                 # a rank that does not emit is done
        return split(out)


def put(out, spans, k, v):
    """Write k, v (B, n_kv, T, hs), a rank's tokens in span order, at their positions of out."""
    ko, vo = split(out)                                # (B, n_kv, C, hs) views of out
    sizes = [n for _, n in spans]
    for (a, n), k_, v_ in zip(spans, k.split(sizes, dim=2), v.split(sizes, dim=2)):
        ko[:, :, a:a + n], vo[:, :, a:a + n] = k_, v_


@torch.no_grad()
def prefill(job, zigzag, decode_room=0, math_path=False):
    """This rank's part of TSP. Returns (logits of its last token, cache, seconds, emitting rank); logits
    and cache on the emitting rank only, the others stop after their last all-gather."""
    C, cfg = job.tokens.shape[1], job.model.cfg
    spans, emitter = tsp_layout(C, job.size, zigzag)
    mine = spans[job.rank]
    cache = cache_for(job, C + decode_room) if job.rank == emitter else None
    buffer = None if cache is not None else torch.empty((1, C, 2, cfg.n_kv_heads, cfg.head_dim),
                                                        dtype=job.dtype, device=job.device)
    kv = GatherKV(job.transport, spans, not zigzag, cache, buffer, cfg.n_layers)
    tokens = torch.cat([job.tokens[:, a:a + n] for a, n in mine], dim=1)
    job.transport.barrier()
    sync(job.device)
    t0 = time.perf_counter()
    try:
        logits = job.model(tokens, kv, mine, last_only=True, math_path=math_path, rope_len=C)[0, -1]
        logits.argmax().item()
    except Done:
        logits = None
    sync(job.device)
    return logits, cache, time.perf_counter() - t0, emitter


def main(args):
    job = setup(args, prepare=lambda job: tsp_layout(job.tokens.shape[1], job.size, args.zigzag))
    with abort_on_error(job.comm):
        if job.system:                                 # warm-ups (fast/system.py)
            job.system.before(prefill, args.zigzag, args.max_new_tokens, args.math)
        logits, cache, ttft, emitter = prefill(job, args.zigzag, args.max_new_tokens, args.math)
        job.transport.barrier()                        # a polite wait, not gather's spin
        stats = job.comm.gather(job.transport.stats, root=emitter)
        if job.system:
            job.system.after(logits)
        if job.rank == emitter:
            spans = tsp_layout(job.tokens.shape[1], job.size, args.zigzag)[0]
            report(job, args, "TSP" + " (zigzag)" * args.zigzag, emitter, [sum(n for _, n in s) for s in spans],
                   stats, ["split: " + " | ".join("+".join(f"[{a},{a + n})" for a, n in s) for s in spans)],
                   logits, cache, ttft)
        done(job)


if __name__ == "__main__":
    sys.exit(main(ARGS))
