"""The seam: everything around the teaching prefill that a plain CPU run does not need.

program.setup makes a System (job.system) only when an option asks for one of these; otherwise
job.system is None and nothing under fast/ is imported. The teaching files call it under
`if job.system`, and read the same without it:
  System(job, args)   the route (on a GPU direct to a CUDA-aware MPI, or staged through pinned host
                      memory; $KVR_ROUTE), the trace wrapped around the transport (--trace),
                      compiled layers (--fuse, --graphs), a warning when ranks share a GPU without MPS
  pick_partition      --partition searched | predicted: the caches, calibration, the cost model
  live_search         --search-live: the partition searched by measured prefills
  before              untimed warm-up prefills on a GPU (and the CUDA graphs' recording), the staged
                      route's shared slots, a cost-model pick timed against the even split
  after               the trace written (every rank); notes and --save on the rank that reports
Why a seam and not flags inside the teaching files: a reader follows runahead.py and tsp.py with
none of this in the way, and the same files run alone on a CPU (tests/test_layout.py checks it).
"""
import os

import torch

import calibrate
import cli
import fast.decode
import partition
from fast.compiled import fuse
from fast.direct import DirectTransport
from fast.staged import StagedTransport, cuda_aware_mpi
from fast.trace import Trace, Traced
from kvcache import split


class System:
    """What one rank's run needs around the teaching prefill (program.setup makes it: job.system)."""

    def __init__(self, job, args):
        self.job, self.args, self.warm_ups = job, args, 0
        self.trace = Trace(job.rank, job.device, bool(args.trace))
        route = self.route(job.device)
        self.staged = route == "staged"
        if self.staged:                                # bytes through pinned host memory
            job.transport = StagedTransport(job.comm, job.device, job.polite, trace=self.trace)
        elif route == "direct":                        # GPU bytes straight to a CUDA-aware MPI
            job.transport = DirectTransport(job.comm, job.device, job.polite)
        if args.trace:
            job.transport = Traced(job.transport, self.trace)
        if args.fuse or args.graphs:
            fuse(job.model, graphs=args.graphs)
        self.sharing = ""                              # a node's ranks outnumber its GPUs: how they share
        if job.device.type == "cuda" and job.local_size > torch.cuda.device_count():
            self.sharing = f"{job.local_size} ranks share {torch.cuda.device_count()} GPU(s) " + (
                "through MPS" if mps() else "without MPS")
        if job.rank == 0 and self.sharing.endswith("without MPS"):
            cli.say(f"warning: {self.sharing}, so their kernels take turns (4 ranks on one H100, 8k tokens: "
                    "KV-Runahead 1.17x one process's TTFT, 1.00x with MPS); start it first: nvidia-cuda-mps-control -d")

    @staticmethod
    def route(device):
        """host | direct | staged: $KVR_ROUTE if set (on a CPU, direct and staged run their protocol
        with plain copies, so every route runs end to end without a GPU), else on a GPU direct under
        a CUDA-aware MPI and staged otherwise, and host on a CPU."""
        route = os.environ.get("KVR_ROUTE")
        if route is None:
            return ("direct" if cuda_aware_mpi() else "staged") if device.type == "cuda" else "host"
        if route not in ("host", "direct", "staged") or (route == "host" and device.type == "cuda"):
            raise ValueError(f"KVR_ROUTE={route}: the routes are host (CPU only), direct and staged")
        if route == "direct" and device.type == "cuda" and not cuda_aware_mpi():
            raise ValueError("KVR_ROUTE=direct: this MPI is not CUDA-aware (KVR_CUDA_AWARE=1 overrides the query)")
        return route

    def pick_partition(self):
        """--partition searched | predicted: rank 0 decides from the caches or the calibrated cost model."""
        calibrate.pick_partition(self.job, self.args.partition, self.args.recalibrate)

    def live_search(self, prefill):
        calibrate.live_search(self.job, self.args, prefill)

    def before(self, prefill, *args):
        """Before the timed prefill: on a GPU one untimed prefill (the first loads and tunes kernels,
        hundreds of ms a serving process pays once, not per prompt), and with --graphs a second that
        records them (fast/segments.py); the staged route's slots sized to what it sent; a partition
        searched on the cost model timed against the even split (calibrate.versus_even). The
        messages are counted again from zero after it."""
        job = self.job
        self.warm_ups = (job.device.type == "cuda" or self.staged) * (1 + bool(self.args.graphs))
        for _ in range(self.warm_ups):                 # (staged on a CPU: one, to size the slots)
            prefill(job, *args)
            self.reserve()
        if job.c_modelled:
            if self.staged:                            # the even split's messages take slots too
                prefill(job, partition.even(job.tokens.shape[1], job.size))
                self.reserve()
            calibrate.versus_even(job, prefill)
            self.reserve()
        job.transport.finish()
        job.transport.reset_stats()

    def reserve(self):
        """Collective: the staged route's shared slots, as large as this rank's largest message so far."""
        if self.staged:
            self.job.transport.finish()
            self.job.transport.reserve(self.job.transport.largest)

    def after(self, logits):
        """Every rank, after the timed prefill: the trace (--trace) is gathered and written; on the
        rank that emitted (logits), it ends with the LM head."""
        if self.args.trace:
            if logits is not None:
                self.job.transport.head()
            self.trace.write(self.job.comm, self.args.trace)

    def notes(self, cache):
        """(how the GPU is shared, how decode runs, how the timed prefill ran), for the report; read
        before decoding."""
        job = self.job
        route = f"; {self.sharing}" if self.sharing else ""
        graphs = fast.decode.takes(job.model, cache) and not self.args.math     # generate.decode's choice
        decode = ", a CUDA graph a step after one eager step" if graphs else ""
        ran = getattr(job.model.forward, "ran", None)              # fast/segments.py: --graphs
        prefill = ", after an untimed warm-up prefill" if self.warm_ups else ""
        if ran == "replayed":
            prefill += ", replayed as CUDA graphs"
        elif ran:
            prefill += f", {ran}, not replayed"
            cli.say(f"warning: --graphs: the timed prefill ran {ran}, not as the CUDA graphs its warm-up recorded: "
                    "its KV cache is not where the warm-up's was (the allocator put it elsewhere)")
        return route, decode, prefill

    def save(self, logits, cache, partition, ttft, tokens, stats):
        """--save: the result whole or not at all, even if the job is killed."""
        if not self.args.save:
            return
        C = self.job.tokens.shape[1]
        prompt_kv = [tuple(t.cpu().clone(memory_format=torch.contiguous_format) for t in split(kv[:, :C]))
                     for kv in cache.kv]                 # HF's layout: (k, v), each (B, n_kv, C, hs)
        with cli.replace_whole(self.args.save) as tmp:
            torch.save(dict(logits=logits.cpu(), past_key_values=prompt_kv, partition=partition, ttft_s=ttft,
                            first_token=tokens[0], generated_ids=tokens, messages=stats), tmp)


def mps():
    """Is NVIDIA's MPS daemon running on this node (ranks sharing a GPU then run side by side)?"""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().startswith("nvidia-cuda-mps"):   # -control or -server, cut at 15 characters
                    return True
        except OSError:
            pass
    return False
