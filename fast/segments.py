"""A forward as CUDA graphs of the segments between K/V exchanges (--graphs).

Under ~1k tokens a rank's layer is launch-bound: on an H200, 128 tokens after 14336 are 0.29 ms of
kernels a layer, and the GPU idles another 0.18 ms waiting for the host, even with each `pre` and
`post` a graph of its own. The exchange (the chain's receive and send, TSP's all-gather) is the
host's work with MPI, so no graph can hold a whole forward; but what lies between two exchanges can
be one graph (bench/sim.py's segments):
    0      layer 0's pre
    l      layer l-1's attention and post, layer l's pre
    L      the last layer's attention and post, the final norm, the LM head
A shape's first forward runs eagerly (kernels load and tune). Its second is the model's own forward,
recorded while it runs: each exchange ends the graph being recorded, replays it, exchanges for real,
and begins the next graph. Later forwards replay the graphs with the real exchanges in between, the
embedding before them. A graph reads the K/V where the recording's exchange returned them, so only
a forward into the same cache memory replays (runahead.py's warm-up prefills twice; the timed
prefill's cache lands where the warm-up's was freed); any other runs eagerly.
"""
import contextlib

import torch

from kvcache import KVCache


def takes(model, tokens, kv):
    """Can this forward be recorded? On a GPU, with a KV cache to key it on (TSP's ranks that do not
    emit gather into a buffer of their own, made anew each prefill), and no ALiBi (its bias is built
    on the host)."""
    return tokens.is_cuda and _cache(kv) is not None and not model.cfg.alibi


def _cache(kv):
    return kv if isinstance(kv, KVCache) else getattr(kv, "cache", None)


class Segments:
    """model.forward, recorded and replayed as segments (fast/compiled.fuse(graphs=True) installs it).
    `ran` says how the last forward ran: eagerly, recorded, or replayed."""

    def __init__(self, model):
        self.model, self.seen, self.recs, self.ran, self.side = model, set(), {}, "eagerly", None

    def __call__(self, tokens, kv, start=0, last_only=False, math_path=False, rope_len=None):
        def forward(kv):
            return type(self.model).forward(self.model, tokens, kv, start, last_only, math_path, rope_len)
        if not takes(self.model, tokens, kv):
            self.ran = "eagerly"
            return forward(kv)
        cache = _cache(kv)
        key = (tuple(tokens.shape), str(start), last_only, math_path, rope_len, type(kv).__name__, kv.dense,
               tuple(t.data_ptr() for t in cache.kv), cache.capacity, tuple(cache.n))
        if key in self.recs:
            self.ran = "replayed"
            return self.recs[key].replay(self.model.embed(tokens), kv)
        if key not in self.seen:                       # first sight: eagerly (kernels load and tune)
            self.seen = {key} | (self.seen if len(self.seen) < 64 else set())
            self.ran = "eagerly"
            return forward(kv)
        if len(self.recs) == 4:                        # the oldest recording goes, and its graph pool
            del self.recs[next(iter(self.recs))]       # back to the device now: the allocator releases a
            torch.cuda.empty_cache()                   # freed pool only here, not when a capture runs out
        rec = self.recs[key] = Recording(key)
        self.ran = "recorded"
        self.side = self.side or torch.cuda.Stream()   # one for all recordings: cuBLAS keeps a workspace
        try:                                           # per stream (32 MiB on an H200), never freed
            return rec.record(self.model, forward, kv, self.side)
        finally:
            if rec.capturing:                          # it failed mid-graph: nothing to replay
                del self.recs[key]


class Recording:
    """The graphs of one forward, and the kv its recording runs with: at each exchange it ends the
    graph being recorded, replays it, makes the real kv's exchange, and begins the next graph."""

    def __init__(self, key):
        self.key, self.graphs, self.kv_out, self.where = key, [], [], []
        self.pool, self.out, self.kv, self.capturing = torch.cuda.graph_pool_handle(), None, None, False

    @property
    def dense(self):
        return self.kv.dense

    def record(self, model, forward, kv, side):
        """Run forward on the stream `side` (a capture cannot run on the default stream), recording it."""
        side.wait_stream(torch.cuda.current_stream())
        hook = model.layers[0].register_forward_pre_hook(self._first)
        self.kv = kv
        try:
            with torch.cuda.stream(side):
                out = forward(self)                    # Done (a rank that does not emit) ends it early
                self._end()
                self.out = out
                out = out.clone()
        finally:
            hook.remove()
            if self.capturing:                         # an error mid-recording: leave no capture open
                with contextlib.suppress(RuntimeError):
                    self.graphs[-1].capture_end()
            self.kv = None                             # the cache is not held: the next prefill's may land here
            torch.cuda.current_stream().wait_stream(side)
        return out

    def _first(self, block, args):
        """Before layer 0: keep what the graphs read from outside, x (the embedding's output, which
        each replay writes anew) and RoPE's cos and sin (the same for the same positions); begin."""
        self.x, self.cos_sin = args[0], args[3]
        self._begin()

    def _begin(self):
        self.graphs.append(torch.cuda.CUDAGraph())
        self.graphs[-1].capture_begin(pool=self.pool, capture_error_mode="thread_local")
        self.capturing = True

    def _end(self):
        self.capturing = False
        self.graphs[-1].capture_end()
        self.graphs[-1].replay()

    def update(self, layer, k, v):
        self._end()
        self.kv_out.append((k, v))                     # where the graph leaves this layer's own K/V
        k_all, v_all = self.kv.update(layer, k, v)     # the real exchange
        self.where.append(_place(k_all))
        self._begin()
        return k_all, v_all

    def replay(self, x, kv):
        self.x.copy_(x)
        for layer, graph in enumerate(self.graphs):
            graph.replay()
            if layer < len(self.kv_out):
                k_all, _ = kv.update(layer, *self.kv_out[layer])   # may raise Done, as eagerly
                if _place(k_all) != self.where[layer]:
                    raise RuntimeError(f"layer {layer}'s K/V are not where the CUDA graphs read them")
        return self.out.clone()


def _place(t):
    return t.data_ptr(), tuple(t.shape), t.stride()
