"""Exercise 7: YaRN wired into model.py by hand, against Hugging Face's LlamaForCausalLM.

For each rope_parameters below: a tiny random HF Llama with that YaRN scaling, saved and loaded
into model.py; yarn()'s frequencies and factor against HF's, then the logits of a 100-token prompt
within 1e-5.
"""
import math
import tempfile
import warnings
from unittest import mock

import torch

import load_weights
import model
from grade import Fail, load
from kvcache import KVCache

ROPES = [
    dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=512),
    dict(rope_type="yarn", rope_theta=500000.0, factor=8.0, original_max_position_embeddings=32,
         beta_fast=16, beta_slow=2, truncate=False, attention_factor=1.3),
]
LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-5)

_rope_params, _rope = load_weights._rope_params, model.rope   # as the project has them


def accept_yarn(d):
    """load_weights._rope_params, edited to let rope_type "yarn" through."""
    rope = dict(d.get("rope_parameters") or {})
    return rope if rope.get("rope_type") == "yarn" else _rope_params(d)


def with_yarn(inv_freq, attention_factor):
    """model.py with YaRN wired in: rope_inv_freq gives its frequencies, rope scales cos and sin."""
    def rope(pos, inv_freq, dtype):
        cos, sin = _rope(pos, inv_freq, torch.float32)
        return (cos * attention_factor).to(dtype), (sin * attention_factor).to(dtype)
    return mock.patch.multiple(model, rope_inv_freq=lambda cfg, seq_len: inv_freq, rope=rope)


def relative(inv_freq, cfg):
    """inv_freq / plain RoPE's, rounded: 1 where YaRN keeps a frequency, 1/factor where it divides it."""
    d = cfg.head_dim
    plain = 1.0 / cfg.rope["rope_theta"] ** (torch.arange(0, d, 2).float() / d)
    return "[" + ", ".join(f"{x:.3f}" for x in (inv_freq / plain).tolist()) + "]"


def check(path):
    s = load(path)
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        from transformers.utils import logging
    except ImportError:
        raise Fail("this check compares with Hugging Face: pip install -r requirements-test.txt") from None
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    ids = torch.randint(3, 256, (1, 100), generator=torch.Generator().manual_seed(1))
    for rope in ROPES:
        torch.manual_seed(0)
        hf = LlamaForCausalLM(LlamaConfig(**LLAMA, rope_parameters=rope)).eval()
        want_inv, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf.config)
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            with mock.patch.object(load_weights, "_rope_params", accept_yarn):
                ours = load_weights.load_model(d)
        inv, factor = s.yarn(ours.cfg)
        if not isinstance(factor, (int, float)) or not math.isclose(factor, want_factor, rel_tol=1e-12):
            raise Fail(f"rope_parameters {rope}: attention_factor {factor!r}, expected {want_factor!r}")
        if not isinstance(inv, torch.Tensor) or inv.shape != want_inv.shape or inv.dtype != torch.float32:
            raise Fail(f"rope_parameters {rope}: inv_freq should be a float32 tensor of shape "
                       f"{list(want_inv.shape)}, got {inv!r}")
        if not torch.allclose(inv, want_inv, rtol=1e-6, atol=0):
            raise Fail(f"rope_parameters {rope}: inv_freq differs from HF's. As fractions of plain RoPE's "
                       f"frequencies,\n  expected {relative(want_inv, ours.cfg)}"
                       f"\n  got      {relative(inv, ours.cfg)}")
        with torch.no_grad():
            want = hf(ids).logits
            with with_yarn(inv, factor):
                got = ours(ids, KVCache(ours.cfg, 1, ids.shape[1]))
        diff = (got - want).abs().max().item()
        if diff > 1e-5:
            raise Fail(f"rope_parameters {rope}: inv_freq and attention_factor match HF's, but the logits "
                       f"differ by up to {diff:.3g} (allowed 1e-5)")
    return "YaRN in model.py matches HF's logits, default and custom rope_parameters"
