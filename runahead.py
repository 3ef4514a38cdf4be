"""KV-Runahead: p ranks prefill a prompt together by filling the KV cache of the last rank.

Rank i owns the contiguous chunk c_i of the prompt, global positions S_{i-1}..S_i-1. In every layer it
receives the K/V of positions [0, S_{i-1}) from rank i-1, appends its own (the KV-cache append),
sends [0, S_i) on to rank i+1 without waiting, and attends over [0, S_i): a rectangle it sees whole
and a triangle, never the masked upper half. Rank 0 waits for nobody and runs ahead into later
layers. The last rank ends with the whole prompt's cache, emits the first token, and decodes on.

How control flows: `prefill` runs the model's ordinary forward over this rank's chunk. In every
layer, between the Q/K/V projection and attention, the model calls `ChainKV.update(layer, k, v)`
(model.py's Attention.forward), and that call is the chain: receive, append, send. On a rank that
does not emit, the last layer's update raises Done once its K/V are sent, and `prefill` catches it:
the rest of that forward would reach nobody.

    mpirun -n 8 python runahead.py                       # built-in model, 2048 synthetic tokens
    mpirun -n 4 python runahead.py --model DIR --prompt "..." --partition searched
"""
import sys
import time

import cli


def check_partition(spec, C, p):
    """--partition, before torch loads: a given one must fit, the caches must be readable."""
    if spec in ("searched", "predicted"):
        import choose
        choose.check_caches()
    elif spec != "even":
        from partition import parse
        parse(spec, C, p)


if __name__ == "__main__":                             # --help and bad options answer before torch loads
    ARGS = cli.runahead().parse_args()
    cli.check_early(ARGS, lambda C, p: check_partition(ARGS.partition, C, p))

import torch  # noqa: E402

from generate import sync  # noqa: E402
from kvcache import cache_for  # noqa: E402
from program import Done, abort_on_error, done, report, setup  # noqa: E402


class ChainKV:
    """KV-Runahead's K/V exchange: receive the prefix from the left, append, send on to the right."""

    dense = False                                      # attention may skip keys no query can see

    def __init__(self, cache, transport, prefix):
        self.cache, self.t, self.prefix = cache, transport, prefix
        self.last = transport.rank == transport.size - 1

    def update(self, layer, k, v):
        """This rank's own k, v (B, n_kv, c_i, hs) in; the K, V of positions [0, S_i) out."""
        room = self.cache.claim(layer, self.prefix)    # [0, S_{i-1}): rank i-1 fills it, in place
        k_all, v_all = self.cache.update(layer, k, v)  # (B, n_kv, S_i, hs): own K/V written meanwhile
        if self.prefix:                                # rank i > 0: the prefix from the left
            self.t.recv_into(room, self.t.rank - 1, tag=layer)
        if not self.last:                              # send on the S_i positions it holds
            self.t.isend(self.cache.held(layer), self.t.rank + 1, tag=layer)
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
    cache = cache_for(job, S_i + (decode_room if last else 0))   # (B=1, S_i tokens, + decode's room)
    job.transport.barrier()
    sync(job.device)
    t0 = time.perf_counter()
    try:                                               # dynamic-NTK RoPE stretches for the whole prompt
        logits = job.model(job.tokens[:, S_prev:S_i], ChainKV(cache, job.transport, S_prev), S_prev,
                           last_only=True, math_path=math_path, rope_len=job.tokens.shape[1])[0, -1]
        logits.argmax().item()                         # the first token id, known on the host
    except Done:
        logits = None
    sync(job.device)
    return logits, cache, time.perf_counter() - t0


def pick_partition(job, args):
    """The chunks c: the even split (KVR-E) unless --partition gives them or asks for a search."""
    C, p = job.tokens.shape[1], job.size
    if args.partition == "even":                       # chunks differ by at most one token
        job.c, job.c_source = [C // p + (i < C % p) for i in range(p)], "even split"
    elif job.system:                                   # searched | predicted: the cost model, the caches
        job.system.pick_partition()
    else:
        from partition import parse                    # a given partition, checked
        job.c, job.c_source = parse(args.partition, C, p), "given"


def main(args):
    job = setup(args, prepare=lambda job: pick_partition(job, args))
    with abort_on_error(job.comm):
        if args.search_live:                           # instead of one run (fast/system.py)
            return job.system.live_search(prefill)
        if job.system:                                 # warm-ups, a searched pick timed against even
            job.system.before(prefill, job.c, args.max_new_tokens, args.math)
        logits, cache, ttft = prefill(job, job.c, args.max_new_tokens, args.math)
        job.transport.finish()
        job.transport.barrier()                        # a polite wait, not gather's spin
        stats = job.comm.gather(job.transport.stats, root=job.size - 1)
        if job.system:
            job.system.after(logits)
        if job.rank == job.size - 1:
            report(job, args, "KV-Runahead", job.rank, job.c, stats,
                   [f"partition ({args.partition}): {','.join(map(str, job.c))}  [{job.c_source}]"],
                   logits, cache, ttft)
        done(job)


if __name__ == "__main__":
    sys.exit(main(ARGS))
