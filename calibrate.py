"""Choosing a partition on this machine: the cost model calibrated by timing real work, rank 0's
choice shared with every rank, and KVR-S searched by measured prefills (runahead.py's --partition
searched|predicted and --search-live). partition.py holds the searches themselves, without torch.

  fit              the CostModel's lin, attn and fixed from chunk timings (non-negative least squares)
  calibrate_model  time chunks of a model after prefixes, and fit them
  measure          ... and the link: ranks 0 and 1 time one layer's K/V there and back
  calibrate        measure until the fit is plausible, and save it in the cache
  pick_partition   rank 0 decides (calibrating first if it must), every rank gets the answer
  release          on a GPU, hand what the allocator holds free back to the ranks beside it
  versus_even      a partition searched on the cost model, timed against the even split
  live_search      the grid search with a real prefill of all ranks as the score
"""
import itertools
import math
import statistics
import time

import numpy as np
import torch

import choose
import partition
from fast import table
from cli import say
from generate import sync
from kvcache import KVCache, bytes_per_token, cache_for


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


def calibrate_model(model, device="cpu", dtype=None, max_len=4096, repeats=5, **fields):
    """Time real chunks of `model` (model.py's Transformer) and fit a CostModel to them.

    For six (c, S) pairs up to S = max_len (>= 8; on a GPU fast/table.py's 15, whose times the cost
    model keeps), fill a fresh KVCache with the S - c prefix tokens (untimed), then time one forward
    of c more tokens at positions S - c .. S - 1, keeping the fastest of `repeats` after a warm-up.
    n_layers comes from model.cfg; the other **fields as in fit. On a CPU shared with other work,
    timings spike: set torch threads to free cores.
    """
    dtype = dtype or next(model.parameters()).dtype
    tokens = torch.randint(model.cfg.vocab_size, (1, max_len), device=device)
    gpu, times = torch.device(device).type == "cuda", {}
    points = table.points(max_len) if gpu else [(max_len // k, max_len // k + P)
                                                for k in (8, 4, 2) for P in (0, max_len // 2)]

    @torch.inference_mode()
    def measure(c, S):
        kv, runs = KVCache(model.cfg, 1, S, dtype, device), []
        for _ in range(1 + repeats):                 # the first run warms up and is not counted
            kv.reset()
            if S > c:
                model(tokens[:, :S - c], kv, 0, last_only=True)
            sync(device)
            t0 = time.perf_counter()
            model(tokens[:, S - c:S], kv, S - c, last_only=True)
            sync(device)
            runs.append(time.perf_counter() - t0)
        times[c, S] = min(runs[1:])
        return times[c, S]

    cost = fit(measure, points, **{"n_layers": model.cfg.n_layers, **fields})
    cost.measured = [[c, S - c, s] for (c, S), s in times.items()] if gpu else []
    return cost


def measure(job):
    """Measure this machine for the cost model: rank 0 times prefill chunks, ranks 0 and 1 the link.
    Returns the CostModel on rank 0 (the others' copy lacks the link)."""
    t = job.transport
    n = job.tokens.shape[1] if job.device.type == "cuda" else min(4096, job.tokens.shape[1])   # a GPU's table:
    cost = t.agree(lambda: calibrate_model(job.model, job.device, job.dtype, max_len=max(1024, n)))   # all of C;
    cfg, times = job.model.cfg, {}                     # 1k tokens at least: shorter ones hide attention
    big = link_tokens(cfg, job.dtype, job.device.type)
    if hasattr(t, "reserve"):                          # staged K/V by the route prefill takes (its slots)
        t.reserve(big * bytes_per_token(cfg, job.dtype))
    if job.size > 1 and job.rank < 2:                  # one layer's K/V of n tokens, there and back,
        polite, t.polite = t.polite, False             # timed by waits that spin (a sleeping poll
        for n in (1, big):                             # would round every wait up to its period)
            buf = torch.zeros((1, n, 2, cfg.n_kv_heads, cfg.head_dim), dtype=job.dtype, device=job.device)
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
        t.polite = polite
        if job.rank == 0:                              # one-way: half the round trip of the small one
            per_token = max(0.0, (times[big] - times[1]) / (big - 1))   # noise can invert it
            cost.comm_per_token, cost.latency = per_token * cfg.n_layers, times[1] / 2 * cfg.n_layers
    return cost


def link_tokens(cfg, dtype, device_type):
    """The large message that times the link: 4096 tokens of one layer's K/V, and on a GPU at least
    64 MiB of them. Falcon-7B's one KV head makes 4096 tokens 1 MiB, 33 us at a staged route's 32 GB/s:
    below the jitter of its 100 us latency, so the slope fitted as 0 three times running (H100)."""
    if device_type != "cuda":                          # a CPU's messages: small models, shared memory
        return 4096
    return max(4096, math.ceil(64 * 2**20 / bytes_per_token(cfg, dtype)))


def calibrate(job, why, tries=3):
    """Measure, refuse a fit that cannot be right (a cost that is not positive: timings spiked),
    measure again quietly if so, and save the first plausible one in the cache; only if every try
    is refused does the user hear of it, as the error."""
    key, path = job.model_key, choose.calibration_path()
    for _ in range(tries):
        cost = measure(job)
        bad = job.transport.agree(cost.implausible)
        release(job)
        if not bad:
            job.transport.agree(lambda: choose.save_calibration(key, cost))
            if job.rank == 0:
                say(f"calibrated {key} {why}: saved to {path}")
            return
    raise ValueError(f"calibrating {key} gave {bad} {tries} times: on a machine this busy, "
                     "use --partition even or a given partition")


def pick_partition(job, spec, recalibrate=False):
    """Rank 0 decides, reading the caches and calibrating first if it must; every rank gets the
    same partition, or the same error (Transport.agree), so no rank is left waiting. Sets job.c,
    job.c_source, and job.c_modelled: searched on the cost model (then versus_even times it)."""
    C, p, key = job.tokens.shape[1], job.size, job.model_key

    def from_table():
        saved = choose.load_table()
        return bool(saved.get(key, p, C) or (spec == "predicted" and saved.contexts(key, p)))

    modelled = spec in ("searched", "predicted") and not job.transport.agree(from_table)

    def why_calibrate():                               # None: the cost model is not needed, or is fine
        if not modelled:
            return None
        if recalibrate:
            return "as asked (--recalibrate)"
        cost = choose.load_calibration(key)
        if cost is None:
            return "on first use"
        bad = cost.implausible() or (job.device.type == "cuda" and not cost.measured and "no chunk times")
        return f"again (the saved one has {bad})" if bad else None

    why = job.transport.agree(why_calibrate)
    if why:
        calibrate(job, why)
    align = choose.alignment(job.device.type)
    job.c, job.c_source = job.transport.agree(lambda: choose.explain(spec, C, p, key, align=align))
    job.c_modelled = modelled and job.c != partition.even(C, p)


def release(job):
    """On a GPU, drop this rank's KV cache and hand back to the device what its allocator holds free:
    ranks that share one GPU cannot use memory another rank's allocator holds, and a calibration
    (chunks of up to C tokens) frees more than a run keeps. Only before the ranks exchange K/V: CUDA-
    aware MPI keeps a peer's buffer mapped once it has read it, so memory freed after that stays in use."""
    if torch.cuda.is_initialized():                    # (a CPU run: nothing to hand back)
        job.cache = None
        torch.cuda.empty_cache()


def versus_even(job, prefill, repeats=3):
    """The cost model's pick against the even split, timed by real prefills of all ranks (alternated,
    median of `repeats`, so one cold first prefill does not decide): the faster one runs, and goes
    into the table, which later runs read. A model of a few coefficients can misjudge a machine (a
    chunk's fixed cost, its rate after a long prefix); a measurement cannot, so `searched` is never
    slower than the even split beyond noise."""
    C, p, path = job.tokens.shape[1], job.size, choose.table_path()
    picks = {"searched": job.c, "even": partition.even(C, p)}
    times = {k: [] for k in picks}
    for _ in range(repeats):
        for k, c in picks.items():
            times[k].append(prefill(job, c)[2])        # the last rank's figure is the TTFT
    job.transport.finish()
    ms = job.transport.agree(lambda: {k: statistics.median(t) * 1e3 for k, t in times.items()}, root=p - 1)
    win = min(ms, key=ms.get)

    def store():
        table = choose.load_table(path)
        table.add(job.model_key, picks[win])
        table.save(path)
    job.transport.agree(store)
    job.transport.reset_stats()                        # the run's own messages only
    job.c = picks[win]
    job.c_source += (f"; timed against the even split: {ms['searched']:.4g} vs {ms['even']:.4g} ms, "
                     f"{win} kept, saved to {path}")


def live_search(job, args, prefill):
    """KVR-S measured live: rank 0 runs the grid search (on a GPU over whole tiles, choose.alignment),
    and every candidate it scores is a real prefill by all ranks (runahead.prefill; median TTFT of
    --repeats). With --search-span it starts at --partition's pick (the cost model's, the table's)
    and stays near it. The best goes into the table. Every candidate fills one KV cache per rank, made
    for C tokens first: CUDA-aware MPI keeps each buffer it read from mapped, so a cache of each
    candidate's size would stay in use, candidate after candidate (4 ranks on one H100, 16k: out of memory)."""
    comm, C, p, path = job.comm, job.tokens.shape[1], job.size, choose.table_path()
    table = job.transport.agree(lambda: choose.load_table(path))
    cache_for(job, C)                                  # every candidate's chunk fits it
    if job.device.type == "cuda":                      # untimed: a GPU's first prefill loads and tunes
        prefill(job, job.c)                            # kernels (hundreds of ms), the rest do not
        job.transport.finish()

    def measure(c):                                    # every rank runs this for every candidate
        ts = [prefill(job, c)[2] for _ in range(args.repeats)]
        job.transport.finish()
        return comm.bcast(statistics.median(ts), root=p - 1)

    if job.rank == 0:
        def score(c):
            comm.bcast(c, root=0)
            return measure(c)
        history = []
        local = args.search_span is not None           # around --partition's pick, or over everything
        best = partition.searched(C, p, score, args.search_steps, args.search_levels, history,
                                  choose.alignment(job.device.type), job.c if local else None, args.search_span)
        scores = dict((tuple(c), s) for c, s in history)
        even = tuple(partition.even(C, p))
        for c in {even, tuple(job.c)} if local else {even}:   # a search on whole tiles may not have
            if c not in scores:                               # tried them: measured too
                scores[c] = score(list(c))
        best = list(min(scores, key=scores.get))
        comm.bcast(None, root=0)
        table.add(job.model_key, best)
        table.save(path)
        print(f"live search over {len(scores)} measured partitions: best {','.join(map(str, best))}, "
              f"median TTFT {scores[tuple(best)] * 1e3:.2f} ms (even split {scores[even] * 1e3:.2f} ms); "
              f"saved to {path} under {job.model_key}")
    else:
        while (c := comm.bcast(None, root=0)) is not None:
            measure(c)
