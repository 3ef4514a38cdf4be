"""transport.py without a GPU: which route it picks, and that CPU tensors travel with their accounting.
(The GPU routes, direct and staged, are checked on a GPU: BENCHMARKS.md, "The GPU data path".)"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")


# As the programs do: an exception on any rank ends the job (MPI Abort), so a failing check is a
# failure at once, not a timeout while the other ranks wait for it.
ABORT = ("import sys, transport\n"
         "sys.excepthook = lambda *e: (sys.__excepthook__(*e), transport.MPI.COMM_WORLD.Abort(1))\n")


def run(code, n=1, timeout=120, **env):
    cmd = ([MPIRUN, "-n", str(n)] if n > 1 else []) + [sys.executable, "-c", ABORT + code]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
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
stats = comm.gather(t.stats, root=0)                 # one rank prints: no lines to interleave
if comm.rank == 0:
    print(stats)
"""
    assert run(code, n=2).strip() == ("[{'sends': 1, 'recvs': 0, 'allgathers': 1, 'bytes_sent': 64, 'bytes_recv': 32}, "
                                      "{'sends': 0, 'recvs': 1, 'allgathers': 1, 'bytes_sent': 32, 'bytes_recv': 64}]")


@pytest.mark.parametrize("route", ["transport.Transport", "StagedTransport"])
def test_recv_into_a_block_of_a_cache_writes_that_block_only(route):
    """The chain's receive: a layer's K/V of S tokens land in the first S positions of a cache layer
    (2, B, n_kv, capacity, hs), a view that is not contiguous, and nothing else there changes."""
    code = f"""
import torch, transport
from fast.staged import StagedTransport
comm, dev = transport.init('cpu')
t = {route}(comm, dev, polite=True)
t.reserve(2 * 3 * 4 * 5 * 8 if comm.rank == 0 else 0)
for layer in range(3):                               # more messages than the staged route's 2 slots
    kv = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).view(2, 1, 3, 4, 5) + 1000 * layer
    if comm.rank == 0:
        t.isend(kv, 1, tag=layer)
    else:
        cache = torch.full((2, 1, 3, 7, 5), -1.0, dtype=torch.float64)
        room = cache[:, :, :, :4]
        assert not room.is_contiguous()
        assert t.recv_into(room, 0, tag=layer) is room
        assert torch.equal(cache[:, :, :, :4], kv) and (cache[:, :, :, 4:] == -1).all()
t.finish()
t.barrier()
if comm.rank == 1:
    print(t.stats["recvs"], t.stats["bytes_recv"])
"""
    assert run(code, n=2).strip() == "3 2880"


def test_staged_protocol_through_shared_slots():
    """The staged route's slots, acks and all-gather, run on the CPU (plain copies for the GPU's): a chain of 7
    layers through 2 slots per rank (so rank 0 must wait for acks to reuse them), then an all-gather,
    twice; every message arrives intact and the bytes went through the sender's shared slot."""
    code = """
import torch, transport
from fast.staged import StagedTransport
comm, dev = transport.init('cpu')
t = StagedTransport(comm, dev, polite=True)
r, p = comm.rank, comm.size
S = [5 * (i + 1) for i in range(p)]                  # rank i sends S[i] rows of 3 float64
t.reserve(0 if r == p - 1 else S[r] * 24)
for it in range(2):
    for layer in range(7):
        if r > 0:
            x = t.recv((S[r - 1], 3), torch.float64, r - 1, tag=layer)
            assert torch.equal(x, torch.full((S[r - 1], 3), 100. * (r - 1) + layer + it, dtype=torch.float64))
            slot = (7 * it + layer) % 2                # round robin over the sender's two slots
            assert torch.equal(t.arena[r - 1][slot * S[r - 1] * 24:][:S[r - 1] * 24].view(torch.float64), x.view(-1))
        if r < p - 1:
            t.isend(torch.full((S[r], 3), 100. * r + layer + it, dtype=torch.float64), r + 1, tag=layer)
        g = t.allgather(torch.full((2, r + 1), float(r + layer)), [i + 1 for i in range(p)], dim=1)
        assert torch.equal(g, torch.cat([torch.full((2, i + 1), float(i + layer)) for i in range(p)], 1))
    t.barrier()
assert t.window is not None and not t.readers and not t.owed
rows = comm.gather((t.stats["sends"], t.stats["recvs"]))
if r == 0:
    print(rows)
"""
    assert run(code, n=3).strip() == "[(14, 0), (14, 14), (0, 14)]"


def test_staged_all_gather_through_shared_slots():
    """TSP's all-gather by slot: every rank's part fits its slot, so none goes through MPI."""
    code = """
import torch, transport
from fast.staged import StagedTransport
comm, dev = transport.init('cpu')
t = StagedTransport(comm, dev, polite=True)
r, p = comm.rank, comm.size
t.reserve((r + 1) * 2 * 8)
for layer in range(5):
    x = torch.arange(2. * (r + 1), dtype=torch.float64).view(2, r + 1) + 10 * r + layer
    g = t.allgather(x, [i + 1 for i in range(p)], dim=1)
    want = torch.cat([torch.arange(2. * (i + 1), dtype=torch.float64).view(2, i + 1) + 10 * i + layer
                      for i in range(p)], 1)
    assert torch.equal(g, want), (g, want)
    assert torch.equal(t.arena[r][layer % 2 * 16 * (r + 1):][:16 * (r + 1)].view(torch.float64), x.view(-1))
t.barrier()
rows = comm.gather((t.stats["allgathers"], t.stats["bytes_recv"]))
if r == 0:
    print(rows)
"""
    assert run(code, n=3).strip() == "[(5, 400), (5, 320), (5, 240)]"


def test_a_receiver_acks_what_it_holds_before_it_blocks():
    """The staged route's copies up finish when the GPU gets to them, not when they are queued: here
    a copy is done only once synchronised. The receiver must pay the acks it owes (waiting for those
    copies) before it blocks in a receive: rank 0 has two slots, so its third send waits for the ack
    of its first, and a receiver that blocks still owing it would wait for ever (a timeout here)."""
    code = """
import torch
from fast.staged import StagedTransport


class Late:
    \"\"\"A copy up that is done only once somebody waits for it (a GPU copy still in its queue).\"\"\"
    def __init__(self):
        self.done = False

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


def up(self, host, out, name, layer):
    out.copy_(host.view(out.dtype).view(out.shape))
    return Late()


StagedTransport._up = up
comm, dev = transport.init('cpu')
t = StagedTransport(comm, dev, polite=True)
t.reserve(64 * 8 if comm.rank == 0 else 0)
for layer in range(5):
    if comm.rank == 0:
        t.isend(torch.full((64,), float(layer), dtype=torch.float64), 1, tag=layer)
    else:
        assert torch.equal(t.recv((64,), torch.float64, 0, tag=layer), torch.full((64,), float(layer), dtype=torch.float64))
t.barrier()
if comm.rank == 1:
    print("ok")
"""
    assert run(code, n=2, timeout=20).strip() == "ok"


def test_a_polite_wait_leaves_the_core_to_the_ranks_that_compute():
    """A rank waiting politely for 2 s costs little CPU time (it sleeps between polls); MPICH's own
    blocking wait would spin the whole time."""
    code = """
import time, torch
comm, dev = transport.init('cpu')
t = transport.Transport(comm, dev, polite=True)
if comm.rank == 0:
    time.sleep(2.0)
    t.isend(torch.ones(4), 1, tag=0)
    t.finish()
else:
    cpu = time.process_time()
    t.recv((4,), torch.float32, 0, tag=0)
    print(f"{time.process_time() - cpu:.3f}")
"""
    assert float(run(code, n=2, timeout=60).strip()) < 0.5


def test_what_rank_0_decides_every_rank_gets_value_or_error():
    """Transport.agree: rank 0 alone runs decide(); every rank returns its value, or raises its error
    with the same message, so no rank waits in a broadcast for an answer that never comes."""
    code = """
comm, dev = transport.init('cpu')
t = transport.Transport(comm, dev, polite=True)
got = [t.agree(lambda: comm.rank * 10 + 7)]
try:
    t.agree(lambda: open('/nonexistent/calibration.json'))
except ValueError as e:
    got.append(str(e))
try:
    t.agree(lambda: {}['key'])
except ValueError as e:
    got.append(str(e))
got = comm.gather(got, root=0)
if comm.rank == 0:
    print(got)
"""
    out = run(code, n=3, timeout=60).strip()
    one = "[7, \"[Errno 2] No such file or directory: '/nonexistent/calibration.json'\", \"KeyError: 'key'\"]"
    assert out == f"[{one}, {one}, {one}]"
