"""The seam: everything around the teaching prefill that a plain CPU run does not need.

program.setup makes a System (job.system) only when an option asks for one of these; otherwise
job.system is None and nothing under fast/ is imported. The teaching files call it under
`if job.system`, and read the same without it:
  System(job, args)   the GPU route (CUDA-aware MPI, or staged through pinned host memory), the
                      trace wrapped around the transport (--trace), compiled layers (--fuse, --graphs)
  pick_partition      --partition searched | predicted: the caches, calibration, the cost model
  live_search         --search-live: the partition searched by measured prefills
  before              untimed warm-up prefills on a GPU (and the CUDA graphs' recording), the staged
                      route's shared slots, a cost-model pick timed against the even split
  after               the trace written (every rank); notes and --save on the rank that reports
Why a seam and not flags inside the teaching files: a reader follows runahead.py and tsp.py with
none of this in the way, and the same files run alone on a CPU (tests/test_layout.py checks it).
"""
import torch

import calibrate
import cli
import fast.decode
from fast.compiled import fuse
from fast.staged import StagedTransport, cuda_aware_mpi
from fast.trace import Trace, Traced



class System:
    def __init__(self, job, args):
        self.job, self.args = job, args
        self.trace = Trace(job.rank, job.device, bool(args.trace))
        self.staged = job.device.type == "cuda" and not cuda_aware_mpi()
        if self.staged:                                # GPU bytes through pinned host memory
            job.transport = StagedTransport(job.comm, job.device, job.polite, trace=self.trace)
        if args.trace:
            job.transport = Traced(job.transport, self.trace)
        if args.fuse or args.graphs:
            fuse(job.model, graphs=args.graphs)

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
        for _ in range((job.device.type == "cuda") * (1 + bool(self.args.graphs))):
            prefill(job, *args)
            self.reserve()
        if job.c_modelled:
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
        """(how decode runs, how the timed prefill ran), for the report; read before decoding."""
        job = self.job
        graphs = fast.decode.takes(job.model, cache) and not self.args.math     # generate.decode's choice
        decode = ", a CUDA graph a step after one eager step" if graphs else ""
        ran = getattr(job.model.forward, "ran", None)              # fast/segments.py: --graphs
        prefill = ", after an untimed warm-up prefill" if job.device.type == "cuda" else ""
        prefill += {"replayed": ", replayed as CUDA graphs", "eagerly": ", eagerly: the cache moved"}.get(ran, "")
        return decode, prefill

    def save(self, logits, cache, partition, ttft, tokens, stats):
        """--save: the result whole or not at all, even if the job is killed."""
        if not self.args.save:
            return
        C = self.job.tokens.shape[1]
        prompt_kv = [(kv[0, :, :, :C].cpu().clone(), kv[1, :, :, :C].cpu().clone()) for kv in cache.kv]
        with cli.replace_whole(self.args.save) as tmp:
            torch.save(dict(logits=logits.cpu(), past_key_values=prompt_kv, partition=partition, ttft_s=ttft,
                            first_token=tokens[0], generated_ids=tokens, messages=stats), tmp)
