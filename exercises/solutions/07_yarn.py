"""Exercise 7: YaRN, a RoPE scaling model.py does not have. Check with: python exercises/check.py 7"""
import math

import torch


def yarn(cfg):
    """YaRN's RoPE inverse frequencies and attention factor, as Hugging Face computes them.

    cfg is model.py's Config; cfg.rope holds config.json's rope_parameters: rope_theta, factor,
    original_max_position_embeddings, and optionally beta_fast (default 32), beta_slow (default 1),
    attention_factor and truncate (default True). README.md gives the recipe.
    Returns (inv_freq, a fp32 tensor of head_dim/2 frequencies; attention_factor, a float).
    """
    r, d = cfg.rope, cfg.head_dim
    base, factor = r["rope_theta"], r["factor"]
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)   # theta^(2i/d), fp32 like HF
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)       # plain RoPE; all / factor

    def pair(rotations):                               # the pair that turns this often over L0
        L0 = r["original_max_position_embeddings"]
        return d * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair(r.get("beta_fast") or 32), pair(r.get("beta_slow") or 1)
    if r.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp                                    # 1: plain RoPE's frequency, 0: divided by factor
    inv_freq = interpolated * (1 - keep) + extrapolated * keep
    attention_factor = r.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor
