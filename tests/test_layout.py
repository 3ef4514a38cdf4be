"""The repository's shape: dependencies point one way, the pure modules start no MPI, the programs
answer --help before torch loads, and every numeric option refuses a value out of range."""
import ast
import glob
import os
import shutil
import subprocess
import sys

import pytest

import bench.figures
import bench.measured
import bench.profiling
import bench.sim
import bench.simulated
import choose
import cli
from conftest import MPIRUN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOM = {"": "the teaching core", "fast": "GPU fast paths", "bench": "tools that measure and draw"}
MODULES = {(f"{room}." if room else "") + os.path.basename(f)[:-3]: f
           for room in ROOM for f in glob.glob(os.path.join(ROOT, room, "*.py"))}
MODULES = {m.removesuffix(".__init__"): f for m, f in MODULES.items()}
ROOT_MODULES = sorted(m for m in MODULES if "." not in m and m not in ROOM)
READING_PATH = 1300            # at most this many lines: runahead.py, tsp.py and what they import at module level


def imports(path):
    """The project's modules that `path` imports, and the line of every import inside a function."""
    tree = ast.parse(open(path).read())
    names, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES:
            subs = {f"{node.module}.{a.name}" for a in node.names}   # from bench import sim
            names |= (subs & set(MODULES)) or {node.module}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested += [n.lineno for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return names, nested


GRAPH = {m: imports(f)[0] for m, f in MODULES.items()}


def lines(module):
    return len(open(MODULES[module]).read().splitlines())


def module_level(path):
    """The project's modules that `path` imports when it is imported or run: its module-level
    statements, blocks such as `if __name__ == "__main__":` included, functions' bodies not."""
    names = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name in MODULES)
            elif isinstance(node, ast.ImportFrom) and node.module in MODULES:
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
                names.update(subs or {node.module})
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(node, block, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
    visit(ast.parse(open(path).read()).body)
    return names | {n.rsplit(".", 1)[0] for n in names if "." in n}   # a package's __init__ comes too


def reading_path(*programs):
    """The programs and every module of the project they import at module level, transitively."""
    seen, todo = set(), list(programs)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += module_level(MODULES[m])
    return sorted(seen)


def test_no_import_circle_and_imports_inside_functions_are_the_seam():
    """An import inside a function is where an option asks for the system (fast/, the caches, the
    calibration, a checkpoint's loader): never a module the reading path already holds, and never
    in the tools or the fast paths themselves."""
    path = set(reading_path("runahead", "tsp"))
    for name, path_ in MODULES.items():
        nested = imports(path_)[1]
        if name in path:
            tree = ast.parse(open(path_).read())
            inner = {a.name if isinstance(n, ast.Import) else n.module
                     for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
                     for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
            assert not inner & path, f"{name} imports {inner & path} inside a function: they are on the path"
        else:
            assert not nested, f"{name} imports inside a function, line {nested[0]}"
    state = {}

    def visit(m, stack):                               # depth-first search: a grey node seen again is a circle
        state[m] = "grey"
        for n in sorted(GRAPH[m]):
            assert state.get(n) != "grey", "import circle: " + " -> ".join(stack + [m, n])
            if n not in state:
                visit(n, stack + [m])
        state[m] = "black"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [])


def test_the_rooms_depend_one_way():
    """The teaching core never imports a tool; the fast paths import only the interfaces they sit
    behind (fast/system.py, the seam, also what it serves); the model's one import of ours is its
    fast path's seam; the cache imports nothing."""
    for m in ROOT_MODULES + [m for m in MODULES if m.startswith("fast")]:
        assert not {n for n in GRAPH[m] if n.startswith("bench")}, f"{m} imports a tool"
    assert GRAPH["model"] == {"fast.attention"} and GRAPH["kvcache"] == set()
    assert GRAPH["fast.attention"] == set() and GRAPH["fast.direct"] == {"transport"}
    assert GRAPH["fast.staged"] == {"fast.direct", "transport"}
    assert GRAPH["fast.compiled"] == {"fast.segments"} and GRAPH["fast.segments"] == {"kvcache"}   # the cache it keys on
    assert GRAPH["fast.decode"] == {"kvcache", "model"}   # the cache's views; the blocks it replays, their RoPE
    assert "transport" not in GRAPH["partition"] | GRAPH["bench.sim"]
    assert GRAPH["fast.trace"] == {"cli"}
    assert GRAPH["fast.system"] == {"calibrate", "cli", "fast.decode", "fast.compiled", "fast.direct", "fast.staged",
                                   "fast.trace", "kvcache", "partition"}


def test_root_modules_are_short_and_the_model_is_the_decoder_as_taught():
    """No root module over 400 lines; model.py at most 350, and nothing in it selects GPU kernels,
    compiles, or replays CUDA graphs (fast/ does)."""
    long = {m: lines(m) for m in ROOT_MODULES if lines(m) > 400}
    assert not long, long
    assert lines("model") <= 350
    code = {getattr(n, "id", None) or getattr(n, "attr", None) for n in ast.walk(ast.parse(open(MODULES["model"]).read()))}
    for word in ("cuda", "cudnn", "flash", "compile", "graph"):
        used = [name for name in code if name and word in name.lower()]
        assert not used, f"model.py's code uses {used}"


@pytest.mark.timeout(300)
def test_the_reading_path_is_short_and_runs_alone(tmp_path):
    """runahead.py (at most 200 lines), tsp.py and what they import at module level come to at most
    READING_PATH lines, none of them under fast/; the README states the figure; and those files
    alone, copied into an empty folder, run both programs on the CPU with the whole checkout's tokens."""
    path = reading_path("runahead", "tsp")
    n = sum(lines(m) for m in path)
    assert n <= READING_PATH and lines("runahead") <= 200 and not [m for m in path if "." in m], (n, path)
    listed = ", ".join(f"`{m}.py`" for m in path)
    assert f"{listed}: {n} lines" in open(os.path.join(ROOT, "README.md")).read(), \
        f"README should say: {listed}: {n} lines"
    for m in path:
        shutil.copy(MODULES[m], tmp_path)
    for script in ("runahead.py", "tsp.py"):
        got = {}
        for where in (ROOT, tmp_path):
            r = subprocess.run([MPIRUN, "-n", "4", sys.executable, script, "--prompt-len", "256", "--threads", "1"],
                               cwd=where, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, (where, r.stderr)
            got[where] = [line for line in r.stdout.splitlines() if line.startswith("tokens: ")]
        assert len(got[ROOT]) == 1 and got[ROOT] == got[tmp_path], got


def loaded(*modules):
    """Which of mpi4py and torch a fresh interpreter has loaded after importing `modules`."""
    r = subprocess.run([sys.executable, "-c", f"import sys, {', '.join(modules)}; "
                        "print(','.join(m for m in ('mpi4py', 'torch') if m in sys.modules))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_pure_modules_do_not_import_mpi4py():
    """The model, the cache, generation, the partitions and their calibration, the loader and the
    simulator start no MPI; the replay and the partitions do not even load torch. The profiler
    reads tsp.py's layout, and so loads mpi4py, but MPI does not start."""
    assert loaded("model", "kvcache", "generate", "partition", "calibrate", "load_weights", "bench.sim",
                  "fast.attention", "fast.compiled", "fast.decode") == "torch"
    assert loaded("bench.sim", "partition", "cli") == ""
    r = subprocess.run([sys.executable, "-c", "import bench.profiling; from mpi4py import MPI; print(MPI.Is_initialized())"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


@pytest.mark.parametrize("script", ["runahead.py", "tsp.py"])
def test_help_answers_before_torch_loads(script):
    r = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--max-new-tokens" in r.stdout
    loaded = [line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "torch" not in loaded and "mpi4py" not in loaded


MAINS = {"runahead.py": lambda argv: cli.check_early(cli.runahead().parse_args(argv), lambda C, p: None),
         "tsp.py": lambda argv: cli.check_early(cli.tsp().parse_args(argv), lambda C, p: None),
         "choose.py": choose.main, "bench/sim.py": bench.sim.main, "bench/profiling.py": bench.profiling.main,
         "bench/measured.py": bench.measured.main, "bench/simulated.py": bench.simulated.main,
         "bench/figures.py": bench.figures.main}


@pytest.mark.parametrize("cmd,message", [
    (["runahead.py", "--threads", "0"], "argument --threads: 0 is out of range (at least 1)"),
    (["runahead.py", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is out of range (at least 1)"),
    (["runahead.py", "--prompt-len", "-3"], "argument --prompt-len: -3 is out of range (at least 1)"),
    (["runahead.py", "--search-steps", "0"], "argument --search-steps: 0 is out of range (at least 1)"),
    (["runahead.py", "--search-levels", "0"], "argument --search-levels: 0 is out of range (at least 1)"),
    (["runahead.py", "--repeats", "0"], "argument --repeats: 0 is out of range (at least 1)"),
    (["runahead.py", "--threads", "two"], "argument --threads: invalid int value: 'two'"),
    (["tsp.py", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is out of range (at least 1)"),
    (["bench/sim.py", "--bandwidth", "0"], "argument --bandwidth: 0 is out of range (must be > 0)"),
    (["bench/sim.py", "--ps", "2,0"], "argument --ps: 0 is out of range (at least 1)"),
    (["bench/sim.py", "--ps", "2,x"], "argument --ps: invalid comma-separated int value: '2,x'"),
    (["bench/profiling.py", "--layers", "1"], "argument --layers: 1 is out of range (at least 2)"),
    (["choose.py", "even", "--C", "0", "-p", "2"], "argument --C: 0 is out of range (at least 1)"),
    (["bench/measured.py", "ranks", "--repeats", "0"], "argument --repeats: 0 is out of range (at least 1)"),
    (["bench/simulated.py", "simulate", "x.json", "--jitter", "-1"], "argument --jitter: -1 is out of range (at least 0.0)"),
    (["bench/figures.py", "attention", "--C", "0"], "argument --C: 0 is out of range (at least 1)"),
    (["runahead.py", "--graphs"], "--graphs: CUDA graphs need --device cuda"),
])
def test_numeric_options_out_of_range_are_one_line(cmd, message, capfd):
    """A value out of range is refused in one line naming the option, never replaced by a default.
    Each command's own parser runs in this process (the programs check the same way before torch
    loads, and the tools parse first; test_help_answers_before_torch_loads starts real processes)."""
    with pytest.raises(SystemExit) as e:
        MAINS[cmd[0]](cmd[1:])
    assert e.value.code == 2 and capfd.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("cmd,message", [
    (["choose.py", "even", "--C", "8", "-p", "2", "--table", "t.json"],
     "--table: the even split uses no table, cost model or alignment"),
    (["choose.py", "even", "--C", "8", "-p", "2", "--align", "4"],
     "--align: the even split uses no table, cost model or alignment"),
    (["bench/figures.py", "example", "--out", "x.png"], "--out: example prints its partition, it draws no picture"),
    (["bench/figures.py", "attention", "--traces", "t.json"], "--traces: attention draws no trace; timeline does"),
    (["bench/figures.py", "timeline", "--traces", "t.json", "-p", "4"],
     "--traces draws runs made before: --C, -p and --partition make new ones"),
])
def test_options_a_command_would_not_read_are_one_line(cmd, message, capfd):
    """An option that the rest of the command line leaves unread is refused, not ignored: one line,
    exit 2, before any file is read or written."""
    with pytest.raises(SystemExit) as e:
        MAINS[cmd[0]](cmd[1:])
    assert e.value.code == 2 and capfd.readouterr().err == f"error: {message}\n"
