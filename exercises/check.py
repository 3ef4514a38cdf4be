"""Check an exercise: python exercises/check.py N [--solution]

Runs the check of exercise N on your exercises/NN_*/starter.py, or with --solution on the reference
solution in exercises/solutions/, prints PASS or FAIL and what was wrong, and exits 0 or 1.
"""
import argparse
import glob
import os
import sys
import traceback

from grade import HERE, ROOT, Fail, load


def exercises():
    """{N: folder} for every exercise folder NN_name."""
    return {int(os.path.basename(d)[:2]): d for d in sorted(glob.glob(os.path.join(HERE, "[0-9][0-9]_*")))}


def run(folder, path):
    """Check `path` against the exercise in `folder`; (passed, line to print)."""
    name = os.path.basename(folder)
    try:
        note = load(os.path.join(folder, "check.py"), "check_" + name).check(path)
    except Fail as e:
        return False, f"FAIL {name}: {e}"
    except NotImplementedError:
        frame = traceback.extract_tb(sys.exc_info()[2])[-1]
        return False, (f"FAIL {name}: {frame.name}() in {os.path.relpath(frame.filename, ROOT)} is not written "
                       "yet (it raises NotImplementedError)")
    except Exception:
        traceback.print_exc()
        return False, f"FAIL {name}: the code raised the error above"
    return True, f"PASS {name}" + (f": {note}" if note else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, help="the exercise's number")
    ap.add_argument("--solution", action="store_true", help="check the reference solution instead")
    a = ap.parse_args(argv)
    found = exercises()
    if a.n not in found:
        ap.error(f"no exercise {a.n}; there are {', '.join(map(str, found))}")
    folder = found[a.n]
    path = (os.path.join(HERE, "solutions", os.path.basename(folder) + ".py") if a.solution
            else os.path.join(folder, "starter.py"))
    passed, line = run(folder, path)
    print(line)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
