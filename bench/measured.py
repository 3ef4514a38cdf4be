"""Benchmarks measured on real hardware: every measured table in BENCHMARKS.md comes from one of these
commands (bench/simulated.py makes the simulated ones).

    python -m bench.measured single [--dims llama7b falcon7b] [--dtype bfloat16 float16] [--C 4096 8192 16384]
        one process on a GPU: our prefill, eager and fused, against transformers' own model, same
        run, same GPU; TTFT medians and MFU.
    python -m bench.measured decode [--dims llama7b] [--C 128] [--new 72] [--fuse]
        one process on a GPU: decode per token, the teaching loop against CUDA graphs, alternated.
    mpirun -n P python -m bench.measured ranks [--C 1024 2048 4096] [--model builtin:llama] [--device cpu]
        P real ranks: one process, TSP, TSP-zigzag, KVR-E, KVR-S and KVR-P (or --variants) on each
        context length, the variants alternated within each repeat; TTFT medians; optional per-rank traces.
    mpirun -n P python -m bench.measured share [--model dims:llama7b] [--C 16384]
        P ranks sharing one GPU: one process and the even chain, each run profiled on every rank;
        how long the GPU was busy, idle, and how many ranks' kernels were in flight at once.
    mpirun -n 2 python -m bench.measured link [--device cuda]
        the link between two ranks: GB/s of one message of 1 MiB .. 256 MiB on each route (direct
        if the MPI is CUDA-aware; staged through the node's shared pinned slots; staged-mpi: through
        MPI in private pinned buffers, the route between nodes); on a GPU, also its host link with
        every rank copying down or up at once (-n P: P ranks sharing one GPU, as bench.emulated runs them)
    python -m bench.measured merge RUN1.json RUN2.json ... --out FILE.json
        independent runs of `ranks` as one file; the medians over the runs, ratios with their range
    python -m bench.measured plot FILE.json ...
        the PNG plots of a results file (TTFT vs context, speedup over TSP, timelines).

Every command writes JSON with every raw figure (--out) and prints a table. Figures are medians over
--repeats after a warm-up.
"""
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections import defaultdict
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

import calibrate
import choose
import cli
import fast.decode
import generate
import partition
import runahead
import transport
import tsp
from bench import figures, plots
from fast.compiled import fuse
from fast.direct import DirectTransport
from fast.staged import StagedTransport, cuda_aware_mpi
from fast.trace import Trace, Traced
from generate import sync
from kvcache import KVCache, bytes_per_token
from load_weights import DIMS, dims_model
from model import Config
from program import abort_on_error, setup

try:
    import transformers                                # the oracle of `bench/measured.py single` only
except ImportError:
    transformers = None

PEAK = {"bfloat16": 989e12, "float16": 989e12}         # H100 SXM / H200 dense tensor-core FLOP/s (same compute)


def flops(cfg, C):
    """Prefill FLOPs with masked tiles skipped: 2 N_mm C + 2 L d C^2 (N_mm: the matmul
    parameters, L layers, d = heads x hs; Llama-2-7B: about 1.30e10 C + 2.62e5 C^2)."""
    d = cfg.dim
    per_layer = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * d
    per_layer += (3 if cfg.arch == "llama" else 2) * d * cfg.ffn_dim
    return 2 * cfg.n_layers * per_layer * C + 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * C * C


LAUNCHERS = {"mpirun", "mpiexec", "mpiexec.hydra", "orterun", "prterun"}


def launch_command():
    """The command line that started this job, as typed: the nearest ancestor process that is an MPI
    launcher (mpirun's own options included), else this process's."""
    pid = os.getpid()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [x.decode() for x in f.read().split(b"\0")[:-1]]
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        if argv and os.path.basename(argv[0]) in LAUNCHERS:
            return shlex.join(argv)
    return shlex.join(["python", *sys.argv])


def machine():
    """What a results file's meta records: the hardware, the versions, the full command."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(host=platform.node(), cpus=len(os.sched_getaffinity(0)), gpu=gpu, torch=torch.__version__,
                cudnn=torch.backends.cudnn.version(), transformers=getattr(transformers, "__version__", None),
                mpi=transport.MPI.Get_library_version().splitlines()[0].strip("\x00"), command=launch_command())


def save(path, meta, rows):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with cli.replace_whole(path) as tmp, open(tmp, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {path}")


def spread(xs, fmt, ranged=True):
    """The median of independent runs' values, and their range when there are several:
    '1.53 (1.50-1.56)'."""
    if not xs:
        return "-"
    m = fmt.format(statistics.median(xs))
    return m + (f" ({fmt.format(min(xs))}-{fmt.format(max(xs))})" if ranged and len(xs) > 1 else "")


def order(keys, r):
    """Round r's order of keys, a Williams design: over n rounds (2n for an odd n) each key runs
    equally often in every position and right after every other key. A rotation would keep each
    key's predecessor fixed, so a variant that slows the next one (on the shared H200, a KV-Runahead
    run slowed the one after it by up to 2%) would bias one key only."""
    n = len(keys)
    row = [keys[(r + (j + 1) // 2 if j % 2 else r - j // 2) % n] for j in range(n)]   # r, r+1, r-1, r+2, ...
    return row[::-1] if n % 2 and r // n % 2 else row


def table(rows, cols):
    """Print rows (dicts) as a Markdown table of the given columns."""
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


# ----------------------------------------------------------------------------- one GPU

def hf_twin(name, dtype):
    """transformers' own model with the same dims as load_weights.dims_model(name), random weights, SDPA."""
    if transformers is None:
        raise SystemExit("bench/measured.py single compares with transformers: pip install -r requirements-test.txt "
                         "(or pass --no-hf)")
    if name == "llama7b":
        cfg, cls = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                               max_position_embeddings=16384), transformers.LlamaForCausalLM
    else:
        cfg, cls = transformers.FalconConfig(vocab_size=65024, hidden_size=4544, num_hidden_layers=32,
                                num_attention_heads=71, multi_query=True, parallel_attn=True,
                                max_position_embeddings=16384), transformers.FalconForCausalLM
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        return cls._from_config(cfg, dtype=dtype).eval()


def gpu_time(fn, repeats):
    """Median seconds of fn() over `repeats` after one warm-up, by CUDA events; None if out of memory."""
    try:
        fn()
        ts = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        return ts
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def single(a):
    """Our one-process prefill, eager then fused, and transformers' on the same GPU in the same run
    (one after another: each holds its own 7B model). --rows FILE prints a run's tables again."""
    if a.rows:
        with open(a.rows) as f:
            return single_tables(json.load(f)["rows"])
    rows = []

    def measure(name, dt, impl, model, call):
        for C in a.C:
            tok = torch.randint(model.config.vocab_size if impl == "transformers" else model.cfg.vocab_size,
                                (1, C), device="cuda")
            ts = gpu_time(lambda: call(tok), a.repeats)
            t, F = (statistics.median(ts) if ts else None), flops(cfg, C)
            rows.append(dict(model=name, dtype=dt, C=C, impl=impl, ttft_s=t, raw_s=ts,
                             tflops=F / t / 1e12 if t else None, mfu=F / t / PEAK[dt] if t else None,
                             source="measured", note="" if ts else "out of memory"))
            print(f"{name} {dt} C={C} {impl}: " + (f"{t * 1e3:.1f} ms, {F / t / 1e12:.0f} TFLOP/s, "
                                                    f"MFU {F / t / PEAK[dt]:.1%}" if t else "out of memory"), flush=True)

    for name in a.dims:
        cfg = Config(**DIMS[name])
        for dt in a.dtype:
            dtype = getattr(torch, dt)
            if a.hf:                                    # alone on the GPU: it needs the memory
                hf = hf_twin(name, dtype)
                measure(name, dt, "transformers", hf, torch.inference_mode()(
                    lambda tok: hf(tok, use_cache=True, logits_to_keep=1).logits.argmax()))
                del hf
                torch.cuda.empty_cache()
            ours = dims_model(name, dtype, "cuda")
            cache = KVCache(cfg, 1, max(a.C), dtype, "cuda")

            @torch.inference_mode()
            def prefill(tok):
                cache.reset()
                ours(tok, cache, 0, last_only=True).argmax()

            measure(name, dt, "ours eager", ours, prefill)
            measure(name, dt, "ours fused", fuse(ours), prefill)
            ours = cache = None
            torch.cuda.empty_cache()
    save(a.out, dict(machine(), peak_flops=PEAK), rows)
    single_tables(rows)


def single_tables(rows):
    """`single`'s tables: per (model, dtype, C) each implementation's TTFT with the interquartile
    range of its repeats, fused MFU and the speed-up over transformers; then Falcon over Llama."""
    t = {(r["model"], r["dtype"], r["C"], r["impl"]): r for r in rows}

    def ms(r):
        if not r or not r["ttft_s"]:
            return "out of memory"
        q = statistics.quantiles(r["raw_s"], n=4) if len(r["raw_s"]) > 1 else [r["ttft_s"]] * 3
        return f"{r['ttft_s'] * 1e3:.1f} ms ({q[0] * 1e3:.1f}-{q[2] * 1e3:.1f})"

    out = []
    for m, dt, C in dict.fromkeys(k[:3] for k in t):
        hf, fused = t.get((m, dt, C, "transformers")), t[m, dt, C, "ours fused"]
        out.append({"model": m, "dtype": dt, "C": C, "transformers": ms(hf), "ours eager": ms(t[m, dt, C, "ours eager"]),
                    "ours fused": ms(fused), "fused MFU": f"{fused['mfu']:.1%}",
                    "fused vs transformers": f"{hf['ttft_s'] / fused['ttft_s']:.2f}x" if hf and hf["ttft_s"] else "-"})
    table(out, list(out[0]))
    pairs = [(dt, C) for m, dt, C, i in t if m == "falcon7b" and i == "ours fused" and ("llama7b", dt, C, i) in t]
    if pairs:
        print()
        table([{"dtype": dt, "C": C, "Falcon fused / Llama fused": f"{t['falcon7b', dt, C, 'ours fused']['ttft_s'] / t['llama7b', dt, C, 'ours fused']['ttft_s']:.3f}"}
               for dt, C in pairs], ["dtype", "C", "Falcon fused / Llama fused"])


def bandwidth(device, nbytes=1 << 30, repeats=5):
    """The device's memory bandwidth as measured, bytes/s: an nbytes tensor copied into another on the
    same device, best of `repeats` after a warm-up, each copy reading and writing nbytes."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst, best = src.clone(), float("inf")              # the clone: the warm-up
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def read_once(model, bw):
    """Bytes of the model's weights and seconds to read them once at bw bytes/s: a decode step's
    lower bound (it reads every weight)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights, weights / bw


def decode_bench(a):
    """Decode on one process, per output token: the teaching loop (generate.decode, graphs=False) and
    fast/decode.py's static steps, eager and as CUDA graphs, alternated in each repeat after the same
    prefill, against reading the weights once at the GPU's bandwidth, measured (`bandwidth`). The
    graphs' tokens are checked torch.equal to the eager static steps' (the same kernels), and compared
    with the teaching loop's. --fuse adds both static ways on a second copy of the model (the same
    weights) with each layer's pre and post compiled (fast/compiled.py), alternated with the rest;
    --compile adds both with the whole step compiled as one graph (fast.decode.decode's `compiled`),
    and with --fuse too, both compiled whole over the fused copy (its matmuls merged)."""
    rows, bw = [], bandwidth("cuda")
    for name in a.dims:
        cfg, dtype = Config(**DIMS[name]), getattr(torch, a.dtype)
        model = dims_model(name, dtype, "cuda")
        cache = KVCache(cfg, 1, a.C + a.new, dtype, "cuda")
        prompt = torch.randint(3, cfg.vocab_size, (1, a.C), device="cuda")
        weights, bound = read_once(model, bw)
        n = a.new - 1
        ways = {"teaching loop": lambda tok: generate.decode(model, tok, cache, n, graphs=False),
                "static eager": lambda tok: fast.decode.decode(model, tok, cache, n, graphs=False),
                "CUDA graphs": lambda tok: fast.decode.decode(model, tok, cache, n, graphs=True)}
        if a.fuse:                                     # compiled on the first (warm-up) repeat
            fused = fuse(dims_model(name, dtype, "cuda"))
            ways["static eager, fused"] = lambda tok: fast.decode.decode(fused, tok, cache, n, graphs=False)
            ways["CUDA graphs, fused"] = lambda tok: fast.decode.decode(fused, tok, cache, n, graphs=True)
        if a.compile:                                  # the whole step one graph, compiled on first use
            ways["static eager, compiled"] = lambda tok: fast.decode.decode(model, tok, cache, n, graphs=False,
                                                                           compiled=True)
            ways["CUDA graphs, compiled"] = lambda tok: fast.decode.decode(model, tok, cache, n, graphs=True,
                                                                          compiled=True)
        if a.compile and a.fuse:                       # the whole step compiled over the merged matmuls
            for how, graphs in (("static eager", False), ("CUDA graphs", True)):
                ways[how + ", fused, compiled"] = lambda tok, g=graphs: fast.decode.decode(fused, tok, cache, n,
                                                                                         graphs=g, compiled=True)
        times, toks = defaultdict(list), {}
        with torch.inference_mode():
            for _ in range(1 + a.repeats):             # the first repeat warms up and is not counted
                for way, run in ways.items():
                    cache.reset()
                    tok = model(prompt, cache, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)
                    sync("cuda")
                    t0 = time.perf_counter()
                    toks[way] = run(tok)
                    sync("cuda")
                    times[way].append((time.perf_counter() - t0) / n)
        same = all(torch.equal(toks["CUDA graphs" + how], toks["static eager" + how])
                   for how, on in (("", True), (", fused", a.fuse), (", compiled", a.compile),
                                   (", fused, compiled", a.fuse and a.compile)) if on)
        agree = int((toks["CUDA graphs"] == toks["teaching loop"]).cumprod(1).sum())
        for way in ways:
            ms = statistics.median(times[way][1:]) * 1e3
            rows.append(dict(model=name, dtype=a.dtype, C=a.C, new=a.new, way=way, ms_per_token=ms,
                             raw_s=times[way][1:], bound_ms=bound * 1e3, measured_GBps=bw / 1e9,
                             graphs_equal_eager=same, tokens_as_teaching=agree))
            print(f"{name} {a.dtype} {a.C}+{a.new}: {way}: {ms:.2f} ms per token (median of {a.repeats})", flush=True)
        print(f"{name}: weights {weights / 1e9:.2f} GB, read once at {bw / 1e9:.0f} GB/s (measured, a "
              f"device-to-device copy): {bound * 1e3:.2f} ms; CUDA graphs' tokens torch.equal to the static steps' "
              f"eager: {same}; first {agree} of {a.new} tokens as the teaching loop's", flush=True)
        model = cache = fused = None
        torch.cuda.empty_cache()
    save(a.out, machine(), rows)


# ----------------------------------------------------------------------------- real ranks

def random_prompt(job, C):
    """C random token ids (none of the first 3, the special ids), seeded by C: the same on every rank."""
    return torch.randint(3, job.model.cfg.vocab_size, (1, C),
                         generator=torch.Generator().manual_seed(C)).to(job.device)


def one_process(job):
    """The prompt prefilled by the last rank alone; the others wait politely (a rank spinning in MPI
    beside it would slow it: caches, memory, SMT). Returns the last rank's seconds, 0 elsewhere."""
    job.transport.barrier()
    t, last = 0.0, job.rank == job.size - 1
    if last:
        cache = KVCache(job.model.cfg, 1, job.tokens.shape[1], job.dtype, job.device)
        sync(job.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            job.model(job.tokens, cache, 0, last_only=True)[0, -1].argmax().item()
        t = time.perf_counter() - t0
    polite, job.transport.polite = job.transport.polite, job.transport.polite or not last
    job.transport.barrier()
    job.transport.polite = polite
    return t


VARIANTS = ["one process", "TSP", "TSP-zigzag", "KVR-E", "KVR-S", "KVR-P"]


def ranks(a):
    """All variants (or --variants) on the same real ranks, alternated; rank 0 prints and saves. The
    meta says which route ran and what the ranks saw of an MPS share (bench/emulated.py sets one)."""
    args = cli.program("").parse_args(["--model", a.model, "--prompt-len", str(max(a.C)), "--dtype", a.dtype,
                                       "--device", a.device, "--max-new-tokens", "1"]
                                      + ["--threads", str(a.threads)] * bool(a.threads) + ["--fuse"] * a.fuse)
    job = setup(args)
    comm, p, rows = job.comm, job.size, []
    with abort_on_error(comm):
        searched, chosen = {}, {}
        search = {"KVR-S", "KVR-P"} & set(a.variants)   # the variants that need a searched partition
        for C in sorted(a.C, reverse=True) if search else ():   # KVR-S first (KVR-P interpolates them);
                                                                # the largest C calibrates the cost model
            job.tokens = random_prompt(job, C)
            calibrate.pick_partition(job, "searched")
            timed = a.live_span or job.c_modelled       # prefills time the pick: by slots that fit any
            if timed and job.system and job.system.staged:   # message, as the runs' do
                job.transport.reserve(max(a.C) * bytes_per_token(job.model.cfg, job.dtype))
            if a.live_span:                             # by measured TTFT near that pick, into the table
                near = job.c_source                     # (runahead.py --search-live --search-span)
                calibrate.live_search(job, SimpleNamespace(search_steps=4, search_levels=2, search_span=a.live_span,
                                                           repeats=a.repeats), runahead.prefill)
                calibrate.pick_partition(job, "searched")
                job.c_source = f"live search within {a.live_span} tokens of: {near}"
            elif job.c_modelled:                        # as runahead.py runs it: timed against even
                calibrate.versus_even(job, runahead.prefill)
            searched[C], chosen[C] = job.c, job.c_source
        for C in a.C:
            job.tokens = random_prompt(job, C)
            parts = {"KVR-E": partition.even(C, p), "KVR-S": searched.get(C)}
            if len(a.C) > 1 and search:                 # KVR-P: predicted without C's own entry
                others = partition.Table()
                for K in a.C:
                    if K != C:
                        others.add(job.model_key, searched[K])
                parts["KVR-P"] = partition.predicted(C, p, others, job.model_key, choose.alignment(job.device.type))

            variants = {"one process": (lambda: one_process(job), p - 1),
                        "TSP": (lambda: tsp.prefill(job, False)[2], p - 1)}
            if C >= 2 * p:
                variants["TSP-zigzag"] = (lambda: tsp.prefill(job, True)[2], 0)
            for v, c in parts.items():
                variants[v] = ((lambda c=c: runahead.prefill(job, c)[2]), p - 1)
            variants = {v: f for v, f in variants.items() if v in a.variants}
            times = {v: [] for v in variants}
            names = list(variants)
            for r in range(a.repeats + 1):              # repeat 0 warms up; then balanced orders
                for v in order(names, r):
                    fn, emitter = variants[v]
                    t = fn()
                    job.transport.finish()
                    t = comm.bcast(t, root=emitter)
                    if r:
                        times[v].append(t)
                if r == 0 and job.system:               # the staged route's slots, as runahead.py has them
                    job.system.reserve()
            if a.trace_dir and C == max(a.C):           # one traced run of TSP, zigzag and KVR-S
                os.makedirs(a.trace_dir, exist_ok=True)
                inner, trace = job.transport, Trace(job.rank, job.device, True)
                kept, inner.trace, job.transport = getattr(inner, "trace", None), trace, Traced(inner, trace)
                for v in [v for v in ("TSP", "TSP-zigzag", "KVR-S") if v in variants]:
                    job.transport.reset_stats()         # the next barrier starts the trace
                    variants[v][0]()
                    job.transport.finish()
                    if job.rank == variants[v][1]:
                        job.transport.head()
                    trace.write(comm, os.path.join(a.trace_dir, f"trace-{v}-p{p}-C{C}.json"))
                job.transport, inner.trace = inner, kept
            link = job.transport.path + ("" if job.device.type == "cpu" else "; one GPU shared")
            for v in names:
                rows.append(dict(model=job.model_key, C=C, p=p, variant=v, ttft_s=statistics.median(times[v]),
                                 raw_s=times[v], partition=parts.get(v), source="measured", link=link,
                                 chosen=chosen[C] if v == "KVR-S" else None))   # how the search picked it
            if job.rank == 0:
                tsp_t = statistics.median(times["TSP"]) if "TSP" in times else None
                print(f"C={C}: " + ", ".join(f"{v} {statistics.median(times[v]) * 1e3:.1f} ms" + (
                    f" (x{tsp_t / statistics.median(times[v]):.2f})" if tsp_t else "") for v in names), flush=True)
    if job.rank == 0:
        meta = dict(machine(), ranks=p,
                    model=job.name, model_arg=a.model, model_key=job.model_key, dtype=a.dtype,
                    device=a.device, threads=torch.get_num_threads(),
                    repeats=a.repeats, fused=a.fuse, variants=a.variants,
                    route={DirectTransport: "direct", StagedTransport: "staged"}.get(type(job.transport), "host"),
                    mps_share=os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),   # as the ranks saw them
                    sms=torch.cuda.get_device_properties(job.device).multi_processor_count
                    if job.device.type == "cuda" else None)
        save(a.out, meta, rows)
        tsp_t = {r["C"]: r["ttft_s"] for r in rows if r["variant"] == "TSP"}
        table([dict(r, ttft_ms=f"{r['ttft_s'] * 1e3:.1f}",
                    speedup=f"{tsp_t[r['C']] / r['ttft_s']:.2f}" if r["C"] in tsp_t else "-",
                    partition=",".join(map(str, r["partition"])) if r["partition"] else "")
               for r in rows], ["C", "p", "variant", "ttft_ms", "speedup", "partition"])


def covered(spans):
    """The time that (start, end) spans cover, overlaps counted once."""
    total, reach = 0, float("-inf")
    for start, end in sorted(spans):
        total += max(0, end - max(start, reach))
        reach = max(reach, end)
    return total


def gpu_spans(prof):
    """(kind, start_ns, end_ns) of a profile's GPU activities (kernel, copy HtoD/DtoH/DtoD/PtoP, memset)
    and of its "go" mark, all on the profiler's clock, which the ranks of one machine share."""
    spans = []
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if name == "go":
            spans.append(("go", e.start_ns(), e.end_ns()))
        elif e.device_type() == torch.autograd.DeviceType.CUDA:
            kind = ("copy " + name.split()[1] if name.startswith("Memcpy") else
                    "memset" if name.startswith("Memset") else "kernel")
            spans.append((kind, e.start_ns(), e.end_ns()))
    return spans


def shared(spans_by_rank):
    """One profiled run of every rank: how long from the first "go" to the last GPU activity (window),
    how much of it some rank kept the GPU busy, and each rank's kernel and copy time. On one GPU
    without MPS the contexts are time-sliced: a kernel whose context is switched out stays in flight,
    so the ranks' busy times add up to more than the window."""
    t0 = min(s for spans in spans_by_rank for k, s, e in spans if k == "go")
    gpu = [[(k, s, e) for k, s, e in spans if k != "go"] for spans in spans_by_rank]
    t1 = max(e for spans in gpu for k, s, e in spans)
    per = []
    for spans in gpu:
        kinds = defaultdict(int)
        for k, s, e in spans:
            kinds[k] += e - s
        per.append(dict(busy_ms=covered([(s, e) for k, s, e in spans]) / 1e6,
                        **{k.replace(" ", "_") + "_ms": v / 1e6 for k, v in sorted(kinds.items())}))
    busy = covered([(s, e) for spans in gpu for k, s, e in spans]) / 1e6
    return dict(window_ms=(t1 - t0) / 1e6, busy_ms=busy, idle_ms=(t1 - t0) / 1e6 - busy,
                in_flight=sum(r["busy_ms"] for r in per) / busy,
                copy_ms=sum(v for r in per for k, v in r.items() if k.startswith("copy")), ranks=per)


def share(a):
    """Where the time goes when ranks share one GPU: one process and the even chain, alternated,
    each run profiled on every rank (torch.profiler: CUPTI's kernel and copy spans), merged on one
    clock. Idle time is the host's (launches, waits); time-slicing shows as spans in flight at once."""
    args = cli.program("").parse_args(["--model", a.model, "--prompt-len", str(a.C), "--dtype", a.dtype,
                                       "--device", "cuda", "--max-new-tokens", "1"])
    job = setup(args)
    comm, rows = job.comm, []
    with abort_on_error(comm):
        job.tokens = random_prompt(job, a.C)

        def chain():
            runahead.prefill(job, partition.even(a.C, job.size))
            job.transport.finish()
            job.transport.barrier()

        variants = {"one process": lambda: one_process(job), "KVR-E": chain}
        for r in range(a.repeats + 1):                  # repeat 0 warms up, unprofiled
            for v in order(list(variants), r):
                if not r:
                    variants[v]()
                    continue
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    job.transport.barrier()
                    with torch.profiler.record_function("go"):
                        pass
                    variants[v]()
                    sync(job.device)
                spans = comm.gather(gpu_spans(prof), root=0)
                if job.rank == 0:
                    rows.append(dict(variant=v, repeat=r, **shared(spans)))
    if job.rank == 0:
        save(a.out, dict(machine(), ranks=job.size, model=job.name, model_key=job.model_key, C=a.C,
                         dtype=a.dtype, route=job.transport.path), rows)
        table([dict(r, **{k: f"{r[k]:.1f}" for k in ("window_ms", "busy_ms", "idle_ms", "copy_ms")},
                    in_flight=f"{r['in_flight']:.2f}") for r in rows],
              ["variant", "repeat", "window_ms", "busy_ms", "idle_ms", "in_flight", "copy_ms"])


def merge(a):
    """Independent runs of `ranks` (separate jobs) as one results file, every row with its run, and
    their table: per variant the median of the runs' medians, and ratios with their range over runs."""
    rows, metas = [], []
    for run, path in enumerate(a.files, 1):
        with open(path) as f:
            d = json.load(f)
        metas.append(dict(d["meta"], file=path))
        rows += [dict(r, run=run) for r in d["rows"]]
    save(a.out, dict(runs=metas), rows)
    t, parts = defaultdict(list), defaultdict(list)
    for r in rows:
        t[r["C"], r["p"], r["variant"]].append(r["ttft_s"] * 1e3)
        parts[r["C"], r["p"], r["variant"]].append(",".join(map(str, r["partition"] or [])))
    table([dict(C=C, p=p, variant=v, ttft_ms=spread(xs, "{:.1f}"),
                tsp_over=spread([x / y for x, y in zip(t[C, p, "TSP"], xs)], "{:.2f}"),
                one_over=spread([x / y for x, y in zip(t[C, p, "one process"], xs)], "{:.2f}"),
                partition=" / ".join(dict.fromkeys(parts[C, p, v])))
           for (C, p, v), xs in t.items()], ["C", "p", "variant", "ttft_ms", "tsp_over", "one_over", "partition"])


# ----------------------------------------------------------------------------- the link

KV_MARKS = {(n, C): bytes_per_token(Config(**DIMS[n]), torch.float16) * C     # one layer's K/V, fp16
            for n in DIMS for C in (4096, 16384)}


def link(a):
    """Rank 0 sending to rank 1, on every route this MPI offers (on GPUs: direct if it is
    CUDA-aware, and staged). Latency: half a round trip of 1 byte. Bandwidth, as osu_bw measures
    it: --window messages of one size sent back to back, then a 1-byte reply; one message's time is
    (that time - the latency) / window, GB/s = size / that. Medians of --repeats. Further ranks only
    wait; on a GPU, host_link then times all of them at once."""
    comm, device = transport.init(a.device)
    if comm.size < 2:
        raise SystemExit("bench/measured.py link needs at least 2 ranks: mpirun -n 2 python -m bench.measured link")
    staged = {"staged": StagedTransport, "staged-mpi": StagedTransport}
    routes = {"host": transport.Transport} if device.type == "cpu" else staged
    if device.type == "cuda" and cuda_aware_mpi():
        routes = {"direct": DirectTransport, **routes}
    rows = []
    for route, Route in routes.items():
        t = Route(comm, device, polite=False)
        if route == "staged":                          # the node's shared slots, as prefill has them
            t.reserve(max(a.mib) << 20)

        def timed(n, window):
            x, ts = torch.ones(n, dtype=torch.uint8, device=device), []
            for r in range(a.repeats + 1):             # the first warms up: buffers, IPC handles
                t.barrier()
                t0 = time.perf_counter()
                if comm.rank == 0:
                    for w in range(window):
                        t.isend(x, 1, tag=w)
                    t.finish()
                    t.recv((1,), torch.uint8, 1, tag=window)
                elif comm.rank == 1:
                    for w in range(window):
                        t.recv((n,), torch.uint8, 0, tag=w)
                    sync(device)                       # the bytes are where a kernel can read them
                    t.isend(x[:1], 0, tag=window)
                    t.finish()
                if r:
                    ts.append(time.perf_counter() - t0)
            return statistics.median(ts)

        latency = timed(1, 1) / 2
        for mib in a.mib:
            one = (timed(mib << 20, a.window) - latency) / a.window
            marks = [f"{n} K/V of {C // 1024}k tokens" for (n, C), b in KV_MARKS.items() if b == mib << 20]
            rows.append(dict(route=route, path=t.path, MiB=mib, GBps=(mib << 20) / one / 1e9, one_way_ms=one * 1e3,
                             latency_us=latency * 1e6, window=a.window, note=", ".join(marks)))
            if comm.rank == 0:
                print(f"{route} {mib} MiB: {rows[-1]['GBps']:.1f} GB/s", flush=True)
    if device.type == "cuda":
        rows += host_link(comm, device, a.mib, a.repeats)
    if comm.rank == 0:
        save(a.out, dict(machine(), repeats=a.repeats, window=a.window), rows)
        table([dict(r, GBps=f"{r['GBps']:.1f}", one_way_ms=f"{r['one_way_ms']:.3f}",
                    latency_us=f"{r['latency_us']:.1f}" if "latency_us" in r else "") for r in rows],
              ["route", "MiB", "GBps", "one_way_ms", "latency_us", "note"])


def host_link(comm, device, mib, repeats):
    """The GPU's host link as ranks sharing one GPU share it: every rank copies the same bytes down
    (device to pinned host memory) or up, all at once from a barrier; the time is the slowest rank's,
    GB/s that of all the ranks' bytes together. The staged all-gather does just this (fast/staged.py):
    each rank's part down, then every rank the others' parts up."""
    rows = []
    for n in mib:
        host = torch.empty(n << 20, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(n << 20, dtype=torch.uint8, device=device)
        for route, dst, src in (("host down", host, dev), ("host up", dev, host)):
            ts = []
            for r in range(repeats + 1):               # the first warms up
                sync(device)
                comm.Barrier()
                t0 = time.perf_counter()
                dst.copy_(src, non_blocking=True)
                sync(device)
                ts.append(comm.allreduce(time.perf_counter() - t0, op=transport.MPI.MAX))
            one = statistics.median(ts[1:])
            rows.append(dict(route=route, path=f"the GPU's host link, {comm.size} ranks copying at once",
                             MiB=n * comm.size, GBps=n * comm.size * 2**20 / one / 1e9, one_way_ms=one * 1e3,
                             ranks=comm.size, note=f"{n} MiB a rank"))
            if comm.rank == 0:
                print(f"{route}, {comm.size} ranks at once, {n} MiB each: {rows[-1]['GBps']:.1f} GB/s", flush=True)
    return rows


# ----------------------------------------------------------------------------- plots

def plot(a):
    for path in a.files:
        with open(path) as f:
            rows = plots.over_runs(json.load(f)["rows"])
        stem = os.path.splitext(path)[0]
        if rows and "variant" in rows[0]:
            plots.plot_ttft(rows, stem + "-ttft.png")
            plots.plot_speedup(rows, stem + "-speedup.png")
            print(f"wrote {stem}-ttft.png, {stem}-speedup.png")
    if a.traces:
        figures.plot_timeline(a.traces, [os.path.basename(t) for t in a.traces], a.timeline)
        print(f"wrote {a.timeline}")


def main(argv=None):
    ap = cli.Parser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("single", help="one process on a GPU: ours vs transformers")
    s.add_argument("--dims", nargs="+", default=["llama7b", "falcon7b"], choices=["llama7b", "falcon7b"])
    s.add_argument("--dtype", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"])
    s.add_argument("--C", nargs="+", type=cli.at_least(1), default=[4096, 8192, 16384])
    s.add_argument("--repeats", type=cli.at_least(1), default=5)
    s.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers")
    s.add_argument("--out", default="results/single.json")
    s.add_argument("--rows", help="print the tables of this results file instead of measuring")
    d = sub.add_parser("decode", help="one process on a GPU: decode per token, teaching loop vs CUDA graphs")
    d.add_argument("--dims", nargs="+", default=["llama7b"], choices=["llama7b", "falcon7b"])
    d.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    d.add_argument("--C", type=cli.at_least(1), default=128, help="prompt tokens")
    d.add_argument("--new", type=cli.at_least(3), default=72, help="new tokens (the first from the prefill)")
    d.add_argument("--repeats", type=cli.at_least(1), default=5)
    d.add_argument("--fuse", action="store_true", help="also the static steps with pre/post compiled")
    d.add_argument("--compile", action="store_true", help="also the static steps each compiled whole")
    d.add_argument("--out", default="results/decode.json")
    r = sub.add_parser("ranks", help="real ranks under mpirun: every variant, alternated")
    r.add_argument("--model", default="builtin:llama")
    r.add_argument("--C", nargs="+", type=cli.at_least(1), default=[1024, 2048, 4096])
    r.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    r.add_argument("--threads", type=cli.at_least(1))
    r.add_argument("--fuse", action="store_true", help="compile each layer's pre/post (GPU)")
    r.add_argument("--repeats", type=cli.at_least(1), default=5)
    r.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS, help="which to run (default all)")
    r.add_argument("--trace-dir", help="also write one traced TSP, zigzag and KVR-S run at the largest C here")
    r.add_argument("--live-span", type=cli.at_least(1), metavar="TOKENS", help="KVR-S searched by measured "
                   "TTFT within TOKENS of the cost model's pick (runahead.py --search-live --search-span)")
    r.add_argument("--out", default="results/ranks.json")
    sh = sub.add_parser("share", help="ranks sharing one GPU: where the time goes (GPU busy, idle, in flight)")
    sh.add_argument("--model", default="dims:llama7b")
    sh.add_argument("--C", type=cli.at_least(1), default=16384)
    sh.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    sh.add_argument("--repeats", type=cli.at_least(1), default=2)
    sh.add_argument("--out", default="results/share.json")
    lk = sub.add_parser("link", help="rank 0 to rank 1: GB/s of one message, 1 MiB .. 256 MiB, each route; "
                        "on a GPU its host link, every rank copying at once")
    lk.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    lk.add_argument("--mib", nargs="+", type=cli.at_least(1), default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    lk.add_argument("--window", type=cli.at_least(1), default=8, help="messages sent back to back per timing")
    lk.add_argument("--repeats", type=cli.at_least(1), default=10)
    lk.add_argument("--out", default="results/link.json")
    mg = sub.add_parser("merge", help="independent runs of `ranks` as one file, and their table")
    mg.add_argument("files", nargs="+")
    mg.add_argument("--out", required=True)
    pl = sub.add_parser("plot", help="PNG plots of results files")
    pl.add_argument("files", nargs="*")
    pl.add_argument("--traces", nargs="*", help="trace JSON files to draw as one timeline figure")
    pl.add_argument("--timeline", default="results/timeline.png")
    a = ap.parse_args(argv)
    if a.cmd == "ranks" and a.live_span and not {"KVR-S", "KVR-P"} & set(a.variants):
        ap.error("--live-span searches KVR-S's partition: --variants has neither KVR-S nor KVR-P")
    if a.cmd == "ranks" and a.trace_dir and not {"TSP", "TSP-zigzag", "KVR-S"} & set(a.variants):
        ap.error("--trace-dir traces TSP, TSP-zigzag and KVR-S: --variants has none of them")
    {"single": single, "decode": decode_bench, "ranks": ranks, "share": share, "merge": merge, "link": link,
     "plot": plot}[a.cmd](a)


if __name__ == "__main__":
    main()
