"""GPU tensors between ranks when the MPI library is not CUDA-aware: staged through pinned host memory.

A tensor is copied down on a side stream as soon as it exists, while the compute stream goes on, and
its send starts once the copy is done; a message received is copied up on another side stream, which
the compute stream waits for through an event, so only the work that reads it waits.

Between the ranks of one node the staging memory is shared (an MPI-3 shared window that `reserve`
sets aside before a prefill): the sender copies down into its slot, MPI carries only the slot's
number, the receiver copies up straight out of the sender's slot and then acks it (an empty message
on a communicator of its own), and the sender reuses a slot only once every reader has acked. So no
CPU copies the bytes. Other staged messages travel through MPI in private pinned buffers.
On the CPU the same protocol runs with plain copies: that is how the tests check it without a GPU.
"""
import ctypes
import os

import torch

from fast.direct import DirectTransport, _Passed
from transport import MPI, _buf, local_comm   # transport decides when MPI starts


def cuda_aware_mpi():
    """True if this MPI library can take CUDA device pointers (Open MPI's or MPICH's query, which
    answers once MPI has started): then GPU tensors go to MPI as they are, and nothing is staged."""
    if os.environ.get("KVR_CUDA_AWARE") in ("0", "1"):      # explicit override
        return os.environ["KVR_CUDA_AWARE"] == "1"
    for path in (MPI.__file__, os.environ.get("MPI4PY_LIBMPI")):   # dlsym also searches libmpi under it;
        lib = ctypes.CDLL(path) if path else None           # a wheel that picks its MPI names it here
        if hasattr(lib, "MPIX_Query_cuda_support"):          # Open MPI (mpi-ext.h)
            return bool(lib.MPIX_Query_cuda_support())
        if hasattr(lib, "MPIX_GPU_query_support"):           # MPICH >= 4
            ok = ctypes.c_int(0)
            lib.MPIX_GPU_query_support(0, ctypes.byref(ok))  # 0 = MPIX_GPU_SUPPORT_CUDA
            return bool(ok.value)
    return False


def positions(out, starts, counts, dim):
    """Each rank's positions of `out` as views, their bytes, and their offsets packed one after another."""
    parts = [out.narrow(dim, a, n) for a, n in zip(starts, counts)]
    sizes = [p.numel() * out.element_size() for p in parts]
    return parts, sizes, [sum(sizes[:r]) for r in range(len(sizes))]


class StagedTransport(DirectTransport):
    """transport.Transport's interface; GPU bytes staged through pinned host memory."""

    direct = False

    def __init__(self, comm, device, polite, trace=None):
        super().__init__(comm, device, polite)
        self.trace = trace         # fast/trace.py's Trace: the copies' spans (d2h, h2d)
        self.largest = 0           # the most bytes one message of this rank has carried: see reserve
        if self.cuda:
            self.down = torch.cuda.Stream(self.device)   # copies to the host (self.up: to the GPU)
        self.landing = []          # (event, buffer): received bytes still being copied up
        self.free, self.staging = {}, set()   # pinned staging buffers: free ones by size; all, by id
        node = local_comm(comm)                        # the shared slots: see reserve
        self.node, self.acks = node, comm.Dup()        # acks travel apart from the data's tags
        self.on_node = MPI.Group.Translate_ranks(comm.Get_group(), list(range(comm.size)), node.Get_group())
        self.window, self.slots, self.slot_bytes, self.arena = None, 0, [0] * comm.size, {}
        self.turn = 0              # the slot this rank fills next (round robin)
        self.readers = {}          # slot -> ack requests still open: the slot is busy until they finish
        self.owed = []             # (event, source, slot): acks to send once the copy up is done
        self.fence = self._event() # the compute stream at the last barrier: see _up

    @property
    def path(self):
        return (("MPI is not CUDA-aware: device buffers staged through pinned host memory" if self.cuda
                 else "KVR_ROUTE=staged: CPU tensors staged through host memory")
                + (", shared by the node's ranks (MPI carries slot numbers)" if self.arena else ""))

    # -------------------------------------------------------------------- the route

    def reserve(self, nbytes, slots=2):
        """Collective: shared pinned memory for `slots` staged messages of up to nbytes from this rank.

        The node's ranks map each other's slots, so a staged message costs two copies over the GPU's
        host link (down on the sender, up on the receiver) and none by MPI. Kept while every rank's
        request still matches."""
        sizes = self.comm.allgather(nbytes)
        if sizes == self.slot_bytes and slots == self.slots:
            return
        self._drain()
        if self.window is not None:
            for t in self.arena.values() if self.cuda else ():
                torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(t.data_ptr()))
            self.window.Free()
        self.window = MPI.Win.Allocate_shared(nbytes * slots, 1, comm=self.node)
        self.slots, self.slot_bytes, self.turn, self.arena = slots, sizes, 0, {}
        for r in range(self.size):
            if self.on_node[r] != MPI.UNDEFINED and sizes[r]:
                t = torch.frombuffer(self.window.Shared_query(self.on_node[r])[0], dtype=torch.uint8)
                if self.cuda:                          # pinned: the copy engines read and write it
                    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0))
                self.arena[r] = t

    def _send(self, t, dest, tag):
        """Start copying t down; its send starts once the copy is done."""
        nbytes = t.numel() * t.element_size()
        self.largest = max(self.largest, nbytes)
        if self._shared(self.rank, nbytes) and self.on_node[dest] != MPI.UNDEFINED:   # dest maps the slot
            slot = self._slot()
            ready, _ = self._down(t, "d2h", tag, self._view(self.rank, slot, nbytes))
            self.queued.append((ready, torch.tensor([slot]), dest, tag))
            self.readers[slot] = [self.acks.Irecv([None, 0, MPI.BYTE], dest, slot)]
        else:
            self.queued.append((*self._down(t, "d2h", tag), dest, tag))

    def _receive(self, out, source, tag):
        """Receive into `out` on this rank's device: its copy up is queued."""
        nbytes = out.numel() * out.element_size()
        if self._shared(source, nbytes):
            self._pay_acks(wait=True)                  # never hold a sender's slot while blocked
            slot = torch.empty(1, dtype=torch.int64)
            self.wait(self.comm.Irecv(_buf(slot), source, tag))
            done = self._up(self._view(source, int(slot), nbytes), out, "h2d", tag)
            self.owed.append((done, source, int(slot)))
        else:
            host = self._pinned(nbytes)
            self.wait(self.comm.Irecv(_buf(host), source, tag))
            self.landing.append((self._up(host, out, "h2d", tag), host))

    def _gather(self, out, starts, counts, dim):
        """Every rank's positions of `out`, through the slots or pinned buffers: this rank's part is
        copied down, the others' parts up into their positions."""
        parts, sizes, displs = positions(out, starts, counts, dim)
        self.largest = max(self.largest, sizes[self.rank])
        if all(self._shared(r, sizes[r]) for r in range(self.size)):
            return self._gather_shared(parts, sizes)
        ready, mine = self._down(parts[self.rank], "d2h", "gather")
        ready.synchronize()
        into = self._pinned(sum(sizes))
        self.wait(self.comm.Iallgatherv(_buf(mine), [MPI.buffer.fromaddress(into.data_ptr(), sum(sizes)),
                                                      sizes, displs, MPI.BYTE]))
        self._release(mine)
        done = ready
        for r in range(self.size):
            if r != self.rank:
                done = self._up(into[displs[r]:displs[r] + sizes[r]], parts[r], "h2d", "gather")
        self.landing.append((done, into))              # the copies run in order: the last one frees it

    def barrier(self):
        """Wait for every rank; afterwards no staged message is in flight (every slot acked)."""
        self._progress()
        self._pay_acks(wait=True)
        self.wait(self.comm.Ibarrier())
        self._drain()                                  # every ack was sent before the barrier
        self.fence = self._event()

    # -------------------------------------------------------------------- the shared slots

    def _shared(self, sender, nbytes):
        """Does a staged message of nbytes from `sender` to this rank or from this rank go by slot?"""
        return sender in self.arena and 0 < nbytes <= self.slot_bytes[sender]

    def _view(self, sender, slot, nbytes):
        start = slot * self.slot_bytes[sender]
        return self.arena[sender][start:start + nbytes]

    def _slot(self):
        """This rank's next slot, once every reader of what it held last has acked."""
        slot, self.turn = self.turn, (self.turn + 1) % self.slots
        for req in self.readers.pop(slot, []):
            self.wait(req)
        return slot

    def _pay_acks(self, wait=False):
        """Ack every slot whose copy up is done (with wait, after waiting for the copies)."""
        keep = []
        for done, source, slot in self.owed:
            if wait or done.query():
                done.synchronize()
                self.pending.append((self.acks.Isend([None, 0, MPI.BYTE], source, slot), None))
            else:
                keep.append((done, source, slot))
        self.owed = keep

    def _drain(self):
        """Pay every ack and collect every ack owed to this rank (every rank drains together)."""
        self._pay_acks(wait=True)
        for reqs in self.readers.values():
            for req in reqs:
                self.wait(req)
        self.readers = {}

    def _gather_shared(self, parts, sizes):
        """All-gather through the slots: every rank copies its part down into its own slot, the ranks
        swap slot numbers, and each copies the others' parts up into their positions; then it acks
        their owners."""
        slot = self._slot()
        ready, _ = self._down(parts[self.rank], "d2h", "gather", self._view(self.rank, slot, sizes[self.rank]))
        self._pay_acks(wait=True)
        ready.synchronize()
        mine, slots = torch.tensor([slot]), torch.empty(self.size, dtype=torch.int64)
        self.wait(self.comm.Iallgather(_buf(mine), _buf(slots)))
        for r in range(self.size):
            if r != self.rank:
                done = self._up(self._view(r, int(slots[r]), sizes[r]), parts[r], "h2d", "gather")
                self.owed.append((done, r, int(slots[r])))
        self.readers[slot] = [self.acks.Irecv([None, 0, MPI.BYTE], r, slot)
                              for r in range(self.size) if r != self.rank]

    # -------------------------------------------------------------------- staging and ordering

    def _progress(self):
        """Start the sends whose bytes are down, pay the acks whose copies are up, and let go of
        staging buffers no send or copy uses any more."""
        super()._progress()
        self._pay_acks()
        busy = []
        for e, buf in self.landing:
            if e.query():
                self._release(buf)
            else:
                busy.append((e, buf))
        self.landing = busy

    def _down(self, t, name, layer, host=None):
        """Copy tensor t into host bytes (pinned memory of the pool unless given), on the side stream
        once the compute stream has written it. Returns (event: the copy is done, the host bytes)."""
        host = self._pinned(t.numel() * t.element_size()) if host is None else host
        if not self.cuda:
            host.view(t.dtype).view(t.shape).copy_(t)
            return _Passed(), host
        written = self._event()
        with torch.cuda.stream(self.down):
            self.down.wait_event(written)
            span = self._span(name, layer)
            host.view(t.dtype).view(t.shape).copy_(t, non_blocking=True)
            done = self._span_end(span)
        t.record_stream(self.down)
        return done, host

    def _up(self, host, out, name, layer):
        """Copy host bytes into tensor `out` on the side stream, which the compute stream waits for.
        Returns the event of the copy's end."""
        if not self.cuda:
            out.copy_(host.view(out.dtype).view(out.shape))
            return _Passed()
        with torch.cuda.stream(self.up):               # after what the compute stream queued before
            self.up.wait_event(self.fence)             # the last barrier: a prefill makes `out` before it
            span = self._span(name, layer)
            out.copy_(host.view(out.dtype).view(out.shape), non_blocking=True)   # a cache block: one copy
            done = self._span_end(span)
        torch.cuda.current_stream().wait_event(done)
        return done

    def _span(self, name, layer):
        """Start a copy span of the trace on the current (side) stream."""
        if self.trace is None or not self.trace.on:
            return None
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return name, layer, e

    def _span_end(self, span):
        e = torch.cuda.Event(enable_timing=span is not None)
        e.record()
        if span is not None:
            self.trace.gpu(*span, e)
        return e

    def _pinned(self, nbytes):
        pool = self.free.setdefault(nbytes, [])
        if pool:
            return pool.pop()
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
        self.staging.add(id(buf))
        return buf

    def _release(self, buf):
        """Return a staging buffer to the pool (other buffers are the caller's tensors)."""
        if id(buf) in self.staging:
            self.free[buf.numel()].append(buf)
