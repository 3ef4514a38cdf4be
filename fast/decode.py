"""Decode as CUDA graphs: the host launches a whole step, some 400 kernels at 7B, with one call.

A decode step is launch-bound on a GPU: at Llama-7B dims the H200 reads the 13.5 GB of weights in
2.8 ms, while the host takes some 60 ms to launch the step kernel by kernel. A CUDA graph records the
step once and replays it; but a recording fixes every shape and address, and the teaching decode
(generate.decode) fixes neither: its keys grow by one a step, and its position is a Python int. So
the step here is static, as in gpt-fast:
- the position is a tensor on the GPU, and the step advances it itself;
- the new K/V go into the cache at that position (`index_copy_`), and attention reads the cache's
  whole capacity, masked so that key j is seen iff j <= position (`dense`, as TSP's baseline masks);
  a masked value still meets its zero weight in probs @ v, where 0 * NaN is NaN, so decode first
  zeroes the positions not yet written, whatever they held;
- the step writes its greedy token where the next step reads it.
The blocks are the model's own (Block.forward); only the K/V exchange is this file's (StaticKV).
Replaying the graph launches exactly the kernels the step launches eagerly: the same bits.
"""
import torch

from kvcache import split
from model import rope, rope_inv_freq


def takes(model, cache):
    """Does decode from `cache` run as CUDA graphs? On a GPU, unless the step would record a constant
    that must change: ALiBi's bias is built on the host for each length, dynamic-NTK RoPE stretches
    its base as the cache outgrows max_position_embeddings."""
    return cache.kv[0].is_cuda and not varies(model.cfg, cache)


def varies(cfg, cache):
    """Would a step's constants change with its position: ALiBi, or dynamic RoPE past max_pos?"""
    dynamic = (cfg.rope is not None and cfg.rope["rope_type"] == "dynamic"
               and cache.capacity > cfg.max_position_embeddings)
    return cfg.alibi or dynamic


class StaticKV:
    """The cache as one static step sees it: the new K/V written at the step's position, and every
    position up to the capacity handed to attention, which masks the ones not yet written."""

    dense = True

    def __init__(self, cache, pos):
        self.cache, self.pos = cache, pos

    def update(self, layer, k, v):
        kv = self.cache.kv[layer]                      # (B, capacity, 2, n_kv, hs)
        kv.index_copy_(1, self.pos, torch.stack((k, v), dim=2).transpose(1, 3))   # (B, 1, 2, n_kv, hs)
        return split(kv)


class Step:
    """One decode step with static shapes: feeds `tok` (B, 1) at `pos` (1,), leaves the greedy next
    token in `tok` and pos + 1 in `pos`."""

    def __init__(self, model, cache, tok):
        cfg, dev = model.cfg, tok.device
        self.model, self.tok = model, tok.clone()
        self.pos = torch.tensor([len(cache)], device=dev)
        self.kv = StaticKV(cache, self.pos)
        # RoPE's frequencies go to the GPU here, once: a recording cannot copy from the host
        self.inv_freq = rope_inv_freq(cfg, cache.capacity).to(dev) if cfg.rope is not None else None

    def __call__(self):
        m = self.model
        x = m.embed(self.tok)                          # (B, 1, d)
        cos_sin = None if self.inv_freq is None else rope(self.pos, self.inv_freq, x.dtype)
        for block in m.layers:
            x = block(x, self.kv, [(self.pos, 1)], cos_sin, False)
        self.tok.copy_(m.lm_head(m.norm(x))[:, -1].argmax(-1, keepdim=True))
        self.pos += 1


@torch.no_grad()
def decode(model, tok, cache, steps, stop_at_eos=False, graphs=True, eager_steps=1, compiled=False):
    """generate.decode's contract with static steps: the first `eager_steps` run as they are (they
    warm cuBLAS and the allocator up), then one step is recorded as a CUDA graph and replayed for the
    rest (graphs=False: every step eager, the same kernels). compiled: the whole step is one
    torch.compile graph, as gpt-fast compiles its decode step, so the work between the matmuls fuses
    (compiled on the first step). Positions len(cache).. of every layer are zeroed first, so whatever
    they held (NaN, inf) cannot reach the masked attention. Returns (B, 1+steps)."""
    if len(cache) + steps > cache.capacity:
        raise ValueError(f"KV cache holds {cache.capacity} tokens; {len(cache)} + {steps} do not fit")
    if varies(model.cfg, cache):
        raise ValueError("ALiBi, and dynamic RoPE past max_position_embeddings, decode with "
                         "generate.decode: a static step fixes its constants")
    for kv in cache.kv:                                # the masked keys: zeros, not junk
        kv[:, len(cache):].zero_()
    step, out, graph = Step(model, cache, tok), [tok], None
    run = torch.compile(step.__call__, fullgraph=True) if compiled else step
    for i in range(steps):
        if stop_at_eos and (step.tok == model.cfg.eos_token_id).all():
            break
        if graphs and i == eager_steps:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):              # recorded, not run
                run()
        graph.replay() if graph else run()
        out.append(step.tok.clone())
    for layer in range(len(cache.kv)):                 # the positions the steps wrote, now held
        cache.claim(layer, len(out) - 1)
    return torch.cat(out, dim=1)
