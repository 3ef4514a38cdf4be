"""Never a hang, never a silently wrong answer: the caches (corrupt, misfitting or implausible), files
written whole or not at all, options refused before the work, and what a newcomer reads.

Every job here runs with a cache folder of its own (KVR_CACHE) and a time limit: a hang fails.
"""
import ast
import glob
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import calibrate
import choose
from conftest import case
import cli
import partition
import program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")
KEY = "llama-d256-L4-h8-kv2-float32-cpu"               # the built-in model's key in the caches


def job(cache, n, *args, timeout=120):
    """`mpirun -n n python runahead.py --threads 1 args` with KVR_CACHE=cache; a hang is a failure."""
    cmd = [MPIRUN, "-n", str(n), sys.executable, "runahead.py", "--threads", "1", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "KVR_CACHE": str(cache)})


def one_line_on_every_rank(r, n, fragment):
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == n and len(set(lines)) == 1, r.stdout + r.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]


# ----------------------------------------------------------------------------- the caches

@pytest.mark.parametrize("name,text,fragment", [
    ("partitions.json", "{not json", "partitions.json is not valid JSON"),
    ("partitions.json", json.dumps({KEY: {"2": {"12": [5, 5]}}}), "partition 5,5 sums to 10, prompt has 12 tokens"),
    ("partitions.json", json.dumps({KEY: {"2": {"12": {"c": [6, 6]}}}}), f"entry '{KEY}', p=2, C=12"),
    ("calibration.json", "[1, 2", "calibration.json is not valid JSON"),
    ("calibration.json", json.dumps({KEY: {"lin": 1e-5, "attn": 1e-9, "speed": 3}}), "unexpected ['speed']"),
    ("calibration.json", json.dumps({KEY: {"lin": "fast"}}), "every field of a cost model is a number"),
])
def test_a_bad_cache_file_is_one_line_on_every_rank_never_a_hang(tmp_path, name, text, fragment):
    """Rank 0 reads the caches for all ranks; an error there reaches every rank (Transport.agree).
    Before, the other ranks waited in a broadcast for ever; a stored partition that did not fit
    the prompt ran, on 10 of 12 tokens."""
    (tmp_path / name).write_text(text)
    r = job(tmp_path, 2, "--prompt-len", "12", "--partition", "searched", timeout=60)
    one_line_on_every_rank(r, 2, fragment)
    assert str(tmp_path / name) in r.stderr              # the line names the file


# Runs that succeed go through the harness (conftest.harness: one job per rank count), each with a
# cache folder of its own.
case("trust-given", 2, "runahead.py", "--prompt-len", "12", "--partition", "6,6",
     cache={"partitions.json": "{not json", "calibration.json": "{not json"})
case("trust-implausible", 2, "runahead.py", "--prompt-len", "64", "--partition", "searched",
     cache={"calibration.json": json.dumps({KEY: {"lin": 1e-5, "attn": 0.0}})})
case("trust-first-use", 2, "runahead.py", "--prompt-len", "64", "--partition", "searched")
case("trust-one-rank", 1, "runahead.py", "--prompt-len", "32", "--dtype", "float16", "--max-new-tokens", "2")


def test_a_given_partition_reads_no_cache(harness):
    _, ranks, _ = harness("trust-given")
    assert "partition (6,6): 6,6  [given]" in ranks[1]["stdout"]


def test_an_implausible_calibration_is_measured_again_and_says_so(harness):
    _, ranks, _ = harness("trust-implausible")
    assert f"calibrated {KEY} again (the saved one has attn = 0.0 (not positive))" in ranks[0]["stderr"]
    saved = choose.load_calibration(KEY, str(ranks[0]["cache"] / "calibration.json"))
    assert saved.implausible() is None and saved.attn > 0


class Agreeing:
    """Transport.agree on one rank: decide() runs, its value is everyone's."""
    rank = 0

    def agree(self, decide):
        return decide()


def test_calibrate_refuses_a_fit_with_free_attention_and_measures_again(monkeypatch, tmp_path):
    """An implausible fit (free attention, a free link) is measured again, quietly: the user hears
    of the one saved, or, if every try is refused, of the error."""
    monkeypatch.setenv("KVR_CACHE", str(tmp_path))
    fits = iter([partition.CostModel(attn=0.0), partition.CostModel(comm_per_token=0.0), partition.CostModel()])
    monkeypatch.setattr(calibrate, "measure", lambda job: next(fits))
    said = []
    monkeypatch.setattr(calibrate, "say", said.append)
    calibrate.calibrate(SimpleNamespace(transport=Agreeing(), rank=0, model_key="m"), "on first use")
    assert [line.split(":")[0] for line in said] == ["calibrated m on first use"]
    assert next(fits, "all three measured") == "all three measured"
    assert choose.load_calibration("m") == partition.CostModel()
    fits = iter([partition.CostModel(attn=-1.0)] * 3)
    with pytest.raises(ValueError, match="gave attn = -1.0 .* 3 times"):
        calibrate.calibrate(SimpleNamespace(transport=Agreeing(), rank=0, model_key="x"), "on first use")


def test_the_caches_live_in_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("KVR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert choose.calibration_path() == str(tmp_path / "kvrunahead" / "calibration.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert choose.table_path() == str(tmp_path / ".cache" / "kvrunahead" / "partitions.json")
    monkeypatch.setenv("KVR_CACHE", str(tmp_path / "mine"))
    assert choose.cache_dir() == str(tmp_path / "mine")


def test_a_run_writes_its_calibration_to_the_cache_and_nothing_into_the_working_directory(harness):
    _, ranks, _ = harness("trust-first-use")
    cache = ranks[0]["cache"]
    assert f"calibrated {KEY} on first use: saved to {cache / 'calibration.json'}" in ranks[0]["stderr"]
    assert choose.load_calibration(KEY, str(cache / "calibration.json")) is not None
    assert not {"calibration.json", "partitions.json"} & set(os.listdir(ROOT))   # the job's working directory


def test_a_case_still_running_at_its_limit_ends_the_harness_job_and_is_named(tmp_path):
    """tests/harness.py bounds every case: a rank still in one after KVR_CASE_LIMIT seconds writes
    where it is and exits, which ends the job (a deadlock fails its case, not the whole suite after
    ten minutes). Here the limit is 2 s and the case needs more: the job ends, and the last case it
    named on stderr is that one, whose ranks' files say where they were."""
    cases = [dict(id="long", program="runahead.py", args=["--prompt-len", "16384", "--threads", "1"])]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    r = subprocess.run([MPIRUN, "-n", "2", sys.executable, os.path.join(ROOT, "tests", "harness.py"),
                        str(tmp_path / "cases.json"), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=50, env={**os.environ, "KVR_CASE_LIMIT": "2"})
    said = "".join(p.read_text() for p in tmp_path.glob("long.rank*.err"))
    assert r.returncode != 0 and r.stderr.splitlines()[0] == "case long", r.stderr
    assert "Timeout (0:00:02)!" in said and "runahead.py" in said, said
    assert not list(tmp_path.glob("long.rank*.json"))  # no rank finished it


# ----------------------------------------------------------------------------- files whole or not at all

def test_replace_whole_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with cli.replace_whole(str(path)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]
    with cli.replace_whole(str(path)) as tmp:
        open(tmp, "w").write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]


def test_a_process_killed_while_saving_leaves_no_file(tmp_path):
    code = ("import os, signal, sys, cli\n"
            "with cli.replace_whole(sys.argv[1]) as tmp:\n"
            "    open(tmp, 'w').write('half a file')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.pt")], cwd=ROOT, timeout=60)
    assert r.returncode == -signal.SIGKILL and not (tmp_path / "x.pt").exists()


def test_replace_whole_gives_the_mode_a_plain_open_would(tmp_path):
    """A new file gets 0666 less the umask, a replaced file keeps its mode: the temporary is made
    0600, and before, that mode survived the rename (every result and cache became owner-only)."""
    old = os.umask(0o022)
    try:
        with cli.replace_whole(str(tmp_path / "new.json")) as tmp:
            open(tmp, "w").write("{}")
        (tmp_path / "shared.json").write_text("old")
        os.chmod(tmp_path / "shared.json", 0o664)
        with cli.replace_whole(str(tmp_path / "shared.json")) as tmp:
            open(tmp, "w").write("new")
        os.umask(0o077)
        with cli.replace_whole(str(tmp_path / "private.json")) as tmp:
            open(tmp, "w").write("{}")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"new.json": 0o644, "shared.json": 0o664, "private.json": 0o600}, modes


def test_replace_whole_writes_its_temporary_beside_the_target(tmp_path, monkeypatch):
    """Beside it, not in $TMPDIR: a rename is atomic only within one file system, and fails across two."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.setenv("TMPDIR", str(other))
    monkeypatch.setattr("tempfile.tempdir", str(other))
    (tmp_path / "out").mkdir()
    with cli.replace_whole(str(tmp_path / "out" / "x.json")) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path / "out")
        open(tmp, "w").write("{}")
    assert os.listdir(other) == [] and os.listdir(tmp_path / "out") == ["x.json"]


def writes(path):
    """(line, the path written) of every call in `path` that writes a file: open(path, "w"),
    torch.save(obj, path), fig.savefig(path)."""
    for node in ast.walk(ast.parse(open(path).read())):
        f = getattr(node, "func", None)
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in (
                ("torch", "save"), ("fig", "savefig")):
            yield node.lineno, node.args[1 if f.attr == "save" else 0]
        elif isinstance(f, ast.Name) and f.id == "open" and any(
                isinstance(a, ast.Constant) and "w" in str(a.value) for a in node.args[1:2]):
            yield node.lineno, node.args[0]


def test_every_file_the_programs_write_goes_through_replace_whole():
    """The path each write opens is `tmp`, the name replace_whole yields (a temporary beside it)."""
    found = 0
    for path in [f for room in ("", "fast", "bench") for f in glob.glob(os.path.join(ROOT, room, "*.py"))]:
        for line, written in writes(path):
            found += 1
            assert getattr(written, "id", None) == "tmp", f"{os.path.relpath(path, ROOT)}:{line} writes in place"
    assert found >= 8


# ----------------------------------------------------------------------------- refused at the start

ONE_RUN = "is an option of a single run, which --search-live is not"


@pytest.mark.parametrize("args,message", [
    (["--save", "/nonexistent/x.pt"], "argument --save: /nonexistent/x.pt: no directory /nonexistent"),
    (["--trace", "/"], "argument --trace: / is a directory"),
    (["--prompt-len", "64", "--partition", "30,34"], "partition 30,34 has 2 chunks for 1 rank"),
    (["--prompt-len", "64", "--partition", "even", "--graphs"], "--graphs: CUDA graphs need --device cuda"),
    (["--prompt-ids", "1,2,x"], "--prompt-ids '1,2,x': expected comma-separated integers"),
    (["--search-span", "256"], "--search-span is an option of --search-live, which is not given"),
    (["--partition", "searched", "--repeats", "5"], "--repeats is an option of --search-live, which is not given"),
    (["--recalibrate"], "--recalibrate: --partition even has no cost model to calibrate"),
    (["--partition", "30,34", "--recalibrate"], "--recalibrate: --partition 30,34 has no cost model to calibrate"),
    (["--search-live", "--save", "x.pt"], f"--save {ONE_RUN}"),
    (["--search-live", "--trace", "t.json"], f"--trace {ONE_RUN}"),
    (["--search-live", "--max-new-tokens", "4"], f"--max-new-tokens {ONE_RUN}"),
    (["--search-live", "--math"], f"--math {ONE_RUN}"),
])
def test_input_errors_answer_before_torch_loads(args, message):
    """One line and exit 2 in a fraction of the time a model takes to load: torch is never imported."""
    r = subprocess.run([sys.executable, "-X", "importtime", "runahead.py", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    loaded = [line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    errors = [line for line in r.stderr.splitlines() if not line.startswith("import time:")]
    assert r.returncode == 2 and errors == [f"error: {message}"], r.stderr[-2000:]
    assert "torch" not in loaded


@pytest.mark.parametrize("env,ranks", [
    ({}, 1),                                                          # no launcher
    ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, 1),                  # a plain python inside salloc -n 4
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2"}, 4),   # srun -n 4
    ({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}, 2),   # srun -n 2 in salloc -n 8
    ({"SLURM_NTASKS": "8", "PMI_SIZE": "2", "PMI_RANK": "0"}, 2),     # mpirun -n 2 inside salloc -n 8
    ({"OMPI_COMM_WORLD_SIZE": "3"}, 3),
    ({"HYDRA_CONTROL_FD": "5"}, None),                                # a launcher that does not say
])
def test_the_ranks_a_launcher_started_are_its_own_not_the_allocations(monkeypatch, env, ranks):
    for v in list(os.environ):
        if v.startswith(("PMI_", "OMPI_", "MV2_", "SLURM_", "HYDRA_")):
            monkeypatch.delenv(v)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli.launched_ranks() == ranks


def test_one_rank_inside_a_slurm_allocation_runs():
    """`python runahead.py` inside `salloc -n 4` is one rank: before, SLURM_NTASKS made the early
    check count four and refuse a one-rank partition (`partition 64 has 1 chunks for 4 ranks`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_", "SLURM_"))}
    r = subprocess.run([sys.executable, "runahead.py", "--prompt-len", "64", "--partition", "64", "--threads", "1",
                        "--max-new-tokens", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**env, "SLURM_NTASKS": "4", "SLURM_NPROCS": "4", "SLURM_JOB_ID": "7"})
    assert r.returncode == 0 and "partition (64): 64  [given]" in r.stdout, r.stderr


def test_too_many_new_tokens_are_refused_before_the_work(tmp_path):
    r = job(tmp_path, 2, "--prompt-len", "64", "--max-new-tokens", "1000000000000000", timeout=60)
    one_line_on_every_rank(r, 2, "--max-new-tokens 1000000000000000: a KV cache of 64 + 1000000000000000 tokens")
    assert "TTFT" not in r.stdout


def test_generating_past_the_models_positions_warns():
    cfg = SimpleNamespace(max_position_embeddings=100)
    args = SimpleNamespace(max_new_tokens=10, dtype="float32")
    assert list(program.warnings(args, cfg, 91, torch.device("cpu"))) == []
    assert list(program.warnings(args, cfg, 95, torch.device("cpu"))) == [
        "95 prompt tokens and 10 new ones reach position 104, past the model's max_position_embeddings (100)"]
    assert list(program.warnings(args, cfg, 101, torch.device("cpu"))) == [
        "prompt of 101 tokens is longer than the model's max_position_embeddings (100)"]


# ----------------------------------------------------------------------------- a newcomer's view

def test_help_shows_every_default():
    out = subprocess.run([sys.executable, "runahead.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60).stdout
    flat = " ".join(out.split())
    for default in ("(default builtin:llama)", "first included (default 8)", "scores it (default 3)"):
        assert default in flat, default


def test_predicted_without_a_table_says_it_searched():
    _, source = choose.explain("predicted", 100, 2, "nobody", cost=partition.CostModel())
    assert source.startswith("predicted: no table entry for 2 ranks, so searched on given cost model")


def test_one_rank_is_one_rank_and_float16_on_a_cpu_says_it_is_slow(harness):
    _, ranks, _ = harness("trust-one-rank")
    assert ranks[0]["stdout"].startswith("KV-Runahead: 1 rank, ")
    assert "warning: float16 on a CPU has no fast kernels" in ranks[0]["stderr"]


def test_the_readme_does_not_quote_an_exercises_answer():
    """Exercises 4 and 8 have the student write the chain that section 5 teaches; the others' answers
    appear nowhere in the README."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    for f in glob.glob(os.path.join(ROOT, "exercises", "solutions", "*.py")):
        if os.path.basename(f)[:2] in ("04", "08"):
            continue
        src = open(f).read().splitlines()
        for fn in [n for n in ast.walk(ast.parse("\n".join(src))) if isinstance(n, ast.FunctionDef)]:
            for line in src[fn.body[0].lineno - 1:fn.end_lineno]:
                line = line.strip()
                assert len(line) < 16 or line.startswith(("#", '"')) or line not in readme, (f, line)


def test_exercise_3s_attention_only_split_is_the_same_fraction_for_every_length():
    """The attention-only cost model is scale-free: the best c0 / C does not move with C, which is
    what exercise 3 now says (it said "as C grows")."""
    text = open(os.path.join(ROOT, "exercises", "03_two_ranks", "README.md")).read()
    assert "as `C` grows" not in text and "every `C`" in text
    cost = partition.CostModel(lin=0, comm_per_token=0, latency=0, head=0)
    fractions = []
    for C in (200, 1000, 3000):
        best = min(range(1, C), key=lambda c0: cost.ttft([c0, C - c0]))
        fractions.append(best / C)
    assert max(fractions) - min(fractions) < 2 / 200


def test_the_readme_states_how_many_tests_there_are(request):
    """The README's counts are what pytest collects: this session's items when it collected the
    whole suite, else a collection of its own."""
    o = request.config.option
    whole = (request.config.args in ([], ["tests"], [os.path.join(ROOT, "tests")]) and not o.keyword and not o.markexpr
             and not o.deselect and not getattr(o, "lf", False) and not getattr(o, "failedfirst", False))
    if whole:
        ids = [item.nodeid for item in request.session.items]
    else:
        ids = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300).stdout.splitlines()
        ids = [i for i in ids if "::" in i]
    gpu = sum(i.startswith("tests/test_gpu.py::") for i in ids)
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    assert f"The tests ({len(ids) - gpu} that run anywhere" in readme and f"and {gpu} in `tests/test_gpu.py`" in readme
