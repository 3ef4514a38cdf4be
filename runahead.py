"""KV-Runahead: p ranks prefill a prompt together by filling the KV cache of the last rank.

Rank i owns the contiguous chunk c_i of the prompt, global positions S_{i-1}..S_i-1. In every layer it
receives the K/V of positions [0, S_{i-1}) from rank i-1, appends its own (the KV-cache append),
sends [0, S_i) on to rank i+1 without waiting, and attends over [0, S_i): a rectangle it sees whole
and a triangle, never the masked upper half. Rank 0 waits for nobody and runs ahead into later
layers. The last rank ends with the whole prompt's cache, emits the first token, and decodes on.

    mpirun -n 8 python runahead.py                       # built-in model, 2048 synthetic tokens
    mpirun -n 4 python runahead.py --model DIR --prompt "..." --partition searched
"""
import os
import statistics
import sys
import time

import cli

if __name__ == "__main__":                             # --help and bad options answer before torch loads
    ARGS = cli.runahead().parse_args()

import torch  # noqa: E402

import partition  # noqa: E402
from kvcache import KVCache, bytes_per_token  # noqa: E402
from model import sync  # noqa: E402
from profiling import calibrate_model  # noqa: E402
from program import Done, abort_on_error, forward, report, say, setup  # noqa: E402


class ChainKV:
    """KV-Runahead's K/V exchange: receive the prefix from the left, append, send on to the right."""

    dense = False

    def __init__(self, cache, transport, prefix, trace):
        self.cache, self.t, self.prefix, self.trace = cache, transport, prefix, trace
        self.last = transport.rank == transport.size - 1
        B, n_kv, hs = cache.kv[0].shape[1], cache.kv[0].shape[2], cache.kv[0].shape[4]
        self.inbox = (2, B, n_kv, prefix, hs)         # K and V of [0, S_{i-1}): the shape to receive

    def update(self, layer, k, v):
        self.trace.add("compute", layer)
        if self.prefix:                                # wait for the left neighbour's layer
            kv = self.t.recv(self.inbox, self.cache.kv[0].dtype, self.t.rank - 1, tag=layer)
            self.cache.update(layer, kv[0], kv[1])
            self.trace.add("recv", layer)
        k_all, v_all = self.cache.update(layer, k, v)  # (B, n_kv, S_i, hs)
        if not self.last:                              # the cache holds exactly S_i tokens: send it all
            self.t.isend(self.cache.kv[layer], self.t.rank + 1, tag=layer)
            self.trace.add("send", layer)
            if layer == len(self.cache.kv) - 1:        # this rank's part of the first token is sent
                self.t.finish()
                raise Done
        return k_all, v_all


@torch.no_grad()
def prefill(job, c, decode_room=0, math_path=False):
    """This rank's part of the prefill. Returns (last-position logits, cache, seconds since barrier);
    logits only on the last rank, the others stop once their last layer's K/V is sent."""
    S_prev, S_i = sum(c[:job.rank]), sum(c[:job.rank + 1])
    last = job.rank == job.size - 1
    cache = KVCache(job.model.cfg, 1, S_i + (decode_room if last else 0), job.dtype, job.device)
    kv = ChainKV(cache, job.transport, S_prev, job.trace)
    job.transport.reserve(0 if last else S_i * bytes_per_token(job.model.cfg, job.dtype))   # one layer's K/V
    job.transport.barrier()
    sync(job.device)
    job.trace.start()
    t0 = time.perf_counter()
    logits = forward(job, job.tokens[:, S_prev:S_i], kv, S_prev, math_path)
    if last:
        job.trace.add("compute", "head")
        logits.argmax().item()                         # the first token id, known on the host
    sync(job.device)
    return logits, cache, time.perf_counter() - t0


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


def live_search(job, args):
    """KVR-S measured live: rank 0 runs the grid search, and every candidate it scores is a real
    prefill by all ranks (median TTFT of --repeats). The best goes into the table."""
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


def main(args):
    job = setup(args, prepare=lambda job: pick_partition(job, args.partition))
    if args.search_live:
        with abort_on_error(job.comm):
            live_search(job, args)
        return
    with abort_on_error(job.comm):
        logits, cache, ttft = prefill(job, job.c, args.max_new_tokens, args.math)
        job.transport.finish()
        job.transport.barrier()                        # a polite wait, not gather's spin
        stats = job.comm.gather(job.transport.stats, root=job.size - 1)
        if args.trace:
            job.trace.write(job.comm, args.trace)
        if job.rank == job.size - 1:
            report(job, args, "KV-Runahead", job.rank, job.c, stats,
                   [f"partition ({args.partition}): {','.join(map(str, job.c))}  [{job.c_source}]"],
                   logits, cache, ttft)


if __name__ == "__main__":
    sys.exit(main(ARGS))
