"""exercises/: every check fails on its starter, for the reason the exercise is about, and passes on
its reference solution."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXERCISES = sorted(os.path.basename(d) for d in glob.glob(os.path.join(ROOT, "exercises", "[0-9][0-9]_*")))

# What the check says about each untouched starter: the failure the exercise asks the student to fix.
STARTER_FAILS_WITH = {
    "01_even": "even() in exercises/01_even/starter.py is not written yet",
    "02_counting": "dot_products() in exercises/02_counting/starter.py is not written yet",
    "03_two_ranks": "best_split() in exercises/03_two_ranks/starter.py is not written yet",
    "04_kv_heads": "rank 0 sent 114688 bytes, but its cache holds K/V of 2 heads x 14 tokens x 4 layers",
    "05_predict": "predict() in exercises/05_predict/starter.py is not written yet",
    "06_deadlock": "deadlock: `mpirun -n 4` with 1 MiB blocks ran 5 s and 0 of 4 ranks finished",
    "07_yarn": "yarn() in exercises/07_yarn/starter.py is not written yet",
    "08_chain": "update() in exercises/08_chain/starter.py is not written yet",
}


def check(name, *flags):
    return subprocess.run([sys.executable, os.path.join("exercises", "check.py"), str(int(name[:2])), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_exercise_is_complete():
    assert len(EXERCISES) >= 6 and sorted(STARTER_FAILS_WITH) == EXERCISES
    for name in EXERCISES:
        for f in (f"exercises/{name}/README.md", f"exercises/{name}/starter.py", f"exercises/{name}/check.py",
                  f"exercises/solutions/{name}.py"):
            assert os.path.exists(os.path.join(ROOT, f)), f


@pytest.mark.parametrize("name", EXERCISES)
def test_check_fails_on_the_starter(name):
    r = check(name)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith(f"FAIL {name}: ") and STARTER_FAILS_WITH[name] in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("name", EXERCISES)
def test_check_passes_on_the_solution(name):
    r = check(name, "--solution")
    assert r.returncode == 0 and r.stdout.startswith(f"PASS {name}"), r.stdout + r.stderr


def test_unknown_exercise_is_refused():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "exercises", "check.py"), "99"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no exercise 99" in r.stderr


# Exercise 8's check names the rule a chain broke: each mistake is planted in the solution's text
# (two here; the check's other messages were each seen with their own planted mistake when written).
CHAIN_MISTAKES = {
    "no Done": ([("                raise Done\n", "")], "(no Done)"),
    "own before prefix": ([("        if self.prefix:", "        k_all, v_all = self.cache.update(layer, k, v)\n        if self.prefix:"),
                           ("            self.cache.update(layer, kv[0], kv[1])\n        k_all, v_all = self.cache.update(layer, k, v)",
                            "            k_all, v_all = self.cache.update(layer, kv[0], kv[1])")],
                          "come before the prefix"),
}


@pytest.mark.parametrize("mistake", CHAIN_MISTAKES)
def test_chain_check_names_the_broken_rule(mistake, tmp_path):
    edits, says = CHAIN_MISTAKES[mistake]
    text = open(os.path.join(ROOT, "exercises", "solutions", "08_chain.py")).read()
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    planted = tmp_path / "planted.py"
    planted.write_text("import torch\n" + text)
    r = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'exercises'); import check; "
                        f"print(check.run('exercises/08_chain', {str(planted)!r})[1])"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.stdout.startswith("FAIL 08_chain: ") and says in r.stdout, r.stdout + r.stderr
