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

import torch
from mpi4py import MPI

import partition
from comm import abort_on_error, cli, report, setup
from kvcache import KVCache
from model import decode, sync


class ChainKV:
    """KV-Runahead's K/V exchange: receive the prefix from the left, append, send on to the right."""

    dense = False

    def __init__(self, cache, transport, prefix, trace):
        self.cache, self.t, self.prefix, self.trace = cache, transport, prefix, trace
        self.last = transport.rank == transport.size - 1
        B, n_kv, hs = cache.kv[0].shape[1], cache.kv[0].shape[2], cache.kv[0].shape[4]
        self.inbox = cache.kv[0].new_empty((2, B, n_kv, prefix, hs))   # K and V of [0, S_{i-1})

    def update(self, layer, k, v):
        self.trace.add("compute", layer)
        if self.prefix:                                # wait for the left neighbour's layer
            self.t.recv(self.inbox, self.t.rank - 1, tag=layer)
            self.cache.update(layer, self.inbox[0], self.inbox[1])
            self.trace.add("recv", layer)
        k_all, v_all = self.cache.update(layer, k, v)  # (B, n_kv, S_i, hs)
        if not self.last:                              # the cache holds exactly S_i tokens: send it all
            self.t.isend(self.cache.kv[layer], self.t.rank + 1, tag=layer)
            self.trace.add("send", layer)
        return k_all, v_all


@torch.no_grad()
def prefill(job, c, decode_room=0, math_path=False):
    """This rank's part of the prefill. Returns (last-position logits, cache, seconds since barrier)."""
    S_prev, S_i = sum(c[:job.rank]), sum(c[:job.rank + 1])
    last = job.rank == job.size - 1
    cache = KVCache(job.model.cfg, 1, S_i + (decode_room if last else 0), job.dtype, job.device)
    kv = ChainKV(cache, job.transport, S_prev, job.trace)
    job.transport.barrier()
    sync(job.device)
    job.trace.start()
    t0 = time.perf_counter()
    logits = job.model(job.tokens[:, S_prev:S_i], kv, S_prev, last_only=True, math_path=math_path)[0, -1]
    job.trace.add("compute", "head")
    if last:
        logits.argmax().item()                         # the first token id, known on the host
    sync(job.device)
    return logits, cache, time.perf_counter() - t0


def main(argv=None):
    ap = cli("KV-Runahead parallel prefill (run under mpirun)")
    ap.add_argument("--partition", default="even",
                    help="even | searched | predicted | c0,c1,... (one chunk per rank, summing to the prompt)")
    args = ap.parse_args(argv)
    job = setup(args, prepare=lambda job: setattr(
        job, "c", partition.choose(args.partition, job.tokens.shape[1], job.size, job.model_key)))
    comm = MPI.COMM_WORLD
    with abort_on_error(comm):
        logits, cache, ttft = prefill(job, job.c, args.max_new_tokens, args.math)
        job.transport.finish()
        stats = comm.gather(job.transport.stats, root=job.size - 1)
        if args.trace:
            job.trace.write(comm, args.trace)
        if job.rank == job.size - 1:
            prompt_kv = [tuple(t.clone() for t in cache.layer(i)) for i in range(job.model.cfg.n_layers)]
            tokens = decode(job.model, logits.argmax().view(1, 1), cache, args.max_new_tokens - 1)[0].tolist()
            report(job, args, "KV-Runahead", job.rank, job.c, stats,
                   [f"partition ({args.partition}): {','.join(map(str, job.c))}"],
                   logits, prompt_kv, tokens, ttft)


if __name__ == "__main__":
    sys.exit(main())
