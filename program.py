"""What runahead.py and tsp.py share around their algorithms: setting a rank up, failing cleanly,
and reporting the result.

  setup           MPI, the model, the prompt and the checks, on every rank; bad input is one line
                  on every rank and exit 2, before any rank can wait on another; returns the Job
  abort_on_error  an exception on any rank, or Ctrl-C, ends the whole job (MPI Abort), never a hang
  report, done    on the rank holding the whole cache: decode on from it, print the result; then
                  every rank waits politely for it
What a plain CPU run does not need (a GPU, --trace, --save, --fuse, --graphs, a searched partition,
$KVR_ROUTE) is job.system's, fast/system.py: the one seam to the system around this code.
"""
import array
import fcntl
import os
import signal
import stat
import sys
import termios
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

import cli
import transport
from cli import say
from generate import decode
from kvcache import KVCache, bytes_per_token
from model import Transformer, builtin


@dataclass
class Job:
    """What a rank has once `setup` is done. Every rank holds the whole prompt and the whole model."""
    comm: object                # MPI's COMM_WORLD: the p ranks of this job
    rank: int                   # this rank; rank 0 is the front of KV-Runahead's chain
    size: int                   # p
    local_size: int             # ranks on this rank's node, sharing its cores and GPUs
    cores: int                  # the cores those ranks may run on, together
    polite: bool                # waits sleep between polls: CPU ranks outnumber the cores
    device: torch.device        # cpu, or the local rank's GPU
    dtype: torch.dtype          # weights, activations and the K/V that travel
    name: str                   # the model as the report names it
    model: Transformer
    model_key: str              # model, dtype and device kind: partitions and calibrations are filed under it
    tokenizer: object           # decodes the report's text; None for a synthetic prompt or built-in model
    tokens: torch.Tensor        # (1, C): the prompt, on `device`
    transport: transport.Transport   # how tensors move between ranks
    system: object = None       # fast/system.py's System, for the options that need it; else None
    c: list = None              # runahead.py: the partition, one chunk per rank (set by its `prepare`)
    c_source: str = ""          # ... and where it came from
    c_modelled: bool = False    # ... searched on the cost model: calibrate.versus_even times it
    cache: KVCache = None       # this rank's KV cache, made once and reused (kvcache.cache_for)


class Done(Exception):
    """Raised by a K/V exchange after its last layer on a rank that does not emit the first token: what
    it would compute next (that layer's attention and MLP, norm, LM head) reaches nobody. Prefill catches it."""


def setup(args, prepare=None):
    """Start MPI, load model and prompt on every rank, then `prepare(job)` (a program's own checks)."""
    comm, device = transport.init(args.device)

    def interrupted(*_):                               # Ctrl-C, to this rank or to mpirun
        abort(comm, f"interrupted (rank {comm.rank})", 130)
    signal.signal(signal.SIGINT, interrupted)
    if cli.interrupted_early:                          # while torch loaded, or MPI started
        interrupted()
    job, error = None, None
    try:
        job = _setup(args, comm, device)
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


def load(args, device):
    """(description, model, key) for --model, built on `device` in --dtype. The key names the model,
    dtype and device kind: partitions and calibrations are filed under it."""
    dtype = getattr(torch, args.dtype)
    if args.model.startswith("builtin:"):
        arch = args.model.split(":", 1)[1]
        if arch not in ("llama", "falcon"):
            raise ValueError(f"--model {args.model}: the built-in models are builtin:llama and builtin:falcon")
        name = f"built-in {arch} (random weights: its tokens are noise)"
        model = builtin(arch, seed=0, dtype=dtype).to(device)
    else:                                              # a checkpoint's directory, or dims:NAME
        from load_weights import named
        name, model = named(args.model, dtype, device)
    cfg = model.cfg
    key = f"{cfg.arch}-d{cfg.dim}-L{cfg.n_layers}-h{cfg.n_heads}-kv{cfg.n_kv_heads}-{args.dtype}-{device.type}"
    return name, model, key


def prompt_ids(args, tokenizer, vocab_size):
    """The prompt's token ids: --prompt through the tokenizer, --prompt-ids, or --prompt-len seeded ids."""
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError("--prompt needs a checkpoint with tokenizer.json or tokenizer.model; "
                             "use --prompt-ids or --prompt-len")
        ids = tokenizer.encode(args.prompt)
    elif args.prompt_ids is not None:
        ids = cli.ids(args.prompt_ids)
    else:
        ids = torch.randint(3, vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    if bad := [i for i in ids if not 0 <= i < vocab_size]:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def check_room(cfg, C, new_tokens, dtype, device):
    """Refuse at once a KV cache (prompt and new tokens) this machine cannot hold: not after the prefill."""
    need = (C + new_tokens) * bytes_per_token(cfg, dtype) * cfg.n_layers
    if device.type == "cuda":
        have, where = torch.cuda.mem_get_info(device)[1], f"GPU {device.index}"
    else:
        have, where = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine"
    if need > have:
        raise ValueError(f"--max-new-tokens {new_tokens}: a KV cache of {C} + {new_tokens} tokens takes "
                         f"{need / 2**30:.3g} GiB, more than the {have / 2**30:.3g} GiB of {where}")


def warnings(args, cfg, C, device):
    """What runs, but not as the user may expect."""
    if C > cfg.max_position_embeddings:
        yield f"prompt of {C} tokens is longer than the model's max_position_embeddings ({cfg.max_position_embeddings})"
    elif C + args.max_new_tokens - 1 > cfg.max_position_embeddings:
        yield (f"{C} prompt tokens and {args.max_new_tokens} new ones reach position {C + args.max_new_tokens - 1}, "
               f"past the model's max_position_embeddings ({cfg.max_position_embeddings})")
    if args.dtype == "float16" and device.type == "cpu":
        yield ("float16 on a CPU has no fast kernels: a prefill takes about 2x bfloat16's time and 5x "
               "float32's (2048 tokens, built-in model); --dtype float32 is the fast one here")


def _setup(args, comm, device):
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    local = transport.local_comm(comm)
    mine = os.sched_getaffinity(0)                     # the cores this rank may run on
    cores = len(set().union(*local.allgather(mine)))   # ... and all the node's ranks together
    torch.set_num_threads(args.threads or max(1, min(len(mine), cores // local.size)))
    polite = device.type == "cpu" and local.size > cores   # a GPU rank never sleeps in a wait
    name, model, key = load(args, device)
    tokenizer = None                                   # a given prompt's text is decoded in the report
    if (args.prompt, args.prompt_ids) != (None, None) and not args.model.startswith(("builtin:", "dims:")):
        from load_weights import load_tokenizer
        tokenizer = load_tokenizer(args.model)
    ids = prompt_ids(args, tokenizer, model.cfg.vocab_size)
    if comm.size > len(ids):
        raise ValueError(f"{comm.size} ranks but only {len(ids)} prompt tokens: every rank needs at least one")
    check_room(model.cfg, len(ids), args.max_new_tokens, getattr(torch, args.dtype), device)
    if comm.rank == 0:
        for line in warnings(args, model.cfg, len(ids), device):
            say(f"warning: {line}")
    job = Job(comm=comm, rank=comm.rank, size=comm.size, local_size=local.size, cores=cores, polite=polite,
              device=device, dtype=getattr(torch, args.dtype), name=name, model=model, model_key=key,
              tokenizer=tokenizer, tokens=torch.tensor([ids], device=device),
              transport=transport.Transport(comm, device, polite))
    if device.type == "cuda" or args.trace or args.save or args.fuse or args.graphs or "KVR_ROUTE" in os.environ or (
            getattr(args, "partition", "even") in ("searched", "predicted") or getattr(args, "search_live", False)):
        from fast.system import System                 # the seam: see fast/system.py
        job.system = System(job, args)
    return job


@contextmanager
def abort_on_error(comm):
    """An exception on any rank takes the whole job down, instead of leaving the others waiting."""
    try:
        yield
    except Exception as e:
        abort(comm, f"error (rank {comm.rank}): {type(e).__name__}: {e}", 1)


def abort(comm, line, status):
    """Say one line and end the whole job (MPI Abort): the other ranks end wherever they wait."""
    say(line)
    _wait_until_stderr_read()
    comm.Abort(status)


def _wait_until_stderr_read(timeout=2.0):
    """Return once the launcher has read this rank's stderr (at most `timeout` s): under MPICH's Hydra
    it is a pipe to the proxy, which serves Abort's socket first and would end the job before the
    error line got through; once the pipe is empty (FIONREAD 0), the line is on its way."""
    try:
        mode = os.fstat(2).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return                                     # a file or a terminal: nothing in flight
        unread, deadline = array.array("i", [0]), time.monotonic() + timeout
        while fcntl.ioctl(2, termios.FIONREAD, unread) == 0 and unread[0] and time.monotonic() < deadline:
            time.sleep(0.001)
    except OSError:                                    # stderr closed: abort at once all the same
        pass


def done(job):
    """Every rank waits here, politely, until the reporting rank has decoded: not in MPI_Finalize's spin."""
    job.transport.polite = True
    job.transport.barrier()


def report(job, args, title, emitter, partition, stats, lines, logits, cache, ttft):
    """On the rank that holds the whole cache: decode on from it, print the result (--save: job.system)."""
    C = job.tokens.shape[1]
    how_route, how_decode, how_prefill = job.system.notes(cache) if job.system else ("", "", "")
    t0 = time.perf_counter()
    tokens = decode(job.model, logits.argmax().view(1, 1), cache, args.max_new_tokens - 1,
                    math_path=args.math)[0].tolist()
    tpot = (time.perf_counter() - t0) / max(1, len(tokens) - 1)
    print(f"{title}: {job.size} rank{'s' * (job.size != 1)}, {job.name}, {C} prompt tokens, {args.dtype} on {job.device}")
    for line in lines + [f"decode: {tpot * 1e3:.2f} ms per output token after the first{how_decode}"]:
        print(line)
    print(f"transport: {job.transport.path}{how_route}; waits: "
          + (f"polite ({job.local_size} ranks on {job.cores} cores)" if job.polite else "blocking"))
    print(f"TTFT: {ttft * 1e3:.2f} ms (rank {emitter}, barrier to first token id{how_prefill})")
    print(f"tokens: {tokens}", flush=True)
    if job.tokenizer:
        print(f"text ({job.tokenizer.name}): {job.tokenizer.decode(job.tokens[0].tolist() + tokens)}", flush=True)
    if job.system:
        job.system.save(logits, cache, partition, ttft, tokens, stats)
