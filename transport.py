"""Moving tensors between ranks: the one module that talks to MPI (mpi4py) for the project.

Tensors travel through mpi4py's buffer calls (Isend, Irecv, Iallgatherv) as raw bytes. A GPU tensor
goes to MPI directly only when the MPI library is CUDA-aware; otherwise it is staged through pinned
host memory, on side streams that overlap the copies with compute. Between the ranks of one node the
staging memory is shared (an MPI-3 shared window): the sender copies down into it, the receiver
copies up out of it, and MPI carries only which slot to read, so no CPU copies the bytes. Waits block
(MPI spins, for the lowest latency) unless CPU ranks outnumber the cores they share: then they poll
politely (Test, then a 0.5 ms sleep), so a waiting rank does not steal the core of one that computes.

MPI starts in `init`, not at import: a rank that computes on a GPU selects its device and creates
its CUDA context first, because a CUDA-aware MPI sets up CUDA IPC between a node's ranks at MPI_Init.
"""
import ctypes
import os
import time

import mpi4py
import torch

mpi4py.rc.initialize = False                           # init() starts MPI, after the GPU is chosen
mpi4py.rc.finalize = True
from mpi4py import MPI  # noqa: E402

# The local rank as launchers tell it before MPI can: Open MPI, MPICH's Hydra, MVAPICH, Slurm.
LOCAL_RANK = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")


def init(device="cpu"):
    """Start MPI; return (COMM_WORLD, this rank's device). On CUDA, the device is the local rank
    modulo the node's GPUs, and its context exists before MPI_Init."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():   # (without one, setup says so)
        local = next((int(os.environ[v]) for v in LOCAL_RANK if v in os.environ), 0)
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.zeros(1, device=device)                  # the CUDA context, before MPI_Init
    if not MPI.Is_initialized():
        MPI.Init_thread()
    return MPI.COMM_WORLD, device


def local_comm(comm):
    """The ranks of comm that share this rank's node (its memory, its GPUs)."""
    return comm.Split_type(MPI.COMM_TYPE_SHARED)


def cuda_aware_mpi():
    """True if this MPI library can take CUDA device pointers (Open MPI's or MPICH's query)."""
    if os.environ.get("KVR_CUDA_AWARE") in ("0", "1"):      # explicit override
        return os.environ["KVR_CUDA_AWARE"] == "1"
    lib = ctypes.CDLL(MPI.__file__)                          # dlsym also searches libmpi under it
    if hasattr(lib, "MPIX_Query_cuda_support"):              # Open MPI (mpi-ext.h)
        return bool(lib.MPIX_Query_cuda_support())
    if hasattr(lib, "MPIX_GPU_query_support"):               # MPICH >= 4
        ok = ctypes.c_int(0)
        lib.MPIX_GPU_query_support(0, ctypes.byref(ok))      # 0 = MPIX_GPU_SUPPORT_CUDA
        return bool(ok.value)
    return False


def _buf(t):
    """A tensor's bytes as an MPI buffer (any dtype, host or device memory; t must be contiguous)."""
    assert t.is_contiguous()
    return [MPI.buffer.fromaddress(t.data_ptr(), t.numel() * t.element_size()), MPI.BYTE]


class _Passed:
    """The event of a CPU copy: done when the copy returns."""

    def synchronize(self):
        pass

    def query(self):
        return True


class Transport:
    """Point-to-point and all-gather of tensors, with message accounting.

    One interface, three routes. CPU tensors go to MPI as they are. GPU tensors go to MPI directly
    when it is CUDA-aware, once the event that marks them written has passed (not the whole stream).
    Otherwise they are staged: a tensor is copied down on a side stream as soon as it exists, while
    the compute stream goes on, and its send starts once the copy is done; a message received is
    copied up on another side stream, which the compute stream waits for through an event, so only
    the work that reads it waits. A send is started by the rank's next exchange at the latest
    (`_start_sends`), so a rank runs at most one layer ahead of its GPU.

    Staged messages between ranks of a node go through the slots that `reserve` set aside in shared
    pinned memory: MPI sends the slot's number, the receiver copies the bytes up from the slot and
    then acks it (an empty message), and the sender reuses a slot only once every reader has acked.
    Other staged messages travel through MPI in private pinned buffers. `direct=False` on the CPU runs
    the staged protocol with plain copies (how the tests check it without a GPU).
    """

    def __init__(self, comm, device, polite, direct=None, trace=None):
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        self.device, self.polite, self.trace = torch.device(device), polite, trace
        self.cuda = self.device.type == "cuda"
        self.direct = (cuda_aware_mpi() if self.cuda else True) if direct is None else direct
        if self.cuda:
            self.down, self.up = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
        self.queued = []           # (event, buffer, dest, tag): sends waiting for their bytes
        self.pending = []          # (request, buffer): a buffer lives until its request is done
        self.landing = []          # (event, buffer): received bytes still being copied up
        self.free, self.staging = {}, set()   # pinned staging buffers: free ones by size; all, by id
        self.stats = dict(sends=0, recvs=0, allgathers=0, bytes_sent=0, bytes_recv=0)
        node = local_comm(comm)                        # the shared slots: see reserve
        self.node, self.acks = node, comm.Dup()        # acks travel apart from the data's tags
        self.on_node = MPI.Group.Translate_ranks(comm.Get_group(), list(range(comm.size)), node.Get_group())
        self.window, self.slots, self.slot_bytes, self.arena = None, 0, [0] * comm.size, {}
        self.turn = 0              # the slot this rank fills next (round robin)
        self.readers = {}          # slot -> ack requests still open: the slot is busy until they finish
        self.owed = []             # (event, source, slot): acks to send once the copy up is done

    @property
    def path(self):
        if not self.cuda:
            return "host memory (CPU tensors straight to MPI)"
        if self.direct:
            return "CUDA-aware MPI: device buffers straight to MPI"
        return ("MPI is not CUDA-aware: device buffers staged through pinned host memory"
                + (", shared by the node's ranks (MPI carries slot numbers)" if self.window else ""))

    # -------------------------------------------------------------------- the operations

    def reserve(self, nbytes, slots=2):
        """Collective: shared pinned memory for `slots` staged messages of up to nbytes from this rank.

        The node's ranks map each other's slots, so a staged message costs two copies over the GPU's
        host link (down on the sender, up on the receiver) and none by MPI. Kept while every rank's
        request still matches; nothing to do when the route is direct."""
        if self.direct:
            return
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

    def isend(self, t, dest, tag):
        """Start sending t; return at once."""
        self._start_sends()                            # the earlier ones first, in order
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if self.direct:
            if self.cuda:
                self.queued.append((self._event(), t, dest, tag))
            else:
                self.pending.append((self.comm.Isend(_buf(t), dest, tag), t))
        elif self._shared(self.rank, nbytes):
            slot = self._slot()
            ready, _ = self._down(t, "d2h", tag, self._view(self.rank, slot, nbytes))
            self.queued.append((ready, torch.tensor([slot]), dest, tag))
            self.readers[slot] = [self.acks.Irecv([None, 0, MPI.BYTE], dest, slot)]
        else:
            self.queued.append((*self._down(t, "d2h", tag), dest, tag))
        self.stats["sends"] += 1
        self.stats["bytes_sent"] += nbytes

    def recv(self, shape, dtype, source, tag):
        """Receive a tensor of `shape` and `dtype` into new memory on this rank's device."""
        self._start_sends()
        out = self._empty(shape, dtype)
        nbytes = out.numel() * out.element_size()
        if self.direct:
            self.wait(self.comm.Irecv(_buf(out), source, tag))
        elif self._shared(source, nbytes):
            self._pay_acks(wait=True)                  # never hold a sender's slot while blocked
            slot = torch.empty(1, dtype=torch.int64)
            self.wait(self.comm.Irecv(_buf(slot), source, tag))
            done = self._up(self._view(source, int(slot), nbytes), out, "h2d", tag)
            self.owed.append((done, source, int(slot)))
        else:
            host = self._pinned(nbytes)
            self.wait(self.comm.Irecv(_buf(host), source, tag))
            self.landing.append((self._up(host, out, "h2d", tag), host))
        self.stats["recvs"] += 1
        self.stats["bytes_recv"] += nbytes
        return out

    def allgather(self, t, counts, dim):
        """Concatenate every rank's t along `dim` (rank order); counts[r] = rank r's size on dim."""
        self._start_sends()
        t = t.contiguous()
        parts = [torch.Size(t.shape[:dim] + (c,) + t.shape[dim + 1:]) for c in counts]
        sizes = [s.numel() * t.element_size() for s in parts]
        flat = self._empty((sum(sizes) // t.element_size(),), t.dtype)
        displs = [sum(sizes[:r]) for r in range(len(sizes))]
        if self.direct:
            self._event().synchronize()                # t is written
            self.wait(self.comm.Iallgatherv(_buf(t), [MPI.buffer.fromaddress(flat.data_ptr(), sum(sizes)),
                                                       sizes, displs, MPI.BYTE]))
        elif all(self._shared(r, sizes[r]) for r in range(self.size)):
            self._gather_shared(t, flat, sizes, displs)
        else:
            ready, mine = self._down(t, "d2h", "gather")
            ready.synchronize()
            into = self._pinned(sum(sizes))
            self.wait(self.comm.Iallgatherv(_buf(mine), [MPI.buffer.fromaddress(into.data_ptr(), sum(sizes)),
                                                          sizes, displs, MPI.BYTE]))
            self._release(mine)
            self.landing.append((self._up(into, flat, "h2d", "gather"), into))
        self.stats["allgathers"] += 1
        self.stats["bytes_sent"] += sizes[self.rank]
        self.stats["bytes_recv"] += sum(sizes) - sizes[self.rank]
        chunks = flat.split([s.numel() for s in parts])
        return torch.cat([c.view(s) for c, s in zip(chunks, parts)], dim=dim)

    def finish(self):
        """Start every queued send and wait until all have gone."""
        self._start_sends()
        for req, buf in self.pending:
            self.wait(req)
            self._release(buf)
        self.pending.clear()

    def barrier(self):
        """Wait for every rank; afterwards no staged message is in flight (every slot acked)."""
        self._start_sends()
        self._pay_acks(wait=True)
        self.wait(self.comm.Ibarrier())
        self._drain()                                  # every ack was sent before the barrier

    def wait(self, req):
        if self.polite:
            while not req.Test():
                time.sleep(0.0005)
        else:
            req.Wait()

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

    def _gather_shared(self, t, flat, sizes, displs):
        """All-gather through the slots: every rank copies its part down into its own slot, the ranks
        swap slot numbers, and each copies the others' parts up; then it acks their owners."""
        slot = self._slot()
        ready, _ = self._down(t, "d2h", "gather", self._view(self.rank, slot, sizes[self.rank]))
        self._pay_acks(wait=True)
        ready.synchronize()
        mine, slots = torch.tensor([slot]), torch.empty(self.size, dtype=torch.int64)
        self.wait(self.comm.Iallgather(_buf(mine), _buf(slots)))
        dst = flat.view(torch.uint8)
        for r in range(self.size):
            part = dst[displs[r]:displs[r] + sizes[r]].view(t.dtype)
            if r == self.rank:
                part.copy_(t.view(-1))
            else:
                done = self._up(self._view(r, int(slots[r]), sizes[r]), part, "h2d", "gather")
                self.owed.append((done, r, int(slots[r])))
        self.readers[slot] = [self.acks.Irecv([None, 0, MPI.BYTE], r, slot)
                              for r in range(self.size) if r != self.rank]

    # -------------------------------------------------------------------- staging and ordering

    def _event(self):
        """An event on the compute stream, here: what was queued before it is done when it is."""
        if not self.cuda:
            return _Passed()
        e = torch.cuda.Event()
        e.record()
        return e

    def _start_sends(self):
        for ready, buf, dest, tag in self.queued:
            ready.synchronize()                        # the bytes are written (direct) or down (staged)
            self.pending.append((self.comm.Isend(_buf(buf), dest, tag), buf))
        self.queued.clear()
        self._pay_acks()
        busy = []
        for req, buf in self.pending:                  # staging buffers of finished sends: reusable
            if req.Test():
                self._release(buf)
            else:
                busy.append((req, buf))
        self.pending, busy = busy, []
        for e, buf in self.landing:
            if e.query():
                self._release(buf)
            else:
                busy.append((e, buf))
        self.landing = busy

    def _empty(self, shape, dtype):
        """New device memory that MPI or the copy up may write at once: allocated on the copy-up
        stream, so no kernel still queued on the compute stream can be using it."""
        if not self.cuda:
            return torch.empty(shape, dtype=dtype)
        with torch.cuda.stream(self.up):
            out = torch.empty(shape, dtype=dtype, device=self.device)
        out.record_stream(torch.cuda.current_stream())  # freed: reused after the compute stream's use
        return out

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
        with torch.cuda.stream(self.up):
            span = self._span(name, layer)
            out.copy_(host.view(out.dtype).view(out.shape), non_blocking=True)
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
