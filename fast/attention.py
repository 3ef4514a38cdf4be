"""Attention at the GPU's rate for half-precision chunks: model.attend's fast path.

model.attend hands over every call on a GPU in fp16 or bf16 but ALiBi's (whose float bias must
round as HF's does) and the math path's. Two things differ from the teaching path:
- shared KV heads always go to SDPA as enable_gqa: broadcasting Falcon's one KV head, as HF does,
  would rule out the fused kernels;
- a large chunk after a prefix runs as two cuDNN blocks. PyTorch's kernel for a lower-right-causal
  block is FlashAttention-2, at about half cuDNN's rate on Hopper; cuDNN's own causal mask is aligned
  top-left, so it cannot take the whole block. Two cuDNN calls can: the prefix rectangle with no
  mask, and the chunk's own square with its causal triangle, merged as ring attention merges blocks.
  A whole prompt needs neither: SDPA's own pick for it runs at cuDNN's rate (H100, torch 2.11: 16k
  tokens, 32 heads of 128, bf16, 3.79 ms; a 16k Llama-7B prefill through cuDNN's op gave the same logits).
"""
import functools
import math

import torch
import torch.nn.functional as F


MIN_PAIRS = 1 << 22                                    # query-key pairs from which cuDNN's blocks pay


def takes(q, cfg, math_path):
    """Is this call the fast path's? (half precision on a GPU, no ALiBi bias, not the math path)"""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not cfg.alibi and not math_path


def attend(q, k, v, start, scale, dense):
    """q (B, nh, T, hs) at positions start..start+T-1 over k, v (B, n_kv, Lk, hs), with the rule of
    model.causal_mask; a chunk after a prefix without the (T, Lk) mask, unless `dense`."""
    T, Lk = q.shape[2], k.shape[2]
    chunk = not dense and T > 1 and Lk > T             # a chunk after a prefix: lower-right causal
    if chunk and cudnn_blocks(q, k, start):
        return blocks(q, k, v, start, scale)
    if chunk and flash_fits(q):                        # FlashAttention-2's causal mask is lower-right
        scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, scale=scale)[0]
    mask = None
    if dense or chunk:
        mask = torch.arange(Lk, device=q.device) <= (start + torch.arange(T, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=scale,
                                          enable_gqa=k.shape[1] < q.shape[1])


def flash_fits(q):
    """Does PyTorch's FlashAttention-2 take this head size on this GPU? (what CausalBias checks before
    it calls the same kernel; its import would load torch._dynamo, a second of every rank's start)"""
    return q.shape[-1] % 8 == 0 and q.shape[-1] <= 256 and torch.cuda.get_device_capability(q.device) >= (8, 0)


def cudnn_blocks(q, k, start):
    """Does a chunk after a prefix go to cuDNN as two blocks? (an Ampere or later GPU, query heads in
    whole groups per KV head, a head size cuDNN takes, and at least MIN_PAIRS query-key pairs. On an
    H200, fp16, 32 heads of 128, the blocks with their merge in one kernel win from about 4M pairs:
    1024 after 3072 in 0.131 ms against FlashAttention-2's 0.214, 256 after 14336 in 0.187 against
    0.218; a layer of 1024 after 14336 takes 1.061 ms with them, 1.369 without.)"""
    return (start > 0 and q.shape[2] > 1 and q.shape[1] % k.shape[1] == 0 and q.shape[2] * k.shape[2] >= MIN_PAIRS
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
    return fused_merge()(a, lse_a, b, lse_b, q.dtype)


@functools.cache
def fused_merge():
    """merge and the cast back as one kernel (torch.compile), made on first use: compiling imports
    torch._dynamo, a second of every rank's start. Eagerly they are nine kernels, four of them over
    the whole (B, nh, T, hs) output in fp32: 0.08 ms of the 1.00 that 2048 after 14336 take on an H200."""
    return torch.compile(lambda a, lse_a, b, lse_b, dtype: merge(a, lse_a, b, lse_b).to(dtype), dynamic=True)


def merge(a, lse_a, b, lse_b):
    """Two attention outputs over disjoint key blocks (B, nh, T, hs), with their log-sum-exps, as one."""
    lse_a, lse_b = lse_a.reshape(*a.shape[:3], 1), lse_b.reshape(*a.shape[:3], 1)   # (B, nh, T, 1)
    lse = torch.logaddexp(lse_a, lse_b)
    return a * (lse_a - lse).exp() + b * (lse_b - lse).exp()
