"""Choosing a partition on this machine: the cost model calibrated by timing real work, rank 0's
choice shared with every rank, and KVR-S searched by measured prefills (runahead.py's --partition
searched|predicted and --search-live). partition.py holds the searches themselves, without torch.

  fit              the CostModel's lin, attn and fixed from chunk timings (non-negative least squares)
  calibrate_model  time chunks of a model after prefixes, and fit them
  calibrate        ... and the link: ranks 0 and 1 time one layer's K/V there and back
  pick_partition   rank 0 decides (calibrating first on first use), every rank gets the answer
  live_search      the grid search with a real prefill of all ranks as the score
"""
import itertools
import math
import os
import statistics
import time

import numpy as np
import torch

import partition
from cli import say
from generate import sync
from kvcache import KVCache, bytes_per_token


def fit(measure, points, **fields):
    """Fit lin, attn and fixed to chunk timings: seconds ~ fixed + lin c + attn c S.

    measure(c, S) -> seconds for one chunk of c tokens ending at S; `points` are the (c, S) to time:
    vary both, or the two terms cannot be told apart. The fit is non-negative least squares, done
    exactly for 3 unknowns: ordinary least squares on every subset of the columns, keeping the best
    fit with no negative coefficient. The chain's comm_per_token, latency and head, and n_layers,
    are not visible in one chunk's time: pass them as **fields.
    """
    A = np.array([[1.0, c, c * S] for c, S in points])
    y = np.array([measure(c, S) for c, S in points])
    norm = np.linalg.norm(A, axis=0)                 # columns differ by ~1e7 in scale
    best_err, best = math.inf, np.zeros(3)
    for cols in itertools.product([False, True], repeat=3):
        x = np.zeros(3)
        if any(cols):
            keep = np.array(cols)
            x[keep] = np.linalg.lstsq(A[:, keep] / norm[keep], y, rcond=None)[0] / norm[keep]
        err = np.sum((A @ x - y) ** 2)
        if (x >= 0).all() and err < best_err:
            best_err, best = err, x
    fixed, lin, attn = map(float, best)
    return partition.CostModel(**{**fields, "fixed": fixed, "lin": lin, "attn": attn})


def calibrate_model(model, device="cpu", dtype=None, max_len=4096, repeats=3, **fields):
    """Time real chunks of `model` (model.py's Transformer) and fit a CostModel to them.

    For six (c, S) pairs up to S = max_len (>= 8), fill a fresh KVCache with the S - c prefix
    tokens (untimed), then time one forward of c more tokens at positions S - c .. S - 1, keeping
    the fastest of `repeats` after a warm-up. n_layers comes from model.cfg; the other **fields as
    in fit. On a CPU shared with other work, timings spike: set torch threads to free cores.
    """
    dtype = dtype or next(model.parameters()).dtype
    tokens = torch.randint(model.cfg.vocab_size, (1, max_len), device=device)
    points = [(c, prev + c) for c in (max_len // 8, max_len // 4, max_len // 2)
              for prev in (0, max_len // 2)]

    @torch.inference_mode()
    def measure(c, S):
        kv, times = KVCache(model.cfg, 1, S, dtype, device), []
        for _ in range(1 + repeats):                 # the first run warms up and is not counted
            kv.reset()
            if S > c:
                model(tokens[:, :S - c], kv, 0, last_only=True)
            sync(device)
            t0 = time.perf_counter()
            model(tokens[:, S - c:S], kv, S - c, last_only=True)
            sync(device)
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    return fit(measure, points, **{"n_layers": model.cfg.n_layers, **fields})


def calibrate(job):
    """Measure this machine for the cost model: rank 0 times prefill chunks, ranks 0 and 1 the link."""
    t = job.transport
    cost = calibrate_model(job.model, job.device, job.dtype,
                           max_len=min(4096, max(64, job.tokens.shape[1]))) if job.rank == 0 else None
    t.barrier()                                        # the others wait politely meanwhile
    cfg, times = job.model.cfg, {}
    t.reserve(1024 * bytes_per_token(cfg, job.dtype))  # staged K/V goes by the route prefill takes
    if job.size > 1 and job.rank < 2:                  # one layer's K/V of n tokens, there and back
        for n in (1, 1024):
            buf = torch.zeros((2, 1, cfg.n_kv_heads, n, cfg.head_dim), dtype=job.dtype, device=job.device)
            ack = torch.zeros(1, dtype=job.dtype, device=job.device)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                if job.rank == 0:
                    t.isend(buf, 1, tag=n)
                    t.finish()
                    t.recv(ack.shape, ack.dtype, 1, tag=n)
                else:
                    t.recv(buf.shape, buf.dtype, 0, tag=n)
                    t.isend(ack, 0, tag=n)
                    t.finish()
                best = min(best, time.perf_counter() - t0)
            times[n] = best
        if job.rank == 0:                              # one-way: half the round trip of the small one
            per_token = max(0.0, (times[1024] - times[1]) / 1023)   # noise can invert it
            cost.comm_per_token, cost.latency = per_token * cfg.n_layers, times[1] / 2 * cfg.n_layers
    return cost


def pick_partition(job, spec):
    """Rank 0 picks the partition (calibrating first if it must), every rank gets the same one."""
    comm, C, p = job.comm, job.tokens.shape[1], job.size
    if job.rank == 0:
        table = partition.Table.load(partition.TABLE) if os.path.exists(partition.TABLE) else partition.Table()
        known = table.get(job.model_key, p, C) or (spec == "predicted" and table.contexts(job.model_key, p))
        need = spec in ("searched", "predicted") and not known and not partition.load_calibration(job.model_key)
    if comm.bcast(need if job.rank == 0 else None, root=0):
        cost = calibrate(job)
        if job.rank == 0:
            partition.save_calibration(job.model_key, cost)
            say(f"calibrated {job.model_key} on first use: saved to {partition.CALIBRATION}")
    answer = None
    if job.rank == 0:
        try:
            answer = partition.explain(spec, C, p, job.model_key)
        except ValueError as e:
            answer = str(e)
    job.transport.barrier()
    answer = comm.bcast(answer, root=0)
    if isinstance(answer, str):
        raise partition.PartitionError(answer)
    job.c, job.c_source = answer


def live_search(job, args, prefill):
    """KVR-S measured live: rank 0 runs the grid search, and every candidate it scores is a real
    prefill by all ranks (runahead.prefill; median TTFT of --repeats). The best goes into the table."""
    comm, C, p = job.comm, job.tokens.shape[1], job.size

    def measure(c):                                    # every rank runs this for every candidate
        ts = [prefill(job, c)[2] for _ in range(args.repeats)]
        job.transport.finish()
        return comm.bcast(statistics.median(ts), root=p - 1)

    if job.rank == 0:
        def score(c):
            comm.bcast(c, root=0)
            return measure(c)
        history = []
        best = partition.searched(C, p, score, args.search_steps, args.search_levels, history)
        comm.bcast(None, root=0)
        table = partition.Table.load(partition.TABLE) if os.path.exists(partition.TABLE) else partition.Table()
        table.add(job.model_key, best)
        table.save(partition.TABLE)
        scores = dict((tuple(c), s) for c, s in history)
        print(f"live search over {len(history)} measured partitions: best {','.join(map(str, best))}, "
              f"median TTFT {scores[tuple(best)] * 1e3:.2f} ms (even split "
              f"{scores[tuple(partition.even(C, p))] * 1e3:.2f} ms); saved to {partition.TABLE} "
              f"under {job.model_key}")
    else:
        while (c := comm.bcast(None, root=0)) is not None:
            measure(c)
