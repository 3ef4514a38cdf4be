"""GPU tensors straight to a CUDA-aware MPI: transport.Transport's route, in the GPU's order.

A GPU runs behind the host, so a tensor the host has asked for may not be written yet. A send is
queued with the event that marks its tensor written (not the whole stream) and started by the
rank's next exchange at the latest (`_progress`), so a rank runs at most one layer ahead of its
GPU. A send right after a receive starts at once: the chain forwards a prefix as soon as it has
come in, not after the host has queued the rest of the layer. Memory that MPI writes is allocated
on a side stream, so no kernel still queued on the compute stream can be using it.
StagedTransport (staged.py) builds on this order.

A message lands where it belongs: the cache's layout (kvcache.py) makes a run of positions one block,
which MPI reads and writes in place; anything else lands in new memory and is copied
(transport.Transport), never as an MPI datatype of many pieces, which a CUDA-aware Open MPI unpacks
through host memory, several times slower.
"""
import torch

from transport import Transport, _buf


class _Passed:
    """The event of a CPU copy: done when the copy returns (the tests run these routes on a CPU)."""

    def synchronize(self):
        pass

    def query(self):
        return True


class DirectTransport(Transport):
    """transport.Transport for GPU tensors under a CUDA-aware MPI; on a CPU, the same queue with
    events that have always passed."""

    def __init__(self, comm, device, polite):
        super().__init__(comm, device, polite)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.up = torch.cuda.Stream(self.device)   # where received memory is allocated (_empty)
        self.queued = []           # (event, buffer, dest, tag): sends waiting for their bytes
        self.forward = False       # a receive just ended: the next send starts at once (_send)

    @property
    def path(self):
        return ("CUDA-aware MPI: device buffers straight to MPI" if self.cuda
                else "KVR_ROUTE=direct: CPU tensors straight to MPI, sends queued as on a GPU")

    def _send(self, t, dest, tag):
        self.queued.append((self._event(), t, dest, tag))   # MPI may read it once the GPU has written it
        if self.forward:                               # the chain: a prefix just came in, and the GPU
            self.forward = False                       # wrote this rank's own K/V while it came, so
            self._progress()                           # the send starts now, not at the next exchange

    def _receive(self, out, source, tag):
        """transport.Transport's receive; the send that follows it starts at once (`_send`)."""
        super()._receive(out, source, tag)
        self.forward = True

    def _gather(self, out, starts, counts, dim):
        """transport.Transport's in-place all-gather, once this rank's part is written."""
        self._event().synchronize()
        super()._gather(out, starts, counts, dim)

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
