"""Moving tensors between ranks: where the project talks to MPI (mpi4py).

Tensors travel through mpi4py's buffer calls (Isend, Irecv, Iallgatherv) as raw bytes, straight from
and into the tensors' memory: host memory on a CPU, GPU memory when the MPI library is CUDA-aware.
When it is not, fast/staged.py stages GPU tensors through pinned host memory behind the same calls.
Waits poll MPI (Test) without a pause, for the lowest latency, unless CPU ranks outnumber the cores
they share: then politely, 0.5 ms apart, so that a waiting rank does not take a computing one's core.

MPI starts in `init`, not at import: a rank that computes on a GPU selects its device and creates
its CUDA context first, because a CUDA-aware MPI sets up CUDA IPC between a node's ranks at MPI_Init.
"""
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


def _buf(t):
    """A contiguous tensor's bytes as an MPI buffer (any dtype, host or GPU memory): MPI uses them in place."""
    assert t.is_contiguous(), "MPI is handed one block of memory"
    return [MPI.buffer.fromaddress(t.data_ptr(), t.numel() * t.element_size()), MPI.BYTE]


class Transport:
    """Point-to-point and all-gather of tensors, with message accounting: the route a reader needs
    first, where MPI reads and writes the tensors where they are (host memory). On a GPU,
    fast/direct.py's DirectTransport is this route in the GPU's order (a CUDA-aware MPI), and
    fast/staged.py's StagedTransport stages the bytes through host memory."""

    direct = True          # MPI reads and writes the tensors themselves (StagedTransport: False)

    def __init__(self, comm, device, polite):
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        self.device, self.polite = torch.device(device), polite
        self.pending = []          # (request, buffer): a buffer lives until its request is done
        self.reset_stats()

    def reset_stats(self):
        """Count messages and bytes from zero (a warm-up's are not the run's)."""
        self.stats = dict(sends=0, recvs=0, allgathers=0, bytes_sent=0, bytes_recv=0)

    @property
    def path(self):
        return "host memory (CPU tensors straight to MPI)"

    def isend(self, t, dest, tag):
        """Start sending t; return at once."""
        self._progress()                               # the earlier ones first, in order
        t = t.contiguous()
        self._send(t, dest, tag)
        self.stats["sends"] += 1
        self.stats["bytes_sent"] += t.numel() * t.element_size()

    def recv(self, shape, dtype, source, tag):
        """Receive a tensor of `shape` and `dtype` into new memory on this rank's device."""
        return self.recv_into(self._empty(shape, dtype), source, tag)

    def recv_into(self, out, source, tag):
        """Receive into `out`, which may be a block of a larger tensor (a cache layer's first positions)."""
        self._progress()
        self._receive(out, source, tag)
        self.stats["recvs"] += 1
        self.stats["bytes_recv"] += out.numel() * out.element_size()
        return out

    def allgather_into(self, out, spans, dim):
        """Collective, in place: `out` holds this rank's parts along `dim` at its spans, then every rank's
        at theirs. spans[r] = rank r's [(start, length), ...], as many for every rank (zigzag: two)."""
        self._progress()
        for part in zip(*spans):                       # one MPI all-gather per span index
            self._gather(out, [a for a, _ in part], [n for _, n in part], dim)
        each, mine = out.numel() // out.shape[dim] * out.element_size(), sum(n for _, n in spans[self.rank])
        self.stats["allgathers"] += 1
        self.stats["bytes_sent"] += mine * each        # `each`: the bytes of one position
        self.stats["bytes_recv"] += (sum(n for s in spans for _, n in s) - mine) * each
        return out

    def finish(self):
        """Wait until every send this rank started has gone."""
        self._progress()
        for req, buf in self.pending:
            self.wait(req)
            self._release(buf)
        self.pending.clear()

    def barrier(self):
        """Wait for every rank."""
        self._progress()
        self.wait(self.comm.Ibarrier())

    def agree(self, decide, root=0):
        """Collective: `decide()` runs on the root rank alone, and every rank returns its value or raises
        its error (as ValueError, same message). What one rank reads or computes for all (a cache file,
        a search) goes through here: an error there cannot leave the others waiting in a broadcast."""
        answer = None
        if self.rank == root:
            try:
                answer = True, decide()
            except Exception as e:
                answer = False, (str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}")
        self.barrier()                                 # wait politely, not in bcast's spin
        ok, value = self.comm.bcast(answer, root=root)
        if not ok:
            raise ValueError(value)
        return value

    def wait(self, req):
        """Poll until req is done, so that Ctrl-C is handled at once (a Wait in C would defer it)."""
        while not req.Test():
            if self.polite:
                time.sleep(0.0005)

    # -------------------------------------------------------------------- how the bytes move
    # The route: MPI reads and writes the tensors themselves. fast/ overrides these.

    def _send(self, t, dest, tag):
        self.pending.append((self.comm.Isend(_buf(t), dest, tag), t))

    def _receive(self, out, source, tag):
        """Into `out` in place if it is one block (kvcache.py: a run of positions), else via new memory."""
        whole = out if out.is_contiguous() else self._empty(out.shape, out.dtype)
        self.wait(self.comm.Irecv(_buf(whole), source, tag))
        out.copy_(whole)                               # (nothing to do when whole is out)

    def _gather(self, out, starts, counts, dim):
        """Rank r's counts[r] positions from starts[r] along `dim` of `out`, MPI writing them in place
        where positions lie back to back (a run of a cache layer's, kvcache.py), else through a copy."""
        rows = out.movedim(dim, 0)                     # positions first
        if not rows.is_contiguous():
            whole = rows.contiguous()
            self._gather(whole, starts, counts, 0)
            rows.copy_(whole)
            return
        step = rows[0].numel() * out.element_size()    # the bytes of one position
        self.wait(self.comm.Iallgatherv(MPI.IN_PLACE, [_buf(rows)[0], [n * step for n in counts],
                                                       [a * step for a in starts], MPI.BYTE]))

    def _progress(self):
        """Let go of the sends that have gone."""
        busy = []
        for req, buf in self.pending:
            if req.Test():
                self._release(buf)
            else:
                busy.append((req, buf))
        self.pending = busy

    def _release(self, buf):
        """A finished send's buffer is no longer needed (StagedTransport reuses its staging buffers)."""

    def _empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=self.device)
