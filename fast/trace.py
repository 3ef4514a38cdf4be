"""A rank's timeline (--trace): compute and communication spans, written as Chrome trace JSON, which
Perfetto (ui.perfetto.dev) and chrome://tracing open.

The teaching code does not know it is traced: `Traced` wraps the rank's transport and marks a span
at every exchange. A compute span ends where an exchange begins (so the one before layer l's holds
layer l-1's attention and MLP and layer l's Q/K/V); recv, send and allgather end where the call
returns. On a GPU the staging copies of fast/staged.py's side streams (d2h, h2d) go in rows of
their own.
"""
import json
import time

import torch

from cli import replace_whole


class Trace:
    """Consecutive spans tagged by layer: `end(name, layer)` ends the span `name` here, and it began
    where the previous span ended (at `start` for the first). Off, it costs nothing."""

    def __init__(self, rank, device, on):
        self.rank, self.device, self.on, self.events, self.copies = rank, torch.device(device), on, [], []

    def now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()                   # only when tracing: spans need real ends
        return time.perf_counter()

    def start(self):
        if self.on:
            self.events, self.copies = [], []          # a warm-up's spans are not this run's
            self.t0 = self.last = self.now()
            if self.device.type == "cuda":
                self.e0 = torch.cuda.Event(enable_timing=True)   # the GPU's clock at t0
                self.e0.record()

    def gpu(self, name, layer, begin, end):
        """A span between two CUDA events (timed) on a side stream: resolved when written."""
        self.copies.append((name, layer, begin, end))

    def end(self, name, layer, t=None):
        """The span `name` of `layer` ends now (or at perf_counter time t); it began where the previous one ended."""
        if not self.on:
            return
        t = self.now() if t is None else t
        self.events.append(dict(name=name, ph="X", pid=0, tid=self.rank, args={"layer": layer},
                                ts=round((self.last - self.t0) * 1e6, 1), dur=round((t - self.last) * 1e6, 1)))
        self.last = t

    def write(self, comm, path):
        """Gather every rank's spans; rank 0 writes one file (copies: pid 1, one row per rank)."""
        if self.copies:
            torch.cuda.synchronize()
        for name, layer, a, b in self.copies:
            start = self.e0.elapsed_time(a) * 1e3          # us since t0
            self.events.append(dict(name=name, ph="X", pid=1, tid=self.rank, args={"layer": layer},
                                    ts=round(start, 1), dur=round(a.elapsed_time(b) * 1e3, 1)))
        self.copies = []
        events = comm.gather(self.events, root=0)
        if comm.rank == 0:
            names = [dict(name="thread_name", ph="M", pid=pid, tid=r, args={"name": f"rank {r}{what}"})
                     for r in range(comm.size) for pid, what in ((0, ""), (1, " copies"))]
            with replace_whole(path) as tmp, open(tmp, "w") as f:
                json.dump({"traceEvents": names + [e for ev in events for e in ev]}, f)


class Traced:
    """A transport that marks the trace at every exchange, and is the transport it wraps otherwise.

    The first barrier after `reset_stats` (the one before a prefill's clock starts) starts the
    trace; the layer of an all-gather is its count since then (one per layer). The first finish or
    barrier after the prefill marks where it ended: `head` closes the emitting rank's trace there."""

    def __init__(self, transport, trace):
        self.inner, self.trace, self.armed, self.gathers, self.after_recv = transport, trace, True, 0, None
        self.stopped = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def reset_stats(self):
        self.inner.reset_stats()
        self.armed = True

    def barrier(self):
        self._stop()
        self.inner.barrier()
        if self.armed:
            self.armed, self.gathers, self.after_recv, self.stopped = False, 0, None, None
            self.trace.start()

    def finish(self):
        self._stop()
        self.inner.finish()

    def _stop(self):
        if not self.armed and self.stopped is None:
            self.stopped = self.trace.now()

    def head(self):
        """On the rank that emitted: its last span, the last layer's attention and MLP and the LM head."""
        self.trace.end("compute", "head", self.stopped)

    def recv_into(self, out, source, tag):
        self.trace.end("compute", tag)
        out = self.inner.recv_into(out, source, tag)
        self.trace.end("recv", tag)
        self.after_recv = tag
        return out

    def recv(self, shape, dtype, source, tag):
        return self.recv_into(self.inner._empty(shape, dtype), source, tag)

    def isend(self, t, dest, tag):
        if self.after_recv != tag:                     # what follows a receive (the append) is the send's
            self.trace.end("compute", tag)
        self.inner.isend(t, dest, tag)
        self.trace.end("send", tag)

    def allgather_into(self, out, spans, dim):
        self.trace.end("compute", self.gathers)
        out = self.inner.allgather_into(out, spans, dim)
        self.trace.end("allgather", self.gathers)
        self.gathers += 1
        return out
