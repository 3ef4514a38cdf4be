"""Exercise 8: the chain's K/V exchange. Check with: python exercises/check.py 8"""
from kvcache import split
from program import Done


class ChainKV:
    """KV-Runahead's K/V exchange, runahead.ChainKV: receive the K/V of the prefix
    from the left rank, append this rank's own, send everything on to the right rank.

    Rank i of p owns the chunk of global positions S[i-1]..S[i]-1; `prefix` is S[i-1] (0 on rank 0)
    and its cache holds exactly S[i] tokens per layer (the last rank's may hold more, for decoding).
    """

    dense = False                                      # attention may skip keys no query can see

    def __init__(self, cache, transport, prefix):
        self.cache, self.t, self.prefix = cache, transport, prefix
        self.last = transport.rank == transport.size - 1
        B, _, _, n_kv, hs = cache.kv[0].shape       # a layer: (B, capacity, 2, n_kv, hs)
        self.inbox = (B, prefix, 2, n_kv, hs)         # K and V of [0, S[i-1]): the shape to receive

    def update(self, layer, k, v):
        """Called by the model in every layer with this rank's own k, v (B, n_kv, c_i, hs); returns
        the K and V of every position this rank's queries may see, [0, S[i])."""
        if self.prefix:                                # wait for the left neighbour's layer
            kv = self.t.recv(self.inbox, self.cache.kv[0].dtype, self.t.rank - 1, tag=layer)
            self.cache.update(layer, *split(kv))
        k_all, v_all = self.cache.update(layer, k, v)  # (B, n_kv, S_i, hs)
        if not self.last:                              # the cache holds exactly S_i tokens: send it all
            self.t.isend(self.cache.kv[layer], self.t.rank + 1, tag=layer)
            if layer == len(self.cache.kv) - 1:        # this rank's part of the first token is sent
                self.t.finish()
                raise Done
        return k_all, v_all
