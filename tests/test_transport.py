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
    assert run("import transport, fast.staged; transport.init(); print(fast.staged.cuda_aware_mpi())", **env).strip() == want


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
g = torch.zeros(2, 3, dtype=torch.float64)           # rank 0's 1 position, then rank 1's 2
g[:, comm.rank:2 * comm.rank + 1] = x[:, :comm.rank + 1]
t.allgather_into(g, [[(0, 1)], [(1, 2)]], dim=1)
assert torch.equal(g, torch.cat([torch.arange(6.).view(2, 3)[:, :1], (torch.arange(6.).view(2, 3) + 10)[:, :2]], 1).double())
stats = comm.gather(t.stats, root=0)                 # one rank prints: no lines to interleave
if comm.rank == 0:
    print(stats)
"""
    assert run(code, n=2).strip() == ("[{'sends': 1, 'recvs': 0, 'allgathers': 1, 'bytes_sent': 64, 'bytes_recv': 32}, "
                                      "{'sends': 0, 'recvs': 1, 'allgathers': 1, 'bytes_sent': 32, 'bytes_recv': 64}]")


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("route", ["transport.Transport", "StagedTransport"])
def test_recv_into_a_block_of_a_cache_writes_that_block_only(route, B):
    """The chain's receive: a layer's K/V of S tokens land in the first S positions of a cache layer
    (B, capacity, 2, n_kv, hs), and nothing else there changes. For B = 1 that block is contiguous
    (positions outermost: MPI writes it in place); for B = 2 it is not (it lands and is copied)."""
    code = f"""
import torch, transport
from fast.staged import StagedTransport
comm, dev = transport.init('cpu')
t = {route}(comm, dev, polite=True)
if hasattr(t, 'reserve'):                            # the staged route's slots
    t.reserve({B} * 4 * 2 * 3 * 5 * 8 if comm.rank == 0 else 0)
for layer in range(3):                               # more messages than the staged route's 2 slots
    kv = torch.arange({B} * 4 * 2 * 3 * 5, dtype=torch.float64).view({B}, 4, 2, 3, 5) + 1000 * layer
    if comm.rank == 0:
        t.isend(kv, 1, tag=layer)
    else:
        cache = torch.full(({B}, 7, 2, 3, 5), -1.0, dtype=torch.float64)
        room = cache[:, :4]
        assert room.is_contiguous() == ({B} == 1)
        assert t.recv_into(room, 0, tag=layer) is room
        assert torch.equal(cache[:, :4], kv) and (cache[:, 4:] == -1).all()
t.finish()
t.barrier()
if comm.rank == 1:
    print(t.stats["recvs"], t.stats["bytes_recv"])
"""
    assert run(code, n=2).strip() == f"3 {B * 2880}"


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
        spans = [[(i * (i + 1) // 2, i + 1)] for i in range(p)]
        g = torch.zeros(2, p * (p + 1) // 2)
        g[:, spans[r][0][0]:][:, :r + 1] = float(r + layer)
        t.allgather_into(g, spans, dim=1)
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
    spans = [[(i * (i + 1) // 2, i + 1)] for i in range(p)]
    g = torch.zeros(2, p * (p + 1) // 2, dtype=torch.float64)
    g[:, spans[r][0][0]:][:, :r + 1] = x
    t.allgather_into(g, spans, dim=1)
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


def test_a_finished_rank_waits_politely_for_the_decoding_one():
    """program.done: a rank whose part is over stays there until the rank that decodes has finished
    (2 s here), sleeping between polls even where its waits would not (a GPU rank's), so it costs
    little CPU time. Gone on to exit, it would spin in MPI_Finalize for the whole decode instead."""
    code = """
import time, types, program
comm, dev = transport.init('cpu')
job = types.SimpleNamespace(transport=transport.Transport(comm, dev, polite=False))
if comm.rank == 1:
    time.sleep(2.0)                                    # decoding
wall, cpu = time.perf_counter(), time.process_time()
program.done(job)
if comm.rank == 0:
    print(f"{time.perf_counter() - wall:.3f} {time.process_time() - cpu:.3f}")
"""
    wall, cpu = map(float, run(code, n=2, timeout=60).split())
    assert wall > 1.5 and cpu < 0.5, (wall, cpu)


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


def test_finish_and_every_exchange_start_the_queued_sends():
    """On the staged route a send waits in `queued` until the rank's next exchange starts it: the
    next isend, a receive, an all-gather, a barrier, or finish. After finish nothing is queued or
    pending, the receiver has the bytes without any later call on the sender, and the private
    buffer it used is free for the next message of its size."""
    code = """
import torch
from fast.staged import StagedTransport
comm, dev = transport.init('cpu')
t = StagedTransport(comm, dev, polite=True)
t.reserve(4 * 8 if comm.rank == 0 else 0)            # rank 0: slots of 4 float64; rank 1 none


def x(k, n=4):
    return torch.arange(n, dtype=torch.float64) + 100 * k


if comm.rank == 0:
    t.isend(x(0), 1, tag=0)                          # by slot
    assert len(t.queued) == 1
    t.isend(x(1, 9), 1, tag=1)                       # larger than the slot: a private buffer
    assert len(t.queued) == 1 and len(t.staging) == 1   # the first send has started
    t.finish()
    assert t.queued == [] and t.pending == [] and len(t.free[72]) == 1
    assert comm.recv(source=1, tag=99) == "got 0 1"   # no transport call on this rank since finish
    t.isend(x(2, 9), 1, tag=2)
    assert len(t.staging) == 1                       # the buffer that finish let go of
    t.barrier()
    assert t.queued == []
    t.isend(x(3), 1, tag=3)
    assert torch.equal(t.recv((4,), torch.float64, 1, tag=4), x(4))
    assert t.queued == []
    t.isend(x(5), 1, tag=5)
    assert torch.equal(t.allgather_into(torch.tensor([1., 0.]), [[(0, 1)], [(1, 1)]], dim=0), torch.tensor([1., 2.]))
    assert t.queued == []
else:
    assert torch.equal(t.recv((4,), torch.float64, 0, tag=0), x(0))
    assert torch.equal(t.recv((9,), torch.float64, 0, tag=1), x(1, 9))
    comm.send("got 0 1", 0, tag=99)
    t.barrier()
    assert torch.equal(t.recv((9,), torch.float64, 0, tag=2), x(2, 9))
    t.isend(x(4), 0, tag=4)
    t.finish()
    assert torch.equal(t.recv((4,), torch.float64, 0, tag=3), x(3))
    assert torch.equal(t.allgather_into(torch.tensor([0., 2.]), [[(0, 1)], [(1, 1)]], dim=0), torch.tensor([1., 2.]))
    assert torch.equal(t.recv((4,), torch.float64, 0, tag=5), x(5))
t.finish()
t.barrier()
assert t.queued == [] and t.pending == [] and t.readers == {} and t.owed == []
rows = comm.gather((t.stats["sends"], t.stats["recvs"]))
if comm.rank == 0:
    print(rows)
"""
    assert run(code, n=2, timeout=60).strip() == "[(5, 1), (1, 5)]"


def test_the_direct_route_forwards_what_it_received_at_once():
    """On the direct route a send waits in `queued` for the rank's next exchange, except right after
    a receive: then it starts at once (fast/direct.py), so the chain's prefix goes on before the
    host has queued the rest of the layer. Only the send that follows the receive starts early."""
    code = """
import torch
from fast.direct import DirectTransport
comm, dev = transport.init('cpu')
t = DirectTransport(comm, dev, polite=True)
x = torch.arange(4, dtype=torch.float64)
if comm.rank == 0:
    t.isend(x, 1, tag=0)
    assert len(t.queued) == 1                        # nothing received before it: it waits
    t.finish()
    got = [t.recv((4,), torch.float64, 1, tag=k) for k in (1, 2)]
    assert torch.equal(got[0], x + 1) and torch.equal(got[1], x + 2)
else:
    room = torch.empty(4, dtype=torch.float64)
    t.recv_into(room, 0, tag=0)
    t.isend(room + 1, 0, tag=1)
    assert t.queued == []                            # forwarded: started by the isend itself
    t.isend(room + 2, 0, tag=2)
    assert len(t.queued) == 1                        # the next one waits as before
    t.finish()
rows = comm.gather((t.stats["sends"], t.stats["recvs"]))   # one rank prints: two would interleave
if comm.rank == 0:
    print(rows)
"""
    assert run(code, n=2, timeout=60).strip() == "[(1, 2), (2, 1)]"


def test_staged_slots_fit_messages_of_any_size_and_are_remade_only_when_asked():
    """StagedTransport.reserve and the slots: with zero bytes reserved nothing is shared and messages
    go through MPI; a message of exactly a slot or fewer bytes goes by slot (the smaller one arrives
    alone, not the slot's stale rest), a larger one through MPI, leaving the slots alone; reserving
    the same again keeps the window; other sizes or another slot count make it anew, with nothing in
    flight, filled from slot 0, and the receiver finds each slot by the sender's slot size."""
    code = """
import torch
from fast.staged import StagedTransport
comm, dev = transport.init('cpu')
r = comm.rank
t = StagedTransport(comm, dev, polite=True)


def f(k, n):
    return torch.arange(n, dtype=torch.float64) + 100 * k


def slot(sender, s, n):                               # the first n float64 of the sender's slot s
    b = t.slot_bytes[sender]
    return t.arena[sender][s * b:s * b + 8 * n].view(torch.float64)


t.reserve(0)                                         # zero bytes everywhere: nothing shared
assert t.arena == {} and t.slot_bytes == [0, 0]
if r == 0:
    t.isend(f(0, 3), 1, tag=0)
    t.finish()
else:
    assert torch.equal(t.recv((3,), torch.float64, 0, tag=0), f(0, 3))
t.barrier()

t.reserve(64 if r == 0 else 0)                       # rank 0: 2 slots of 8 float64
assert t.slot_bytes == [64, 0] and list(t.arena) == [0] and t.slots == 2
w, a = t.window, t.arena[0]
t.reserve(64 if r == 0 else 0)                       # the same again: kept
assert t.window is w and t.arena[0] is a
if r == 0:
    t.isend(f(1, 8), 1, tag=1)                       # exactly a slot: slot 0
    t.isend(f(2, 8), 1, tag=2)                       # slot 1
    t.isend(f(3, 3), 1, tag=3)                       # smaller: slot 0 again, its rest stale
    t.isend(f(4, 12), 1, tag=4)                      # larger: through MPI
    t.finish()
    assert comm.recv(source=1, tag=99) == "checked"
else:
    for k in (1, 2):                                 # (a slot is reused only once acked: by the next call)
        assert torch.equal(t.recv((8,), torch.float64, 0, tag=k), f(k, 8))
        assert torch.equal(slot(0, k - 1, 8), f(k, 8))
    room = torch.full((8,), -1.0, dtype=torch.float64)
    t.recv_into(room[:3], 0, tag=3)
    assert torch.equal(room[:3], f(3, 3)) and (room[3:] == -1).all(), room
    assert torch.equal(slot(0, 0, 3), f(3, 3)) and torch.equal(slot(0, 0, 8)[3:], f(1, 8)[3:])
    assert torch.equal(t.recv((12,), torch.float64, 0, tag=4), f(4, 12))
    assert torch.equal(slot(0, 0, 3), f(3, 3)) and torch.equal(slot(0, 1, 8), f(2, 8))
    comm.send("checked", 0, tag=99)

t.reserve(24 if r == 0 else 40)                      # other sizes: made anew
assert t.window is not w and t.slot_bytes == [24, 40] and sorted(t.arena) == [0, 1]
assert t.readers == {} and t.owed == []              # nothing of the old slots in flight
w = t.window
if r == 0:
    t.isend(f(5, 3), 1, tag=5)                       # 24 B: slot 0, the turn starts again
    t.isend(f(6, 4), 1, tag=6)                       # 32 B > 24: through MPI
    assert torch.equal(t.recv((5,), torch.float64, 1, tag=7), f(7, 5)) and torch.equal(slot(1, 0, 5), f(7, 5))
    t.isend(f(8, 3), 1, tag=8)                       # slot 1, at 24 B (rank 1's slots are 40 B)
else:
    assert torch.equal(t.recv((3,), torch.float64, 0, tag=5), f(5, 3)) and torch.equal(slot(0, 0, 3), f(5, 3))
    assert torch.equal(t.recv((4,), torch.float64, 0, tag=6), f(6, 4))
    t.isend(f(7, 5), 0, tag=7)                       # 40 B: rank 1's slot 0
    assert torch.equal(t.recv((3,), torch.float64, 0, tag=8), f(8, 3)) and torch.equal(slot(0, 1, 3), f(8, 3))
t.finish()
t.barrier()

t.reserve(24 if r == 0 else 40, slots=3)             # the same sizes, 3 slots: made anew
assert t.window is not w and t.slots == 3
for k in range(7):                                   # round robin over 3
    if r == 0:
        t.isend(f(10 + k, 3), 1, tag=10 + k)
    else:
        assert torch.equal(t.recv((3,), torch.float64, 0, tag=10 + k), f(10 + k, 3))
        assert torch.equal(slot(0, k % 3, 3), f(10 + k, 3)), k
t.finish()
t.barrier()
rows = comm.gather((t.stats["sends"], t.stats["recvs"]))
if r == 0:
    print(rows)
"""
    assert run(code, n=2, timeout=60).strip() == "[(15, 1), (1, 15)]"


def test_a_sender_reuses_a_slot_only_once_its_reader_has_acked():
    """The staged slots: rank 0 has 2 and sends 4 messages that rank 1 starts reading only once rank
    0 has blocked; rank 0 must block in its third send (slot 0 again, round robin), waiting for the
    ack of the first, which it has not overwritten. After a barrier no ack is owed, awaited or left
    unreceived."""
    code = """
import torch
from fast.staged import StagedTransport
comm, dev = transport.init('cpu')
t = StagedTransport(comm, dev, polite=True)
side = comm.Dup()                                    # the test's own notes, apart from the transport's
t.reserve(8 * 8 if comm.rank == 0 else 0)
x = [torch.full((8,), float(k), dtype=torch.float64) for k in range(4)]
if comm.rank == 0:
    told, wait, sending = [], t.wait, [None]

    def tell(what):
        if not told:
            told.append(what)
            side.send(what, 1)

    def waiting(req):                                # about to block: tell rank 1 in which send
        tell(f"waits in send {sending[0]}")
        return wait(req)

    t.wait = waiting
    for k in range(4):
        sending[0] = k
        t.isend(x[k], 1, tag=k)
    tell("never waited")
    t.wait = wait
    t.finish()
else:
    told = side.recv(source=0)                       # rank 1 reads nothing before this
    got = [t.recv((8,), torch.float64, 0, tag=k) for k in range(4)]
    assert told == "waits in send 2", told
    assert all(torch.equal(g, w) for g, w in zip(got, x)), got
t.barrier()
assert t.readers == {} and t.owed == [] and t.queued == []
t.finish()                                           # (the acks' own sends may still be listed)
assert t.pending == []
assert not t.acks.Iprobe(transport.MPI.ANY_SOURCE, transport.MPI.ANY_TAG)   # every ack was taken
if comm.rank == 1:
    print("ok")
"""
    assert run(code, n=2, timeout=60).strip() == "ok"


@pytest.mark.parametrize("route", ["transport.Transport", "StagedTransport"])
def test_all_gather_of_unequal_parts_along_any_dim(route):
    """All-gather in place of parts of unequal sizes (one of them empty) along dims 0, 1 and 2, into
    buffers that are blocks of larger tensors, in four dtypes. Staged: parts that all fit their slots go by slot (each
    rank's in its own slot, round robin, busy until every other rank has acked it), and once one does
    not fit, all go through MPI and no slot is written. The accounting counts each rank's part as
    sent and the others' as received."""
    code = f"""
import math, torch
from fast.staged import StagedTransport
comm, dev = transport.init('cpu')
r, p = comm.rank, comm.size
t = {route}(comm, dev, polite=True)
staged = isinstance(t, StagedTransport)
if staged:                                           # rank r's slot: a (2, r + 1, 3) float64 part
    t.reserve((r + 1) * 6 * 8)


def part(k, shape, dtype=torch.float64):
    return (torch.arange(math.prod(shape)).view(shape) + 1000 * k).to(dtype)


def mine(s, nbytes):                                 # this rank's slot s
    b = t.slot_bytes[r]
    return t.arena[r][s * b:s * b + nbytes]


def gather(make, counts, dim):                       # into a buffer that is a block of a larger one
    want = torch.cat([make(i, counts[i]) for i in range(p)], dim)
    room = list(want.shape)
    room[dim] += 2
    whole = torch.full(room, -7, dtype=want.dtype)
    g = whole.narrow(dim, 0, want.shape[dim])
    starts = [sum(counts[:i]) for i in range(p)]
    g.narrow(dim, starts[r], counts[r]).copy_(make(r, counts[r]))
    assert t.allgather_into(g, [[(a, n)] for a, n in zip(starts, counts)], dim) is g
    assert torch.equal(g, want), (g, want)
    assert (whole.narrow(dim, want.shape[dim], 2) == -7).all()   # the room after it untouched


a = lambda i, c: part(i, (2, 3, c)).transpose(1, 2)   # (2, c, 3), not contiguous
gather(a, [1, 2, 3], 1)                              # every part fits: by slot
if staged:
    assert torch.equal(mine(0, 48 * (r + 1)), a(r, r + 1).contiguous().view(-1).view(torch.uint8))
    assert len(t.readers[0]) == p - 1                # slot 0 is busy until the p - 1 others ack
    keep = t.arena[r].clone()
gather(lambda i, c: part(10 + i, (3, 2, c))[:, :, :3].permute(2, 0, 1), [2, 1, 2], 0)   # rank 0's: 96 B > 48
gather(lambda i, c: part(20 + i, (2, 1, 4), torch.float32)[:, :, :c], [0, 2, 1], 2)     # an empty part
if staged:
    assert torch.equal(t.arena[r], keep)             # through MPI: no slot written
d = lambda i, c: part(30 + i, (2, c, 3), torch.int64)
gather(d, [1, 2, 3], 1)                              # by slot 1: the turn did not move
if staged:
    assert torch.equal(mine(1, 48 * (r + 1)), d(r, r + 1).view(-1).view(torch.uint8))
gather(lambda i, c: part(40 + i, (2, c, 3), torch.bfloat16), [1, 2, 3], 1)   # slot 0 again
t.barrier()
if staged:                                           # every ack paid and taken
    assert t.readers == {{}} and t.owed == []
    assert not t.acks.Iprobe(transport.MPI.ANY_SOURCE, transport.MPI.ANY_TAG)
rows = comm.gather(t.stats)
if r == 0:
    print(rows)
"""
    out = run(code, n=3, timeout=60).strip()
    stats = [dict(sends=0, recvs=0, allgathers=5, bytes_sent=s, bytes_recv=v)
             for s, v in ((204, 708), (280, 632), (428, 484))]
    assert out == str(stats)


@pytest.mark.parametrize("route", ["transport.Transport", "DirectTransport", "StagedTransport"])
def test_all_gather_of_two_spans_a_rank_into_a_cache_layer(route):
    """Zigzag's all-gather: rank r holds chunks r and 2p-1-r; two gathers in place put every rank's
    K/V at their positions of a cache layer's first C positions, (B, C, 2, n_kv, hs) of a larger
    capacity, and nothing past C is written. Counted as one all-gather."""
    code = f"""
import torch
from fast.direct import DirectTransport
from fast.staged import StagedTransport
from kvcache import split
import tsp
comm, dev = transport.init('cpu')
r, p = comm.rank, comm.size
t = {route}(comm, dev, polite=True)
if isinstance(t, StagedTransport):
    t.reserve(2 * 2 * 3 * 4 * 8)
C = 13
spans, _ = tsp.tsp_layout(C, p, zigzag=True)
want = torch.arange(2 * 2 * C * 4, dtype=torch.float64).view(1, C, 2, 2, 4)
for layer in range(3):
    layer_kv = torch.full((1, C + 5, 2, 2, 4), -1.0, dtype=torch.float64)   # a cache layer, capacity C + 5
    out = layer_kv[:, :C]
    mine = torch.cat([want[:, a:a + n] for a, n in spans[r]], dim=1) + layer
    tsp.put(out, spans[r], *split(mine))
    t.allgather_into(out, spans, dim=1)
    assert torch.equal(out, want + layer), out
    assert (layer_kv[:, C:] == -1).all()
t.barrier()
rows = comm.gather((t.stats["allgathers"], t.stats["bytes_sent"] + t.stats["bytes_recv"]))
if r == 0:
    print(rows)
"""
    assert run(code, n=3, timeout=60).strip() == str([(3, 3 * 13 * 2 * 2 * 4 * 8)] * 3)


@pytest.mark.parametrize("route", ["transport.Transport", "StagedTransport"])
def test_messages_of_any_dtype_land_in_blocks_by_their_tags(route):
    """Point to point in float16, bfloat16, int64 and float32, from a tensor that is not contiguous
    and of no bytes at all, received out of order (the tags tell them apart), into blocks of larger
    tensors of several shapes where nothing else changes; staged, some go by slot and some through
    MPI. The accounting counts messages and their bytes, and reset_stats zeroes it."""
    code = f"""
import torch
from fast.staged import StagedTransport
comm, dev = transport.init('cpu')
t = {route}(comm, dev, polite=True)
if hasattr(t, 'reserve'):                            # staged: 24 and 96 B by slot, the others by MPI
    t.reserve(96 if comm.rank == 0 else 0)
msgs = [torch.arange(120).view(2, 1, 3, 4, 5).to(torch.float16) - 60,    # 240 B
        torch.arange(12).view(3, 4).to(torch.bfloat16) + 0.5,            # 24 B
        torch.arange(12).view(3, 4) + (1 << 40),                         # int64, 96 B
        torch.arange(24).view(3, 2, 4) - (1 << 50),                      # int64, 192 B
        torch.arange(12, dtype=torch.float32).view(3, 4).t(),            # not contiguous, 48 B
        torch.arange(120).view(2, 1, 3, 4, 5).to(torch.float16) * 2,     # 240 B
        torch.zeros(0, 3)]                                               # 0 B
blocks = {{0: (2, 1, 3, 7, 5), 1: (3, 9), 2: (3, 9), 3: (3, 5, 7), 5: (2, 1, 3, 7, 5)}}
if comm.rank == 0:
    for k, m in enumerate(msgs):
        t.isend(m, 1, tag=k)
    t.finish()
else:
    for k in (1, 3, 0, 2, 4, 5, 6):                  # out of order, by slot and through MPI
        m = msgs[k]
        if k in blocks:
            whole = torch.full(blocks[k], -7, dtype=m.dtype)
            at = tuple(slice(0, n) for n in m.shape)
            room = whole[at]
            assert not room.is_contiguous()
            assert t.recv_into(room, 0, tag=k) is room
            assert torch.equal(room, m), (k, room)
            whole[at] = -7
            assert (whole == -7).all(), k
        else:
            y = t.recv(tuple(m.shape), m.dtype, 0, tag=k)
            assert y.dtype == m.dtype and torch.equal(y, m), (k, y)
g = torch.zeros(1, 5, dtype=torch.bfloat16)
g[:, 2 * comm.rank:2 + 3 * comm.rank] = comm.rank + 0.5
t.allgather_into(g, [[(0, 2)], [(2, 3)]], dim=1)
assert torch.equal(g, torch.tensor([[.5, .5, 1.5, 1.5, 1.5]], dtype=torch.bfloat16)), g
t.barrier()
rows = comm.gather(t.stats)
t.reset_stats()
rows.append(t.stats) if comm.rank == 0 else None
if comm.rank == 0:
    print(rows)
"""
    out = run(code, n=2, timeout=60).strip()
    assert out == str([dict(sends=7, recvs=0, allgathers=1, bytes_sent=844, bytes_recv=6),
                       dict(sends=0, recvs=7, allgathers=1, bytes_sent=6, bytes_recv=844),
                       dict(sends=0, recvs=0, allgathers=0, bytes_sent=0, bytes_recv=0)])


def test_agree_with_another_root_and_what_only_the_root_has():
    """Transport.agree with root=p-1 and root 0, where decide() reads what only the root has: it
    runs on the root alone (once per call), and every rank gets the root's value, or the root's
    error as a ValueError with the same message, even where decide() would succeed elsewhere."""
    code = """
comm, dev = transport.init('cpu')
t = transport.Transport(comm, dev, polite=True)
r, p = comm.rank, comm.size
calls = []
plan = {"plan": {"split": [3, 5, 8]}} if r == p - 1 else {}   # what only the last rank has read


def decide():
    calls.append(r)
    return plan["plan"]


def refuse():
    calls.append(r)
    if "plan" in plan:
        raise ValueError("the cache is stale")        # an error only the root sees
    return "fine here"


def broken():
    calls.append(r)
    return plan["missing"]


got = [t.agree(decide, root=p - 1)]
for f in (refuse, broken):
    try:
        got.append(t.agree(f, root=p - 1))
    except ValueError as e:
        got.append("ValueError: " + str(e))
first = {"x": 41} if r == 0 else {}
got.append(t.agree(lambda: calls.append(r) or first["x"] + 1))
rows = comm.gather((got, len(calls)))
if r == 0:
    print(rows)
"""
    one = [{"split": [3, 5, 8]}, "ValueError: the cache is stale", "ValueError: KeyError: 'missing'", 42]
    assert run(code, n=3, timeout=60).strip() == str([(one, 1), (one, 0), (one, 3)])


def test_private_staging_buffers_are_reused_only_once_free():
    """Staged messages through MPI go from private buffers: three large sends in flight at once
    (the receiver starts only after all three) each keep their own buffer, so every message arrives
    as sent; after finish every buffer is free and the next sends reuse them, and a receiver
    reuses its one landing buffer for every message of that size."""
    code = """
import torch
from fast.staged import StagedTransport
comm, dev = transport.init('cpu')
t = StagedTransport(comm, dev, polite=True)
t.reserve(0)
side = comm.Dup()
N = 1 << 19                                          # 4 MiB of float64: more than MPI buffers alone


def x(k):
    return torch.full((N,), float(k), dtype=torch.float64)


if comm.rank == 0:
    for k in range(3):
        t.isend(x(k), 1, tag=k)
    side.send("all three sent", 1)
    t.finish()
    assert t.queued == [] and t.pending == []
    n = len(t.staging)
    assert 1 <= n <= 3 and len(t.free[8 * N]) == n   # all free again
    for k in range(3, 6):
        t.isend(x(k), 1, tag=k)
        t.finish()
    assert len(t.staging) == n and len(t.free[8 * N]) == n
else:
    side.recv(source=0)
    for k in range(6):
        y = t.recv((N,), torch.float64, 0, tag=k)
        assert (y == k).all(), (k, y.unique())
t.barrier()
if comm.rank == 1:
    assert len(t.staging) == 1 and len(t.free[8 * N]) == 1
    print("ok")
"""
    assert run(code, n=2, timeout=60).strip() == "ok"


def test_the_direct_route_queues_sends_until_the_next_exchange():
    """The direct route's send queue, which a GPU uses (a send waits for its tensor's event): here
    fast.direct.DirectTransport on a CPU, whose events have passed. Each isend starts the ones
    queued before it, and finish, barrier and agree start the rest, so that nothing is left queued
    or pending and the receiver gets every message without a later call on the sender."""
    code = """
import torch
from fast.direct import DirectTransport
comm, dev = transport.init('cpu')
t = DirectTransport(comm, dev, polite=True) if comm.rank == 0 else transport.Transport(comm, dev, polite=True)
x = [torch.full((3,), float(k)) for k in range(6)]
if comm.rank == 0:
    t.isend(x[0], 1, tag=0)
    t.isend(x[1], 1, tag=1)
    assert len(t.queued) == 1
    t.finish()
    assert t.queued == [] and t.pending == []
    assert comm.recv(source=1, tag=99) == "got 0 1"  # no transport call on this rank since finish
    t.isend(x[2], 1, tag=2)
    t.barrier()
    assert t.queued == []
    t.isend(x[3], 1, tag=3)
    assert t.agree(lambda: "go") == "go"
    assert t.queued == []
    t.finish()
else:
    got = [t.recv((3,), torch.float32, 0, tag=k) for k in (0, 1)]
    comm.send("got 0 1", 0, tag=99)
    t.barrier()
    got.append(t.recv((3,), torch.float32, 0, tag=2))
    assert t.agree(lambda: "go") == "go"
    got.append(t.recv((3,), torch.float32, 0, tag=3))
    assert all(torch.equal(g, w) for g, w in zip(got, x)), got
    print("ok")
"""
    assert run(code, n=2, timeout=60).strip() == "ok"


def test_across_nodes_a_staged_message_goes_through_mpi():
    """Ranks on different nodes (here every rank is made a node of its own) share no slots: a
    message between them goes through MPI and arrives intact (README: "Across nodes the bytes go
    through MPI"). Before, the sender put it in its slot and sent the slot's number, which the
    receiver took for the message."""
    code = """
import torch
import fast.staged as staged
staged.local_comm = lambda comm: comm.Split(comm.rank)     # every rank a node of its own
comm, dev = transport.init('cpu')
t = staged.StagedTransport(comm, dev, polite=True)
t.reserve(64)
x = torch.arange(8, dtype=torch.float64)
if comm.rank == 0:
    t.isend(x, 1, tag=0)
    t.finish()
else:
    y = t.recv((8,), torch.float64, 0, tag=0)
    assert torch.equal(y, x), y
t.barrier()
if comm.rank == 1:
    print("ok")
"""
    assert run(code, n=2, timeout=30).strip() == "ok"
