"""The causal KV cache: what decoding reuses, and what KV-Runahead's ranks fill for the last rank.

Attention sees HF's layout, a K and a V of shape (B, n_kv, T, hs) per layer, keys after RoPE, KV heads
not repeated for their query group. They live in one preallocated buffer per layer, positions
outermost as in meta-llama's cache: (B, capacity, 2, n_kv, hs). Decode never re-allocates, and (B = 1)
any run of a layer's positions, K and V, is one block: one message, which MPI writes in place.
"""
import torch


def bytes_per_token(cfg, dtype):
    """Bytes of one token's K and V in one layer: what the chain and the all-gather move per token."""
    return 2 * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize


def split(block):
    """The K and V of a block of positions (B, T, 2, n_kv, hs), each (B, n_kv, T, hs): views, not copies."""
    return block[:, :, 0].transpose(1, 2), block[:, :, 1].transpose(1, 2)


class KVCache:
    """Per-layer K/V storage; `update` appends a chunk and returns everything cached so far.

    Every mode of the model talks to its K/V through an object with this `update` (see model.py):
    this cache (one process), runahead.ChainKV (receive, append, send) and tsp.GatherKV (all-gather)."""

    dense = False  # attention may skip keys the queries cannot see (tsp.py's paper baseline sets True)

    def __init__(self, cfg, batch, capacity, dtype=torch.float32, device="cpu"):
        shape = (batch, capacity, 2, cfg.n_kv_heads, cfg.head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.n = [0] * cfg.n_layers  # tokens held, per layer (layers fill one after another)

    @property
    def capacity(self):
        return self.kv[0].shape[1]

    def __len__(self):
        """Tokens cached in every layer."""
        return self.n[-1]

    def update(self, layer, k, v):
        """Append k, v (B, n_kv, T, hs) to `layer`; return its keys and values so far, (B, n_kv, n+T, hs)."""
        room = self.claim(layer, k.shape[2])           # (B, T, 2, n_kv, hs)
        room[:, :, 0], room[:, :, 1] = k.transpose(1, 2), v.transpose(1, 2)
        return self.layer(layer)

    def claim(self, layer, T):
        """Count the next T positions of `layer` as held and return them, (B, T, 2, n_kv, hs), to be
        written in place: where runahead.ChainKV has MPI put the prefix it receives."""
        n = self.n[layer]
        if n + T > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens; {n} + {T} do not fit")
        self.n[layer] = n + T
        return self.kv[layer][:, n:n + T]

    def held(self, i):
        """The positions layer i holds, K and V together, (B, len, 2, n_kv, hs): what the chain sends on."""
        return self.kv[i][:, :self.n[i]]

    def layer(self, i):
        """(k, v) of layer i, each (B, n_kv, len, hs): views, not copies."""
        return split(self.held(i))

    def reset(self):
        self.n = [0] * len(self.n)


def cache_for(job, capacity):
    """This rank's KV cache, emptied: made once and reused while big enough (gpt-fast's setup_caches),
    so every prefill fills the same memory: --graphs replays need it, and CUDA-aware MPI maps it once."""
    if job.cache is None or job.cache.capacity < capacity:
        job.cache = KVCache(job.model.cfg, 1, capacity, job.dtype, job.device)
    job.cache.reset()
    return job.cache
