"""Benchmarks: every table in BENCHMARKS.md comes from one of these commands.

    python bench.py single [--dims llama7b falcon7b] [--dtype bfloat16 float16] [--C 4096 8192 16384]
        one process on a GPU: our prefill, eager and fused, against transformers' own model, same
        run, same GPU; TTFT medians and MFU.
    mpirun -n P python bench.py ranks [--C 1024 2048 4096] [--model builtin:llama] [--device cpu]
        P real ranks: one process, TSP, TSP-zigzag, KVR-E, KVR-S and KVR-P on each context length,
        the variants alternated within each repeat; TTFT medians; optional per-rank traces.
    python bench.py plot FILE.json ...
        the PNG plots of a results file (TTFT vs context, speedup over TSP, timelines).

Every command writes JSON with every raw figure (--out) and prints a table. Figures are medians over
--repeats after a warm-up; ratios come from variants measured side by side in one run.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PEAK = {"bfloat16": 989e12, "float16": 989e12}         # H100 SXM dense tensor-core FLOP/s


def flops(cfg, C):
    """Prefill FLOPs with masked tiles skipped: 2 N_mm C + 2 L d C^2 (paper.md §4), d = heads x hs."""
    d = cfg.dim
    per_layer = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * d
    per_layer += (3 if cfg.arch == "llama" else 2) * d * cfg.ffn_dim
    return 2 * cfg.n_layers * per_layer * C + 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * C * C


def machine():
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(host=platform.node(), cpus=len(os.sched_getaffinity(0)), gpu=gpu, torch=torch.__version__)


def save(path, meta, rows):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {path}")


def table(rows, cols):
    """Print rows (dicts) as a Markdown table of the given columns."""
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


# ----------------------------------------------------------------------------- one GPU

def hf_twin(name, dtype):
    """transformers' own model with the same dims as sim.dims_model(name), random weights, SDPA."""
    from transformers import FalconConfig, FalconForCausalLM, LlamaConfig, LlamaForCausalLM
    if name == "llama7b":
        cfg, cls = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                               max_position_embeddings=16384), LlamaForCausalLM
    else:
        cfg, cls = FalconConfig(vocab_size=65024, hidden_size=4544, num_hidden_layers=32,
                                num_attention_heads=71, multi_query=True, parallel_attn=True,
                                max_position_embeddings=16384), FalconForCausalLM
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
    """Our one-process prefill, eager then fused, and transformers' on the same GPU in the same run."""
    from kvcache import KVCache
    from model import Config
    from sim import DIMS, dims_model
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
            measure(name, dt, "ours fused", ours.fuse(), prefill)
            ours = cache = None
            torch.cuda.empty_cache()
    save(a.out, dict(machine(), command=" ".join(sys.argv), peak_flops=PEAK), rows)
    table([dict(r, ttft_ms=f"{r['ttft_s'] * 1e3:.1f}" if r["ttft_s"] else "OOM",
                mfu=f"{r['mfu']:.1%}" if r["mfu"] else "-") for r in rows],
          ["model", "dtype", "C", "impl", "ttft_ms", "mfu"])


# ----------------------------------------------------------------------------- real ranks

def ranks(a):
    """All variants on the same real ranks, alternated; rank 0 prints and saves."""
    from mpi4py import MPI

    import partition
    import runahead
    import tsp
    from comm import abort_on_error, setup
    from model import sync

    comm = MPI.COMM_WORLD
    args = argparse.Namespace(model=a.model, prompt=None, prompt_ids=None, prompt_len=max(a.C),
                              dtype=a.dtype, device=a.device, max_new_tokens=1, threads=a.threads,
                              math=False, fuse=a.fuse, trace=None, save=None)
    job = setup(args)
    p, rows = job.size, []
    with abort_on_error(comm):
        searched = {}
        for C in sorted(a.C, reverse=True):             # KVR-S first (KVR-P interpolates them);
                                                        # the largest C calibrates the cost model
            job.tokens = torch.randint(3, job.model.cfg.vocab_size, (1, C),
                                       generator=torch.Generator().manual_seed(C)).to(job.device)
            runahead.pick_partition(job, "searched")
            searched[C] = job.c
        for C in a.C:
            job.tokens = torch.randint(3, job.model.cfg.vocab_size, (1, C),
                                       generator=torch.Generator().manual_seed(C)).to(job.device)
            others = partition.Table()
            for K in a.C:
                if K != C:
                    others.add(job.model_key, searched[K])
            parts = {"KVR-E": partition.even(C, p), "KVR-S": searched[C]}
            if len(a.C) > 1:                            # KVR-P: predicted without C's own entry
                parts["KVR-P"] = partition.predicted(C, p, others, job.model_key)

            def one_process():                          # the last rank alone; the others wait
                job.transport.barrier()
                if job.rank != p - 1:
                    return 0.0
                from kvcache import KVCache
                cache = KVCache(job.model.cfg, 1, C, job.dtype, job.device)
                sync(job.device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    job.model(job.tokens, cache, 0, last_only=True)[0, -1].argmax().item()
                return time.perf_counter() - t0

            variants = {"one process": (one_process, p - 1),
                        "TSP": (lambda: tsp.prefill(job, False)[2], p - 1)}
            if C >= 2 * p:
                variants["TSP-zigzag"] = (lambda: tsp.prefill(job, True)[2], 0)
            for v, c in parts.items():
                variants[v] = ((lambda c=c: runahead.prefill(job, c)[2]), p - 1)
            times = {v: [] for v in variants}
            names = list(variants)
            for r in range(a.repeats + 1):              # repeat 0 warms up; the order rotates
                for v in names[r % len(names):] + names[:r % len(names)]:
                    fn, emitter = variants[v]
                    t = fn()
                    job.transport.finish()
                    t = comm.bcast(t, root=emitter)
                    if r:
                        times[v].append(t)
            if a.trace_dir and C == max(a.C):           # one traced run of TSP and KVR-S
                os.makedirs(a.trace_dir, exist_ok=True)
                job.trace.on = True
                for v in ("TSP", "KVR-S"):
                    job.trace.events = []
                    variants[v][0]()
                    job.transport.finish()
                    job.trace.write(comm, os.path.join(a.trace_dir, f"trace-{v}-p{p}-C{C}.json"))
                job.trace.on = False
            link = "shared memory" if job.device.type == "cpu" else "host-staged MPI, one GPU shared"
            for v in names:
                rows.append(dict(model=job.model_key, C=C, p=p, variant=v, ttft_s=statistics.median(times[v]),
                                 raw_s=times[v], partition=parts.get(v), source="measured", link=link))
            if job.rank == 0:
                tsp_t = statistics.median(times["TSP"])
                print(f"C={C}: " + ", ".join(f"{v} {statistics.median(times[v]) * 1e3:.1f} ms "
                                             f"(x{tsp_t / statistics.median(times[v]):.2f})" for v in names),
                      flush=True)
    if job.rank == 0:
        meta = dict(machine(), command="mpirun -n %d python %s" % (p, " ".join(sys.argv)), ranks=p,
                    model=job.name, model_arg=a.model, model_key=job.model_key, dtype=a.dtype,
                    device=a.device, threads=torch.get_num_threads(),
                    repeats=a.repeats, fused=a.fuse)
        save(a.out, meta, rows)
        table([dict(r, ttft_ms=f"{r['ttft_s'] * 1e3:.1f}",
                    speedup=f"{next(x['ttft_s'] for x in rows if x['C'] == r['C'] and x['variant'] == 'TSP') / r['ttft_s']:.2f}",
                    partition=",".join(map(str, r["partition"])) if r["partition"] else "")
               for r in rows], ["C", "p", "variant", "ttft_ms", "speedup", "partition"])


# ----------------------------------------------------------------------------- the simulator

def profile(a):
    """On a GPU: what the simulator replays. Per model: a KernelTable of one KVR rank's segment times
    on a (chunk, prefix) grid, and direct profiles of every rank of TSP, TSP-zigzag, KVR-E and one
    process for each (C, p). A 4-layer model stands in for 32 identical layers (sim.expand)."""
    import sim
    from partition import even
    for name in a.dims:
        dtype = getattr(torch, a.dtype)
        m = sim.dims_model(name, dtype, a.device, n_layers=a.layers)
        if a.fuse:
            m.fuse()
        t0 = time.perf_counter()
        layers = sim.DIMS[name]["n_layers"] if name in sim.DIMS else None   # builtin: all its layers timed
        kt = sim.KernelTable.measure(m, a.cs, a.prefixes, layers=layers, repeats=a.repeats)
        direct = []
        for C in a.C:
            direct.append(dict(variant="one process", C=C, p=1, segs=sim.profile_single(m, C, a.repeats, 2)))
            for p in a.p:
                for v, segs in [("TSP", lambda: sim.profile_tsp(m, C, p, False, a.repeats, 2)),
                                ("TSP-zigzag", lambda: sim.profile_tsp(m, C, p, True, a.repeats, 2)),
                                ("KVR-E", lambda: sim.profile_kvr(m, even(C, p), a.repeats, 2))]:
                    direct.append(dict(variant=v, C=C, p=p, segs=segs()))
            print(f"{name}: profiled C={C} ({time.perf_counter() - t0:.0f} s)", flush=True)
        out = a.out.format(model=name.replace(":", "-"))
        save(out, dict(machine(), command=" ".join(sys.argv), model=name, dtype=a.dtype, fused=a.fuse,
                       layers_timed=a.layers, kernels=dict(meta=kt.meta, grid=[[c, P, *t] for (c, P), t in
                                                                                sorted(kt.grid.items())])), direct)


def profile_partitions(a):
    """On a GPU: direct profiles of the KVR-S and KVR-P partitions a `simulate` run chose on the
    kernel table, so that a second `simulate --direct` replays them on measured, not interpolated,
    segment times."""
    import sim
    with open(a.simulated) as f:
        rows = [r for r in json.load(f)["rows"] if r["variant"] in ("KVR-S", "KVR-P")]
    for name in dict.fromkeys(r["model"] for r in rows):
        m = sim.dims_model(name, getattr(torch, a.dtype), a.device, n_layers=a.layers)
        if a.fuse:
            m.fuse()
        done, out = {}, []
        for r in (r for r in rows if r["model"] == name):
            c = tuple(r["partition"])
            if c not in done:
                done[c] = sim.profile_kvr(m, list(c), a.repeats, 2)
            out.append(dict(variant=r["variant"], C=r["C"], p=r["p"], link=r["link"], partition=list(c),
                            segs=done[c]))
        print(f"{name}: profiled {len(done)} partitions", flush=True)
        save(a.out.format(model=name.replace(":", "-")), dict(machine(), command=" ".join(sys.argv), model=name, dtype=a.dtype,
                                            fused=a.fuse, layers_timed=a.layers), out)


LINKS = {"300 GB/s": dict(bandwidth=300e9), "10 GB/s": dict(bandwidth=10e9)}


def simulate(a):
    """Replay the profiles over the paper's links: every variant's TTFT, KVR-S searched on the
    KernelTable, KVR-P interpolated from the other contexts' KVR-S, the ideal, and TSP and KVR-S
    on a noisy network. CPU only: seconds to minutes."""
    import partition
    import sim
    from tsp import layout
    rows = []
    for path in a.profiles:
        with open(path) as f:
            prof = json.load(f)
        meta = prof["meta"]
        kt = sim.KernelTable({(c, P): tuple(t) for c, P, *t in meta["kernels"]["grid"]}, meta["kernels"]["meta"])
        L, bpt, name = kt.meta["layers"], kt.meta["bytes_per_token"], meta["model"]
        direct = {(r["variant"], r["C"], r["p"]): [sim.expand(s, L) for s in r["segs"]] for r in prof["rows"]}
        for path2 in a.direct:                          # KVR-S / KVR-P partitions profiled directly
            with open(path2) as f:
                d2 = json.load(f)
            if d2["meta"]["model"] == name:
                direct.update({(tuple(r["partition"]), r["C"], r["p"]): [sim.expand(s, L) for s in r["segs"]]
                               for r in d2["rows"]})

        def kvr(c, net, **kw):                          # measured segments if profiled, else the table's
            segs = direct.get((tuple(c), sum(c), len(c))) or [
                kt.segments(ci, Si - ci) for ci, Si in zip(c, partition.prefix_sums(c))]
            return sim.replay_chain(segs, c, net, bpt, **kw).ttft

        Cs = sorted({r["C"] for r in prof["rows"]})
        ps = sorted({r["p"] for r in prof["rows"] if r["p"] > 1})
        for link, kw in LINKS.items():
            for p in ps:
                net = sim.network(p, **kw)
                searched = {C: sim.search(C, p, kt, net, steps=a.steps, levels=a.levels)
                            for C in sorted(set(Cs) | set(a.table_C))}
                for C in Cs:
                    one = sum(direct["one process", C, 1][0])
                    spans, emitter = layout(C, p, False)
                    zspans, zemitter = layout(C, p, True)
                    zcounts = [sum(n for _, n in s) for s in zspans]
                    others = partition.Table()
                    for K in searched:                  # KVR-P: C itself is not in its table
                        if K != C:
                            others.add(name, searched[K])
                    cP = partition.predicted(C, p, others, name)
                    res = {
                        "one process": (one, None),
                        "ideal": (one / p, None),
                        "TSP": (sim.replay_allgather(direct["TSP", C, p], partition.even(C, p), net, bpt,
                                                     emitter).ttft, None),
                        "TSP-zigzag": (sim.replay_allgather(direct["TSP-zigzag", C, p], zcounts, net, bpt,
                                                            zemitter).ttft, None),
                        "KVR-E": (sim.replay_chain(direct["KVR-E", C, p], partition.even(C, p), net, bpt).ttft,
                                  partition.even(C, p)),
                        "KVR-E (table)": (sim.predict(kt, partition.even(C, p), net).ttft, partition.even(C, p)),
                        "KVR-S": (kvr(searched[C], net), searched[C]),
                        "KVR-P": (kvr(cP, net), cP),
                    }
                    noisy = sim.network(p, **kw, jitter=a.jitter)
                    res["TSP noisy"] = (sim.replay_allgather(direct["TSP", C, p], partition.even(C, p), noisy,
                                                             bpt, emitter, seed=C).ttft, None)
                    res["KVR-S noisy"] = (kvr(searched[C], noisy, seed=C), searched[C])
                    for v, (t, c) in res.items():
                        rows.append(dict(model=name, C=C, p=p, variant=v, ttft_s=t, partition=c,
                                         source="simulated", link=link))
                    print(f"{name} {link} p={p} C={C}: " + ", ".join(
                        f"{v} {t * 1e3:.1f}" for v, (t, _) in res.items()), flush=True)
    save(a.out, dict(machine(), command=" ".join(sys.argv), profiles=a.profiles, jitter=a.jitter,
                     search=dict(steps=a.steps, levels=a.levels), table_C=a.table_C), rows)
    summary(rows)


def summary(rows):
    """The simulated tables of BENCHMARKS.md: TTFT (ms) per variant, and the ratios the targets name."""
    t = {(r["model"], r["link"], r["p"], r["C"], r["variant"]): r["ttft_s"] * 1e3 for r in rows}
    for model, link in dict.fromkeys((r["model"], r["link"]) for r in rows):
        print(f"\n{model}, links {link} (simulated; ms)\n")
        out = []
        for (m, lk, p, C, v) in t:
            if (m, lk, v) == (model, link, "TSP"):
                g = lambda v: t[model, link, p, C, v]  # noqa: E731
                out.append(dict(p=p, C=C, **{k: f"{g(k):.1f}" for k in (
                    "TSP", "TSP-zigzag", "KVR-E", "KVR-S", "KVR-P", "ideal")},
                    **{"TSP/KVR-S": f"{g('TSP') / g('KVR-S'):.2f}", "zigzag/KVR-S": f"{g('TSP-zigzag') / g('KVR-S'):.2f}",
                       "KVR-S/ideal": f"{g('KVR-S') / g('ideal'):.2f}", "KVR-P/KVR-S": f"{g('KVR-P') / g('KVR-S'):.3f}",
                       "noisy TSP": f"{g('TSP noisy') / g('TSP') - 1:+.1%}",
                       "noisy KVR-S": f"{g('KVR-S noisy') / g('KVR-S') - 1:+.1%}"}))
        table(out, list(out[0]))


def validate(a):
    """The simulator against real runs: profile each real row's work on this device, replay it with
    the link calibrated in the real run (calibration.json), and report the error. `--devices 1` when
    the real ranks shared one device, default: a device per rank."""
    import partition
    import sim
    from comm import Job, _setup
    from tsp import layout
    out = []
    for path in a.real:
        with open(path) as f:
            real = json.load(f)
        meta = real["meta"]
        args = argparse.Namespace(model=meta["model_arg"], prompt=None, prompt_ids=None, prompt_len=1,
                                  dtype=meta["dtype"], device=meta["device"], max_new_tokens=1,
                                  threads=meta["threads"], math=False, fuse=meta["fused"], trace=None, save=None)
        from mpi4py import MPI
        job = Job()
        _setup(job, args, MPI.COMM_SELF)
        cost = partition.load_calibration(job.model_key)
        L, bpt = job.model.cfg.n_layers, sim.bytes_per_token(job.model.cfg, job.dtype)
        per_token = cost.comm_per_token / L if cost and cost.comm_per_token else 0.0
        link = sim.Link(bpt / per_token if per_token else 1e15, cost.latency / L if cost else 0.0)
        for r in real["rows"]:
            C, p, v = r["C"], r["p"], r["variant"]
            if v == "one process":
                t = sim.replay_chain(sim.profile_single(job.model, C, a.repeats, 2), [C], link, bpt).ttft
            elif v.startswith("TSP"):
                spans, emitter = layout(C, p, v == "TSP-zigzag")
                segs = sim.profile_tsp(job.model, C, p, v == "TSP-zigzag", a.repeats, 2)
                t = sim.replay_allgather(segs, [sum(n for _, n in s) for s in spans], link, bpt, emitter,
                                         devices=a.devices).ttft
            else:
                t = sim.replay_chain(sim.profile_kvr(job.model, r["partition"], a.repeats, 2), r["partition"],
                                     link, bpt, devices=a.devices).ttft
            out.append(dict(model=job.model_key, C=C, p=p, variant=v, real_s=r["ttft_s"], simulated_s=t,
                            error=t / r["ttft_s"] - 1, link=f"{link.bandwidth / 1e9:.3g} GB/s, "
                            f"{link.latency * 1e6:.3g} us", devices=a.devices or p, real_file=path))
            print(f"{path} C={C} p={p} {v}: real {r['ttft_s'] * 1e3:.1f} ms, simulated {t * 1e3:.1f} ms, "
                  f"error {out[-1]['error']:+.1%}", flush=True)
    save(a.out, dict(machine(), command=" ".join(sys.argv)), out)
    table([dict(r, real_ms=f"{r['real_s'] * 1e3:.1f}", simulated_ms=f"{r['simulated_s'] * 1e3:.1f}",
                error=f"{r['error']:+.1%}") for r in out],
          ["C", "p", "variant", "real_ms", "simulated_ms", "error", "link", "devices"])


# ----------------------------------------------------------------------------- plots

def plot(a):
    import figures
    for path in a.files:
        with open(path) as f:
            rows = json.load(f)["rows"]
        stem = os.path.splitext(path)[0]
        if rows and "variant" in rows[0]:
            figures.plot_ttft(rows, stem + "-ttft.png")
            figures.plot_speedup(rows, stem + "-speedup.png")
            print(f"wrote {stem}-ttft.png, {stem}-speedup.png")
    if a.traces:
        figures.plot_timeline(a.traces, [os.path.basename(t) for t in a.traces], a.timeline)
        print(f"wrote {a.timeline}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("single", help="one process on a GPU: ours vs transformers")
    s.add_argument("--dims", nargs="+", default=["llama7b", "falcon7b"], choices=["llama7b", "falcon7b"])
    s.add_argument("--dtype", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"])
    s.add_argument("--C", nargs="+", type=int, default=[4096, 8192, 16384])
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers")
    s.add_argument("--out", default="results/single.json")
    r = sub.add_parser("ranks", help="real ranks under mpirun: every variant, alternated")
    r.add_argument("--model", default="builtin:llama")
    r.add_argument("--C", nargs="+", type=int, default=[1024, 2048, 4096])
    r.add_argument("--dtype", default="float32")
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    r.add_argument("--threads", type=int)
    r.add_argument("--fuse", action="store_true", help="compile each layer's pre/post (GPU)")
    r.add_argument("--repeats", type=int, default=5)
    r.add_argument("--trace-dir", help="also write one traced TSP and KVR-S run at the largest C here")
    r.add_argument("--out", default="results/ranks.json")
    pr = sub.add_parser("profile", help="GPU: kernel table and direct profiles for the simulator")
    pr.add_argument("--dims", nargs="+", default=["llama7b", "falcon7b"],
                    choices=["llama7b", "falcon7b", "builtin:llama", "builtin:falcon"])
    pr.add_argument("--dtype", default="float16")
    pr.add_argument("--device", default="cuda")
    pr.add_argument("--fuse", action="store_true")
    pr.add_argument("--layers", type=int, default=4, help="layers timed (identical layers: 4 stand for 32)")
    pr.add_argument("--C", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 12288, 16384])
    pr.add_argument("-p", nargs="+", type=int, default=[2, 4, 8])
    pr.add_argument("--cs", nargs="+", type=int, default=[128, 256, 512, 1024, 2048, 3072, 4096, 6144,
                                                           8192, 12288, 16384])
    pr.add_argument("--prefixes", nargs="+", type=int, default=[0, 1024, 2048, 4096, 6144, 8192, 12288, 14336])
    pr.add_argument("--repeats", type=int, default=5)
    pr.add_argument("--out", default="results/profiles-{model}.json")
    si = sub.add_parser("simulate", help="replay profiles over the paper's links: the multi-GPU tables")
    si.add_argument("profiles", nargs="+")
    si.add_argument("--steps", type=int, default=16)
    si.add_argument("--levels", type=int, default=4)
    si.add_argument("--table-C", nargs="+", type=int, default=list(range(1024, 16385, 1024)),
                    help="contexts KVR-S is searched for to make KVR-P's table (the C predicted is left out)")
    si.add_argument("--jitter", type=float, default=0.5, help="noisy network: each message up to this much slower")
    si.add_argument("--direct", nargs="*", default=[], help="profile-partitions files: KVR-S/KVR-P measured")
    si.add_argument("--out", default="results/simulated.json")
    pp = sub.add_parser("profile-partitions", help="GPU: direct profiles of a simulate run's KVR-S/KVR-P")
    pp.add_argument("simulated")
    pp.add_argument("--dtype", default="float16")
    pp.add_argument("--device", default="cuda")
    pp.add_argument("--fuse", action="store_true")
    pp.add_argument("--layers", type=int, default=4)
    pp.add_argument("--repeats", type=int, default=5)
    pp.add_argument("--out", default="results/partitions-{model}.json")
    va = sub.add_parser("validate", help="the simulator against real runs of `ranks` on this machine")
    va.add_argument("real", nargs="+", help="results JSON of bench.py ranks")
    va.add_argument("--devices", type=int, help="devices the real ranks shared (default: one each)")
    va.add_argument("--repeats", type=int, default=5)
    va.add_argument("--out", default="results/validate.json")
    su = sub.add_parser("summary", help="the tables of a simulate results file, again")
    su.add_argument("file")
    pl = sub.add_parser("plot", help="PNG plots of results files")
    pl.add_argument("files", nargs="*")
    pl.add_argument("--traces", nargs="*", help="trace JSON files to draw as one timeline figure")
    pl.add_argument("--timeline", default="results/timeline.png")
    a = ap.parse_args(argv)
    {"single": single, "ranks": ranks, "profile": profile, "simulate": simulate, "validate": validate,
     "profile-partitions": profile_partitions,
     "plot": plot, "summary": lambda a: summary(json.load(open(a.file))["rows"])}[a.cmd](a)


if __name__ == "__main__":
    main()
