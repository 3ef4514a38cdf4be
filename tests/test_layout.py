"""The repository's shape: dependencies point one way, the pure modules start no MPI, the programs
answer --help before torch loads, and every numeric option refuses a value out of range."""
import ast
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {os.path.basename(f)[:-3]: f for f in glob.glob(os.path.join(ROOT, "*.py"))}


def imports(path):
    """The project's modules that `path` imports, and the line of every import inside a function."""
    tree = ast.parse(open(path).read())
    names, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            names |= {m.split(".")[0] for m in mods if m and m.split(".")[0] in MODULES}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested += [n.lineno for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return names, nested


def test_no_import_circle_and_no_import_inside_a_function():
    graph = {}
    for name, path in MODULES.items():
        graph[name], nested = imports(path)
        assert not nested, f"{name}.py imports inside a function, line {nested[0]}"
    state = {}

    def visit(m, stack):                               # depth-first search: a grey node seen again is a circle
        state[m] = "grey"
        for n in sorted(graph[m]):
            assert state.get(n) != "grey", "import circle: " + " -> ".join(stack + [m, n])
            if n not in state:
                visit(n, stack + [m])
        state[m] = "black"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert graph["model"] == set() and graph["kvcache"] == set()        # the model imports nothing of ours
    assert "transport" not in graph["partition"] | graph["sim"]


def loaded(*modules):
    """Which of mpi4py and torch a fresh interpreter has loaded after importing `modules`."""
    r = subprocess.run([sys.executable, "-c", f"import sys, {', '.join(modules)}; "
                        "print(','.join(m for m in ('mpi4py', 'torch') if m in sys.modules))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_pure_modules_do_not_import_mpi4py():
    """The model, the cache, the partitions, the loader and the simulator start no MPI; the replay
    and the partitions do not even load torch."""
    assert loaded("model", "kvcache", "partition", "load_weights", "sim", "profiling") == "torch"
    assert loaded("sim", "partition", "cli") == ""


@pytest.mark.parametrize("script", ["runahead.py", "tsp.py"])
def test_help_answers_before_torch_loads(script):
    r = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--max-new-tokens" in r.stdout
    loaded = [line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "torch" not in loaded and "mpi4py" not in loaded


@pytest.mark.parametrize("cmd,message", [
    (["runahead.py", "--threads", "0"], "argument --threads: 0 is out of range (at least 1)"),
    (["runahead.py", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is out of range (at least 1)"),
    (["runahead.py", "--prompt-len", "-3"], "argument --prompt-len: -3 is out of range (at least 1)"),
    (["runahead.py", "--search-steps", "0"], "argument --search-steps: 0 is out of range (at least 1)"),
    (["runahead.py", "--search-levels", "0"], "argument --search-levels: 0 is out of range (at least 1)"),
    (["runahead.py", "--repeats", "0"], "argument --repeats: 0 is out of range (at least 1)"),
    (["runahead.py", "--threads", "two"], "argument --threads: invalid int value: 'two'"),
    (["tsp.py", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is out of range (at least 1)"),
    (["sim.py", "--bandwidth", "0"], "argument --bandwidth: 0 is out of range (must be > 0)"),
    (["sim.py", "--ps", "2,0"], "argument --ps: 0 is out of range (at least 1)"),
    (["sim.py", "--ps", "2,x"], "argument --ps: invalid comma-separated int value: '2,x'"),
    (["profiling.py", "--layers", "1"], "argument --layers: 1 is out of range (at least 2)"),
    (["partition.py", "even", "--C", "0", "-p", "2"], "argument --C: 0 is out of range (at least 1)"),
    (["bench.py", "ranks", "--repeats", "0"], "argument --repeats: 0 is out of range (at least 1)"),
    (["bench_sim.py", "simulate", "x.json", "--jitter", "-1"], "argument --jitter: -1 is out of range (at least 0.0)"),
    (["figures.py", "attention", "--C", "0"], "argument --C: 0 is out of range (at least 1)"),
    (["runahead.py", "--graphs"], "--graphs: CUDA graphs need --device cuda"),
])
def test_numeric_options_out_of_range_are_one_line(cmd, message):
    """A value out of range is refused in one line naming the option, never replaced by a default."""
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == f"error: {message}\n", r.stderr
