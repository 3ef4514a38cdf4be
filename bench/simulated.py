"""The simulator's benchmarks: profile every rank's work on one GPU, replay it over the paper's
links, and hold the replay against real runs. Every simulated table in BENCHMARKS.md comes from here.

    python -m bench.simulated profile [--dims llama7b falcon7b] [--run 1]
        on a GPU, one independent run: a KernelTable of one rank's segment times; on it, KVR-S's
        shortlist and KVR-P for every link; then every variant of each (C, p) profiled directly,
        interleaved: one process, TSP, TSP-zigzag, and KV-Runahead on every partition named
    python -m bench.simulated simulate results/profiles-*.json
        CPU: replay every run over the links (300, 10, uneven, measured); KVR-S scored on the
        direct profiles, KVR-P, the ideal; per run, then summarised over the runs
    python -m bench.simulated validate results/ranks.json [--devices 1]
        the simulator against real runs of `bench/measured.py ranks` on this machine
    python -m bench.simulated summary results/simulated-graphs.json
        the tables of a simulate run and the targets, again
"""
import json
import multiprocessing
import os
import statistics
import time
from collections import defaultdict

import torch

import choose
import cli
import partition
import program
from bench import profiling, sim
from bench.measured import machine, order, save, spread, table
from fast.compiled import fuse
from kvcache import bytes_per_token
from load_weights import DIMS, dims_model
from tsp import tsp_layout


def links(p, measured=None, jitter=0.0):
    """The networks every table is replayed on, for p ranks: the paper's 300 and 10 GB/s per hop; an
    uneven one, 300 GB/s with the middle hop (link p//2 - 1, which the chain's largest message and
    every ring step cross) at 10 GB/s; and the links bench/measured.py link measured (label -> Link fields)."""
    out = {"300 GB/s": sim.network(p, 300e9, jitter=jitter), "10 GB/s": sim.network(p, 10e9, jitter=jitter),
           "300 GB/s, middle hop 10 GB/s": sim.network(p, 300e9, jitter=jitter, slow={p // 2 - 1: 10e9})}
    for label, kw in (measured or {}).items():
        out[label] = sim.network(p, **kw, jitter=jitter)
    return out


def measured_links(path, routes, lrows=None):
    """label -> Link fields of each route of a bench/measured.py link file (or its rows, `lrows`),
    fitted by sim.fit_link."""
    if lrows is None:
        with open(path) as f:
            lrows = json.load(f)["rows"]
    out = {}
    for route in routes:
        mine = [r for r in lrows if r["route"] == route]
        if not mine:
            raise SystemExit(f"{path} has no route {route!r}")
        fit = sim.fit_link([r["MiB"] * 2**20 for r in mine], [r["one_way_ms"] / 1e3 for r in mine])
        out[f"{fit.bandwidth / 1e9:.0f} GB/s (measured, {route}, ranks on one GPU)"] = dict(bandwidth=fit.bandwidth, latency=fit.latency)
    return out


def _search(job):
    """A worker process: KVR-S searched on the kernel table for one (C, p, network)."""
    C, p, kt, net, steps, levels = job
    return sim.search(C, p, kt, net, steps=steps, levels=levels)


def shortlist(kt, name, Cs, ps, nets, table_C, steps, levels, pool):
    """Per (link, p, C): the partition the kernel-table search picks (KVR-S's shortlist), and KVR-P
    interpolated from the other contexts' picks (the C itself left out of its table)."""
    table_C = sorted(set(table_C) | set(Cs))
    keys = [(label, p, C) for p in ps for label in nets[p] for C in table_C]
    best = dict(zip(keys, pool.map(_search, [(C, p, kt, nets[p][label], steps, levels) for label, p, C in keys])))
    out = []
    for label, p, C in keys:
        if C in Cs:
            others = partition.Table()
            for K in table_C:
                if K != C:
                    others.add(name, best[label, p, K])
            out.append(dict(link=label, p=p, C=C, searched=best[label, p, C], predicted=partition.predicted(
                C, p, others, name, choose.alignment(kt.meta["device_type"])) if len(table_C) > 1 else None))
    return out


def profile_block(m, C, p, parts, rounds, math_tsp=False):
    """Every variant of one (C, p) profiled interleaved: each round runs each variant once, in a
    balanced order (bench.measured.order), after one round of warm-up. Returns {(variant, partition): per rank,
    the median of each segment over the rounds}."""
    jobs = {("one process", None): lambda: profiling.profile_single(m, C, 1, 0),
            ("TSP", None): lambda: profiling.profile_tsp(m, C, p, False, 1, 0),
            ("TSP-zigzag", None): lambda: profiling.profile_tsp(m, C, p, True, 1, 0)}
    if math_tsp:
        jobs["TSP (math path)", None] = lambda: profiling.profile_tsp(m, C, p, False, 1, 0, math_path=True)
    jobs.update({("KVR", c): (lambda c=c: profiling.profile_kvr(m, list(c), 1, 0)) for c in parts})
    keys, runs = list(jobs), {k: [] for k in jobs}
    for r in range(rounds + 1):
        for k in order(keys, r):
            segs = jobs[k]()
            if r:
                runs[k].append(segs)
    return {k: [[statistics.median(x) for x in zip(*(run[i] for run in v))] for i in range(len(v[0]))]
            for k, v in runs.items()}


def profile(a):
    """On a GPU, one independent run of what the simulator replays. Per model: a KernelTable of one
    KVR rank's segment times on a (chunk, prefix) grid; KVR-S's shortlist and KVR-P searched on it for
    every link; then, per (C, p), every variant profiled directly and interleaved (profile_block): one
    process, TSP, TSP-zigzag and KV-Runahead on the even split and on every shortlisted partition. A
    4-layer model stands in for 32 identical layers (sim.expand)."""
    measured = {k: v for path in a.measured_link for k, v in measured_links(path, a.routes).items()}
    nets = {p: links(p, measured) for p in a.p}
    paper = {tuple(map(int, x.split(":"))) for x in a.paper_tsp}
    pool = None                                        # started after the first table: its
    try:                                               # imports would disturb the GPU's timings
        for name in a.dims:
            m = dims_model(name, getattr(torch, a.dtype), a.device, n_layers=a.layers)
            if a.fuse or a.graphs:
                fuse(m, graphs=a.graphs)
            t0 = time.perf_counter()
            profiling.TIMED.clear()
            layers = DIMS[name]["n_layers"] if name in DIMS else None   # builtin: all its layers timed
            kt = profiling.measure_table(m, a.cs, a.prefixes, layers=layers, repeats=a.repeats)
            pool = pool or multiprocessing.get_context("spawn").Pool(a.workers)
            short = shortlist(kt, name, a.C, a.p, nets, a.table_C, a.steps, a.levels, pool)
            print(f"{name}: kernel table and {len(short)} searches ({time.perf_counter() - t0:.0f} s)", flush=True)
            rows = []
            for C in a.C:
                for p in a.p:
                    parts = dict.fromkeys([tuple(partition.even(C, p))] + [tuple(s[k]) for s in short
                                          if (s["C"], s["p"]) == (C, p) for k in ("searched", "predicted") if s[k]])
                    for (v, c), segs in profile_block(m, C, p, parts, a.repeats, (C, p) in paper).items():
                        rows.append(dict(variant=v, C=C, p=1 if v == "one process" else p,
                                         partition=list(c) if c else None, segs=segs))
                print(f"{name}: profiled C={C} ({time.perf_counter() - t0:.0f} s; timed forwards "
                      f"{dict(profiling.TIMED)})", flush=True)
            save(a.out.format(model=name.replace(":", "-")), dict(
                machine(), run=a.run, model=name, dtype=a.dtype, fused=a.fuse or a.graphs, graphs=a.graphs,
                layers_timed=a.layers, rounds=a.repeats, timed_forwards=dict(profiling.TIMED), links=measured,
                shortlist=short, search=dict(steps=a.steps, levels=a.levels),
                kernels=dict(meta=kt.meta, grid=[[c, P, *t] for (c, P), t in sorted(kt.grid.items())])), rows)
    finally:
        if pool:
            pool.terminate()


def simulate(a):
    """Replay each run's profiles over every link: TSP, TSP-zigzag, KVR-E, KVR-S, KVR-P, the ideal, and
    TSP and KVR-S on a noisy network. KVR-S is the best of the profiled partitions (the even split and
    the kernel-table search's shortlist for every link), scored by replaying their direct profiles:
    the paper's search, scored by measured TTFT. CPU only: seconds."""
    rows = []
    for path in a.profiles:
        with open(path) as f:
            prof = json.load(f)
        meta = prof["meta"]
        L, bpt, name, run = meta["kernels"]["meta"]["layers"], meta["kernels"]["meta"]["bytes_per_token"], \
            meta["model"], meta["run"]
        direct = {(r["variant"], r["C"], r["p"], tuple(r["partition"] or ())): [sim.expand(s, L) for s in r["segs"]]
                  for r in prof["rows"]}
        short = {(s["link"], s["p"], s["C"]): s for s in meta["shortlist"]}
        for p in sorted({r["p"] for r in prof["rows"] if r["p"] > 1}):
            noisy = links(p, meta["links"], a.jitter)
            for label, net in links(p, meta["links"]).items():
                for C in sorted({r["C"] for r in prof["rows"]}):
                    def kvr(c, net=net, **kw):
                        return sim.replay_chain(direct["KVR", C, p, tuple(c)], list(c), net, bpt, **kw).ttft

                    def tsp(v, net=net, **kw):
                        spans, emitter = tsp_layout(C, p, v == "TSP-zigzag")
                        return sim.replay_allgather(direct[v, C, p, ()], [[n for _, n in s] for s in spans],
                                                    net, bpt, emitter, **kw).ttft

                    one, even, s = sum(direct["one process", C, 1, ()][0]), partition.even(C, p), short[label, p, C]
                    best = list(min((c for v, K, q, c in direct if (v, K, q) == ("KVR", C, p)), key=kvr))
                    res = {"one process": (one, None), "ideal": (one / p, None),
                           "TSP": (tsp("TSP"), None), "TSP-zigzag": (tsp("TSP-zigzag"), None),
                           "KVR-E": (kvr(even), even), "KVR-S": (kvr(best), best),
                           "KVR-S (table)": (kvr(s["searched"]), s["searched"]),
                           "TSP noisy": (tsp("TSP", noisy[label], seed=C), None),
                           "KVR-S noisy": (kvr(best, noisy[label], seed=C), best)}
                    if s["predicted"]:
                        res["KVR-P"] = (kvr(s["predicted"]), s["predicted"])
                    if ("TSP (math path)", C, p, ()) in direct:
                        res["TSP (math path)"] = (tsp("TSP (math path)"), None)
                    for v, (t, c) in res.items():
                        rows.append(dict(model=name, run=run, C=C, p=p, variant=v, ttft_s=t, partition=c,
                                         source="simulated", link=label))
        print(f"{path}: replayed", flush=True)
    save(a.out, dict(machine(), profiles=a.profiles, jitter=a.jitter), rows)
    summary(rows)


def summary(rows):
    """The simulated tables of BENCHMARKS.md: TTFT (ms) per variant, the median of the independent
    runs, and the ratios the targets name with their range over the runs; then the targets."""
    t = defaultdict(list)
    for r in rows:
        t[r["model"], r["link"], r["p"], r["C"], r["variant"]].append(r["ttft_s"] * 1e3)
    runs = len({r["run"] for r in rows})
    ratios = {"TSP/KVR-S": ("TSP", "KVR-S"), "zigzag/KVR-S": ("TSP-zigzag", "KVR-S"),
              "KVR-E/KVR-S": ("KVR-E", "KVR-S"), "KVR-S/ideal": ("KVR-S", "ideal"),
              "KVR-P/KVR-S": ("KVR-P", "KVR-S"), "table/KVR-S": ("KVR-S (table)", "KVR-S")}

    def ratio(key, x, y):
        return [a / b for a, b in zip(t[(*key, x)], t[(*key, y)])]

    for model, link in dict.fromkeys((r["model"], r["link"]) for r in rows):
        print(f"\n{model}, links {link} (simulated; ms; median of {runs} runs, ratios with their range)\n")
        out = []
        for key in dict.fromkeys(k[:4] for k in t if k[:2] == (model, link)):
            out.append(dict(p=key[2], C=key[3], **{v: spread(t[(*key, v)], "{:.1f}", False) for v in (
                "TSP", "TSP-zigzag", "KVR-E", "KVR-S", "KVR-P", "ideal")},
                **{k: spread(ratio(key, x, y), "{:.2f}") for k, (x, y) in ratios.items()},
                **{f"noisy {v}": spread([n / b - 1 for n, b in zip(t[(*key, v + " noisy")], t[(*key, v)])], "{:+.1%}")
                   for v in ("TSP", "KVR-S")}))
        table(out, list(out[0]))
    print("\nTargets (met: every run meets it; inconclusive: some runs do; missed: none does)\n")
    for target, pick, (x, y), ok in TARGETS:
        keys = [k[:4] for k in t if k[4] == "TSP" and pick(*k[:4])]
        verdict = defaultdict(list)
        for key in keys:
            r = ratio(key, x, y)
            if not r:
                continue
            verdict["met" if all(map(ok, r)) else "inconclusive" if any(map(ok, r)) else "missed"].append(
                f"{key[0]} {key[1]} p={key[2]} C={key[3]}: {spread(r, '{:.3f}')}")
        print(f"- {target}: " + ", ".join(f"{v} {len(c)}" for v, c in sorted(verdict.items())))
        for v in ("missed", "inconclusive") + (("met",) if len(keys) <= 4 else ()):
            for c in verdict.get(v, [])[:12]:
                print(f"    {v}: {c}")


TARGETS = [   # (what, which cells, ratio, test): issue 12's targets on the simulated tables
    ("KVR-S <= 1.15x the ideal, 8 GPUs, 16k, 300 GB/s", lambda m, lk, p, C: (lk, p, C) == ("300 GB/s", 8, 16384),
     ("KVR-S", "ideal"), lambda r: r <= 1.15),
    ("KVR-S >= TSP-zigzag at C >= 2k", lambda m, lk, p, C: C >= 2048, ("TSP-zigzag", "KVR-S"), lambda r: r >= 1),
    ("KVR-S >= KVR-E everywhere", lambda m, lk, p, C: True, ("KVR-E", "KVR-S"), lambda r: r >= 1),
    ("KVR-P within 2% of KVR-S at C >= 4k", lambda m, lk, p, C: C >= 4096, ("KVR-P", "KVR-S"),
     lambda r: abs(r - 1) <= 0.02),
    ("Llama-7B, 4 GPUs, 12k, 300 GB/s: TSP / KVR-S >= 1.42x (paper)",
     lambda m, lk, p, C: (m, lk, p, C) == ("llama7b", "300 GB/s", 4, 12288), ("TSP", "KVR-S"), lambda r: r >= 1.42),
    ("Falcon-7B, 8 GPUs, 8k, 300 GB/s: TSP / KVR-S >= 1.63x (paper)",
     lambda m, lk, p, C: (m, lk, p, C) == ("falcon7b", "300 GB/s", 8, 8192), ("TSP", "KVR-S"), lambda r: r >= 1.63),
    ("the same, the paper's TSP (attention on the math path): TSP (math path) / KVR-S >= 1.63x",
     lambda m, lk, p, C: (m, lk, p, C) == ("falcon7b", "300 GB/s", 8, 8192), ("TSP (math path)", "KVR-S"),
     lambda r: r >= 1.63),
]


def replay(v, C, p, c, segs, link, bpt, devices=None, host=None):
    """validate's replay of one cell, variant v of C tokens on p ranks (c: KV-Runahead's partition),
    from its profiled segments: one process as a chain of one rank; TSP's gather through the shared
    host link if `host`."""
    if v == "one process":
        return sim.replay_chain(segs, [C], link, bpt).ttft
    if v.startswith("TSP"):
        spans, emitter = tsp_layout(C, p, v == "TSP-zigzag")
        return sim.replay_allgather(segs, [[n for _, n in s] for s in spans], link, bpt, emitter, devices=devices,
                                    host=host).ttft
    return sim.replay_chain(segs, c, link, bpt, devices=devices).ttft


def validate(a):
    """The simulator against real runs: profile each real row's work on this device, replay it with
    the link calibrated in the real run (calibration.json) or one bench/measured.py link measured
    (--measured-link FILE --route R), and report the error. `--devices 1` when
    the real ranks shared one device, default: a device per rank. `--shared-host`: the ranks shared
    one GPU on the staged route, so TSP's gather goes through that GPU's host link, as the link
    file's host rows measured it (sim.replay_allgather's host)."""
    out, host = [], None
    if a.route and not a.measured_link:
        raise SystemExit("error: --route picks a route of a --measured-link file: name one")
    if a.shared_host:
        if not a.measured_link:
            raise SystemExit("error: --shared-host replays the host link of a --measured-link file: name one")
        host = tuple(sim.Link(**f) for f in measured_links(a.measured_link, ["host down", "host up"]).values())
    for path in a.real:
        with open(path) as f:
            real = json.load(f)
        meta = real["meta"]
        args = cli.program("").parse_args(["--model", meta["model_arg"], "--dtype", meta["dtype"]]
                                          + ["--fuse"] * meta["fused"])
        torch.set_num_threads(meta["threads"])
        _, model, key = program.load(args, torch.device(meta["device"]))
        L, bpt = model.cfg.n_layers, bytes_per_token(model.cfg, getattr(torch, meta["dtype"]))
        if a.measured_link:                            # the link bench/measured.py link measured on this route
            link = sim.Link(**next(iter(measured_links(a.measured_link, [a.route or "staged"]).values())))
        else:                                          # the link the real run calibrated
            cost = choose.load_calibration(key)
            per_token = cost.comm_per_token / L if cost and cost.comm_per_token else 0.0
            link = sim.Link(bpt / per_token if per_token else 1e15, cost.latency / L if cost else 0.0)
        for r in real["rows"]:
            C, p, v = r["C"], r["p"], r["variant"]
            if v == "one process":
                segs = profiling.profile_single(model, C, a.repeats, 2)
            elif v.startswith("TSP"):
                segs = profiling.profile_tsp(model, C, p, v == "TSP-zigzag", a.repeats, 2)
            else:
                segs = profiling.profile_kvr(model, r["partition"], a.repeats, 2)
            t = replay(v, C, p, r["partition"], segs, link, bpt, a.devices, host)
            via = (f"host link down {host[0].bandwidth / 1e9:.3g}, up {host[1].bandwidth / 1e9:.3g} GB/s"
                   if host and v.startswith("TSP") else f"{link.bandwidth / 1e9:.3g} GB/s, {link.latency * 1e6:.3g} us")
            out.append(dict(model=key, C=C, p=p, variant=v, real_s=r["ttft_s"], simulated_s=t,
                            error=t / r["ttft_s"] - 1, link=via, devices=a.devices or p, real_file=path,
                            segs=segs))                # per rank, what was replayed: to replay it again
            print(f"{path} C={C} p={p} {v}: real {r['ttft_s'] * 1e3:.1f} ms, simulated {t * 1e3:.1f} ms, "
                  f"error {out[-1]['error']:+.1%}", flush=True)
    save(a.out, machine(), out)
    table([dict(r, real_ms=f"{r['real_s'] * 1e3:.1f}", simulated_ms=f"{r['simulated_s'] * 1e3:.1f}",
                error=f"{r['error']:+.1%}") for r in out],
          ["C", "p", "variant", "real_ms", "simulated_ms", "error", "link", "devices"])


def main(argv=None):
    ap = cli.Parser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("profile", help="GPU: one run of the kernel table, the search, and direct profiles")
    pr.add_argument("--dims", nargs="+", default=["llama7b", "falcon7b"],
                    choices=["llama7b", "falcon7b", "builtin:llama", "builtin:falcon"])
    pr.add_argument("--dtype", default="float16")
    pr.add_argument("--device", default="cuda")
    pr.add_argument("--fuse", action="store_true")
    pr.add_argument("--graphs", action="store_true", help="--fuse, and CUDA graphs (fast.compiled.fuse)")
    pr.add_argument("--layers", type=cli.at_least(2), default=4, help="layers timed (identical layers: 4 stand for 32)")
    pr.add_argument("--C", nargs="+", type=cli.at_least(1), default=[1024, 2048, 4096, 8192, 12288, 16384])
    pr.add_argument("-p", nargs="+", type=cli.at_least(2), default=[2, 4, 8])
    pr.add_argument("--cs", nargs="+", type=cli.at_least(1), default=[128, 256, 384, 512, 768, 1024, 1536, 2048, 3072,
                                                                      4096, 6144, 8192, 12288, 16384])
    pr.add_argument("--prefixes", nargs="+", type=cli.at_least(0), default=[0, 1024, 2048, 4096, 6144, 8192, 12288, 14336])
    pr.add_argument("--repeats", type=cli.at_least(1), default=5, help="timed runs per table point, rounds per block")
    pr.add_argument("--table-C", nargs="+", type=cli.at_least(1), default=list(range(1024, 16385, 1024)),
                    help="contexts KVR-S is searched for to make KVR-P's table (the C predicted is left out)")
    pr.add_argument("--steps", type=cli.at_least(1), default=16)
    pr.add_argument("--levels", type=cli.at_least(1), default=4)
    pr.add_argument("--measured-link", nargs="*", default=[], help="bench/measured.py link results: their routes' fitted links")
    pr.add_argument("--routes", nargs="+", default=["direct"], help="which routes of --measured-link files")
    pr.add_argument("--paper-tsp", nargs="*", default=["12288:4", "8192:8"],
                    help="C:p where TSP is also profiled with attention on the math path")
    pr.add_argument("--workers", type=cli.at_least(1), default=max(1, len(os.sched_getaffinity(0)) - 1),
                    help="processes for the searches")
    pr.add_argument("--run", type=cli.at_least(1), default=1, help="which independent run this is (kept in meta)")
    pr.add_argument("--out", default="results/profiles-{model}.json")
    si = sub.add_parser("simulate", help="replay profiles over the links: the multi-GPU tables")
    si.add_argument("profiles", nargs="+", help="bench/simulated.py profile files, any number of runs")
    si.add_argument("--jitter", type=cli.at_least(0.0, float), default=0.5, help="noisy network: each message up to this much slower")
    si.add_argument("--out", default="results/simulated.json")
    va = sub.add_parser("validate", help="the simulator against real runs of `ranks` on this machine")
    va.add_argument("real", nargs="+", help="results JSON of bench/measured.py ranks")
    va.add_argument("--devices", type=cli.at_least(1, float), help="devices the real ranks shared (default: one "
                    "each), or as many ranks' speed alone as their GPU gives them together (bench.emulated)")
    va.add_argument("--repeats", type=cli.at_least(1), default=5)
    va.add_argument("--measured-link", help="a bench/measured.py link file: replay on its --route's fitted link")
    va.add_argument("--route", help="the route of the --measured-link file to replay on (default staged)")
    va.add_argument("--shared-host", action="store_true", help="the ranks shared one GPU on the staged route: "
                    "TSP's gather through its host link (the --measured-link file's host down and up rows)")
    va.add_argument("--out", default="results/validate.json")
    su = sub.add_parser("summary", help="the tables of a simulate results file, again")
    su.add_argument("file")
    a = ap.parse_args(argv)
    {"profile": profile, "simulate": simulate, "validate": validate,
     "summary": lambda a: summary(json.load(open(a.file))["rows"])}[a.cmd](a)


if __name__ == "__main__":
    main()
