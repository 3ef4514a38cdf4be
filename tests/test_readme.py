"""README.md is a tutorial: every command it quotes is run here, and every line of code it quotes is
checked against the file it names, so the tutorial cannot drift from the code; docs/gpu.md, the GPU
and operations page, is held to the same rules.

Commands: each line starting with `$ ` inside a ```console block is run with bash, in a fresh copy of
the repository (the files git tracks or would track: what a clone holds), with `python` and `mpirun`
meaning this interpreter and the mpirun beside it (as `. .venv/bin/activate` arranges for a reader).
It must exit 0 (a command that should fail says so itself: `...; echo "exit status $?"`). The lines
after it, up to the next `$ ` or the block's end, must be its whole output (stdout and stderr in one
stream, as a terminal shows them; blank lines aside), line for line and in order, with two wildcards:
    ~840     any number (a timing: 840 is what it was when the README was written)
    ...      any text; a line that is only `...` stands for any number of lines left out.
So a quote may leave lines out only where it says so.

Code: a ```python block whose first line is `# file.py: name` quotes file.py. Its other lines, with
lines that are only `...` marking gaps, must appear in the file in that order, each run of lines
contiguous and with the same indentation relative to its first line.
"""
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from bench.figures import read_trace
from conftest import FETCH_LIMIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = ["README.md", os.path.join("docs", "gpu.md")]   # the tutorial, and the GPU and operations page
_sibling = os.path.join(os.path.dirname(sys.executable), "mpirun")
MPIRUN = _sibling if os.path.exists(_sibling) else "mpirun"
NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?"


def blocks(kind):
    """(where, first line number, lines) of each ```kind block in the documents."""
    out = []
    for doc in DOCS:
        lines, cur, start = open(os.path.join(ROOT, doc)).read().splitlines(), None, 0
        for i, line in enumerate(lines, 1):
            if cur is None and line.strip() == f"```{kind}":
                cur, start = [], i + 1
            elif cur is not None and line.strip() == "```":
                out.append((doc, start, cur))
                cur = None
            elif cur is not None:
                cur.append(line)
    return out


def commands():
    """("file:line", command, expected output lines) for every `$ ` line of the console blocks."""
    out = []
    for doc, start, lines in blocks("console"):
        first = len(out)
        for i, line in enumerate(lines):
            if line.startswith("$ "):
                out.append([f"{doc}:{start + i}", line[2:], []])
            elif line.strip():
                assert len(out) > first, f"{doc}:{start + i}: output before any command"
                out[-1][2].append(line.rstrip())
    return out


def accounts_for(expected, got):
    """True if the quoted lines `expected` (with `...` gap lines) are the output lines `got`, in order."""
    @functools.cache
    def match(i, j):                                   # expected[i:] against got[j:]
        if i == len(expected):
            return j == len(got)
        if expected[i] == "...":
            return match(i + 1, j) or (j < len(got) and match(i, j + 1))
        return j < len(got) and bool(pattern(expected[i]).fullmatch(got[j])) and match(i + 1, j + 1)
    return match(0, 0)


def pattern(expected):
    """A quoted output line as a regex for a whole output line: ~N any number, ... any text."""
    parts = re.split(r"(~\d[\d,]*(?:\.\d+)?|\.\.\.)", expected)
    return re.compile("".join(NUMBER if p.startswith("~") else ".*" if p == "..." else re.escape(p)
                              for p in parts))


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A copy of what a fresh clone holds, and a PATH whose python and mpirun are this session's."""
    dst = tmp_path_factory.mktemp("clone")
    try:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):   # not a git checkout: take what is here
        files = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) for f in fs
                 if not {".git", ".venv", "__pycache__", ".pytest_cache"} & set(d.split(os.sep))]
    for f in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(dst / f), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), dst / f)
    bin_dir = tmp_path_factory.mktemp("bin")
    tools = {"python": sys.executable}
    if os.path.exists(_sibling):
        tools["mpirun"] = _sibling
    for name, target in tools.items():
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return dst, env


def test_readme_quotes_commands():
    assert len(commands()) >= 10


@pytest.mark.parametrize("line,command,expected", [   # a fetch converts the real model: minutes, not one
    pytest.param(*c, marks=[pytest.mark.timeout(FETCH_LIMIT)] * ("fetch_model.py" in c[1])) for c in commands()],
    ids=[c[0] for c in commands()])
def test_command(clone, line, command, expected):
    root, env = clone
    t = time.time()
    r = subprocess.run(["bash", "-c", command], cwd=root, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=300)
    output = r.stdout
    assert r.returncode == 0, f"{line}: `{command}` exited {r.returncode}:\n{output}"
    got = [g.rstrip() for g in output.splitlines() if g.strip()]
    assert accounts_for(expected, got), (f"{line}: `{command}` ({time.time() - t:.1f} s) printed "
                                         "other lines than quoted:\n  " + "\n  ".join(expected)
                                         + "\n--- it printed:\n" + output)
    ratios_agree(got)
    share_fetched_models(root)


def ratios_agree(lines):
    """A printed table with ttft_ms and speedup columns: every speedup is its TSP row's ttft_ms (same C
    and p) over its own, to the printed rounding. `~N` accepts any number, so the quote alone would
    not notice a ratio printed upside down or against another row. Returns the rows checked."""
    rows, names = [], None
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells and "ttft_ms" in cells and "speedup" in cells:
            names = cells
        elif cells and names and not set(cells[0]) <= set("-"):
            rows.append(dict(zip(names, cells)))
        elif not cells:
            names = None
    for r in rows:
        tsp = next(x for x in rows if (x["C"], x["p"], x["variant"]) == (r["C"], r["p"], "TSP"))
        a, b = float(tsp["ttft_ms"]), float(r["ttft_ms"])   # each printed to 0.1 ms, the ratio to 0.01
        assert (a - 0.05) / (b + 0.05) - 0.005 <= float(r["speedup"]) <= (a + 0.05) / (b - 0.05) + 0.005, (
            f"speedup {r['speedup']} of {r['variant']} at C={r['C']} is not TSP's {a} ms over its {b} ms")
    return len(rows)


def test_the_quoted_token_lists_could_catch_a_wrong_cache():
    """A quoted `tokens: [...]` checks a run only if a wrong cache would print other tokens: a list
    that repeats a cycle of two ids (the built-in model's once did) would pass almost any run."""
    lists = [json.loads(line[len("tokens: "):]) for _, _, lines in blocks("console") for line in lines
             if line.startswith("tokens: [")]
    assert len(lists) >= 6
    for ids in lists:
        assert len(set(ids)) >= 3 * len(ids) // 4, ids


def test_a_ratio_is_checked_against_its_rows():
    table = ["| C | p | variant | ttft_ms | speedup | partition |", "|---|---|---|---|---|---|",
             "| 512 | 2 | TSP | 35.2 | 1.00 |  |", "| 512 | 2 | KVR-E | 31.0 | 1.14 | 256,256 |"]
    assert ratios_agree(table) == 2
    for wrong in ("0.88", "1.20"):                     # upside down; another row's
        with pytest.raises(AssertionError, match="is not TSP's"):
            ratios_agree(table[:3] + [table[3].replace("1.14", wrong)])


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:                                    # another file system
        shutil.copy2(src, dst)


def share_fetched_models(copy):
    """A model the README's fetch command converted in the copy is the checkout's too, if it has none
    yet (hard links where it can, renamed into place whole): the session's `smollm2` fixture, which runs the same
    fetch, then finds it instead of converting it a second time (about 35 s on 2 cores)."""
    for name in os.listdir(copy / "models") if os.path.isdir(copy / "models") else []:
        src, dst = copy / "models" / name, os.path.join(ROOT, "models", name)
        if name != "wheels" and not name.endswith(".partial") and not os.path.exists(dst):
            shutil.copytree(src, dst + ".partial", copy_function=_link_or_copy, dirs_exist_ok=True)
            os.rename(dst + ".partial", dst)


def snippets():
    """(line number, file, [runs of lines]) for every ```python block that names its file."""
    out = []
    for doc, start, lines in blocks("python"):
        m = re.fullmatch(r"# (\S+\.py): .+", lines[0].strip()) if lines else None
        if not m:
            continue
        runs, cur = [], []
        for line in lines[1:]:
            if line.strip() == "...":
                runs.append(cur)
                cur = []
            else:
                cur.append(line)
        out.append((f"{doc}:{start}", m.group(1), [r for r in runs + [cur] if r]))
    return out


def test_readme_quotes_code():
    assert len(snippets()) >= 5 and {s[0].split(":")[0] for s in snippets()} == set(DOCS)


@pytest.mark.parametrize("line,path,runs", snippets(), ids=[s[0] for s in snippets()])
def test_code_is_quoted_verbatim(line, path, runs):
    assert runs, f"{line}: the block names {path} but quotes no line of it"   # else vacuous
    text = open(os.path.join(ROOT, path)).read().splitlines()
    at = 0
    for run in runs:
        want = textwrap.dedent("\n".join(run))
        n = len(run)
        found = next((i for i in range(at, len(text) - n + 1)
                      if textwrap.dedent("\n".join(text[i:i + n])) == want), None)
        assert found is not None, f"{line}: these lines are not in {path} (in this order):\n{want}"
        at = found + n


def test_wildcards():
    assert pattern("TTFT: ~840 ms (rank 2, ...)").fullmatch("TTFT: 1035.25 ms (rank 2, barrier to first token id)")
    assert not pattern("TTFT: ~840 ms").fullmatch("TTFT: fast ms")
    assert not pattern("partition (even): 3,3,3").fullmatch("partition (even): 3,3,4")
    assert pattern("wrote out/x.png (~60 KB)").fullmatch("wrote out/x.png (81 KB)")
    assert accounts_for(["a", "...", "d"], ["a", "b", "c", "d"]) and accounts_for(["...", "b"], ["a", "b"])
    assert not accounts_for(["a", "d"], ["a", "b", "d"])            # a line left out without `...`
    assert not accounts_for(["b", "a"], ["a", "b"]) and not accounts_for(["a", "a"], ["a"])


# ----------------------------------------------------------------------------- the pictures

TIMELINE = os.path.join(ROOT, "figures", "timeline.json")     # what figures/timeline.png shows


def test_the_timeline_figures_quoted_are_the_pictures():
    """Section 5 quotes the TTFTs of the three runs figures/timeline.png draws."""
    tsp, even, front = (round(p["ttft_ms"]) for p in json.load(open(TIMELINE))["panels"])
    text = " ".join(open(README).read().split())
    assert f"its finish is the TTFT: {even} ms in this run, against {tsp} ms for TSP's emitting rank" in text
    assert f"takes queries off the ranks that see the most keys: {front} ms" in text


def test_the_timeline_picture_shows_what_todays_code_records(tmp_path):
    """The runs the picture draws, again today on fewer tokens (the spans a rank records do not
    depend on the length), record the same spans, rank by rank: name and layer, in order. A change
    to what a rank computes or exchanges (a rank that no longer stops after its last send, say)
    fails here until the picture is redrawn (python -m bench.figures timeline)."""
    panels = json.load(open(TIMELINE))["panels"]
    C, runs = 96, [("tsp.py", []), ("runahead.py", ["--partition", "even"]), ("runahead.py", ["--partition", "40,32,24"])]
    cases = [dict(id=f"panel{i}", program=script, trace=True, args=["--prompt-len", str(C), "--threads", "1",
                                                                       "--max-new-tokens", "1", *extra])
             for i, (script, extra) in enumerate(runs)]
    (tmp_path / "cases.json").write_text(json.dumps(cases))      # one job runs the three (tests/harness.py)
    r = subprocess.run([MPIRUN, "-n", "3", sys.executable, os.path.join(ROOT, "tests", "harness.py"),
                        str(tmp_path / "cases.json"), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    for i, panel in enumerate(panels):
        today = {str(rank): [[n, layer] for n, layer, _, _ in spans]
                 for rank, spans in read_trace(tmp_path / f"panel{i}.json").items()}
        assert today == panel["spans"], panel["title"]
