"""Timing what each rank computes, on a real device: the measurements bench/sim.py replays and the cost
model is fitted to.

A rank is profiled alone: TimedKV stands in for the K/V it would receive or gather, and a Clock marks
the L+1 segments bench/sim.py replays (its docstring draws them). Host clock on a CPU, CUDA events on a GPU.

    python -m bench.profiling --model llama7b --dtype float16 --device cuda --kernels kernels.json
    python -m bench.profiling --fuse --breakdown 2048:14336 128:14336    # where a late rank's layer goes
"""
import collections
import platform
import statistics
import time
from dataclasses import asdict

import torch

import bench
import cli
import partition
import tsp
from bench import sim
from fast.compiled import fuse
from generate import sync
from kvcache import KVCache, bytes_per_token, split
from load_weights import DIMS, dims_model

class Clock:
    """Marks in time: host clock on a CPU, CUDA events on a GPU (recorded on the stream, no host sync
    until `read`, so the GPU runs as it would unobserved)."""

    def __init__(self, device):
        self.cuda, self.marks = torch.device(device).type == "cuda", []

    def mark(self):
        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())

    def read(self):
        """Seconds between consecutive marks; forgets them."""
        if self.cuda:
            torch.cuda.synchronize()
            d = [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        else:
            d = [b - a for a, b in zip(self.marks, self.marks[1:])]
        self.marks = []
        return d


class TimedKV:
    """Stands in for ChainKV / GatherKV while one rank is profiled: does the rank's own K/V work,
    communicates nothing, and marks the clock where the real rank would meet the other ranks.

    Chain (`prefix`: S_{i-1} tokens whose random K/V are in the cache already, where the real rank's
    receive puts them): claim them, append the own K/V, then mark: here the real rank has its K/V
    [0, S_i) and sends them. (The real rank waits for the prefix just before the claim.)
    All-gather (`gathered`: a buffer of all C positions holding random K/V, or the emitter's cache;
    `spans`: this rank's): write the own K/V at its positions, mark (the real rank enters the
    all-gather, which fills the other positions in place). With neither: a plain KV cache, marked
    after each append.
    """

    def __init__(self, clock, cache=None, prefix=0, gathered=None, spans=None, dense=False):
        self.clock, self.cache, self.prefix, self.gathered, self.spans = clock, cache, prefix, gathered, spans
        self.dense = dense

    def reset(self):
        if self.cache is not None:
            self.cache.reset()

    def update(self, layer, k, v):
        if self.gathered is None:
            if self.prefix:
                self.cache.claim(layer, self.prefix)
            k, v = self.cache.update(layer, k, v)
            self.clock.mark()
            return k, v
        out = self.gathered if self.cache is None else self.cache.claim(layer, self.gathered.shape[1])
        tsp.put(out, self.spans, k, v)
        self.clock.mark()
        return split(out)


def _where(model):
    p = next(model.parameters())
    return p.device, p.dtype


TIMED = collections.Counter()                          # how the timed forwards ran (--graphs: replayed)


@torch.inference_mode()
def _time(model, n, kv, start, repeats, warmup, math_path=False):
    """Segment durations (L+1 floats, s) of a forward of n tokens at `start`: median of `repeats`."""
    tokens, runs = torch.randint(model.cfg.vocab_size, (1, n), device=_where(model)[0]), []
    for r in range(warmup + repeats):
        kv.reset()
        sync(tokens.device)
        kv.clock.mark()
        model(tokens, kv, start, last_only=True, math_path=math_path)   # every rank runs the LM head
        kv.clock.mark()
        d = kv.clock.read()
        if r >= warmup:
            runs.append(d)
            TIMED[getattr(model.forward, "ran", "eagerly")] += 1
    return [statistics.median(col) for col in zip(*runs)]


def _recording(model):
    """Untimed forwards that --graphs adds: eagerly or recorded, then recorded or replayed, so that
    every timed forward replays (profile_block's rounds re-record a shape that Segments evicted)."""
    return 2 * getattr(model, "graphs", False)


def profile_chunk(model, c, prefix, repeats=3, warmup=1):
    """One KV-Runahead rank: c tokens after a prefix of `prefix` tokens. L+1 segment times (s)."""
    (device, dtype), cfg = _where(model), model.cfg
    cache = KVCache(cfg, 1, prefix + c, dtype, device)
    for kv in cache.kv:                                # the prefix as received: random K/V
        kv[:, :prefix] = torch.randn_like(kv[:, :prefix])
    warmup += _recording(model)
    return _time(model, c, TimedKV(Clock(device), cache, prefix), prefix, repeats, warmup)


def profile_kvr(model, c, repeats=3, warmup=1):
    """Every rank of KV-Runahead with partition c: per rank, L+1 segment times (s)."""
    S = partition.prefix_sums(c)
    return [profile_chunk(model, ci, Si - ci, repeats, warmup) for ci, Si in zip(c, S)]


def profile_single(model, C, repeats=3, warmup=1):
    """One process prefilling C tokens: [L+1 segment times]; replay it as a chain of one rank."""
    return [profile_chunk(model, C, 0, repeats, warmup)]


def profile_tsp(model, C, p, zigzag=False, repeats=3, warmup=1, math_path=False):
    """Every rank of TSP (dense masked attention) or zigzag TSP: per rank, L+1 segment times (s).
    math_path: attention as plain tensor ops, scores and mask materialised (as transformers' eager
    attention computes it)."""
    (device, dtype), cfg = _where(model), model.cfg
    spans, emitter = tsp.tsp_layout(C, p, zigzag)
    gathered = torch.randn((1, C, 2, cfg.n_kv_heads, cfg.head_dim), dtype=dtype, device=device)
    out, warmup = [], warmup + _recording(model)      # the emitter records; the other ranks run eagerly
    for r, mine in enumerate(spans):
        cache = KVCache(cfg, 1, C, dtype, device) if r == emitter else None
        if cache is not None:                          # the other ranks' K/V, where the gather puts them
            for kv_ in cache.kv:
                kv_[:, :C] = gathered
        kv = TimedKV(Clock(device), cache, gathered=gathered, spans=mine, dense=not zigzag)
        out.append(_time(model, sum(n for _, n in mine), kv, mine, repeats, warmup, math_path))
    return out


KINDS = {"attention": ("flash", "fmha", "cudnn", "sdpa", "attention"),   # torch.profiler's kernel names,
         "GEMMs": ("gemm", "nvjet", "cutlass", "xmma", "cublas"),         # matched in this order
         "copies": ("copy", "memcpy", "memset")}


def breakdown(model, c, prefix, repeats=5):
    """Where a layer of one KV-Runahead rank goes on a GPU: c tokens after `prefix`, as profile_chunk
    runs them. Returns ms per layer: the layer's time (CUDA events, median of `repeats`), its kernels
    by kind (torch.profiler, the sum over `repeats` forwards / repeats / layers, so the LM head of
    one token counts too), "other kernels" (fused elementwise, norms, the cuDNN blocks' merge) and
    the gaps: the GPU idle, waiting for the host to launch."""
    device, dtype = _where(model)
    layer = statistics.median(profile_chunk(model, c, prefix, repeats, 2)[1:-1])
    cache = KVCache(model.cfg, 1, prefix + c, dtype, device)
    kv = TimedKV(Clock(device), cache, prefix)
    _time(model, c, kv, prefix, 1, 1)                  # --graphs: record them into this cache
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _time(model, c, kv, prefix, repeats, 0)
    out = {"layer": layer * 1e3, **{k: 0.0 for k in KINDS}, "other kernels": 0.0}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kind = next((k for k, words in KINDS.items() if any(w in e.name.lower() for w in words)), "other kernels")
            out[kind] += e.device_time / 1e3 / repeats / model.cfg.n_layers
    out["gaps"] = out["layer"] - sum(v for k, v in out.items() if k != "layer")
    return out


def measure_table(model, cs, prefixes, max_len=None, layers=None, repeats=5, warmup=1):
    """A sim.KernelTable: one rank profiled at every (c, P) with P + c <= max_len (default max(cs)).
    `layers`: how many layers its segments() give (default the model's; a 4-layer model can stand in
    for 32)."""
    (device, dtype), cfg = _where(model), model.cfg
    profile_chunk(model, max(cs), 0, 1, 1)             # wake the device up: clocks, libraries
    grid = {}
    for P in prefixes:
        for c in cs:
            if P + c <= (max_len or max(cs)):
                s = profile_chunk(model, c, P, repeats, warmup)
                grid[c, P] = (s[0], statistics.median(s[1:-1]), s[-1])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    meta = dict(cfg=asdict(cfg), dtype=str(dtype).split(".")[1], device=name, device_type=device.type,
                torch=torch.__version__, layers=layers or cfg.n_layers,
                bytes_per_token=bytes_per_token(cfg, dtype), repeats=repeats)
    return sim.KernelTable(grid, meta)


def simulate_kvr(model, c, links, devices=None, repeats=3):
    """Profile KV-Runahead's ranks for partition c, then replay them: what `mpirun runahead.py` would do."""
    return sim.replay_chain(profile_kvr(model, c, repeats), c, links, bytes_per_token(model.cfg, _where(model)[1]),
                        devices)


def simulate_tsp(model, C, p, links, zigzag=False, devices=None, repeats=3):
    """Profile TSP's ranks (or zigzag's), then replay them: what `mpirun tsp.py` would do."""
    spans, emitter = tsp.tsp_layout(C, p, zigzag)
    return sim.replay_allgather(profile_tsp(model, C, p, zigzag, repeats), [[n for _, n in s] for s in spans],
                                links, bytes_per_token(model.cfg, _where(model)[1]), emitter, devices)



def main(argv=None):
    ap = cli.Parser(description="Measure a sim.KernelTable: one KV-Runahead rank's segment "
                                             "times on a grid of (chunk, prefix)")
    ap.add_argument("--kernels", default="kernels.json", help="where to write the KernelTable")
    ap.add_argument("--model", default="llama7b", help="llama7b | falcon7b | builtin:llama | builtin:falcon")
    ap.add_argument("--dtype", default="float16", choices=["float32", "float64", "float16", "bfloat16"])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--layers", type=cli.at_least(2), default=4, help="layers of a 7B model to time (the table gives 32)")
    ap.add_argument("--cs", type=bench.ints(1), default=[128, 256, 512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--prefixes", type=bench.ints(0), default=[0, 1024, 2048, 4096, 8192, 12288])
    ap.add_argument("--repeats", type=cli.at_least(1), default=10, help="timed runs per grid point (median)")
    ap.add_argument("--fuse", action="store_true", help="compile each layer's pre and post (fast.compiled.fuse)")
    ap.add_argument("--graphs", action="store_true", help="--fuse, and each forward as CUDA graphs (fast/segments.py)")
    ap.add_argument("--breakdown", nargs="+", metavar="C:P", help="instead of the table: where a layer of C tokens "
                    "after P goes (GEMMs, attention, copies, other kernels, gaps), for each C:P")
    a = ap.parse_args(argv)
    if a.breakdown and a.device != "cuda":
        ap.error("--breakdown sorts a GPU's kernels: use --device cuda")
    t0 = time.perf_counter()
    small = None if a.model.startswith("builtin:") else a.layers
    m = dims_model(a.model, getattr(torch, a.dtype), a.device, small)
    m = fuse(m, graphs=a.graphs) if a.fuse or a.graphs else m
    if a.breakdown:
        rows = []
        for cp in a.breakdown:
            c, P = map(int, cp.split(":"))
            rows.append({"chunk": c, "prefix": P, **{k: f"{v:.3f}" for k, v in breakdown(m, c, P, a.repeats).items()}})
        how = ", fused" * (a.fuse or a.graphs) + ", CUDA graphs" * a.graphs
        print(f"ms per layer, {a.model} {a.dtype}{how}, on {torch.cuda.get_device_name()}")
        print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
        print("\n".join("| " + " | ".join(map(str, r.values())) + " |" for r in rows))
        return
    kt = measure_table(m, a.cs, a.prefixes, layers=small and DIMS[a.model]["n_layers"],
                       repeats=a.repeats)
    kt.save(a.kernels)
    print(f"wrote {a.kernels} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
