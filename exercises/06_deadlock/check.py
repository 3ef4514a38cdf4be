"""Exercise 6: run the ring under `mpirun -n 4` with a time limit; check what every rank gathered."""
import ast
import contextlib
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from grade import Fail

RANKS, N, TIMEOUT = 4, 262144, 5                      # 1 MiB blocks of int32
_here = os.path.join(os.path.dirname(sys.executable), "mpirun")
MPIRUN = _here if os.path.exists(_here) else "mpirun"


def answer(path):
    """The value of `WHY = ...` in the file, read without running it."""
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "WHY" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:                                    # gone meanwhile
        return ""


def stop(job, marker):
    """End a hung mpirun job and every rank of it, so that none is left spinning on a core.

    SIGTERM makes mpirun end its ranks; failing that, SIGKILL its process group (mpirun started one).
    Hydra starts each rank in a session of its own, so ranks still running after that, found by
    `marker` in their command line, are killed one by one.
    """
    job.terminate()
    try:
        job.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
    for _ in range(20):
        ranks = [int(pid) for pid in filter(str.isdigit, os.listdir("/proc")) if marker in _cmdline(pid)]
        if not ranks:
            return
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def check(path):
    with tempfile.TemporaryDirectory() as out:
        cmd = [MPIRUN, "-n", str(RANKS), sys.executable, path, "--n", str(N), "--out", out]
        job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
        try:
            log = job.communicate(timeout=TIMEOUT)[0]
        except subprocess.TimeoutExpired:
            stop(job, out)
            done = len(glob.glob(os.path.join(out, "rank*.npy")))
            raise Fail(f"deadlock: `mpirun -n {RANKS}` with {4 * N // 2**20} MiB blocks ran {TIMEOUT} s and "
                       f"{done} of {RANKS} ranks finished, so it was killed. Where is each rank waiting, and "
                       "for whom?") from None
        if job.returncode != 0:
            raise Fail(f"`mpirun -n {RANKS}` exited with status {job.returncode}; its output ends:\n"
                       + "\n".join(log.splitlines()[-15:]))
        want = np.arange(RANKS * N, dtype=np.int32).reshape(RANKS, N)
        for r in range(RANKS):
            file = os.path.join(out, f"rank{r}.npy")
            if not os.path.exists(file):
                raise Fail(f"rank {r} saved nothing to {file}; keep main() as it was")
            got = np.load(file)
            if got.shape != want.shape:
                raise Fail(f"rank {r} gathered an array of shape {got.shape}, expected {want.shape}")
            for b in range(RANKS):
                if not np.array_equal(got[b], want[b]):
                    source = [s for s in range(RANKS) if np.array_equal(got[b], want[s])]
                    raise Fail(f"rank {r}: block {b} should be rank {b}'s block, but holds "
                               + (f"rank {source[0]}'s" if source else "something else"))
    why = answer(path)
    if why != "B":
        raise Fail(f"the ring completes and every rank holds every block, but WHY = {why!r} is not the "
                   "explanation of the hang: reread the four in README.md, and where each rank waited")
    return f"{RANKS} ranks gathered {RANKS} blocks of {4 * N // 2**20} MiB; no rank waits in a cycle"
