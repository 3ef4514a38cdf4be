"""KV-Runahead: p ranks prefill a prompt together by filling the KV cache of the last rank.

Rank i owns the contiguous chunk c_i of the prompt, global positions S_{i-1}..S_i-1. In every layer it
receives the K/V of positions [0, S_{i-1}) from rank i-1, appends its own (the KV-cache append),
sends [0, S_i) on to rank i+1 without waiting, and attends over [0, S_i): a rectangle it sees whole
and a triangle, never the masked upper half. Rank 0 waits for nobody and runs ahead into later
layers. The last rank ends with the whole prompt's cache, emits the first token, and decodes on.

    mpirun -n 8 python runahead.py                       # built-in model, 2048 synthetic tokens
    mpirun -n 4 python runahead.py --model DIR --prompt "..." --partition searched
"""
import sys
import time

import choose
import cli

if __name__ == "__main__":                             # --help and bad options answer before torch loads
    ARGS = cli.runahead().parse_args()
    cli.check_early(ARGS, lambda C, p: choose.check_caches() if ARGS.partition in ("searched", "predicted")
                    else choose.explain(ARGS.partition, C, p))

import torch  # noqa: E402

from calibrate import live_search, pick_partition, versus_even  # noqa: E402
from generate import sync  # noqa: E402
from kvcache import KVCache, bytes_per_token  # noqa: E402
from program import Done, abort_on_error, forward, report, setup, warm_up  # noqa: E402


class ChainKV:
    """KV-Runahead's K/V exchange: receive the prefix from the left, append, send on to the right."""

    dense = False

    def __init__(self, cache, transport, prefix, trace):
        self.cache, self.t, self.prefix, self.trace = cache, transport, prefix, trace
        self.last = transport.rank == transport.size - 1

    def update(self, layer, k, v):
        self.trace.end("compute", layer)
        if self.prefix:                                # the left neighbour's K/V of [0, S_{i-1}):
            room = self.cache.claim(layer, self.prefix)   # MPI writes them into the cache itself
            self.t.recv_into(room, self.t.rank - 1, tag=layer)
            self.trace.end("recv", layer)
        k_all, v_all = self.cache.update(layer, k, v)  # (B, n_kv, S_i, hs)
        if not self.last:                              # the cache holds exactly S_i tokens: send it all
            self.t.isend(self.cache.kv[layer], self.t.rank + 1, tag=layer)
            self.trace.end("send", layer)
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
        job.trace.end("compute", "head")
        logits.argmax().item()                         # the first token id, known on the host
    sync(job.device)
    return logits, cache, time.perf_counter() - t0


def main(args):
    job = setup(args, prepare=lambda job: pick_partition(job, args.partition, args.recalibrate))
    if args.search_live:
        with abort_on_error(job.comm):
            live_search(job, args, prefill)
        return
    with abort_on_error(job.comm):
        warm_up(job, prefill, job.c, args.max_new_tokens, args.math)
        if job.c_modelled:                             # a cost model's pick, not yet measured here
            versus_even(job, prefill)
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
