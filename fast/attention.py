"""Attention at the GPU's rate for half-precision chunks: model.attend's fast path.

model.attend hands over every call on a GPU in fp16 or bf16 but ALiBi's (whose float bias must
round as HF's does) and the math path's. Two things differ from the teaching path:
- shared KV heads always go to SDPA as enable_gqa: broadcasting Falcon's one KV head, as HF does,
  would rule out the fused kernels;
- a large chunk after a prefix runs as two cuDNN blocks. PyTorch's kernel for a lower-right-causal
  block is FlashAttention-2, at about half cuDNN's rate on Hopper; cuDNN's own causal mask is aligned
  top-left, so it cannot take the whole block. Two cuDNN calls can: the prefix rectangle with no
  mask, and the chunk's own square with its causal triangle, merged as ring attention merges blocks.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias


def takes(q, mask):
    """Is this call the fast path's? (half precision on a GPU, and no ALiBi bias)"""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and (mask is None or isinstance(mask, CausalBias) or mask.dtype == torch.bool))


def attend(q, k, v, start, scale, mask, causal):
    """q (B, nh, T, hs) at positions start..start+T-1 over k, v (B, n_kv, Lk, hs); `mask` and
    `causal` as model.causal_mask gives them."""
    if isinstance(mask, CausalBias) and cudnn_blocks(q, k, start):   # a chunk after a prefix
        return blocks(q, k, v, start, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=k.shape[1] < q.shape[1])


def cudnn_blocks(q, k, start):
    """Does a chunk after a prefix go to cuDNN as two blocks? (an Ampere or later GPU, query heads in
    whole groups per KV head, a head size cuDNN takes, and at least 16M query-key pairs: below that
    the two calls and the merge cost more than they save, on an H200.)"""
    return (start > 0 and q.shape[2] > 1 and q.shape[1] % k.shape[1] == 0 and q.shape[2] * k.shape[2] >= 1 << 24
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128 and torch.backends.cudnn.is_available()
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def blocks(q, k, v, start, scale):
    """The chunk as two blocks, each with its log-sum-exp (lse, fp32) from cuDNN:
        ┌─────── prefix ───────┬─ own ─┐
        │ a: no mask           │ b: ◣  │   out = (a e^lse_a + b e^lse_b) / (e^lse_a + e^lse_b)
    Exact up to rounding."""
    cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention
    a, lse_a = cudnn(q, k[:, :, :start], v[:, :, :start], None, True, scale=scale)[:2]
    b, lse_b = cudnn(q, k[:, :, start:], v[:, :, start:], None, True, is_causal=True, scale=scale)[:2]
    return merge(a, lse_a, b, lse_b).to(q.dtype)


def merge(a, lse_a, b, lse_b):
    """Two attention outputs over disjoint key blocks (B, nh, T, hs), with their log-sum-exps, as one."""
    lse_a, lse_b = lse_a.reshape(*a.shape[:3], 1), lse_b.reshape(*a.shape[:3], 1)   # (B, nh, T, 1)
    lse = torch.logaddexp(lse_a, lse_b)
    return a * (lse_a - lse).exp() + b * (lse_b - lse).exp()
