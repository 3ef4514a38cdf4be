"""bench/emulated.py without a GPU: the commands it runs (the share 100/p exported to every rank by
the launcher's own flag), MPS required, started and stopped, a ranks job out of memory split C by
C until every cell that fits is measured, going on from a results file, the tables and the targets'
verdicts from a synthetic results file, a job printing bytes that are not UTF-8, and one small run
end to end on the CPU."""
import json
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import emulated  # noqa: E402
from bench.emulated import SHARE, VARIANTS  # noqa: E402
from conftest import MPIRUN  # noqa: E402
from test_sim import markdown_rows  # noqa: E402


def printed_steps(text):
    """{step: its command line, split} of every `[step] command` line a run printed."""
    return {line[1:line.index("]")].removesuffix(" (done before)"): shlex.split(line[line.index("]") + 2:])
            for line in text.splitlines() if line.startswith("[") and not line.startswith("[mps]")}


def after(cmd, flag, n=1):
    """The n values after flag in cmd."""
    i = cmd.index(flag)
    return cmd[i + 1:i + 1 + n]


@pytest.mark.parametrize("mpi", ["openmpi", "mpich"])
def test_dry_run_commands(mpi, tmp_path, capsys):
    """p=2 and 4 get 50 and 25 % by the launcher's own flag, before the program; the whole GPU none,
    one rank and one process only; the simulator's steps the same share, the link p ranks, validate
    the ranks' own file and link. Nothing runs and nothing is written."""
    out = tmp_path / "e.json"
    emulated.main(["run", "--dry-run", "--mpi", mpi, "--mpirun", "mpirun", "-p", "2", "4", "--C", "8192", "4096",
                   "--route", "direct", "--simulate", "--out", str(out)])
    steps = printed_steps(capsys.readouterr().out)
    assert list(steps) == ["ranks whole GPU C=4096,8192", "sim whole GPU", "ranks p=2 C=4096,8192", "link p=2",
                           "sim p=2", "ranks p=4 C=4096,8192", "link p=4", "sim p=4"]
    files = str(tmp_path / "e")
    for p, share in ((2, "50"), (4, "25")):
        env = {SHARE: share, "KVR_CACHE": f"{files}/cache-{share}", "KVR_ROUTE": "direct"}
        flags = [x for k, v in env.items() for x in (["-x", f"{k}={v}"] if mpi == "openmpi" else ["-genv", k, v])]
        for key, n in ((f"ranks p={p} C=4096,8192", str(p)), (f"link p={p}", str(p))):
            cmd = steps[key]
            launcher = ["mpirun"] + ["--allow-run-as-root", "--oversubscribe"] * (mpi == "openmpi")
            assert cmd[:cmd.index(sys.executable)] == launcher + flags + ["-n", n]
        ranks = steps[f"ranks p={p} C=4096,8192"]
        assert ranks[ranks.index(sys.executable):ranks.index("--C")] == [
            sys.executable, "-m", "bench.measured", "ranks", "--model", "dims:llama7b", "--dtype", "float16",
            "--device", "cuda", "--repeats", "3"]
        assert after(ranks, "--C", 2) == ["4096", "8192"] and after(ranks, "--variants", 6) == VARIANTS + ["--out"]
        sim = steps[f"sim p={p}"]
        assert sim[:4] == ["env", f"{SHARE}={share}", f"KVR_CACHE={files}/cache-{share}", sys.executable]
        assert after(sim, "validate", 5) == [f"{files}/ranks-p{p}-C4096-8192.json", "--measured-link",
                                             f"{files}/link-p{p}.json", "--route", "direct"]
    whole = steps["ranks whole GPU C=4096,8192"]
    assert after(whole, "-n") == ["1"] and not [x for x in whole if SHARE in x or "KVR_ROUTE" in x]
    assert after(whole, "--variants", 2) == ["one process", "--out"]
    assert steps["sim whole GPU"][:3] == ["env", f"KVR_CACHE={files}/cache-100", sys.executable]
    assert "--measured-link" not in steps["sim whole GPU"] and not os.path.exists(out) and not os.path.exists(files)
    assert "--shared-host" not in steps["sim p=4"]


def test_dry_run_staged_replays_tsp_through_the_shared_host_link(tmp_path, capsys):
    """On the staged route the ranks' copies share one GPU's host link: validate is told so (its
    TSP gather through the link file's host rows); on the CPU there is no host link to replay."""
    for device, shared in (("cuda", True), ("cpu", False)):
        emulated.main(["run", "--dry-run", "--mpi", "mpich", "--mpirun", "mpirun", "-p", "4", "--C", "4096",
                       "--route", "staged", "--device", device, "--simulate", "--out", str(tmp_path / "e.json")])
        sim = printed_steps(capsys.readouterr().out)["sim p=4"]
        assert after(sim, "--route", 2) == (["staged", "--shared-host"] if shared else ["staged", "--repeats"])


def test_link_sizes_belong_to_simulate_and_are_refused_without_it(tmp_path, capsys):
    """--link-mib sets the sizes the link step times (default 1 4 16 64 256); without --simulate
    no link is timed, so it is refused rather than ignored."""
    base = ["run", "--dry-run", "--mpi", "mpich", "--mpirun", "mpirun", "-p", "2", "--C", "4096", "--route", "direct",
            "--out", str(tmp_path / "e.json")]
    for given, sizes in (([], ["1", "4", "16", "64", "256"]), (["--link-mib", "8", "32"], ["8", "32"])):
        emulated.main([*base, "--simulate", *given])
        link = printed_steps(capsys.readouterr().out)["link p=2"]
        assert link[link.index("--mib") + 1:link.index("--out")] == sizes
    with pytest.raises(SystemExit, match="^error: --link-mib is an option of --simulate, which is not given$"):
        emulated.main([*base, "--link-mib", "8"])


def test_dry_run_live_span_reaches_the_ranks_of_every_share(tmp_path, capsys):
    """--live-span: each share's ranks job searches KVR-S live (bench.measured ranks --live-span);
    the whole GPU runs one process only, and so searches nothing."""
    emulated.main(["run", "--dry-run", "--mpi", "openmpi", "--mpirun", "mpirun", "-p", "2", "4", "--C", "16384",
                   "--live-span", "512", "--out", str(tmp_path / "e.json")])
    steps = printed_steps(capsys.readouterr().out)
    assert [after(steps[f"ranks p={p} C=16384"], "--live-span") for p in (2, 4)] == [["512"], ["512"]]
    assert "--live-span" not in steps["ranks whole GPU C=16384"]


def test_flavor_from_version(tmp_path):
    """Which MPI a launcher is, from its --version: this checkout's (MPICH's Hydra), a fake Open MPI,
    and one that is neither, refused; one that is not there, a one-line error."""
    assert emulated.flavor([MPIRUN]) == "mpich"
    for name, text in (("ompi", "mpirun (Open MPI) 4.1.6"), ("other", "some launcher 1.0")):
        (tmp_path / name).write_text(f"#!/bin/sh\necho '{text}'\n")
        (tmp_path / name).chmod(0o755)
    assert emulated.flavor([str(tmp_path / "ompi")]) == "openmpi"
    with pytest.raises(SystemExit, match="neither Open MPI nor MPICH"):
        emulated.flavor([str(tmp_path / "other")])
    with pytest.raises(SystemExit, match=r"cannot run .*absent --oversubscribe \(No such file or directory\): pass --mpirun"):
        emulated.flavor([str(tmp_path / "absent"), "--oversubscribe"])


def test_a_jobs_output_that_is_not_utf8_is_shown_not_fatal(tmp_path, capsys):
    """A job may print bytes that are not UTF-8 (a ranks job under Open MPI 5.0.7 built with CUDA
    printed 0x85 on the H100): its results are still read, a failing job's error line is its note."""
    def job(code):
        return dict(out=str(tmp_path / "out.json"), env={}, cmd=[sys.executable, "-c", code])
    ok = job("import json, sys; sys.stdout.buffer.write(bytes([0x85]) + b' cuMemHostRegister\\n'); "
             f"json.dump(dict(meta={{}}, rows=[1]), open({str(tmp_path / 'out.json')!r}, 'w'))")
    got = emulated.execute(ok)
    assert (got["rc"], got["note"], got["rows"]) == (0, "", [1]) and "\ufffd cuMemHostRegister" in capsys.readouterr().out
    bad = emulated.execute(job("import sys; sys.stdout.buffer.write(bytes([0x85]) + b'\\nerror (rank 1): boom\\n'); sys.exit(3)"))
    assert (bad["rc"], bad["note"]) == (3, "failed (exit 3): error (rank 1): boom")


def fake_execute(calls, oom=lambda s: False, broken=lambda s: False):
    """emulated.execute without jobs: TTFTs in ms per 1k tokens, one process at the share p times the
    whole GPU's 10, KVR-S 10.2 (1.02x the whole GPU), TSP 15; validate 5% above, TSP-zigzag 20%."""
    ms = {"one process": 10.0, "TSP": 15.0, "TSP-zigzag": 13.0, "KVR-E": 11.0, "KVR-S": 10.2}

    def execute(s):
        calls.append(s["key"])
        if broken(s):
            raise RuntimeError("a step broke")
        if oom(s):
            return dict(s, rc=1, seconds=0.0, note="out of memory")
        if s["kind"] == "ranks":
            asked = s["cmd"][s["cmd"].index("--variants") + 1:]
            asked = asked[:next(i for i, x in enumerate(asked) if x.startswith("--"))]
            rows = [dict(C=C, p=s["p"], variant=v, ttft_s=ms[v] * C * 1e-6 * (s["p"] if v == "one process" else 1),
                         raw_s=[0.0], partition=None) for C in s["C"] for v in asked]
            meta = dict(gpu="Fake GPU", route="direct", sms=132 // s["p"], mps_share=s["env"].get(SHARE))
        elif s["kind"] == "link":
            rows, meta = [], dict(gpu="Fake GPU")
        else:                                          # validate: each given file's rows
            files = s["cmd"][s["cmd"].index("validate") + 1:]
            rows = [dict(r, simulated_s=r["ttft_s"] * (1.2 if r["variant"] == "TSP-zigzag" else 1.05))
                    for path in files[:files.index("--repeats")] if path.endswith(".json") and "/ranks-" in path
                    for r in json.load(open(path))["rows"]]
            meta = dict(gpu="Fake GPU")
        return dict(s, rc=0, seconds=0.0, note="", meta=meta, rows=rows)
    return execute


RUN = ["run", "--mpi", "mpich", "--device", "cpu", "-p", "2", "4", "--C", "4096", "8192", "16384", "--simulate"]


def test_out_of_memory_is_split_and_reported_and_a_run_goes_on(tmp_path, monkeypatch, capsys):
    """4 ranks at 16k do not fit: their job runs again C by C, then 16k without TSP, which is reported
    out of memory in every variant's cell; the targets are judged at 8k, saying why not 16k.
    The same command again runs nothing; other settings are refused."""
    calls, out = [], str(tmp_path / "e.json")
    oom = fake_execute(calls, oom=lambda s: s["kind"] == "ranks" and s["p"] == 4 and 16384 in s["C"])
    monkeypatch.setattr(emulated, "execute", oom)
    emulated.main(RUN + ["--out", out])
    assert calls == ["ranks whole GPU C=4096,8192,16384", "sim whole GPU", "ranks p=2 C=4096,8192,16384", "link p=2",
                     "sim p=2", "ranks p=4 C=4096,8192,16384", "ranks p=4 C=4096", "ranks p=4 C=8192",
                     "ranks p=4 C=16384", "ranks p=4 C=16384 without TSP", "link p=4", "sim p=4"]
    text, d = capsys.readouterr().out, json.load(open(out))
    rows, sim = d["rows"], d["meta"]["steps"]["sim p=4"]["cmd"]
    assert [x for x in sim if "/ranks-" in x] == [f"{tmp_path}/e/ranks-p4-C{C}.json" for C in (4096, 8192)]   # fitted
    assert after(sim, "--devices") == ["4.000"]        # one process at the share over the whole GPU
    assert after(d["meta"]["steps"]["sim p=2"]["cmd"], "--devices") == ["2.000"]
    assert "--devices" not in d["meta"]["steps"]["sim whole GPU"]["cmd"]
    assert len(rows) == 3 + 2 * 3 * 5
    lost = [r for r in rows if r["ttft_s"] is None]
    assert {(r["p"], r["C"]) for r in lost} == {(4, 16384)} and {r["note"] for r in lost} == {"out of memory"}
    assert all(r["simulated_s"] for r in rows if r["ttft_s"])
    four = markdown_rows(text.split("emulated: 4 ranks at 25% of one Fake GPU")[1].split("simulated vs")[0], "C")
    assert [r["C"] for r in four] == ["4096", "8192", "16384"]
    assert four[2]["KVR-S"] == four[2]["TSP"] == "out of memory" and four[2]["whole GPU"] == "163.8"
    assert four[1]["whole GPU / KVR-S"] == f"{10 / 10.2:.3f}"
    assert four[1]["KVR-S speed-up over one process at share"] == f"{40 / 10.2:.2f}"
    assert "- 4 emulated GPUs, C=8192, C=16384: out of memory: KVR-S <= 1.05x one whole-GPU process: " \
           "83.6 vs 81.9 ms, 1.020x: met" in text
    assert "TSP / KVR-S >= 1.42: 1.47: met" in text and "23 of 28 cells, worst +20.0%" in text

    calls.clear()
    emulated.main(RUN + ["--out", out])
    again = capsys.readouterr().out
    assert calls == [] and "going on after the 12 steps done before" in again
    assert again.count("(done before)") == 12
    assert json.load(open(out))["rows"] == rows
    with pytest.raises(SystemExit, match="holds a run of other settings"):
        emulated.main(RUN[:-1] + ["--repeats", "5", "--out", out])


def test_a_largest_c_that_fits_only_without_tsp_is_measured_without_it(tmp_path, monkeypatch, capsys):
    """4 ranks at 16k fit only without TSP and TSP-zigzag (whose ranks each hold the whole prompt's
    K/V): 16k runs again without them, their cells say out of memory, and the targets are judged at
    16k, TSP's ratio saying why it has none."""
    calls, out = [], str(tmp_path / "e.json")
    monkeypatch.setattr(emulated, "execute", fake_execute(calls, oom=lambda s: s["kind"] == "ranks" and s["p"] == 4
                                                          and 16384 in s["C"] and "TSP" in s["cmd"]))
    emulated.main(RUN + ["--out", out])
    assert calls[5:10] == ["ranks p=4 C=4096,8192,16384", "ranks p=4 C=4096", "ranks p=4 C=8192",
                           "ranks p=4 C=16384", "ranks p=4 C=16384 without TSP"]
    step = json.load(open(out))["meta"]["steps"]["ranks p=4 C=16384 without TSP"]
    assert step["out"].endswith("/ranks-p4-C16384-no-TSP.json")
    assert step["cmd"][step["cmd"].index("--variants") + 1:][:4] == ["one process", "KVR-E", "KVR-S", "--out"]
    rows = {(r["p"], r["C"], r["variant"]): r for r in json.load(open(out))["rows"]}
    assert rows[4, 16384, "KVR-S"]["ttft_s"] and rows[4, 16384, "one process"]["ttft_s"]
    assert {rows[4, 16384, v]["note"] for v in ("TSP", "TSP-zigzag")} == {"out of memory"}
    text = capsys.readouterr().out
    assert "- 4 emulated GPUs, C=16384: KVR-S <= 1.05x one whole-GPU process: 167.1 vs 163.8 ms, 1.020x: met" in text
    assert "TSP / KVR-S >= 1.42: TSP out of memory" in text


def test_a_share_whose_every_job_runs_out_of_memory_still_says_its_route(tmp_path, monkeypatch, capsys):
    """4 ranks out of memory at every C, with TSP and without: every cell of theirs says so, the
    table is headed by the route asked for (no ranks job of theirs could say which ran), and the
    target says it was not measured."""
    calls, out = [], str(tmp_path / "e.json")
    monkeypatch.setattr(emulated, "execute", fake_execute(calls, oom=lambda s: s["kind"] == "ranks" and s["p"] == 4))
    emulated.main(["run", "--mpi", "mpich", "--device", "cpu", "-p", "4", "--C", "16384", "--route", "direct",
                   "--out", out])
    assert calls == ["ranks whole GPU C=16384", "ranks p=4 C=16384", "ranks p=4 C=16384 without TSP"]
    d, text = json.load(open(out)), capsys.readouterr().out
    assert d["meta"]["route"] == "direct" and "dims:llama7b, float16, direct route; TTFT ms, median of 3" in text
    assert {r["note"] for r in d["rows"] if r["p"] == 4} == {"out of memory"}
    assert "- 4 emulated GPUs against the whole GPU: not measured" in text


def test_mps_required_started_and_stopped(tmp_path, monkeypatch, capsys):
    """--device cuda without MPS and without its control program: one line, nothing run. With a
    control program and no daemon: started before the first job, stopped after the last, also when
    a job fails; a daemon already running is left alone."""
    calls = []
    monkeypatch.setattr(emulated, "execute", fake_execute(calls))
    monkeypatch.setattr(emulated, "mps", lambda: False)
    monkeypatch.setenv("PATH", str(tmp_path))
    cuda = ["run", "--mpi", "mpich", "-p", "2", "--C", "256", "--out", str(tmp_path / "e.json")]
    with pytest.raises(SystemExit, match="no MPS daemon runs and nvidia-cuda-mps-control is not on PATH"):
        emulated.main(cuda)
    assert calls == [] and not os.path.exists(tmp_path / "e.json")

    log = tmp_path / "log"
    (tmp_path / "nvidia-cuda-mps-control").write_text(
        f'#!/bin/sh\nif [ "$1" = -d ]; then echo start >> {log}; else read x; echo "$x" >> {log}; fi\n')
    (tmp_path / "nvidia-cuda-mps-control").chmod(0o755)
    monkeypatch.setattr(emulated, "execute", fake_execute(calls, broken=lambda s: s["p"] == 2))
    with pytest.raises(RuntimeError, match="a step broke"):
        emulated.main(cuda)
    assert calls == ["ranks whole GPU C=256", "ranks p=2 C=256"] and log.read_text() == "start\nquit\n"
    monkeypatch.setattr(emulated, "mps", lambda: True)
    monkeypatch.setattr(emulated, "execute", fake_execute(calls))
    emulated.main(cuda)
    assert log.read_text() == "start\nquit\n" and "[mps] a daemon runs already" in capsys.readouterr().out


def synthetic(route, kvrs_ms, errors):
    """A results file of p=4 at 8k and 16k (16k out of memory) and the whole GPU, as cells() writes it."""
    rows = [dict(p=1, C=C, variant="one process", ttft_s=t, note="", simulated_s=None, error=None)
            for C, t in ((8192, 0.080), (16384, 0.250))]
    times = (("one process", 0.320), ("TSP", 0.150), ("TSP-zigzag", 0.120), ("KVR-E", 0.090), ("KVR-S", kvrs_ms / 1e3))
    for v, t in times:
        rows.append(dict(p=4, C=8192, variant=v, ttft_s=t, note="", simulated_s=t * (1 + errors.get(v, 0.0)),
                         error=errors.get(v, 0.0)))
        rows.append(dict(p=4, C=16384, variant=v, ttft_s=None, note="out of memory", simulated_s=None, error=None))
    meta = dict(settings=dict(model="dims:llama7b", dtype="float16", repeats=3), p=[4], route=route,
                machine=dict(gpu="NVIDIA H100 80GB HBM3"), sms={"1": 132, "4": 33})
    return dict(meta=meta, rows=rows)


def test_summary_tables_and_targets(tmp_path, capsys):
    """The table of a results file, again: heading, milliseconds, ratios, the out-of-memory row; the
    targets met on the direct route, and missed (or not measured) on a staged one."""
    path = tmp_path / "direct.json"
    path.write_text(json.dumps(synthetic("direct", 82.0, {"KVR-S": 0.04, "TSP": -0.06})))
    emulated.main(["summary", str(path)])
    text = capsys.readouterr().out
    assert "emulated: 4 ranks at 25% of one NVIDIA H100 80GB HBM3\ndims:llama7b, float16, direct route; TTFT ms, " \
           "median of 3; the ranks saw 33 SMs, one whole-GPU process 132" in text
    measured, oom, simulated, none = markdown_rows(text, "C")
    assert measured == {"C": "8192", "one process at share": "320.0", "whole GPU": "80.0", "TSP": "150.0",
                        "TSP-zigzag": "120.0", "KVR-E": "90.0", "KVR-S": "82.0",
                        "KVR-S speed-up over one process at share": "3.90", "whole GPU / KVR-S": "0.976",
                        "TSP / KVR-S": "1.83"}
    assert oom == dict({k: "out of memory" for k in measured}, C="16384", **{"whole GPU": "250.0"},
                       **{k: "-" for k in list(measured)[-3:]})
    assert simulated == {"C": "8192", "one process at share": "320.0 (+0.0%)", "whole GPU": "-",
                         "TSP": "141.0 (-6.0%)", "TSP-zigzag": "120.0 (+0.0%)", "KVR-E": "90.0 (+0.0%)",
                         "KVR-S": "85.3 (+4.0%)"}
    assert none == dict({k: "-" for k in simulated}, C="16384")
    assert "- 4 emulated GPUs, C=8192, C=16384: out of memory: KVR-S <= 1.05x one whole-GPU process: " \
           "82.0 vs 80.0 ms, 1.025x: met" in text
    assert "- 4 emulated GPUs, C=8192, direct route: TSP / KVR-S >= 1.42: 1.83: met" in text
    assert "every cell: 5 of 5 cells, worst -6.0% (p=4 C=8192 TSP): met" in text

    path.write_text(json.dumps(synthetic("staged", 86.0, {"TSP-zigzag": 0.12})))
    emulated.main(["summary", str(path)])
    text = capsys.readouterr().out
    assert "86.0 vs 80.0 ms, 1.075x: missed" in text
    assert "TSP / KVR-S >= 1.42: not measured (this run's route: staged)" in text
    assert "4 of 5 cells, worst +12.0% (p=4 C=8192 TSP-zigzag): missed\n" \
           "    missed: p=4 C=8192 TSP-zigzag +12.0%" in text


def test_the_link_on_more_ranks_than_two_is_rank_0_to_rank_1(tmp_path):
    """bench.measured link on 3 CPU ranks (bench.emulated runs it on p): rank 0 sends to rank 1
    while rank 2 only waits at the barriers; one row per size, no host link rows on a CPU."""
    out = tmp_path / "link.json"
    r = subprocess.run([MPIRUN, "-n", "3", sys.executable, "-m", "bench.measured", "link", "--device", "cpu", "--mib",
                        "1", "2", "--repeats", "1", "--window", "2", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=50)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.load(open(out))["rows"]
    assert [(x["route"], x["MiB"]) for x in rows] == [("host", 1), ("host", 2)]


@pytest.mark.parametrize("flags,message", [
    (["--shared-host"], "--shared-host replays the host link of a --measured-link file: name one"),
    (["--route", "direct"], "--route picks a route of a --measured-link file: name one"),
])
def test_validate_options_of_a_link_file_need_one(flags, message):
    """Without --measured-link the link is the real run's calibration, which has no routes and no
    host link: these options are refused, before any file is read, not ignored."""
    from bench import simulated
    with pytest.raises(SystemExit, match=f"^error: {message}$"):
        simulated.main(["validate", "ranks.json", *flags])


@pytest.mark.parametrize("flags,message", [
    (["--live-span", "64"], "--live-span searches KVR-S's partition: --variants has neither KVR-S nor KVR-P"),
    (["--trace-dir", "t"], "--trace-dir traces TSP, TSP-zigzag and KVR-S: --variants has none of them"),
])
def test_ranks_options_of_variants_not_run_are_refused(tmp_path, flags, message):
    """bench.measured ranks --variants "one process" KVR-E: no partition is searched and none of
    the traced variants runs, so these options would do nothing; one line, exit 2, before MPI."""
    r = subprocess.run([sys.executable, "-m", "bench.measured", "ranks", "--variants", "one process", "KVR-E",
                        "--C", "64", "--repeats", "1", "--out", str(tmp_path / "r.json"), *flags],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (2, f"error: {message}\n"), r.stderr[-2000:]
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(300)
def test_end_to_end_on_the_cpu(tmp_path):
    """Every step for real on 2 CPU ranks (no MPS): the built-in model at 128 and 256 tokens, one
    repeat, the simulator too. Every cell measured and simulated; the share reached the ranks through
    the launcher; `summary` prints the same tables from the file."""
    out = tmp_path / "e.json"
    r = subprocess.run([sys.executable, "-m", "bench.emulated", "run", "--device", "cpu", "--model", "builtin:llama",
                        "--dtype", "float32", "--C", "128", "256", "-p", "2", "--repeats", "1", "--simulate",
                        "--link-mib", "1", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.load(open(out))
    steps = d["meta"]["steps"]
    assert [s["note"] for s in steps.values()] == [""] * 5, r.stdout[-5000:]
    assert steps["ranks p=2 C=128,256"]["meta"]["mps_share"] == "50"     # through MPICH's -genv
    assert steps["ranks whole GPU C=128,256"]["meta"]["mps_share"] is None and d["meta"]["route"] == "host"
    assert len(d["rows"]) == 2 + 2 * 5 and all(x["ttft_s"] > 0 and x["simulated_s"] > 0 for x in d["rows"])
    s = subprocess.run([sys.executable, "-m", "bench.emulated", "summary", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert s.returncode == 0 and "emulated: 2 ranks at 50% of one CPU" in s.stdout
    assert markdown_rows(s.stdout, "C") == markdown_rows(r.stdout, "C")[-4:]
    assert [x["C"] for x in markdown_rows(s.stdout, "C")] == ["128", "256"] * 2
    again = emulated.replay(json.load(open(out)))["rows"]       # the replay has not changed since
    assert [(x["simulated_s"], x["error"]) for x in again] == [(x["simulated_s"], x["error"]) for x in d["rows"]]


def test_replay_of_the_stored_h100_profiles():
    """summary --replay on results/: the stored profiles replayed by today's bench/sim.py. It gives
    back what validate computed then, but for zigzag TSP, which was replayed as one all-gather a layer
    and is now two, one per span (sim.replay_allgather): slower, on the direct and the staged route."""
    for name in ("emulated-h100-direct-l16-sim.json", "emulated-h100-staged-l16-sim.json"):
        d = json.load(open(os.path.join(ROOT, "results", name)))
        then = {(r["p"], r["C"], r["variant"]): r["simulated_s"] for r in d["rows"]}
        now = {(r["p"], r["C"], r["variant"]): r["simulated_s"] for r in emulated.replay(d)["rows"]}
        zigzag = [k for k in then if k[2] == "TSP-zigzag" and then[k]]
        assert len(zigzag) == 2 and all(now[k] > then[k] for k in zigzag)
        assert all(now[k] == pytest.approx(then[k], rel=1e-9) for k in then if k not in zigzag)
