"""Exercise 4: the chain run in one process; logits, cache and bytes of every rank checked.

Ranks run one after another: rank i finishes its whole prefill before rank i+1 starts, which the
chain allows because rank i never waits for rank i+1. Messages wait in a dictionary meanwhile.
"""
import torch

from grade import Fail, load
from kvcache import KVCache
from model import builtin
from partition import prefix_sums

PARTITION = [14, 11, 9, 6]


class Mailbox:
    """transport.Transport's isend and recv, for ranks that run one after another in this process."""

    def __init__(self, rank, size, box):
        self.rank, self.size, self.box, self.bytes_sent = rank, size, box, 0

    def isend(self, t, dest, tag):
        self.box[self.rank, dest, tag] = t.clone()
        self.bytes_sent += t.numel() * t.element_size()

    def recv(self, shape, dtype, source, tag):
        msg = self.box.pop((source, self.rank, tag), None)
        if msg is None:
            raise Fail(f"rank {self.rank} waits for layer {tag} from rank {source}, which never sent it: "
                       "under MPI this rank would hang")
        if msg.shape != torch.Size(shape) or msg.dtype != dtype:
            raise Fail(f"rank {self.rank}, layer {tag}: rank {source} sent K/V of shape {list(msg.shape)} "
                       f"({msg.dtype}) where {list(shape)} ({dtype}) was expected; sender and receiver must agree")
        return msg


@torch.no_grad()
def chain(ChainKV, model, tokens, c):
    """KV-Runahead over len(c) ranks: (last rank's logits, its cache, bytes each rank sent)."""
    box, sent = {}, []
    for rank in range(len(c)):
        S_prev, S_i = sum(c[:rank]), sum(c[:rank + 1])
        cache, t = KVCache(model.cfg, 1, S_i), Mailbox(rank, len(c), box)
        logits = model(tokens[:, S_prev:S_i], ChainKV(cache, t, S_prev, model.cfg), S_prev, last_only=True)
        sent.append(t.bytes_sent)
    return logits, cache, sent


@torch.no_grad()
def chunked(model, tokens, c):
    """One process prefilling the chunks c in order through one KV cache."""
    cache, S = KVCache(model.cfg, 1, sum(c)), 0
    for n in c:
        logits = model(tokens[:, S:S + n], cache, S, last_only=True)
        S += n
    return logits, cache


def check(path):
    s = load(path)
    torch.set_num_threads(1)
    notes = []
    for arch in ("llama", "falcon"):
        model = builtin(arch)
        cfg = model.cfg
        tokens = torch.randint(cfg.vocab_size, (1, sum(PARTITION)), generator=torch.Generator().manual_seed(0))
        logits, cache, sent = chain(s.ChainKV, model, tokens, PARTITION)
        ref_logits, ref_cache = chunked(model, tokens, PARTITION)
        if not torch.equal(logits, ref_logits):
            raise Fail(f"builtin {arch}: the last rank's logits differ from one process prefilling the same "
                       f"chunks by up to {(logits - ref_logits).abs().max():.3g}; they should be identical")
        for layer in range(cfg.n_layers):
            if not all(torch.equal(a, b) for a, b in zip(cache.layer(layer), ref_cache.layer(layer))):
                raise Fail(f"builtin {arch}: the last rank's cache differs from one process's in layer {layer}")
        token_bytes = 2 * cfg.n_kv_heads * cfg.head_dim * 4 * cfg.n_layers   # K and V, fp32, every layer
        for rank, S in enumerate(prefix_sums(PARTITION)[:-1]):
            b, want = sent[rank], token_bytes * S
            if b != want:
                why = (f": {b // want}x too many, one copy per query head (n_heads / n_kv_heads = "
                       f"{cfg.n_heads // cfg.n_kv_heads})" if b % want == 0 else "")
                raise Fail(f"builtin {arch} ({cfg.n_heads} query heads, {cfg.n_kv_heads} KV heads): rank {rank} "
                           f"sent {b} bytes, but its cache holds K/V of {cfg.n_kv_heads} heads x {S} tokens "
                           f"x {cfg.n_layers} layers = {want} bytes{why}")
            got = s.link_bytes(cfg.n_kv_heads, cfg.head_dim, cfg.n_layers, S, 4)
            if got != b:
                raise Fail(f"link_bytes({cfg.n_kv_heads}, {cfg.head_dim}, {cfg.n_layers}, {S}, 4) returned {got}, "
                           f"but rank {rank} of builtin {arch} measured {b} bytes sent")
        if sent[-1]:
            raise Fail(f"builtin {arch}: the last rank sent {sent[-1]} bytes; it has no right neighbour")
        notes.append(f"{arch} {sum(sent)} bytes (repeated heads: {sum(sent) * cfg.n_heads // cfg.n_kv_heads})")
    for name, args, want in [("Llama-2-7B", (32, 128, 32, 4096), 2 * 2**30),
                             ("Falcon-7B", (1, 64, 32, 4096), 32 * 2**20)]:
        got = s.link_bytes(*args)
        if got != want:
            raise Fail(f"link_bytes{args} ({name}, fp16) returned {got}, expected {want}")
    return "chain moved " + ", ".join(notes)
