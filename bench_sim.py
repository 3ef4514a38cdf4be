"""The simulator's benchmarks: profile every rank's work on one GPU, replay it over the paper's
links, and hold the replay against real runs. Every simulated table in BENCHMARKS.md comes from here.

    python bench_sim.py profile [--dims llama7b falcon7b]
        on a GPU: a KernelTable of one rank's segment times, and direct profiles of every rank of
        one process, TSP, TSP-zigzag and KVR-E per (C, p)
    python bench_sim.py simulate results/profiles-*.json [--direct results/partitions-*.json]
        CPU: replay them over 300 and 10 GB/s links; KVR-S searched, KVR-P interpolated, the ideal
    python bench_sim.py profile-partitions results/simulated.json
        on a GPU: direct profiles of the KVR-S/KVR-P partitions simulate chose on the table
    python bench_sim.py validate results/ranks.json [--devices 1]
        the simulator against real runs of `bench.py ranks` on this machine
    python bench_sim.py summary results/simulated.json
        the tables of a simulate run, again
"""
import json
import sys
import time

import torch

import cli
import partition
import profiling
import program
import sim
from bench import machine, save, table
from kvcache import bytes_per_token
from model import DIMS, dims_model


def profile(a):
    """On a GPU: what the simulator replays. Per model: a KernelTable of one KVR rank's segment times
    on a (chunk, prefix) grid, and direct profiles of every rank of TSP, TSP-zigzag, KVR-E and one
    process for each (C, p). A 4-layer model stands in for 32 identical layers (sim.expand)."""
    for name in a.dims:
        dtype = getattr(torch, a.dtype)
        m = dims_model(name, dtype, a.device, n_layers=a.layers)
        if a.fuse:
            m.fuse()
        t0 = time.perf_counter()
        layers = DIMS[name]["n_layers"] if name in DIMS else None   # builtin: all its layers timed
        kt = profiling.measure_table(m, a.cs, a.prefixes, layers=layers, repeats=a.repeats)
        direct = []
        for C in a.C:
            direct.append(dict(variant="one process", C=C, p=1, segs=profiling.profile_single(m, C, a.repeats, 2)))
            for p in a.p:
                for v, segs in [("TSP", lambda: profiling.profile_tsp(m, C, p, False, a.repeats, 2)),
                                ("TSP-zigzag", lambda: profiling.profile_tsp(m, C, p, True, a.repeats, 2)),
                                ("KVR-E", lambda: profiling.profile_kvr(m, partition.even(C, p), a.repeats, 2))]:
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
    with open(a.simulated) as f:
        rows = [r for r in json.load(f)["rows"] if r["variant"] in ("KVR-S", "KVR-P")]
    for name in dict.fromkeys(r["model"] for r in rows):
        m = dims_model(name, getattr(torch, a.dtype), a.device, n_layers=a.layers)
        if a.fuse:
            m.fuse()
        done, out = {}, []
        for r in (r for r in rows if r["model"] == name):
            c = tuple(r["partition"])
            if c not in done:
                done[c] = profiling.profile_kvr(m, list(c), a.repeats, 2)
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
        links = dict(LINKS)
        for path2 in a.measured_link:                   # a link bench.py link measured, per route
            with open(path2) as f:
                lrows = json.load(f)["rows"]
            for route in dict.fromkeys(r["route"] for r in lrows):
                mine = [r for r in lrows if r["route"] == route]
                fit = sim.fit_link([r["MiB"] * 2**20 for r in mine], [r["one_way_ms"] / 1e3 for r in mine])
                links[f"{fit.bandwidth / 1e9:.0f} GB/s (measured, {route})"] = dict(bandwidth=fit.bandwidth,
                                                                                  latency=fit.latency)
        for link, kw in links.items():
            for p in ps:
                net = sim.network(p, **kw)
                searched = {C: sim.search(C, p, kt, net, steps=a.steps, levels=a.levels)
                            for C in sorted(set(Cs) | set(a.table_C))}
                for C in Cs:
                    one = sum(direct["one process", C, 1][0])
                    spans, emitter = partition.tsp_layout(C, p, False)
                    zspans, zemitter = partition.tsp_layout(C, p, True)
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
    out = []
    for path in a.real:
        with open(path) as f:
            real = json.load(f)
        meta = real["meta"]
        args = cli.program("").parse_args(["--model", meta["model_arg"], "--dtype", meta["dtype"]]
                                          + ["--fuse"] * meta["fused"])
        torch.set_num_threads(meta["threads"])
        _, model, key = program.load(args, torch.device(meta["device"]))
        cost = partition.load_calibration(key)
        L, bpt = model.cfg.n_layers, bytes_per_token(model.cfg, getattr(torch, meta["dtype"]))
        per_token = cost.comm_per_token / L if cost and cost.comm_per_token else 0.0
        link = sim.Link(bpt / per_token if per_token else 1e15, cost.latency / L if cost else 0.0)
        for r in real["rows"]:
            C, p, v = r["C"], r["p"], r["variant"]
            if v == "one process":
                t = sim.replay_chain(profiling.profile_single(model, C, a.repeats, 2), [C], link, bpt).ttft
            elif v.startswith("TSP"):
                spans, emitter = partition.tsp_layout(C, p, v == "TSP-zigzag")
                segs = profiling.profile_tsp(model, C, p, v == "TSP-zigzag", a.repeats, 2)
                t = sim.replay_allgather(segs, [sum(n for _, n in s) for s in spans], link, bpt, emitter,
                                         devices=a.devices).ttft
            else:
                t = sim.replay_chain(profiling.profile_kvr(model, r["partition"], a.repeats, 2), r["partition"],
                                     link, bpt, devices=a.devices).ttft
            out.append(dict(model=key, C=C, p=p, variant=v, real_s=r["ttft_s"], simulated_s=t,
                            error=t / r["ttft_s"] - 1, link=f"{link.bandwidth / 1e9:.3g} GB/s, "
                            f"{link.latency * 1e6:.3g} us", devices=a.devices or p, real_file=path))
            print(f"{path} C={C} p={p} {v}: real {r['ttft_s'] * 1e3:.1f} ms, simulated {t * 1e3:.1f} ms, "
                  f"error {out[-1]['error']:+.1%}", flush=True)
    save(a.out, dict(machine(), command=" ".join(sys.argv)), out)
    table([dict(r, real_ms=f"{r['real_s'] * 1e3:.1f}", simulated_ms=f"{r['simulated_s'] * 1e3:.1f}",
                error=f"{r['error']:+.1%}") for r in out],
          ["C", "p", "variant", "real_ms", "simulated_ms", "error", "link", "devices"])


def main(argv=None):
    ap = cli.Parser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("profile", help="GPU: kernel table and direct profiles for the simulator")
    pr.add_argument("--dims", nargs="+", default=["llama7b", "falcon7b"],
                    choices=["llama7b", "falcon7b", "builtin:llama", "builtin:falcon"])
    pr.add_argument("--dtype", default="float16")
    pr.add_argument("--device", default="cuda")
    pr.add_argument("--fuse", action="store_true")
    pr.add_argument("--layers", type=cli.at_least(2), default=4, help="layers timed (identical layers: 4 stand for 32)")
    pr.add_argument("--C", nargs="+", type=cli.at_least(1), default=[1024, 2048, 4096, 8192, 12288, 16384])
    pr.add_argument("-p", nargs="+", type=cli.at_least(1), default=[2, 4, 8])
    pr.add_argument("--cs", nargs="+", type=cli.at_least(1), default=[128, 256, 512, 1024, 2048, 3072, 4096, 6144,
                                                           8192, 12288, 16384])
    pr.add_argument("--prefixes", nargs="+", type=cli.at_least(0), default=[0, 1024, 2048, 4096, 6144, 8192, 12288, 14336])
    pr.add_argument("--repeats", type=cli.at_least(1), default=5)
    pr.add_argument("--out", default="results/profiles-{model}.json")
    si = sub.add_parser("simulate", help="replay profiles over the paper's links: the multi-GPU tables")
    si.add_argument("profiles", nargs="+")
    si.add_argument("--steps", type=cli.at_least(1), default=16)
    si.add_argument("--levels", type=cli.at_least(1), default=4)
    si.add_argument("--table-C", nargs="+", type=cli.at_least(1), default=list(range(1024, 16385, 1024)),
                    help="contexts KVR-S is searched for to make KVR-P's table (the C predicted is left out)")
    si.add_argument("--jitter", type=cli.at_least(0.0, float), default=0.5, help="noisy network: each message up to this much slower")
    si.add_argument("--measured-link", nargs="*", default=[],
                    help="results of bench.py link: each route's fitted link is replayed too")
    si.add_argument("--direct", nargs="*", default=[], help="profile-partitions files: KVR-S/KVR-P measured")
    si.add_argument("--out", default="results/simulated.json")
    pp = sub.add_parser("profile-partitions", help="GPU: direct profiles of a simulate run's KVR-S/KVR-P")
    pp.add_argument("simulated")
    pp.add_argument("--dtype", default="float16")
    pp.add_argument("--device", default="cuda")
    pp.add_argument("--fuse", action="store_true")
    pp.add_argument("--layers", type=cli.at_least(2), default=4)
    pp.add_argument("--repeats", type=cli.at_least(1), default=5)
    pp.add_argument("--out", default="results/partitions-{model}.json")
    va = sub.add_parser("validate", help="the simulator against real runs of `ranks` on this machine")
    va.add_argument("real", nargs="+", help="results JSON of bench.py ranks")
    va.add_argument("--devices", type=cli.at_least(1), help="devices the real ranks shared (default: one each)")
    va.add_argument("--repeats", type=cli.at_least(1), default=5)
    va.add_argument("--out", default="results/validate.json")
    su = sub.add_parser("summary", help="the tables of a simulate results file, again")
    su.add_argument("file")
    a = ap.parse_args(argv)
    {"profile": profile, "simulate": simulate, "validate": validate, "profile-partitions": profile_partitions,
     "summary": lambda a: summary(json.load(open(a.file))["rows"])}[a.cmd](a)


if __name__ == "__main__":
    main()
