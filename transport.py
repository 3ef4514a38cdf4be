"""Moving tensors between ranks: the one module that talks to MPI (mpi4py) for the project.

Tensors travel through mpi4py's buffer calls (Isend, Irecv, Iallgatherv) as raw bytes. A GPU tensor
goes to MPI directly only when the MPI library is CUDA-aware; otherwise it is staged through a
pinned host buffer. Waits spin when each rank has a core, and poll politely (Test, then a 0.5 ms
sleep) when ranks outnumber cores, so a waiting rank does not steal the core of one that computes.

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
    """Point-to-point and all-gather of tensors, with message accounting and an optional trace."""

    def __init__(self, comm, device, polite):
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        self.device, self.polite = torch.device(device), polite
        self.direct = self.device.type != "cuda" or cuda_aware_mpi()
        self.pending = []          # (request, buffer): a buffer must outlive its Isend
        self.pinned = {}           # staging buffers, reused per (purpose, tag, shape, dtype)
        self.stats = dict(sends=0, recvs=0, allgathers=0, bytes_sent=0, bytes_recv=0)

    @property
    def path(self):
        if self.device.type != "cuda":
            return "host memory (CPU tensors straight to MPI)"
        if self.direct:
            return "CUDA-aware MPI: device buffers straight to MPI"
        return "MPI is not CUDA-aware: device buffers staged through pinned host memory"

    def _host(self, key, t):
        """Pinned host copy of device tensor t (or t itself when MPI can take it)."""
        if self.direct:
            if t.is_cuda:
                torch.cuda.current_stream().synchronize()   # MPI reads memory, not the stream
            return t
        if key not in self.pinned:
            self.pinned[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return self.pinned[key].copy_(t)                    # synchronous device-to-host copy

    def wait(self, req):
        if self.polite:
            while not req.Test():
                time.sleep(0.0005)
        else:
            req.Wait()

    def isend(self, t, dest, tag):
        """Start sending t; return at once. The buffer stays alive until finish()."""
        h = self._host(("send", tag, t.shape, t.dtype), t.contiguous())
        self.pending.append((self.comm.Isend(_buf(h), dest, tag), h))
        self.stats["sends"] += 1
        self.stats["bytes_sent"] += h.numel() * h.element_size()

    def recv(self, out, source, tag):
        """Receive into the contiguous tensor `out`."""
        h = out if self.direct else self.pinned.setdefault(
            ("recv", tag, out.shape, out.dtype), torch.empty(out.shape, dtype=out.dtype, pin_memory=True))
        self.wait(self.comm.Irecv(_buf(h), source, tag))
        if h is not out:
            out.copy_(h)
        self.stats["recvs"] += 1
        self.stats["bytes_recv"] += out.numel() * out.element_size()

    def allgather(self, t, counts, dim):
        """Concatenate every rank's t along `dim` (rank order); counts[r] = rank r's size on dim."""
        t = t.contiguous()
        parts = [torch.Size(t.shape[:dim] + (c,) + t.shape[dim + 1:]) for c in counts]
        sizes = [s.numel() * t.element_size() for s in parts]
        flat = torch.empty(sum(sizes) // t.element_size(), dtype=t.dtype, device=t.device)
        h = self._host(("gather", tuple(sizes), t.dtype), t)
        hf = flat if self.direct else self.pinned.setdefault(
            ("gatherv", tuple(sizes), t.dtype), torch.empty(flat.shape, dtype=t.dtype, pin_memory=True))
        displs = [sum(sizes[:r]) for r in range(len(sizes))]
        self.wait(self.comm.Iallgatherv(_buf(h), [MPI.buffer.fromaddress(hf.data_ptr(), sum(sizes)),
                                                   sizes, displs, MPI.BYTE]))
        if hf is not flat:
            flat.copy_(hf)
        self.stats["allgathers"] += 1
        self.stats["bytes_sent"] += sizes[self.rank]
        self.stats["bytes_recv"] += sum(sizes) - sizes[self.rank]
        chunks = flat.split([s.numel() for s in parts])
        return torch.cat([c.view(s) for c, s in zip(chunks, parts)], dim=dim)

    def finish(self):
        """Wait for every send still in flight."""
        for req, _ in self.pending:
            self.wait(req)
        self.pending.clear()

    def barrier(self):
        self.wait(self.comm.Ibarrier())
