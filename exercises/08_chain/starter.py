"""Exercise 8: the chain's K/V exchange. Check with: python exercises/check.py 8"""
from kvcache import split  # noqa: F401  (a received block's K and V)
from program import Done  # noqa: F401  (raise it after the last layer's send)


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
        the K and V of every position this rank's queries may see, [0, S[i]).

        What you have (README.md says what to do with it):
          self.t.recv(shape, dtype, source, tag)  waits for a tensor; self.inbox is the shape of the
                                                  prefix's K and V, (B, S[i-1], 2, n_kv, hs)
          kvcache.split(kv)                       such a block's K and V, each (B, n_kv, S[i-1], hs)
          self.t.isend(tensor, dest, tag)         starts a send and returns at once
          self.t.finish()                         waits until every send started has gone
          self.cache.update(layer, k, v)          appends k, v; returns the layer's K, V so far
          self.cache.kv[layer]                    the layer's K and V, (B, capacity, 2, n_kv, hs)
          self.t.rank, self.last, len(self.cache.kv) (the number of layers), Done
        """
        raise NotImplementedError
