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
                           ("            self.cache.update(layer, *split(kv))\n        k_all, v_all = self.cache.update(layer, k, v)",
                            "            k_all, v_all = self.cache.update(layer, *split(kv))")],
                          "come before the prefix"),
}


def planted(name, edits, tmp_path, head=""):
    """The check's line on the reference solution of exercise `name` with `edits` made to its text."""
    text = open(os.path.join(ROOT, "exercises", "solutions", f"{name}.py")).read()
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "planted.py"
    path.write_text(head + text)
    r = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'exercises'); import check; "
                        f"print(check.run('exercises/{name}', {str(path)!r})[1])"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    return r.stdout + r.stderr


@pytest.mark.parametrize("mistake", CHAIN_MISTAKES)
def test_chain_check_names_the_broken_rule(mistake, tmp_path):
    edits, says = CHAIN_MISTAKES[mistake]
    out = planted("08_chain", edits, tmp_path, head="import torch\n")
    assert out.startswith("FAIL 08_chain: ") and says in out, out


# Exercises 5 and 6: an answer that breaks one of the statement's rules fails the check, and says
# where. Exercise 5's fail on its small hand-made tables; exercise 6's work on 4 ranks but not on all.
LOOP = "    for j in range(p - 1):                             # one past the previous, room for those after\n"
FIXUP = "        b[j] = min(max(b[j], (b[j - 1] if j else 0) + 1), C - (p - 1 - j))\n"
STEP = """        mine, theirs = (r - step) % p, (r - step - 1) % p   # the block passed on, the block received
        sending = comm.Isend(out[mine], dest=right, tag=step)   # start the send, do not wait for it
        comm.Recv(out[theirs], source=left, tag=step)
        sending.Wait()                                # then let the send finish, step by step
"""
BOTH_WAYS = """\
        sends = [(out[(r - step) % p], right, 2 * step), (out[(r + step) % p], left, 2 * step + 1)]
        recvs = [(out[(r - step - 1) % p], left, 2 * step), (out[(r + step + 1) % p], right, 2 * step + 1)]
        ops = [(comm.Send, sends), (comm.Recv, recvs)]
        for op, messages in ops if r % 2 == 0 else ops[::-1]:      # even ranks send first
            for buf, peer, tag in messages:
                op(buf, peer, tag=tag)
"""
MISTAKES = {
    "no fix-up": ("05_predict", [(LOOP + FIXUP, "")], "returned [7, 2, 1, 0], not a partition of 10 tokens"),
    "fix-up forward only": ("05_predict", [(FIXUP, "        b[j] = max(b[j], (b[j - 1] if j else 0) + 1)\n")],
                            "returned [7, 2, 1, 0], not a partition of 10 tokens"),
    "weight on a's": ("05_predict", [("w = (C - a) / (z - a)", "w = (z - C) / (z - a)")],
                      "returned [186, 71, 28, 15], but the rule for it gives [219, 49, 20, 12]: between 200 and "
                      "1000"),
    "outermost entries": ("05_predict", [("a, z = max(below), min(above)", "a, z = min(below), max(above)")],
                          "returned [33, 7, 5], but the rule for it gives [29, 11, 5]: between 30 and 60"),
    "truncated": ("05_predict", [("round(x * C)", "int(x * C)")],
                  "returned [91, 26, 7, 6], but the rule for it gives [91, 26, 8, 5]: outside the stored lengths"),
    "4 ranks only": ("06_deadlock", [("p, r = comm.size, comm.rank", "p, r = 4, comm.rank")],
                     "`mpirun -n 2` exited with status 1"),
    # both ways round in p // 2 steps: on an odd count, ranks p - 1 and 0 (both even) first send to each other
    "even counts only": ("06_deadlock", [("range(p - 1)", "range(p // 2)"), (STEP, BOTH_WAYS)],
                         "deadlock: `mpirun -n 3` with 1 MiB blocks ran 5 s and 0 of 3 ranks finished"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_check_fails_on_a_wrong_answer(mistake, tmp_path):
    name, edits, says = MISTAKES[mistake]
    out = planted(name, edits, tmp_path)
    assert out.startswith(f"FAIL {name}: ") and says in out, out
