"""MPI plumbing shared by runahead.py and tsp.py: moving tensors, waiting, tracing, failing, the CLI.

Tensors travel through mpi4py's buffer calls (Isend, Irecv, Iallgatherv) as raw bytes. A GPU tensor
goes to MPI directly only when the MPI library is CUDA-aware; otherwise it is staged through a
pinned host buffer. Waits spin when each rank has a core, and poll politely (Test, then a 0.5 ms
sleep) when ranks outnumber cores, so a waiting rank does not steal the core of one that computes.
"""
import argparse
import ctypes
import json
import os
import sys
import time
from contextlib import contextmanager

import torch
from mpi4py import MPI


# ----------------------------------------------------------------------------- transport

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

    def __init__(self, comm, device, polite, trace=None):
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        self.device, self.polite, self.trace = torch.device(device), polite, trace
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


# ----------------------------------------------------------------------------- tracing

class Trace:
    """A rank's timeline: consecutive spans (compute, recv, send, allgather) tagged by layer.

    Each `add(name, layer)` closes the span that began at the previous call. Written as Chrome trace
    JSON, which Perfetto (ui.perfetto.dev) and chrome://tracing open. Off, it costs nothing.
    """

    def __init__(self, rank, device, on):
        self.rank, self.device, self.on, self.events = rank, torch.device(device), on, []

    def now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()                         # only when tracing: spans need real ends
        return time.perf_counter()

    def start(self):
        if self.on:
            self.t0 = self.last = self.now()

    def add(self, name, layer):
        if not self.on:
            return
        t = self.now()
        self.events.append(dict(name=name, ph="X", pid=0, tid=self.rank, args={"layer": layer},
                                ts=round((self.last - self.t0) * 1e6, 1), dur=round((t - self.last) * 1e6, 1)))
        self.last = t

    def write(self, comm, path):
        """Gather every rank's spans; rank 0 writes one file."""
        events = comm.gather(self.events, root=0)
        if comm.rank == 0:
            names = [dict(name="thread_name", ph="M", pid=0, tid=r, args={"name": f"rank {r}"})
                     for r in range(comm.size)]
            with open(path, "w") as f:
                json.dump({"traceEvents": names + [e for ev in events for e in ev]}, f)


# ----------------------------------------------------------------------------- the shared program

def cli(description):
    """The command line runahead.py and tsp.py share (README documents it)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="builtin:llama",
                    help="HF checkpoint directory, builtin:llama / builtin:falcon (small, random weights), "
                         "or dims:llama7b / dims:falcon7b (the paper's sizes, random weights)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer.model)")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    src.add_argument("--prompt-len", type=int, help="N synthetic token ids (seeded; default 2048)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate, the first included")
    ap.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks here)")
    ap.add_argument("--math", action="store_true", help="the readable masked-softmax attention path")
    ap.add_argument("--fuse", action="store_true",
                    help="compile each layer's elementwise work (torch.compile; for GPUs, slow to start)")
    ap.add_argument("--trace", help="write a per-rank timeline (Chrome trace JSON) to this file")
    ap.add_argument("--save", help="torch.save logits, KV cache, partition, TTFT and tokens here")
    return ap


def say(line):
    """One line to stderr in a single write, so lines from several ranks never interleave."""
    os.write(2, (line + "\n").encode())


class Job:
    """Everything a rank needs to run: model, prompt, device, transport. Built by `setup`."""


def setup(args, prepare=None, comm=MPI.COMM_WORLD):
    """Load model and prompt on every rank, then `prepare(job)` (a program's own checks).

    Bad input on any rank: one line on every rank and exit 2, before any rank can wait on another.
    """
    job, error = Job(), None
    try:
        _setup(job, args, comm)
        if prepare:
            prepare(job)
    except Exception as e:                             # whatever it is, no rank may be left waiting
        error = str(e).splitlines()[0] if str(e) else type(e).__name__
    errors = comm.allgather(error)
    if any(errors):
        first = next(r for r, e in enumerate(errors) if e)
        where = "" if all(e == errors[first] for e in errors) else f" (rank {first})"
        say(f"error{where}: {errors[first]}")
        sys.exit(2)
    return job


def _setup(job, args, comm):
    from load_weights import Tokenizer, load_model
    from model import builtin
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    cores = len(os.sched_getaffinity(0))
    job.rank, job.size, job.local_rank, job.local_size = comm.rank, comm.size, local.rank, local.size
    torch.set_num_threads(args.threads or max(1, cores // local.size))
    job.polite = local.size > cores
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device")
        job.device = torch.device("cuda", local.rank % torch.cuda.device_count())
        torch.cuda.set_device(job.device)
    else:
        job.device = torch.device("cpu")
    job.dtype = getattr(torch, args.dtype)
    if args.model.startswith("dims:"):                  # a paper-scale model with random weights
        from sim import DIMS, dims_model
        if args.model[5:] not in DIMS:
            raise ValueError(f"--model {args.model}: known dims are " + ", ".join("dims:" + k for k in DIMS))
        job.name = f"{args.model[5:]} dimensions, random weights"
        job.model = dims_model(args.model[5:], job.dtype, job.device)
    elif args.model.startswith("builtin:"):
        arch = args.model.split(":", 1)[1]
        if arch not in ("llama", "falcon"):
            raise ValueError(f"--model {args.model}: the built-in models are builtin:llama and builtin:falcon")
        job.name = f"built-in {arch} (random weights: its tokens are noise)"
        job.model = builtin(arch, seed=0, dtype=job.dtype).to(job.device)
    else:
        job.name = args.model
        job.model = load_model(args.model, job.dtype, job.device)
    if args.fuse:
        job.model.fuse()
    cfg = job.model.cfg
    job.model_key = (f"{cfg.arch}-d{cfg.dim}-L{cfg.n_layers}-h{cfg.n_heads}-kv{cfg.n_kv_heads}"
                     f"-{args.dtype}-{job.device.type}")
    if args.prompt is not None:
        if args.model.startswith(("builtin:", "dims:")):
            raise ValueError("--prompt needs a checkpoint with tokenizer.model; use --prompt-ids or --prompt-len")
        ids = Tokenizer(args.model).encode(args.prompt)
    elif args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",")]
        except ValueError:
            raise ValueError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
    else:
        n = 2048 if args.prompt_len is None else args.prompt_len
        if n < 1:
            raise ValueError(f"--prompt-len {n}: need at least 1 token")
        ids = torch.randint(3, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{cfg.vocab_size - 1})")
    if comm.size > len(ids):
        raise ValueError(f"{comm.size} ranks but only {len(ids)} prompt tokens: every rank needs at least one")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1 (the first token is the point of prefill)")
    if len(ids) > cfg.max_position_embeddings and comm.rank == 0:
        say(f"warning: prompt of {len(ids)} tokens is longer than the model's "
            f"max_position_embeddings ({cfg.max_position_embeddings})")
    job.tokens = torch.tensor([ids], device=job.device)     # (1, C)
    job.trace = Trace(comm.rank, job.device, bool(args.trace))
    job.transport = Transport(comm, job.device, job.polite)


@contextmanager
def abort_on_error(comm=MPI.COMM_WORLD):
    """An exception on any rank takes the whole job down, instead of leaving the others waiting."""
    try:
        yield
    except Exception as e:
        say(f"error (rank {comm.rank}): {type(e).__name__}: {e}")
        comm.Abort(1)


def report(job, args, title, emitter, partition, stats, lines, logits, cache, ttft):
    """On the rank that holds the whole cache: decode on from it, print the result, --save it."""
    from model import decode
    C = job.tokens.shape[1]
    prompt_kv = [tuple(t.clone().cpu() for t in cache.layer(i)) for i in range(job.model.cfg.n_layers)]
    t0 = time.perf_counter()
    tokens = decode(job.model, logits.argmax().view(1, 1), cache, args.max_new_tokens - 1)[0].tolist()
    tpot = (time.perf_counter() - t0) / max(1, len(tokens) - 1)
    cores = len(os.sched_getaffinity(0))
    print(f"{title}: {job.size} ranks, {job.name}, {C} prompt tokens, {args.dtype} on {job.device}")
    for line in lines + [f"decode: {tpot * 1e3:.2f} ms per output token after the first"]:
        print(line)
    print(f"transport: {job.transport.path}; waits: "
          + (f"polite ({job.local_size} ranks on {cores} cores)" if job.polite else "blocking"))
    print(f"TTFT: {ttft * 1e3:.2f} ms (rank {emitter}, barrier to first token id)")
    print(f"tokens: {tokens}", flush=True)
    if args.save:
        torch.save(dict(logits=logits.cpu(), past_key_values=prompt_kv, partition=partition, ttft_s=ttft,
                        first_token=tokens[0], generated_ids=tokens, messages=stats), args.save)
