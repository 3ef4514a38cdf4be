"""TSP (tensor/sequence parallel), the paper's baseline: split the prompt evenly, all-gather every
layer's K/V on every rank.

Each rank computes Q/K/V for its C/p tokens; every layer all ranks all-gather K and V (one collective,
a global synchronisation point), so each holds all C keys; each computes a dense (C/p x C) QK^T and
masks the future away, wasting the masked part. The rank holding the last token emits the first token.
Control flows as in runahead.py: the model calls `GatherKV.update` in every layer.

`--zigzag` is the stronger baseline modern context parallelism uses: 2p chunks, rank r holds chunks
r and 2p-1-r (early and late tokens: balanced causal work), and attention skips what the mask hides.

    mpirun -n 4 python tsp.py [--zigzag] [same options as runahead.py]
"""
import sys
import time

import cli


def tsp_layout(C, p, zigzag=False):
    """TSP's split, per rank its spans of positions [(start, length), ...], and the rank that emits
    the first token. Plain TSP: the even split, one span each, the last rank emits. Zigzag: 2p even
    chunks, rank r holds chunks r and 2p-1-r (early and late tokens: balanced causal work), so rank 0
    holds the last token and emits."""
    if zigzag and C < 2 * p:
        raise ValueError(f"--zigzag needs at least 2 tokens per rank: {C} tokens for {p} ranks")
    if p > C:
        raise ValueError(f"{p} ranks but only {C} prompt tokens")
    n = 2 * p if zigzag else p
    c = [C // n + (i < C % n) for i in range(n)]       # even: chunks differ by at most one token
    start = [sum(c[:i]) for i in range(n)]
    if not zigzag:
        return [[(start[r], c[r])] for r in range(p)], p - 1
    return [[(start[r], c[r]), (start[n - 1 - r], c[n - 1 - r])] for r in range(p)], 0


if __name__ == "__main__":                             # --help and bad options answer before torch loads
    ARGS = cli.tsp().parse_args()
    cli.check_early(ARGS, lambda C, p: tsp_layout(C, p, ARGS.zigzag))

import torch  # noqa: E402

from generate import sync  # noqa: E402
from program import Done, abort_on_error, cache_for, done, report, setup  # noqa: E402


class GatherKV:
    """TSP's K/V exchange: all-gather every rank's K/V, put them in position order, attend over all."""

    def __init__(self, transport, counts, order, dense, cache, n_layers):
        self.t, self.counts, self.order, self.dense = transport, counts, order, dense
        self.cache, self.last_layer = cache, n_layers - 1

    def update(self, layer, k, v):
        kv = self.t.allgather(torch.stack((k, v)), self.counts, dim=3)   # (2, B, n_kv, C, hs)
        if self.order is not None:                     # zigzag: rank order -> position order
            kv = kv[:, :, :, self.order]
        if self.cache is not None:                     # the emitting rank keeps the whole cache
            return self.cache.update(layer, kv[0], kv[1])
        if layer == self.last_layer:                   # a rank that does not emit is done
            raise Done
        return kv[0], kv[1]


@torch.no_grad()
def prefill(job, zigzag, decode_room=0, math_path=False):
    """This rank's part of TSP. Returns (logits of its last token, cache, seconds, emitting rank); logits
    and cache on the emitting rank only, the others stop after their last all-gather."""
    C = job.tokens.shape[1]
    spans, emitter = tsp_layout(C, job.size, zigzag)
    mine = spans[job.rank]
    positions = torch.cat([torch.arange(a, a + n) for s in spans for a, n in s])   # in rank order
    order = None if not zigzag else positions.argsort().to(job.device)
    cache = cache_for(job, C + decode_room) if job.rank == emitter else None
    kv = GatherKV(job.transport, [sum(n for _, n in s) for s in spans], order, not zigzag, cache,
                  job.model.cfg.n_layers)
    tokens = torch.cat([job.tokens[:, a:a + n] for a, n in mine], dim=1)
    job.transport.barrier()
    sync(job.device)
    t0 = time.perf_counter()
    try:
        logits = job.model(tokens, kv, mine, last_only=True, math_path=math_path, rope_len=C)[0, -1]
        logits.argmax().item()
    except Done:
        logits = None
    sync(job.device)
    return logits, cache, time.perf_counter() - t0, emitter


def main(args):
    job = setup(args, prepare=lambda job: tsp_layout(job.tokens.shape[1], job.size, args.zigzag))
    with abort_on_error(job.comm):
        if job.system:                                 # warm-ups (fast/system.py)
            job.system.before(prefill, args.zigzag, args.max_new_tokens, args.math)
        logits, cache, ttft, emitter = prefill(job, args.zigzag, args.max_new_tokens, args.math)
        job.transport.barrier()                        # a polite wait, not gather's spin
        stats = job.comm.gather(job.transport.stats, root=emitter)
        if job.system:
            job.system.after(logits)
        if job.rank == emitter:
            spans = tsp_layout(job.tokens.shape[1], job.size, args.zigzag)[0]
            report(job, args, "TSP" + (" (zigzag)" if args.zigzag else ""), emitter,
                   [sum(n for _, n in s) for s in spans], stats,
                   ["split: " + " | ".join("+".join(f"[{a},{a + n})" for a, n in s) for s in spans)],
                   logits, cache, ttft)
        done(job)


if __name__ == "__main__":
    sys.exit(main(ARGS))
