"""Many runs of runahead.py and tsp.py in one MPI job: the ranks start once, then run case after case.

    mpirun -n P python tests/harness.py CASES.json OUT

CASES.json lists cases, each {"id": ..., "program": "runahead.py" | "tsp.py", "args": [...]}: the
program's own command line, run through its own `main` exactly as `mpirun -n P python PROGRAM ARGS`
would run it, with `--save OUT/ID.pt` added (and `--trace OUT/ID.json` where the case asks for it).
Starting the ranks and importing torch is most of what a small case costs, so tests/test_mpi.py
launches one job per rank count instead of one per case. Every rank also writes OUT/ID.rankR.json:
how often its model ran the final norm (a rank that does not emit the first token must not, once
its last K/V are exchanged), and OUT/ID.rankR.out and .err, what it printed. A case may set
environment variables ("env": the cache folder). As in the programs, an exception on any
rank ends the whole job (MPI Abort): the cases before it have their files, the rest are missing, and
the test of each says which case the job died in. So does a case that hangs: a rank still in a case
after CASE_LIMIT seconds writes where it is (faulthandler) and exits, which ends the job.
"""
import faulthandler
import json
import os
import sys
from contextlib import redirect_stdout

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
import program  # noqa: E402
import runahead  # noqa: E402
import transport  # noqa: E402
import tsp  # noqa: E402
from program import abort_on_error, say  # noqa: E402

CASE_LIMIT = float(os.environ.get("KVR_CASE_LIMIT", 60))   # s; every case here takes a few
PROGRAMS = {"runahead.py": (cli.runahead, runahead.main), "tsp.py": (cli.tsp, tsp.main)}
NORM_CALLS = []
_load = program.load


def load(args, device):
    """program.load, with a count of the final norm's calls on this rank."""
    name, model, key = _load(args, device)
    model.norm.register_forward_hook(lambda *_: NORM_CALLS.append(1))
    return name, model, key


program.load = load


def main(cases_file, out):
    comm, _ = transport.init("cpu")
    for case in json.load(open(cases_file)):
        parser, run = PROGRAMS[case["program"]]
        extra = ["--save", os.path.join(out, case["id"] + ".pt")]
        if case.get("trace"):
            extra += ["--trace", os.path.join(out, case["id"] + ".json")]
        if comm.rank == 0:
            say(f"case {case['id']}")                  # where the job was, if it dies
        NORM_CALLS.clear()
        os.environ.update(case.get("env", {}))
        base = os.path.join(out, f"{case['id']}.rank{comm.rank}")
        faulthandler.dump_traceback_later(CASE_LIMIT, exit=True)   # to fd 2: a hang ends the job
        with abort_on_error(comm), open(base + ".err", "w") as err:
            stderr = os.dup(2)                         # the rank's lines (cli.say writes to fd 2)
            os.dup2(err.fileno(), 2)
            try:
                with open(base + ".out", "w") as f, redirect_stdout(f):
                    run(parser().parse_args(case["args"] + extra))
            finally:
                os.dup2(stderr, 2)
                os.close(stderr)
            with open(base + ".json", "w") as f:
                json.dump(dict(norm_calls=len(NORM_CALLS)), f)
            comm.Barrier()
        faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main(*sys.argv[1:])
