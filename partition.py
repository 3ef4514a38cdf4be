"""How to split a prompt of C tokens over p ranks: the load balancing of KV-Runahead (Cho, Rastegari
and Naik, "KV-Runahead: Scalable Causal LLM Inference by Parallel Key-Value Cache Generation", ICML
2024: its cost analysis, and its context-level load balancing with KVR-E, KVR-S and KVR-P).

A partition is a list `c` of p chunk lengths: c[0] for rank 0, the front of the chain, up to c[p-1]
for the last rank, which ends with the full KV cache and emits the first token. S[i] = c[0]+..+c[i]
is where rank i's chunk ends, so S[p-1] = C and S[0..p-2] are the partition's p-1 boundaries.

Rank i attends c[i] queries to S[i] keys, so a token costs more the further back it sits in the
chain: the even split (KVR-E) overloads the back, and good partitions are front-loaded. Read on for
  validate, even, parse   well-formed partitions (tsp.py's tsp_layout: the baselines' splits)
  CostModel               predicted per-rank times and TTFT, KV-Runahead and TSP (calibrate.py
                          fits it to this machine)
  searched                the hierarchical grid search over boundaries (KVR-S)
  Table, predicted        the lookup table of searched partitions and its interpolation (KVR-P)
(choose.py picks among them for a run, with the caches of what this machine measured.)
"""
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

import cli
from fast import table


def read_json(path):
    """A JSON file's value; a file that is not JSON is a ValueError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): delete it, and it is made anew") from None


class PartitionError(ValueError):
    """A partition that does not give every rank a non-empty chunk of the prompt."""


def _fmt(c):
    return ",".join(map(str, c))


def _check_ranks(C, p):
    if p < 1:
        raise PartitionError(f"need at least 1 rank, got {p}")
    if p > C:
        raise PartitionError(f"{p} ranks but only {C} prompt tokens")


def validate(c, C, p):
    """Check that c gives each of p ranks >= 1 token and covers all C; return it as a list of ints."""
    _check_ranks(C, p)
    c = list(c)
    if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in c):
        raise PartitionError(f"partition {_fmt(c)} has a chunk that is not an integer")
    if len(c) != p:
        raise PartitionError(f"partition {_fmt(c)} has {len(c)} chunks for {p} rank{'s' * (p != 1)}")
    if min(c) < 1:
        raise PartitionError(f"partition {_fmt(c)} has an empty chunk (every rank needs >= 1 token)")
    if sum(c) != C:
        raise PartitionError(f"partition {_fmt(c)} sums to {sum(c)}, prompt has {C} tokens")
    return [int(x) for x in c]


def even(C, p):
    """KVR-E: chunks differ by at most one token; the extra tokens go to the front ranks."""
    _check_ranks(C, p)
    q, r = divmod(C, p)
    return validate([q + (i < r) for i in range(p)], C, p)


def parse(spec, C, p):
    """'4,3,2' -> [4, 3, 2], validated."""
    try:
        c = [int(x) for x in spec.split(",")]
    except ValueError:
        raise PartitionError(f"partition {spec!r} is not a comma-separated list of integers") from None
    return validate(c, C, p)


def prefix_sums(c):
    """S[i] = c[0] + .. + c[i]."""
    return list(itertools.accumulate(c))


def from_boundaries(b, C):
    """Chunks from the boundaries S[0] < .. < S[p-2] of a prompt of C tokens."""
    return [v - u for u, v in zip([0, *b], [*b, C])]


# ----------------------------------------------------------------------------- counting (the paper's worked example)

def dot_products(c):
    """QK^T dot products per rank as the paper counts them: c[i] * S[i].

    That is the c[i] x S[i-1] rectangle of the prefix plus the whole c[i] x c[i] diagonal block; a
    causal kernel would skip the block's upper half, c[i]*(c[i]-1)/2 of them. (4,3,2) -> 16, 21, 18.
    """
    return [ci * Si for ci, Si in zip(c, prefix_sums(c))]


def chain_kv_tokens(c):
    """K and V token entries KV-Runahead moves per layer: rank i sends S[i] to rank i+1, i < p-1."""
    return 2 * sum(prefix_sums(c)[:-1])


def tsp_kv_tokens(C, p):
    """K and V token entries TSP's all-gather moves per layer: each rank receives the C - c[i] it lacks."""
    return 2 * sum(C - ci for ci in even(C, p))


# ----------------------------------------------------------------------------- cost model

@dataclass
class CostModel:
    """Predicted prefill time of a partition. Every coefficient is for the whole model, all layers.

    Defaults: Llama-2-7B in bf16 on H100s linked at 300 GB/s (the paper's NVLink). With p = 1 they
    give TTFT 0.10 s at 4k, 0.49 s at 16k, 1.22 s at 32k: what one H100 measured for us with PyTorch
    SDPA (about 59% of bf16 peak), before the GPU fast paths.
    """
    lin: float = 2.24e-5           # s per token: QKV, o-proj, MLP (1.30e10 flop at 5.8e14 flop/s)
    attn: float = 4.5e-10          # s per query-key dot product (QK^T and PV), counted as in
                                   # dot_products: a chunk's mask makes SDPA compute its diagonal
                                   # block densely, so c_i S_i is what a rank actually computes
    comm_per_token: float = 1.75e-6  # s per token of K/V received: 0.5 MiB at 300 GB/s
    latency: float = 6.4e-4        # s per hop of the chain: 32 layers x 20 us per message
    head: float = 1e-3             # s: final norm and LM head on the last token, last rank only
    fixed: float = 0.0             # s: anything paid once per prefill (calibrate.fit's intercept)
    n_layers: int = 32
    measured: list = field(default_factory=list)   # on a GPU, the chunk times fitted, [(c, P, s), ...]

    def chunk_time(self, c, S):
        """One rank alone prefilling c tokens that end at S (S - c already cached): what calibrate.fit fits,
        or on a GPU fixed + what calibrate.py measured, interpolated where it reaches (fast/table.py)."""
        if self.measured and S <= table.reach(self.measured):     # all of it the layers' (their launches)
            return self.fixed + table.interpolate(self.measured, c, S - c)
        return self.fixed + self.lin * c + self.attn * c * S

    def rank_times(self, c):
        """When each rank finishes its last layer, in s after the start, with the chain's waits.

        Layers are equal, so rank i spends work_i = (chunk_time(c_i, S_i) - fixed) / L on each (lin c_i
        + attn c_i S_i on the fit). The chain runs as runahead.ChainKV does: at layer l, rank i receives
        the K/V of the S_{i-1} tokens before it from rank i-1, appends its own and at once sends that
        prefix on to rank i+1 (asynchronously); only then does it attend and run the MLP. All of work_i
        is counted after that point, the QKV projection too (a quarter of a 7B layer's linear work, less
        of the whole), so the model's sends are early by at most one QKV projection a hop. Rank i's
        left link carries layer l's prefix in hop_i = (latency + comm_per_token S_{i-1}) / L, one
        message at a time:
            s_i(l) = max(t_i(l-1), a_i(l))                 (rank i holds layer l's prefix, sends it on)
            a_i(l) = max(a_i(l-1), s_{i-1}(l)) + hop_i     (layer l's prefix arrives at rank i)
            t_i(l) = s_i(l) + work_i                       (rank i finishes layer l)
        with t_i(-1) = a_i(-1) = 0 and rank 0 never waiting: s_0(l) = t_0(l-1). A slow link delays only
        the ranks behind it. This is bench/sim.py's replay_chain with segments (0, work_i, .., work_i),
        exactly (tests/test_sim.py). Ranks before the last really stop at s_i(L-1), their last prefix
        sent; TTFT is the last rank's t.
        """
        L, prev, out = self.n_layers, [0.0] * self.n_layers, []   # prev[l]: s_{i-1}(l)
        for i, (ci, Si) in enumerate(zip(c, prefix_sums(c))):
            work = (self.chunk_time(ci, Si) - self.fixed) / L
            hop = (self.latency + self.comm_per_token * (Si - ci)) / L if i else 0.0
            t, arrive, sends = 0.0, 0.0, []
            for l in range(L):
                arrive = max(arrive, prev[l]) + hop
                sends.append(max(t, arrive))
                t = sends[-1] + work
            prev = sends
            out.append(t)
        return out

    def ttft(self, c):
        """KV-Runahead's time to first token: the last rank's finish, then the LM head."""
        return self.rank_times(c)[-1] + self.head + self.fixed

    def ttft_tsp(self, C, p):
        """The TSP baseline (the paper's tensor/sequence parallel prefill) on the even split: every layer ends in an all-gather, a
        barrier, so TTFT is the slowest rank's compute, lin c_i + attn c_i C (dense attention over
        all C keys, then masked), plus the gather: C - c_i tokens in over p - 1 ring steps.
        """
        c = even(C, p)
        compute = max(self.lin * ci + self.attn * ci * C for ci in c)
        gather = self.comm_per_token * (C - min(c)) + self.latency * (p - 1)
        return compute + gather + self.head + self.fixed

    def save(self, path):
        with cli.replace_whole(path) as tmp, open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1)

    @classmethod
    def load(cls, path):
        return cls.from_dict(read_json(path), path)

    @classmethod
    def from_dict(cls, d, where):
        """A CostModel from its fields, every one a known name and a number (`where` names the source)."""
        known = cls.__dataclass_fields__
        if not isinstance(d, dict) or set(d) - set(known):
            extra = sorted(set(d) - set(known)) if isinstance(d, dict) else d
            raise ValueError(f"{where}: not a cost model (unexpected {extra}; fields are {', '.join(known)})")
        if not table.plain(d):
            raise ValueError(f"{where}: every field of a cost model is a number, and `measured` a list of [c, P, s]")
        return cls(**d)

    def implausible(self):
        """Why a calibration cannot be right, or None: attention or the link that costs nothing. On a
        loaded machine timings spike, and a fit can make either look free, which turns the search
        upside down. (The linear term may fit as 0 where the fixed cost absorbs it: a small model's
        chunks are mostly overhead, and the partitions hardly depend on it.)"""
        bad = [f"{k} = {getattr(self, k)!r}" for k in ("attn", "comm_per_token") if not getattr(self, k) > 0]
        return ", ".join(bad) + " (not positive)" if bad else None


# ----------------------------------------------------------------------------- KVR-S: searched

def _stretch(b, j, x, C):
    """Boundaries b with b[j] moved to x and the rest stretched with it: the chunks before it
    grow or shrink in proportion to one another, and so do the chunks after it."""
    return ([round(v * x / b[j]) for v in b[:j]] + [x]
            + [round(x + (v - b[j]) * (C - x) / (C - b[j])) for v in b[j + 1:]])


ALIGN = 128   # a GPU's boundaries: whole tiles of its attention kernels (see `aligned`)


def aligned(C, p, align):
    """Partitions whose boundaries S[0..p-2] are multiples of `size` tokens, as partitions of the
    n = ceil(C / size) tiles: returns (n, tokens, size), tokens(u) being the chunks in tokens of a
    partition u of the tiles (the last chunk keeps what is left of its last tile). size is `align`,
    or 1 (tiles are tokens) where fewer tiles than ranks would leave a rank none. On a GPU, a chunk
    that starts inside a tile makes its rank's attention pay for partial tiles (cuDNN, 25% of an
    H200's SMs, Llama-7B dims: 3501 tokens after 12883 took 5.35 ms of attention a layer, 3456
    after 12928 4.67), so it searches on whole tiles (choose.alignment)."""
    size = align if -(-C // align) >= p else 1
    n = -(-C // size)
    return n, lambda u: [x * size for x in u[:-1]] + [C - size * (n - u[-1])], size


def tiles(c, n, size):
    """The partition of n tiles of `size` tokens nearest to c: each boundary to its nearest tile
    edge, kept increasing and short of the end (the last chunk may end inside its last tile)."""
    b = []
    for j, x in enumerate(prefix_sums(c)[:-1]):
        b.append(min(max(round(x / size), b[-1] + 1 if b else 1), n - (len(c) - 1 - j)))
    return from_boundaries(b, n)


def searched(C, p, score, steps=8, levels=3, history=None, align=1, start=None, span=None):
    """KVR-S: the partition with the lowest score(c), by hierarchical grid search over boundaries.

    Start from the even split (or `start`, below). Level 0 moves boundaries on a grid of spacing
    about C/steps over the whole prompt; each later level shrinks the spacing by the same factor,
    (C/steps)**(1/(levels-1)), so that the last level is one token, and looks only within one old
    spacing of the incumbent. A full grid over all p-1 boundaries at once would be steps**(p-1)
    candidates (2M for p = 8), so within a level we do coordinate search instead: for one boundary j
    at a time, each grid point x is tried twice,
      slide:    b[j] = x, the other boundaries stay;
      stretch:  b[j] = x, the chunks on either side of it scale with it (_stretch).
    Any improvement is kept, and all boundaries are swept again until a sweep improves nothing.
    Slides alone stall where TTFT is a max over ranks tied at the top (the balanced partitions we
    look for): moving one boundary unloads one of the tied ranks but loads its neighbour.

    score(c) -> float: a cost model's ttft or a measured TTFT. Each partition is scored once; for
    the default CostModel, p = 8, C = 16384 that is ~19k scores (~5k with levels=4, same answer).
    If `history` is a list it receives every (c, score) evaluated, in order. align > 1: the same
    search over whole tiles of `align` tokens (`aligned`). start, span: begin at partition `start`
    instead of the even split, with level 0's grid only `span` tokens either side of each boundary
    (spacing about span/steps; a sweep that improves moves it along): a local search around a good
    guess, for scores slow to measure (calibrate.live_search at 16k: hundreds of prefills from even).
    """
    _check_ranks(C, p)
    if span is not None and span < 1:
        raise PartitionError(f"a search span of {span} tokens moves no boundary: give at least 1")
    n, tokens, size = aligned(C, p, align)
    if size > 1:
        inner = [] if history is not None else None
        first = None if start is None else tiles(validate(start, C, p), n, size)
        best = tokens(searched(n, p, lambda u: score(tokens(u)), steps, levels, inner, 1,
                               first, None if span is None else -(-span // size)))
        if history is not None:
            history += [(tokens(u), s) for u, s in inner]
        return validate(best, C, p)
    seen = {}

    def f(b):
        if tuple(b) not in seen:
            c = from_boundaries(b, C)
            seen[tuple(b)] = score(c)
            if history is not None:
                history.append((c, seen[tuple(b)]))
        return seen[tuple(b)]

    def valid(b):
        return all(u < v for u, v in zip([0, *b], [*b, C]))

    b = prefix_sums(even(C, p) if start is None else validate(start, C, p))[:-1]
    best, window = f(b), min(span or C, C)
    exponents = [1.0] if levels == 1 else np.linspace(1, 0, levels)
    for s in [max(1, round((window / steps) ** e)) for e in exponents]:
        improved = True
        while improved:
            improved = False
            for j in range(p - 1):
                k = window // s
                for x in range(b[j] - k * s, b[j] + k * s + 1, s):
                    for trial in (b[:j] + [x] + b[j + 1:], _stretch(b, j, x, C)):
                        if 0 < x < C and valid(trial) and f(trial) < best:
                            best, b, improved = f(trial), trial, True
        window = s
    return validate(from_boundaries(b, C), C, p)


# ----------------------------------------------------------------------------- KVR-P: predicted

class Table:
    """Searched partitions keyed by model name, p and C, kept as a JSON file."""

    def __init__(self, entries=None):
        self.entries = entries or {}                 # {model: {p: {C: [c0, c1, ...]}}}

    def add(self, model, c):
        c = validate(c, sum(c), len(c))
        self.entries.setdefault(model, {}).setdefault(len(c), {})[sum(c)] = c

    def get(self, model, p, C):
        """The partition stored for (model, p, C), or None."""
        return self.entries.get(model, {}).get(p, {}).get(C)

    def contexts(self, model, p):
        """The context lengths stored for (model, p), ascending."""
        return sorted(self.entries.get(model, {}).get(p, {}))

    def save(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with cli.replace_whole(path) as tmp, open(tmp, "w") as f:
            json.dump(self.entries, f, indent=1)     # JSON turns the int keys p, C into strings

    @classmethod
    def load(cls, path):
        """The table in `path`; every entry must be a partition of its C over its p ranks."""
        raw, t = read_json(path), cls()
        try:
            for m, byp in raw.items():
                for p, byC in byp.items():
                    for C, c in byC.items():
                        where = f"{path}: entry {m!r}, p={p}, C={C}"
                        try:
                            t.entries.setdefault(m, {}).setdefault(int(p), {})[int(C)] = validate(c, int(C), int(p))
                        except (ValueError, TypeError) as e:
                            raise ValueError(f"{where}: {e}") from None
        except AttributeError:
            raise ValueError(f"{path}: not a table of partitions ({{model: {{p: {{C: [c0, c1, ...]}}}}}})") from None
        return t


def predicted(C, p, table, model, align=1):
    """KVR-P: a partition for an unseen C, interpolated from the table's neighbours in C.

    Each boundary is read as a fraction S[i]/C; between the two nearest stored contexts the
    fractions are interpolated linearly in C, and beyond the stored range the nearest entry's are
    used. Rounding to tokens (align > 1: to whole tiles of `align` tokens, `aligned`) then fixes
    up, left to right and then right to left, so that every chunk keeps >= 1 token (tile). A stored
    C is returned as stored.
    """
    _check_ranks(C, p)
    Cs = table.contexts(model, p)
    if not Cs:
        raise PartitionError(f"the table has no partition for model {model!r} on {p} ranks")
    if C in Cs:
        return list(table.get(model, p, C))

    def frac(K):
        return np.array(prefix_sums(table.get(model, p, K))[:-1]) / K

    below, above = [K for K in Cs if K < C], [K for K in Cs if K > C]
    if below and above:
        a, z = below[-1], above[0]
        w = (C - a) / (z - a)
        f = (1 - w) * frac(a) + w * frac(z)
    else:
        f = frac(below[-1] if below else above[0])
    n, tokens, size = aligned(C, p, align)
    b = [math.floor(x * C / size + 0.5) for x in f] + [n]        # in tiles of `size` tokens
    for j in range(p - 1):                           # each boundary >= 1 past the previous
        b[j] = max(b[j], b[j - 1] + 1 if j else 1)
    for j in reversed(range(p - 1)):                 # each boundary <= 1 before the next
        b[j] = min(b[j], b[j + 1] - 1)
    return validate(tokens(from_boundaries(b[:-1], n)), C, p)
