"""Moving tensors between ranks: the one module that talks to MPI (mpi4py) for the project.

Tensors travel through mpi4py's buffer calls (Isend, Irecv, Iallgatherv) as raw bytes. A GPU tensor
goes to MPI directly only when the MPI library is CUDA-aware; otherwise it is staged through pinned
host memory, on side streams that overlap the copies with compute. Waits block (MPI spins, for the
lowest latency) unless CPU ranks outnumber the cores they share: then they poll politely (Test, then
a 0.5 ms sleep), so a waiting rank does not steal the core of one that computes.

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


class Transport:
    """Point-to-point and all-gather of tensors, with message accounting.

    One interface, three routes. CPU tensors go to MPI as they are. GPU tensors go to MPI directly
    when it is CUDA-aware, once the event that marks them written has passed (not the whole stream).
    Otherwise they are staged through pinned host memory: a tensor is copied down on a side stream as
    soon as it exists, while the compute stream goes on, and its send starts once the copy is done;
    a message received is copied up on another side stream, which the compute stream waits for
    through an event, so only the work that reads it waits. A send is started by the rank's next
    exchange at the latest (`_start_sends`), so a rank runs at most one layer ahead of its GPU.
    """

    def __init__(self, comm, device, polite, direct=None, trace=None):
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        self.device, self.polite, self.trace = torch.device(device), polite, trace
        self.cuda = self.device.type == "cuda"
        self.direct = not self.cuda or (cuda_aware_mpi() if direct is None else direct)
        if self.cuda:
            self.down, self.up = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
        self.queued = []           # (event, buffer, dest, tag): sends waiting for their bytes
        self.pending = []          # (request, buffer): a buffer lives until its request is done
        self.landing = []          # (event, buffer): received bytes still being copied up
        self.free, self.staging = {}, set()   # pinned staging buffers: free ones by size; all, by id
        self.stats = dict(sends=0, recvs=0, allgathers=0, bytes_sent=0, bytes_recv=0)

    @property
    def path(self):
        if not self.cuda:
            return "host memory (CPU tensors straight to MPI)"
        if self.direct:
            return "CUDA-aware MPI: device buffers straight to MPI"
        return "MPI is not CUDA-aware: device buffers staged through pinned host memory"

    # -------------------------------------------------------------------- the operations

    def isend(self, t, dest, tag):
        """Start sending t; return at once."""
        self._start_sends()                            # the earlier ones first, in order
        t = t.contiguous()
        if not self.cuda:
            self.pending.append((self.comm.Isend(_buf(t), dest, tag), t))
        elif self.direct:
            self.queued.append((self._event(), t, dest, tag))
        else:
            self.queued.append((*self._down(t, "d2h", tag), dest, tag))
        self.stats["sends"] += 1
        self.stats["bytes_sent"] += t.numel() * t.element_size()

    def recv(self, shape, dtype, source, tag):
        """Receive a tensor of `shape` and `dtype` into new memory on this rank's device."""
        self._start_sends()
        out = self._empty(shape, dtype)
        nbytes = out.numel() * out.element_size()
        if self.direct:
            self.wait(self.comm.Irecv(_buf(out), source, tag))
        else:
            host = self._pinned(nbytes)
            self.wait(self.comm.Irecv(_buf(host), source, tag))
            self._up(host, out, "h2d", tag)
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
        if self.direct:
            if self.cuda:
                self._event().synchronize()            # t is written
            mine, into = t, flat
        else:
            ready, mine = self._down(t, "d2h", "gather")
            ready.synchronize()
            into = self._pinned(sum(sizes))
        displs = [sum(sizes[:r]) for r in range(len(sizes))]
        self.wait(self.comm.Iallgatherv(_buf(mine), [MPI.buffer.fromaddress(into.data_ptr(), sum(sizes)),
                                                      sizes, displs, MPI.BYTE]))
        if not self.direct:
            self._release(mine)
            self._up(into, flat, "h2d", "gather")
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
        self._start_sends()
        self.wait(self.comm.Ibarrier())

    def wait(self, req):
        if self.polite:
            while not req.Test():
                time.sleep(0.0005)
        else:
            req.Wait()

    # -------------------------------------------------------------------- staging and ordering

    def _event(self):
        """An event on the compute stream, here: what was queued before it is done when it is."""
        e = torch.cuda.Event()
        e.record()
        return e

    def _start_sends(self):
        for ready, buf, dest, tag in self.queued:
            ready.synchronize()                        # the bytes are written (direct) or down (staged)
            self.pending.append((self.comm.Isend(_buf(buf), dest, tag), buf))
        self.queued.clear()
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

    def _down(self, t, name, layer):
        """Copy device tensor t into pinned memory on the side stream, once the compute stream has
        written it. Returns (event: the copy is done, the pinned bytes)."""
        host = self._pinned(t.numel() * t.element_size())
        written = self._event()
        with torch.cuda.stream(self.down):
            self.down.wait_event(written)
            span = self._span(name, layer)
            host.view(t.dtype).view(t.shape).copy_(t, non_blocking=True)
            done = self._span_end(span)
        t.record_stream(self.down)
        return done, host

    def _up(self, host, out, name, layer):
        """Copy pinned bytes into device tensor `out` on the side stream; the compute stream waits."""
        with torch.cuda.stream(self.up):
            span = self._span(name, layer)
            out.copy_(host.view(out.dtype).view(out.shape), non_blocking=True)
            done = self._span_end(span)
        torch.cuda.current_stream().wait_event(done)
        self.landing.append((done, host))

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
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.staging.add(id(buf))
        return buf

    def _release(self, buf):
        """Return a staging buffer to the pool (other buffers are the caller's tensors)."""
        if id(buf) in self.staging:
            self.free[buf.numel()].append(buf)
