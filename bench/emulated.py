"""Real parallel speed-up on one GPU: p small GPUs emulated by NVIDIA MPS, each of p ranks held to
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE = 100/p % of the SMs, against one process on the whole GPU.

    python -m bench.emulated run [--model dims:llama7b] [--dtype float16] [--C 4096 8192 12288 16384]
        [-p 2 4] [--repeats 3] [--route staged|direct] [--simulate] [--live-span TOKENS] [--out FILE.json]
        [--dry-run]
    python -m bench.emulated summary [--replay] FILE.json ...     the tables and the targets again, no
        GPU; --replay: the simulated cells replayed again by bench/sim.py as it is now (`replay`)

`run` starts MPS unless a daemon runs (and then stops it at the end), and runs each step as a job:
  ranks whole GPU  `mpirun -n 1 ... bench.measured ranks --variants "one process"`, no share
  ranks p          `mpirun -n p ... bench.measured ranks`, the share exported to every rank: one
                   process at the share (the last rank alone), TSP, TSP-zigzag, KVR-E, KVR-S per C
  link p           --simulate: `bench.measured link` on p ranks at the share: rank 0 to rank 1,
                   and the GPU's host link with all p copying at once
  sim p            --simulate: `bench.simulated validate`, one process at the share: the work of each
                   measured cell profiled rank by rank, replayed over that link, the ranks side by
                   side no faster together than the whole GPU (`--devices`, see `capacity`);
                   on the staged route TSP's gather goes through the one host link they share
Each share calibrates its own cost model (KVR_CACHE=FILE/cache-SHARE): KVR-S is searched for the
small GPU (--live-span: then by measured TTFT near the model's pick, as the paper searches it). A
ranks job that runs out of GPU memory runs again C by C (on the H100 4k and 8k fitted alone, not in
one job), and a C alone again without TSP and TSP-zigzag (each of their ranks holds the whole
prompt's K/V): every cell that fits is measured, one that does not says "out of memory".
FILE.json keeps every step (command, environment, exit status, the job's own meta and rows), saved
after each: the same command again goes on where a time limit cut it off, and may add values of p.
"""
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch

import cli
from bench import sim, simulated
from bench.measured import save, table
from fast.system import mps
from kvcache import bytes_per_token
from load_weights import DIMS, named
from model import Config, builtin

SHARE = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
VARIANTS = ["one process", "TSP", "TSP-zigzag", "KVR-E", "KVR-S"]
LINK_MIB = [1, 4, 16, 64, 256]                         # the message sizes --simulate times the link at
SETTINGS = ("model", "dtype", "device", "C", "repeats", "route", "fuse", "live_span")   # one of each per results file
JOBS = {"ranks": ("bench.measured", "ranks"), "link": ("bench.measured", "link"),
        "sim": ("bench.simulated", "validate")}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")


def flavor(launcher):
    """'openmpi' or 'mpich', as `mpirun --version` says: they export variables to the ranks differently."""
    try:
        r = subprocess.run([*launcher, "--version"], capture_output=True, text=True)
    except OSError as e:
        raise SystemExit(f"error: cannot run {shlex.join(launcher)} ({e.strerror}): pass --mpirun") from None
    for name, marks in (("openmpi", ("Open MPI", "OpenRTE")), ("mpich", ("HYDRA", "MPICH"))):
        if any(m in r.stdout + r.stderr for m in marks):
            return name
    raise SystemExit(f"error: {shlex.join(launcher)} --version names neither Open MPI nor MPICH: pass --mpi")


def mpirun(launcher, kind, n, env):
    """n ranks with env exported to each: Open MPI `-x VAR=value` (as root and oversubscribed, as the
    lent GPU machines need), MPICH's Hydra `-genv VAR value`."""
    cmd = launcher + [f for f in ("--allow-run-as-root", "--oversubscribe") if kind == "openmpi" and f not in launcher]
    for k, v in env.items():
        cmd += ["-x", f"{k}={v}"] if kind == "openmpi" else ["-genv", k, v]
    return cmd + ["-n", str(n)]


def step(a, kind, p, args, n=0, C=None, without=""):
    """One job at p's share (p=1: the whole GPU, no share), on n ranks of mpirun (0: no launcher);
    `without` names variants left out (a key and file of its own)."""
    env = {SHARE: str(100 // p)} if p > 1 else {}
    env["KVR_CACHE"] = f"{a.files}/cache-{100 // p}"
    if a.route != "auto" and kind != "sim" and p > 1:
        env["KVR_ROUTE"] = a.route
    env |= {k: os.environ[k] for k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY") if k in os.environ}
    Cs = ",".join(map(str, C or []))
    out = (f"{a.files}/{kind}-p{p}" + (f"-C{Cs.replace(',', '-')}" if C else "")
           + f"-no-{without}" * bool(without) + ".json")
    cmd = [sys.executable, "-m", *JOBS[kind], *args, "--out", out]
    key = (f"{kind} " + (f"p={p}" if p > 1 else "whole GPU") + (f" C={Cs}" if C else "")
           + f" without {without}" * bool(without))
    return dict(key=key, kind=kind, p=p, C=C, env=env, out=out, launched=bool(n),
                cmd=mpirun(a.launcher, a.mpi, n, env) + cmd if n else cmd)


def execute(s):
    """Run a step, its output shown as it comes. Returns the step with its exit status, a note ("" when
    it gave its results, "out of memory", or why it failed), and the job's own meta and rows."""
    if os.path.exists(s["out"]):                       # an older run's, not this one's
        os.remove(s["out"])
    t0, lines = time.time(), []
    proc = subprocess.Popen(s["cmd"], env={k: v for k, v in os.environ.items() if k != SHARE} | s["env"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
    if proc.returncode == 0 and os.path.exists(s["out"]):
        with open(s["out"]) as f:
            return dict(s, **json.load(f), rc=0, seconds=time.time() - t0, note="")
    why = next((x.strip() for x in lines if x.startswith("error")), None) or next(
        (x.strip() for x in reversed(lines) if x.strip()), "no output")     # the ranks' error line, if any
    return dict(s, rc=proc.returncode, seconds=time.time() - t0, note="out of memory" if re.search(
        "out of memory", "".join(lines), re.I) else f"failed (exit {proc.returncode}): {why}")


def start_mps(a):
    """True if this run started MPS, which it then stops at the end; a --device cuda run needs it."""
    if a.device == "cuda" and not a.dry_run and not mps():
        if not shutil.which("nvidia-cuda-mps-control"):
            raise SystemExit("error: --device cuda emulates p GPUs by MPS, but no MPS daemon runs and "
                             "nvidia-cuda-mps-control is not on PATH")
        subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True)
        print("[mps] started: nvidia-cuda-mps-control -d (stopped at the end)")
        return True
    print("[mps] " + ("none (--device cpu)" if a.device == "cpu" else "nvidia-cuda-mps-control -d unless a "
                      "daemon runs; at the end, if it started one: echo quit | nvidia-cuda-mps-control"
                      if a.dry_run else "a daemon runs already: used, and left running"))
    return False


def run(a):
    """Every step in turn (the module's docstring), then the tables and the targets."""
    if a.fuse and a.simulate:
        raise SystemExit("error: --simulate profiles with bench.simulated validate, which does not fuse: drop --fuse")
    if a.link_mib and not a.simulate:
        raise SystemExit("error: --link-mib is an option of --simulate, which is not given")
    a.C, a.files, a.launcher = sorted(a.C), os.path.abspath(os.path.splitext(a.out)[0]), shlex.split(a.mpirun)
    a.mpi = a.mpi or flavor(a.launcher)
    settings, steps = {k: getattr(a, k) for k in SETTINGS}, {}
    if os.path.exists(a.out) and not a.dry_run:
        with open(a.out) as f:
            before = json.load(f)["meta"]
        if before["settings"] != settings:
            raise SystemExit(f"error: {a.out} holds a run of other settings ({before['settings']}): pass another --out")
        steps = {k: s for k, s in before["steps"].items() if s["note"] in ("", "out of memory")}
        print(f"{a.out}: going on after the {len(steps)} steps done before (delete it to measure again)")
    started = start_mps(a)
    meta = dict(settings=settings, p=sorted(set(a.p) | {s["p"] for s in steps.values()} - {1}), mpi=a.mpi,
                launcher=a.launcher, mps="started" if started else "running" if a.device == "cuda" else None,
                command=shlex.join([sys.executable, "-m", "bench.emulated", *a.argv]), steps=steps)
    term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # a time limit: MPS is still stopped

    def do(s):
        """Run step s, or take it from before; a dry run prints it and takes it as done."""
        print(f"\n[{s['key']}]{' (done before)' * (s['key'] in steps)} " + shlex.join(
            s["cmd"] if s["launched"] else ["env", *(f"{k}={v}" for k, v in s["env"].items()), *s["cmd"]]), flush=True)
        if a.dry_run:
            return dict(s, note="", meta={"route": a.route if a.route != "auto" else "ROUTE"})
        if s["key"] not in steps:
            steps[s["key"]] = execute(s)
            save(a.out, meta, cells(meta))
        got = steps[s["key"]]
        if got["kind"] == "ranks" and not got["note"] and got["meta"]["mps_share"] != s["env"].get(SHARE):
            raise SystemExit(f"error: the ranks saw {SHARE}={got['meta']['mps_share']}, not {s['env'].get(SHARE)}: "
                             f"the launcher did not pass it on (is it {a.mpi}?)")
        if not got["note"] and not os.path.exists(s["out"]):      # a fresh machine: written again for validate
            os.makedirs(os.path.dirname(s["out"]), exist_ok=True)
            with cli.replace_whole(s["out"]) as tmp, open(tmp, "w") as f:
                json.dump(dict(meta=got["meta"], rows=got["rows"]), f)
        return got

    ranks = ["--model", a.model, "--dtype", a.dtype, "--device", a.device, "--repeats", str(a.repeats)]
    try:
        for p in [1, *sorted(a.p)]:
            every = VARIANTS[:1 if p == 1 else None]
            ran, todo = [], [(a.C, every)]
            while todo:                                # out of memory: each C alone, then a C alone
                Cs, vs = todo.pop(0)                   # without TSP's full-length caches
                live = ["--live-span", str(a.live_span)] if a.live_span and p > 1 else []
                ran.append(do(step(a, "ranks", p, [*ranks, "--C", *map(str, Cs), "--variants", *vs, *live]
                                   + ["--fuse"] * a.fuse, p, Cs, "TSP" if vs != every else "")))
                if ran[-1]["note"] == "out of memory" and len(Cs) > 1:
                    todo[:0] = [([C], vs) for C in Cs]
                elif ran[-1]["note"] == "out of memory" and "TSP" in vs:
                    todo[:0] = [(Cs, [v for v in vs if not v.startswith("TSP")])]
            ok, link = [s for s in ran if not s["note"]], []
            if a.simulate and ok and p > 1:            # the link at this share, and the host link p ranks share
                got = do(step(a, "link", p, ["--device", a.device, "--mib", *map(str, a.link_mib or LINK_MIB)], p))
                route = ok[0]["meta"]["route"]
                link = None if got["note"] else ["--measured-link", got["out"], "--route", route] + (
                    ["--shared-host"] if route == "staged" and a.device == "cuda" else [])
            if a.simulate and ok and link is not None:
                cap = capacity(steps, p)
                do(step(a, "sim", p, [*(s["out"] for s in ok), *link, "--repeats", str(a.repeats)]
                        + (["--devices", f"{cap:.3f}"] if cap else [])))
    finally:
        signal.signal(signal.SIGTERM, term)
        if started:
            subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, timeout=120)
    if not a.dry_run:
        summary(dict(meta=meta, rows=cells(meta)))


def capacity(steps, p):
    """The whole GPU's speed in shares of 100/p %: one process's TTFT at the share over the whole GPU's,
    the median over the C both measured (None for p=1 or without both). A share alone has the whole
    memory system (on an H100, 25% ran 2.93x slower than the whole GPU, not 4x), so p shares side by
    side together run at most this many times one share's speed alone: what the replay's `devices`
    caps them at, instead of p independent GPUs."""
    one = {q: {r["C"]: r["ttft_s"] for s in steps.values() if s["kind"] == "ranks" and s["p"] == q and not s["note"]
               for r in s["rows"] if r["variant"] == "one process" and r["ttft_s"]} for q in (1, p)}
    both = sorted(set(one[1]) & set(one[p])) if p > 1 else []
    return max(1.0, statistics.median(one[p][C] / one[1][C] for C in both)) if both else None


def cells(meta):
    """The results file's rows: per (p, C, variant; p=1 the whole GPU) the measured TTFT or why there is
    none, and where a sim step ran the simulated TTFT and its error. The meta gains the machine (as the
    first job's bench.measured.machine() saw it), the route and the SMs each share's ranks saw."""
    done = [s for s in meta["steps"].values() if not s["note"]]
    first = next((s["meta"] for s in done), {})
    route = next((s["meta"]["route"] for s in done if s["kind"] == "ranks" and s["p"] > 1),
                 meta["settings"]["route"])            # none ran: the route asked for
    meta.update(machine={k: first.get(k) for k in ("host", "cpus", "gpu", "torch", "cudnn", "mpi")}, route=route,
                sms={str(s["p"]): s["meta"]["sms"] for s in done if s["kind"] == "ranks"})
    sim = {(r["p"], r["C"], r["variant"]): r["simulated_s"] for s in done if s["kind"] == "sim" for r in s["rows"]}
    rows = []
    for p in [1, *meta["p"]]:
        for C in meta["settings"]["C"]:
            mine = [s for s in meta["steps"].values() if s["kind"] == "ranks" and s["p"] == p and C in s["C"]]
            ok = next((s for s in mine if not s["note"]), None)
            got = {r["variant"]: r for r in ok["rows"] if r["C"] == C} if ok else {}
            oom = any(s["note"] == "out of memory" and s["C"] == [C] for s in mine)
            why = "out of memory" if oom else next((s["note"] for s in mine if s["note"] != "out of memory"), "not run")
            for v in VARIANTS[:1 if p == 1 else None]:
                r, t = got.get(v), sim.get((p, C, v))
                rows.append(dict(model=meta["settings"]["model"], dtype=meta["settings"]["dtype"], route=route, p=p,
                                 share=100 // p, C=C, variant=v, ttft_s=r and r["ttft_s"], raw_s=r and r["raw_s"],
                                 partition=r and r["partition"], note="" if r else why if oom or not ok else "not run",
                                 simulated_s=t, error=t / r["ttft_s"] - 1 if t and r else None))
    return rows


def summary(d):
    """Per p: the measured table, headed by what it emulates, and the simulated one; then the targets."""
    meta, rows = d["meta"], d["rows"]
    t, Cs, sms = {(r["p"], r["C"], r["variant"]): r for r in rows}, sorted({r["C"] for r in rows}), meta["sms"]

    def ms(r):
        return "-" if r is None else f"{r['ttft_s'] * 1e3:.1f}" if r["ttft_s"] else r["note"]

    def ratio(x, y, fmt="{:.2f}"):
        return fmt.format(x["ttft_s"] / y["ttft_s"]) if x and y and x["ttft_s"] and y["ttft_s"] else "-"

    def simulated(r):
        return f"{r['simulated_s'] * 1e3:.1f} ({r['error']:+.1%})" if r and r["error"] is not None else "-"

    for p in meta["p"]:
        cols = {"one process at share": (p, "one process"), "whole GPU": (1, "one process"),
                **{v: (p, v) for v in VARIANTS[1:]}}
        saw = f"; the ranks saw {sms[str(p)]} SMs, one whole-GPU process {sms['1']}" if sms.get(str(p)) else ""
        print(f"\nemulated: {p} ranks at {100 // p}% of one {meta['machine']['gpu'] or 'CPU (--device cpu: no share)'}"
              f"\n{meta['settings']['model']}, {meta['settings']['dtype']}, {meta['route']} route; TTFT ms, "
              f"median of {meta['settings']['repeats']}{saw}\n")
        out = []
        for C in Cs:
            one, whole, kvrs = t.get((p, C, "one process")), t.get((1, C, "one process")), t.get((p, C, "KVR-S"))
            out.append({"C": C, **{k: ms(t.get((q, C, v))) for k, (q, v) in cols.items()},
                        "KVR-S speed-up over one process at share": ratio(one, kvrs),
                        "whole GPU / KVR-S": ratio(whole, kvrs, "{:.3f}"),
                        "TSP / KVR-S": ratio(t.get((p, C, "TSP")), kvrs)})
        table(out, list(out[0]))
        if any(r["simulated_s"] for r in rows if r["p"] == p):
            print(f"\nsimulated vs measured, {p} ranks at {100 // p}%: simulated ms (error)\n")
            table([{"C": C, **{k: simulated(t.get((q, C, v))) for k, (q, v) in cols.items()}} for C in Cs],
                  ["C", *cols])
    targets(meta, t)


def replay(d):
    """The results file d with its simulated cells replayed again: each sim step's stored profiles
    (validate's segs) by bench/sim.py as it is now, over the link its link step measured, capped as
    it was (--devices). What a change to the replay does to every cell, without a GPU."""
    meta, spec, dtype = d["meta"], d["meta"]["settings"]["model"], getattr(torch, d["meta"]["settings"]["dtype"])
    kind, _, name = spec.partition(":")
    cfg = (Config(**DIMS[name.partition(":")[0]]) if kind == "dims" else builtin(name).cfg if kind == "builtin"
           else named(spec, dtype, "cpu")[1].cfg)
    bpt = bytes_per_token(cfg, dtype)
    cells, got = {(r["p"], r["C"], r["variant"]): r for r in d["rows"]}, {}
    for s in meta["steps"].values():
        if s["kind"] != "sim" or s["note"]:
            continue
        cmd, link, host = s["cmd"], sim.Link(1e15, 0.0), None      # p=1: one rank, no messages
        if "--measured-link" in cmd:
            lrows = meta["steps"][f"link p={s['p']}"]["rows"]
            route = cmd[cmd.index("--route") + 1]
            link = sim.Link(**next(iter(simulated.measured_links(None, [route], lrows).values())))
            if "--shared-host" in cmd:
                host = tuple(sim.Link(**f) for f in simulated.measured_links(None, ["host down", "host up"],
                                                                             lrows).values())
        devices = float(cmd[cmd.index("--devices") + 1]) if "--devices" in cmd else None
        for r in s["rows"]:
            key = (r["p"], r["C"], r["variant"])
            got[key] = simulated.replay(r["variant"], r["C"], r["p"], cells[key]["partition"], r["segs"], link, bpt,
                                        devices, host)
    for key, t in got.items():
        cells[key].update(simulated_s=t, error=t / cells[key]["ttft_s"] - 1 if cells[key]["ttft_s"] else None)
    return d


def targets(meta, t):
    """The issue's targets, at 4 emulated GPUs and the largest C measured there; the simulator's error."""
    def ttft(p, C, v):
        return (t.get((p, C, v)) or {}).get("ttft_s")

    print("\nTargets\n")
    measured = [C for p, C, v in t if (p, v) == (4, "KVR-S") and ttft(4, C, v) and ttft(1, C, "one process")]
    if measured:
        C = max(measured)
        lost = "".join(f", C={K}: {r['note']}" for (p, K, v), r in t.items() if (p, v) == (4, "KVR-S") and K > C)
        k, whole, tsp = ttft(4, C, "KVR-S"), ttft(1, C, "one process"), ttft(4, C, "TSP")
        print(f"- 4 emulated GPUs, C={C}{lost}: KVR-S <= 1.05x one whole-GPU process: {k * 1e3:.1f} vs "
              f"{whole * 1e3:.1f} ms, {k / whole:.3f}x: {'met' if k <= 1.05 * whole else 'missed'}")
        print(f"- 4 emulated GPUs, C={C}, direct route: TSP / KVR-S >= 1.42: " + (
            f"not measured (this run's route: {meta['route']})" if meta["route"] != "direct" else
            f"{tsp / k:.2f}: {'met' if tsp >= 1.42 * k else 'missed'}" if tsp else f"TSP {t[4, C, 'TSP']['note']}"))
    else:
        print("- 4 emulated GPUs against the whole GPU: not measured (no p=4 cell with KVR-S and the whole GPU)")
    errors = [(r["error"], f"p={p} C={C} {v}") for (p, C, v), r in t.items() if r["error"] is not None]
    worst = max(errors, key=lambda e: abs(e[0]), default=None)
    missed = [f"{w} {e:+.1%}" for e, w in errors if abs(e) > 0.1]
    print("- simulated within 10% of measured in every cell: " + (
        f"{len(errors) - len(missed)} of {len(errors)} cells, worst {worst[0]:+.1%} ({worst[1]}): "
        f"{'missed' if missed else 'met'}" if errors else "not simulated (run --simulate)")
        + "".join(f"\n    missed: {m}" for m in missed))


def main(argv=None):
    ap = cli.Parser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the emulated GPUs, the whole GPU and (--simulate) the simulator's prediction")
    r.add_argument("--model", default="dims:llama7b")
    r.add_argument("--dtype", default="float16", choices=["float32", "float64", "float16", "bfloat16"])
    r.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: every step runs, no MPS (a test)")
    r.add_argument("--C", nargs="+", type=cli.at_least(1), default=[4096, 8192, 12288, 16384])
    r.add_argument("-p", nargs="+", type=cli.at_least(2), default=[2, 4])
    r.add_argument("--repeats", type=cli.at_least(1), default=3)
    r.add_argument("--route", default="auto", choices=["auto", "staged", "direct"], help="KVR_ROUTE of the ranks")
    r.add_argument("--fuse", action="store_true", help="compile each layer's pre/post (bench.measured ranks --fuse)")
    r.add_argument("--live-span", type=cli.at_least(1), metavar="TOKENS", help="KVR-S searched by measured TTFT "
                   "at each share, within TOKENS of the cost model's pick (bench.measured ranks --live-span)")
    r.add_argument("--simulate", action="store_true", help="the simulator's TTFT of each cell too")
    r.add_argument("--link-mib", nargs="+", type=cli.at_least(1),
                   help=f"--simulate's link (default {' '.join(map(str, LINK_MIB))})")
    r.add_argument("--mpirun", default=MPIRUN if os.path.exists(MPIRUN) else "mpirun", help="the launcher, its options")
    r.add_argument("--mpi", choices=["openmpi", "mpich"], help="the launcher's flavour (default: from its --version)")
    r.add_argument("--out", default="results/emulated.json", help="the results; each job's own go to FILE/")
    r.add_argument("--dry-run", action="store_true", help="print the commands and their environments, run nothing")
    s = sub.add_parser("summary", help="the tables and targets of results files, again")
    s.add_argument("files", nargs="+")
    s.add_argument("--replay", action="store_true", help="the simulated cells replayed again from the profiles "
                   "the files keep, by bench/sim.py as it is now (no GPU)")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        a.argv = sys.argv[1:] if argv is None else argv
        return run(a)
    for path in a.files:
        with open(path) as f:
            d = json.load(f)
        summary(replay(d) if a.replay else d)


if __name__ == "__main__":
    main()
