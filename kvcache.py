"""The causal KV cache: what decoding reuses, and what KV-Runahead's ranks fill for the last rank.

Layout is Hugging Face's: per layer a K and a V of shape (B, n_kv, T, hs), keys after RoPE, KV heads
not repeated for their query group. Both live in one preallocated buffer per layer,
(2, B, n_kv, capacity, hs), so decode never re-allocates and one layer's K and V travel as one message.
"""
import torch


def bytes_per_token(cfg, dtype):
    """Bytes of one token's K and V in one layer: what the chain and the all-gather move per token."""
    return 2 * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize


class KVCache:
    """Per-layer K/V storage; `update` appends a chunk and returns everything cached so far.

    Every mode of the model talks to its K/V through an object with this `update` (see model.py):
    this cache (one process), runahead.ChainKV (receive, append, send) and tsp.GatherKV (all-gather).
    """

    dense = False  # attention may skip keys the queries cannot see (tsp.py's paper baseline sets True)

    def __init__(self, cfg, batch, capacity, dtype=torch.float32, device="cpu"):
        shape = (2, batch, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.n = [0] * cfg.n_layers  # tokens held, per layer (layers fill one after another)

    @property
    def capacity(self):
        return self.kv[0].shape[3]

    def __len__(self):
        """Tokens cached in every layer."""
        return self.n[-1]

    def update(self, layer, k, v):
        """Append k, v (B, n_kv, T, hs) to `layer`; return its keys and values so far, (B, n_kv, n+T, hs)."""
        room = self.claim(layer, k.shape[2])           # (2, B, n_kv, T, hs)
        room[0], room[1] = k, v
        return self.layer(layer)

    def claim(self, layer, T):
        """Count the next T positions of `layer` as held and return them, (2, B, n_kv, T, hs), to be
        written in place: where runahead.ChainKV has MPI put the prefix it receives."""
        n = self.n[layer]
        if n + T > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens; {n} + {T} do not fit")
        self.n[layer] = n + T
        return self.kv[layer][:, :, :, n:n + T]

    def layer(self, i):
        """(k, v) of layer i, each (B, n_kv, len, hs): views, not copies."""
        return self.kv[i][0, :, :, :self.n[i]], self.kv[i][1, :, :, :self.n[i]]

    def reset(self):
        self.n = [0] * len(self.n)
