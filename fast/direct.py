"""GPU tensors straight to a CUDA-aware MPI: transport.Transport's route, in the GPU's order.

A GPU runs behind the host, so a tensor the host has asked for may not be written yet. A send is
queued with the event that marks its tensor written (not the whole stream) and started by the
rank's next exchange at the latest (`_progress`), so a rank runs at most one layer ahead of its
GPU. Memory that MPI writes is allocated on a side stream, so no kernel still queued on the
compute stream can be using it. StagedTransport (staged.py) builds on this order.
"""
import torch

from transport import MPI, Transport, _buf


class _Passed:
    """The event of a CPU copy: done when the copy returns (the tests run these routes on a CPU)."""

    def synchronize(self):
        pass

    def query(self):
        return True


def positions(out, starts, counts, dim):
    """Each rank's positions of `out` as views, their bytes, and their offsets packed one after another."""
    parts = [out.narrow(dim, a, n) for a, n in zip(starts, counts)]
    sizes = [p.numel() * out.element_size() for p in parts]
    return parts, sizes, [sum(sizes[:r]) for r in range(len(sizes))]


class DirectTransport(Transport):
    """transport.Transport for GPU tensors under a CUDA-aware MPI; on a CPU, the same queue with
    events that have always passed."""

    def __init__(self, comm, device, polite):
        super().__init__(comm, device, polite)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.up = torch.cuda.Stream(self.device)   # where received memory is allocated (_empty)
        self.queued = []           # (event, buffer, dest, tag): sends waiting for their bytes

    @property
    def path(self):
        return ("CUDA-aware MPI: device buffers straight to MPI" if self.cuda
                else "KVR_ROUTE=direct: CPU tensors straight to MPI, sends queued as on a GPU")

    def _send(self, t, dest, tag):
        self.queued.append((self._event(), t, dest, tag))   # MPI may read it once the GPU has written it

    def _receive(self, out, source, tag):
        if self.cuda and not out.is_contiguous():      # a CUDA-aware Open MPI unpacks a device subarray
            whole = self._empty(out.shape, out.dtype)  # through host memory: 6x slower on an H200 than
            self.wait(self.comm.Irecv(_buf(whole), source, tag))   # landing it whole and copying once
            out.copy_(whole)
            whole.record_stream(torch.cuda.current_stream())   # not reused before the copy has run
            return
        super()._receive(out, source, tag)

    def _gather(self, out, starts, counts, dim):
        """On a GPU the parts land whole and are copied once into their positions, as the chain's
        prefix is (a CUDA-aware MPI would unpack a device datatype through host memory)."""
        if not self.cuda:
            return super()._gather(out, starts, counts, dim)
        parts, sizes, displs = positions(out, starts, counts, dim)
        mine = parts[self.rank].contiguous()
        flat = self._empty((sum(p.numel() for p in parts),), out.dtype)
        self._event().synchronize()                    # mine is written
        self.wait(self.comm.Iallgatherv(_buf(mine), [_buf(flat)[0], sizes, displs, MPI.BYTE]))
        for r, (part, got) in enumerate(zip(parts, flat.split([p.numel() for p in parts]))):
            if r != self.rank:
                part.copy_(got.view(part.shape))

    def _event(self):
        """An event on the compute stream, here: what was queued before it is done when it is."""
        if not self.cuda:
            return _Passed()
        e = torch.cuda.Event()
        e.record()
        return e

    def _progress(self):
        """Start the queued sends whose bytes are ready (in order), and let go of finished ones."""
        for ready, buf, dest, tag in self.queued:
            ready.synchronize()                        # the bytes are written (direct) or down (staged)
            self.pending.append((self.comm.Isend(_buf(buf), dest, tag), buf))
        self.queued.clear()
        super()._progress()

    def _empty(self, shape, dtype):
        """New memory that MPI or a copy may write at once: on a GPU allocated on a side stream."""
        if not self.cuda:
            return super()._empty(shape, dtype)
        with torch.cuda.stream(self.up):
            out = torch.empty(shape, dtype=dtype, device=self.device)
        out.record_stream(torch.cuda.current_stream())  # freed: reused after the compute stream's use
        return out
