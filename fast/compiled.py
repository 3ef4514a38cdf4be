"""Each layer's elementwise work compiled, its matmuls on one input merged, and optionally each forward
replayed as CUDA graphs (--fuse, --graphs).

Eager, every elementwise op of a layer (norms, RoPE, SiLU/GELU, residuals) is a kernel that reads
and writes the whole activation: 175 of 595 ms for 16k tokens at Llama-2-7B dims on an H100. Block.pre
and Block.post are pure tensor functions, so torch.compile fuses each into a few kernels. Attention
and the K/V exchange stay eager, so every mode still shares them.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fast.segments import Segments


def fuse(model, backend="inductor", graphs=False):
    """Merge each Llama layer's matmuls (`merge`), compile every layer's `pre` and `post`; returns the model.

    graphs: also replay each forward as CUDA graphs of the segments between K/V exchanges
    (fast/segments.py). Under ~1k tokens a chunk is launch-bound; from 1k on, the same."""
    for block in model.layers:
        if model.cfg.arch == "llama":
            merge(block)
        block.pre = torch.compile(block.pre, backend=backend)
        block.post = torch.compile(block.post, backend=backend)
    model.graphs = graphs
    if graphs:
        model.forward = Segments(model)
    return model


def merge(block):
    """A Llama layer's Q, K and V as one matmul, and its gate and up as one (gpt-fast's wqkv): the
    same products from fewer, wider GEMMs (in decode, 2 launches where there were 5).
    Falcon stores them merged already. The separate weights become views of the merged ones, so
    nothing is held twice, and a merged product's columns are each the separate one's up to rounding."""
    a, hs = block.attn, block.attn.cfg.head_dim
    wqkv, bqkv = joined(a.wq, a.wk, a.wv)
    w13, b13 = joined(block.w_gate, block.w_up)
    sizes = [a.wq.out_features, a.wk.out_features, a.wv.out_features]

    def qkv(x):                                        # Attention.qkv's shapes: (B, heads, T, hs) each
        B, T, _ = x.shape
        return [y.view(B, T, -1, hs).transpose(1, 2) for y in F.linear(x, wqkv, bqkv).split(sizes, dim=-1)]

    def mlp(h):                                        # LlamaBlock.mlp
        gate, up = F.linear(h, w13, b13).chunk(2, dim=-1)
        return block.w_down(F.silu(gate) * up)

    a.qkv, block.mlp = qkv, mlp


def joined(*linears):
    """One weight (and bias) for linears that read the same input, their own now views of it."""
    w = torch.cat([lin.weight.detach() for lin in linears])
    b = torch.cat([lin.bias.detach() for lin in linears]) if linears[0].bias is not None else None
    o = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = nn.Parameter(w[o:o + n], requires_grad=False)
        if b is not None:
            lin.bias = nn.Parameter(b[o:o + n], requires_grad=False)
        o += n
    return w, b
