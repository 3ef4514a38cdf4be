"""Llama and Falcon decoders, written by hand, computing exactly what Hugging Face computes.

Read top to bottom: the config, RoPE and ALiBi, attention (the one function every mode shares),
the two decoder blocks, the model, and the small random model we build without a checkpoint
(generate.py runs it on one process). GPU speed lives in fast/: attention hands a half-precision GPU
chunk to it in a few lines, and fast.compiled compiles the blocks from outside.

The one idea the rest of the project builds on: a layer never owns its keys and values. It computes
K/V for its own tokens and hands them to `kv.update(layer, k, v)`, which returns the K/V of every
position the tokens may attend to, 0..Lk-1. A KV cache appends (kvcache.py); KV-Runahead receives the
prefix from the left rank, appends, and sends it on (runahead.py); TSP all-gathers (tsp.py).
Bit-for-bit agreement with HF needs HF's op order and dtype casts: the comments say where one matters,
and tests/test_model.py checks every variant against transformers' own models.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    arch: str = "llama"            # "llama" or "falcon"
    vocab_size: int = 32000
    dim: int = 4096                # hidden size d
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32           # KV heads as stored in the cache and sent between ranks
    head_dim: int = 128
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    alibi: bool = False            # Falcon-RW: ALiBi instead of RoPE
    attn_bias: bool = False
    mlp_bias: bool = False
    qkv_layout: str = "separate"   # llama: separate q/k/v; falcon: "mq", "grouped" or "per_head" fused
    parallel_attn: bool = False    # falcon: attention and MLP read the same input
    mlp_norm: bool = True          # falcon: a second LayerNorm in front of the MLP
    tie_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2


# ----------------------------------------------------------------------------- positions

def rope_inv_freq(cfg, seq_len):
    """RoPE inverse frequencies (hs/2,), fp32 tensor math exactly as HF's rope_utils."""
    r, hs = cfg.rope, cfg.head_dim
    theta, kind = r["rope_theta"], r["rope_type"]
    if kind == "dynamic" and seq_len > cfg.max_position_embeddings:
        # Dynamic NTK: stretch the base for long inputs. HF keeps this as state across calls; we
        # compute it from this call's length, which is what HF does on a fresh model.
        seq = torch.tensor(seq_len)
        theta = theta * ((r["factor"] * seq / cfg.max_position_embeddings) - (r["factor"] - 1)) ** (hs / (hs - 2))
    inv = 1.0 / (theta ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs))
    if kind == "linear":
        inv = inv / r["factor"]
    elif kind == "llama3":
        f, lo, hi, L0 = r["factor"], r["low_freq_factor"], r["high_freq_factor"], r["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > L0 / lo, inv / f, inv)
        smooth = (L0 / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / f + smooth * inv_l
        medium = ~(wavelen < L0 / hi) * ~(wavelen > L0 / lo)
        inv = torch.where(medium, smoothed, inv_l)
    return inv


def rope(pos, inv_freq, dtype):
    """cos, sin (T, hs) for global positions pos (T,); angles in fp32 like HF, then cast."""
    freqs = pos[:, None].float() * inv_freq.to(pos.device)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def alibi_slopes(n_heads):
    """ALiBi slopes as Falcon-RW computes them (fp32)."""
    c = 2 ** math.floor(math.log2(n_heads))
    slopes = torch.pow(torch.tensor(2 ** (-(2 ** -(math.log2(c) - 3))), dtype=torch.float32),
                       torch.arange(1, 1 + c, dtype=torch.int32))
    if c != n_heads:
        extra = torch.pow(torch.tensor(2 ** (-(2 ** -(math.log2(2 * c) - 3))), dtype=torch.float32),
                          torch.arange(1, 1 + 2 * min(c, n_heads - c), 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


# ----------------------------------------------------------------------------- attention

def attend(q, k, v, start, cfg, dense=False, math_path=False):
    """Causal attention of queries at global positions start..start+T-1 over keys at 0..Lk-1.

    q (B, nh, T, hs); k, v (B, n_kv, Lk, hs). A query at position i sees keys 0..i. Unless `dense`,
    keys no query can see are dropped first, so the block is lower-right causal:
        ┌─────── prefix ───────┬─ own ─┐
        │ all visible          │ ◣     │   (T rows, Lk = start+T columns)
    `dense` keeps every key and masks them instead (the paper's TSP baseline computes them).
    Returns (B, nh, T, hs).
    """
    T = q.shape[2]
    if not dense:
        k, v = k[:, :, :start + T], v[:, :, :start + T]
    scale = cfg.head_dim ** -0.5 if cfg.arch == "llama" else None
    if q.device.type != "cpu" and not math_path:       # a GPU: fast/attention.py may take it
        from fast import attention
        if attention.takes(q, cfg, math_path):         # (half precision, no ALiBi)
            return attention.attend(q, k, v, start, scale, dense)
    mask, causal = causal_mask(q, k, start, cfg, dense, math_path)
    if math_path:
        return _attend_math(q, k, v, mask, cfg, scale)
    # Shared KV heads: HF Llama passes enable_gqa (even for one KV head). HF Falcon's multi-query
    # path lets its one KV head broadcast, which rounds differently in fp32, so we do the same.
    gqa = k.shape[1] < q.shape[1] and not (cfg.arch == "falcon" and k.shape[1] == 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def causal_mask(q, k, start, cfg, dense, math_path):
    """The rule "query i sees keys 0..i" as (attn_mask, is_causal), in the form HF hands to SDPA, so
    that the same kernel runs and the result is bitwise HF's: is_causal for a whole prompt from
    position 0; nothing for one token (decode sees every key); else an explicit (T, Lk) mask, which
    for a chunk after a prefix is meta-llama's mask for a cached prefix (row i sees keys 0..start+i),
    and for ALiBi carries the float bias. `start` may be a tensor (fast/decode.py's static step)."""
    T, Lk = q.shape[2], k.shape[2]
    if not (cfg.alibi or math_path or dense) and (Lk == T or T == 1):
        return None, T > 1
    mask = torch.arange(Lk, device=q.device) <= (start + torch.arange(T, device=q.device))[:, None]
    if cfg.alibi:                                      # HF rounds slopes and products to bf16
        slopes = alibi_slopes(cfg.n_heads).to(q.device)
        alibi = (slopes[:, None].bfloat16() * torch.arange(Lk, device=q.device)).to(q.dtype)[:, None, :]
        mask = torch.masked_fill(alibi / math.sqrt(cfg.head_dim), ~mask, torch.finfo(q.dtype).min)
        mask = mask if math_path else mask[None]       # 4-D: SDPA rounds a 3-D float mask differently
    return mask, False


def _attend_math(q, k, v, mask, cfg, scale):
    """The same attention as plain tensor ops: scores, mask, softmax, weighted sum."""
    g = q.shape[1] // k.shape[1]                       # query heads per KV head
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = q @ k.transpose(-2, -1)                   # (B, nh, T, Lk)
    scores = scores * scale if scale is not None else scores / math.sqrt(cfg.head_dim)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(q.dtype).min)
    else:
        scores = scores + mask
    soft_dtype = torch.float32 if cfg.arch == "llama" else q.dtype   # HF Llama's softmax is fp32
    return F.softmax(scores, dim=-1, dtype=soft_dtype).to(q.dtype) @ v


# ----------------------------------------------------------------------------- blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        h = x.to(torch.float32)                        # HF normalises in fp32, even for fp64 models
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class FalconLinear(nn.Linear):
    """x @ W.T, then + b as a separate op (F.linear's fused bias rounds differently)."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        nh, nkv, hs, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
        if cfg.arch == "llama":
            self.wq = nn.Linear(d, nh * hs, bias=cfg.attn_bias)
            self.wk = nn.Linear(d, nkv * hs, bias=cfg.attn_bias)
            self.wv = nn.Linear(d, nkv * hs, bias=cfg.attn_bias)
            self.wo = nn.Linear(nh * hs, d, bias=cfg.attn_bias)
        else:
            self.wqkv = FalconLinear(d, (nh + 2 * nkv) * hs, bias=cfg.attn_bias)
            self.wo = FalconLinear(nh * hs, d, bias=cfg.attn_bias)

    def qkv(self, x):
        """q (B, nh, T, hs), k and v (B, n_kv, T, hs), before RoPE."""
        B, T, _ = x.shape
        nh, nkv, hs = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        if self.cfg.arch == "llama":
            return (self.wq(x).view(B, T, nh, hs).transpose(1, 2),
                    self.wk(x).view(B, T, nkv, hs).transpose(1, 2),
                    self.wv(x).view(B, T, nkv, hs).transpose(1, 2))
        fused = self.wqkv(x)
        if self.cfg.qkv_layout == "grouped":           # per KV group: [q ... q, k, v]
            f = fused.view(B, T, nkv, nh // nkv + 2, hs)
            q, k, v = f[:, :, :, :-2].flatten(2, 3), f[:, :, :, -2], f[:, :, :, -1]
        elif self.cfg.qkv_layout == "mq":              # [q_0 ... q_nh-1, k, v]
            f = fused.view(B, T, nh + 2, hs)
            q, k, v = f[:, :, :-2], f[:, :, -2:-1], f[:, :, -1:]
        else:                                          # per head: [q_i, k_i, v_i]
            f = fused.view(B, T, nh, 3, hs)
            q, k, v = f[..., 0, :], f[..., 1, :], f[..., 2, :]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # views: no copies

    def project(self, x, cos_sin):
        """q (B, nh, T, hs), k and v (B, n_kv, T, hs), RoPE applied at the tokens' global positions."""
        q, k, v = self.qkv(x)
        if cos_sin is not None:
            cos, sin = cos_sin
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        return q, k, v

    def forward(self, q, k, v, kv, spans, math_path):
        """Exchange K/V through `kv`, then attend. Returns (B, nh, T, hs), before the output projection."""
        k, v = kv.update(self.layer, k, v)             # the one line each parallel mode changes
        ys, o = [], 0
        for a, n in spans:                             # each run of positions attends on its own
            ys.append(attend(q[:, :, o:o + n], k, v, a, self.cfg, kv.dense, math_path))
            o += n
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=2)


class Block(nn.Module):
    """A decoder layer in three steps: `pre` (norm, Q/K/V, RoPE), attention with the K/V exchange,
    `post` (output projection, MLP, residuals). `pre` and `post` are pure tensor functions: on a
    GPU, fast/compiled.py compiles them so that their elementwise chains run as a few kernels."""

    def forward(self, x, kv, spans, cos_sin, math_path):
        h, q, k, v = self.pre(x, cos_sin)
        y = self.attn(q, k, v, kv, spans, math_path)
        return self.post(x, h, y)

    def pre(self, x, cos_sin):
        h = self.attn_norm(x)
        return (h, *self.attn.project(h, cos_sin))

    def post(self, x, h, y):                           # sequential residuals (Falcon-7B's are parallel)
        x = x + self.attn.wo(merge_heads(y))
        return x + self.mlp(self.mlp_norm(x))


def merge_heads(y):
    """(B, nh, T, hs) -> (B, T, nh * hs)"""
    B, nh, T, hs = y.shape
    return y.transpose(1, 2).reshape(B, T, nh * hs)


class LlamaBlock(Block):
    def __init__(self, cfg, layer):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def mlp(self, h):
        return self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class FalconBlock(Block):
    def __init__(self, cfg, layer):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.mlp_norm else None
        self.attn = Attention(cfg, layer)
        self.w_in = FalconLinear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.w_out = FalconLinear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def mlp(self, h):
        return self.w_out(F.gelu(self.w_in(h)))        # exact erf GELU

    def post(self, x, h, y):
        if not self.cfg.parallel_attn:                 # falcon-rw: sequential, like GPT-2 and Llama
            return super().post(x, h, y)
        m = self.mlp(self.mlp_norm(x) if self.mlp_norm is not None else h)
        return (m + self.attn.wo(merge_heads(y))) + x  # falcon-7b/40b/180b/11b: one residual for both


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        Block = LlamaBlock if cfg.arch == "llama" else FalconBlock
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.arch == "llama" else nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, tokens, kv, start=0, last_only=False, math_path=False, rope_len=None):
        """Logits (B, T, V) for tokens (B, T) at global positions start..start+T-1.

        The same call prefills a whole prompt (start=0), a chunk that continues a prefix (start = the
        prefix length), or decodes one token; `kv` decides where the K/V of other positions come from.
        `start` may also be a list of (start, length) spans, one contiguous run of positions each:
        zigzag TSP gives a rank two runs. `rope_len` is the length dynamic-NTK RoPE stretches its base
        for (default: this call's last position + 1): a parallel prefill passes the whole prompt's,
        so that every rank rotates its chunk as one process prefilling the whole prompt would.
        """
        T = tokens.shape[1]
        spans = [(start, T)] if isinstance(start, int) else start
        x = self.embed(tokens)                         # (B, T, d)
        cos_sin = None
        if self.cfg.rope is not None:
            pos = torch.cat([torch.arange(a, a + n, device=tokens.device) for a, n in spans])
            cos_sin = rope(pos, rope_inv_freq(self.cfg, rope_len or max(a + n for a, n in spans)), x.dtype)
        for block in self.layers:
            x = block(x, kv, spans, cos_sin, math_path)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))


def builtin(arch="llama", seed=0, dtype=torch.float32):
    """A small random model built from a seed: runs anywhere with no download. Its output is noise that
    wanders (std 2/sqrt(fan_in)), so its tokens tell a wrong cache (std 0.02: two ids, over and over)."""
    if arch == "llama":
        cfg = Config(arch="llama", vocab_size=1024, dim=256, n_layers=4, n_heads=8, n_kv_heads=2,
                     head_dim=32, ffn_dim=688, max_position_embeddings=16384)
    else:
        cfg = Config(arch="falcon", vocab_size=1024, dim=256, n_layers=4, n_heads=8, n_kv_heads=1,
                     head_dim=32, ffn_dim=1024, max_position_embeddings=16384, qkv_layout="mq",
                     parallel_attn=True, mlp_norm=False, tie_embeddings=True, bos_token_id=11, eos_token_id=11)
    g = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:                         # norm weights: near 1, but not exactly
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:                                      # the embedding (vocab, d), or a matrix (out, in)
                x = torch.randn(p.shape, generator=g)
                p.copy_(0.1 * x if name == "embed.weight" else 2 * x / p.shape[1] ** 0.5)
    return model.to(dtype).eval()
