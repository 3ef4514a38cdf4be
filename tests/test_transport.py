"""transport.py without a GPU: which route it picks, and that CPU tensors travel with their accounting.
(The GPU routes, direct and staged, are checked on a GPU: BENCHMARKS.md, "The GPU data path".)"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")


def run(code, n=1, **env):
    cmd = ([MPIRUN, "-n", str(n)] if n > 1 else []) + [sys.executable, "-c", code]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("env,want", [({}, "False"), ({"KVR_CUDA_AWARE": "1"}, "True"),
                                      ({"KVR_CUDA_AWARE": "0"}, "False")])
def test_cuda_awareness_is_queried_or_overridden(env, want):
    """The PyPI MPICH is not CUDA-aware; KVR_CUDA_AWARE overrides the query either way."""
    assert run("import transport; transport.init(); print(transport.cuda_aware_mpi())", **env).strip() == want


def test_cpu_route_and_mpi_starts_in_init():
    out = run("import transport; from mpi4py import MPI; a = MPI.Is_initialized(); comm, dev = transport.init('cpu');"
              "t = transport.Transport(comm, dev, polite=False); print(a, MPI.Is_initialized(), dev, t.direct, t.path)")
    assert out.strip() == "False True cpu True host memory (CPU tensors straight to MPI)"


def test_send_recv_allgather_and_their_accounting():
    code = """
import torch, transport
comm, dev = transport.init('cpu')
t = transport.Transport(comm, dev, polite=True)
x = torch.arange(6, dtype=torch.float64).view(2, 3) + 10 * comm.rank
if comm.rank == 0:
    t.isend(x, 1, tag=7)
    t.finish()
else:
    y = t.recv((2, 3), torch.float64, 0, tag=7)
    assert torch.equal(y, torch.arange(6, dtype=torch.float64).view(2, 3)), y
g = t.allgather(x[:, :comm.rank + 1], [1, 2], dim=1)
assert torch.equal(g, torch.cat([torch.arange(6.).view(2, 3)[:, :1], (torch.arange(6.).view(2, 3) + 10)[:, :2]], 1).double())
print(comm.rank, t.stats)
"""
    out = sorted(run(code, n=2).strip().splitlines())
    assert out == ["0 {'sends': 1, 'recvs': 0, 'allgathers': 1, 'bytes_sent': 64, 'bytes_recv': 32}",
                   "1 {'sends': 0, 'recvs': 1, 'allgathers': 1, 'bytes_sent': 32, 'bytes_recv': 64}"]
