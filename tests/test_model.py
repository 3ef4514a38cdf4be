"""model.py + load_weights.py against transformers 5.24, the oracle, on tiny random models.

Claims, strongest first:
- full prefill on the default (SDPA) path is bitwise equal to HF sdpa: logits and every cached K/V;
- chunked prefill and token-by-token decode agree with HF's full prefill within ATOL (rtol 0), not
  bitwise: a different chunking changes matmul shapes and hence rounding (on these models HF's own
  chunked vs full prefill differ by up to ~3e-6 fp32 / ~2e-15 fp64);
- the readable math path agrees within ATOL with HF eager fed the same chunks (Falcon-RW: HF sdpa,
  as HF eager double-counts ALiBi);
- greedy generation gives HF's token ids.
"""
import glob
import os

import pytest
import torch
from conftest import FORMATS, VARIANTS, B, T, build_hf, tokens
from transformers import DynamicCache

from fast.compiled import fuse
from generate import decode, generate
from kvcache import KVCache
from load_weights import load_model
from model import Config, builtin

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# HF's dynamic RoPE recomputes its base from the longest position seen so far (state kept across
# calls), so on a prompt longer than max_position_embeddings a chunk's RoPE depends on how the prompt
# was cut (by design; 6.5e-4 apart here): for that variant the oracle is a fresh HF model fed the
# same chunks.
CHUNK_DEPENDENT = {"llama_dynamic_long"}
SCHEDULES = {"chunked": [5, 1, 7, 1, 10], "decode": [6] + [1] * 18}  # chunk lengths, summing to T


def hf_run(name, dtype, attn="sdpa", schedule=(T,)):
    """HF logits (B, T, V) and per-layer cache [(k, v)] of a fresh model fed tokens() in chunks."""
    model, ids, cache, out, start = build_hf(name, dtype, attn), tokens(), DynamicCache(), [], 0
    with torch.no_grad():
        for n in schedule:
            out.append(model(ids[:, start:start + n], cache=cache, use_cache=True).logits)
            start += n
    return torch.cat(out, dim=1), [(layer.keys, layer.values) for layer in cache.layers]


def ours(model, k):
    """Our cached K or V as HF stores it: Falcon's new decoder caches each KV head g times."""
    g = model.cfg.n_heads // model.cfg.n_kv_heads if model.cfg.qkv_layout == "grouped" else 1
    return k.repeat_interleave(g, dim=1)


def run_chunks(model, dtype, schedule, math_path=False):
    """Prefill tokens() chunk by chunk through one KVCache; returns logits (B, T, V) and the cache."""
    ids, cache, out, start = tokens(), KVCache(model.cfg, B, T, dtype), [], 0
    with torch.no_grad():
        for n in schedule:
            out.append(model(ids[:, start:start + n], cache, start, math_path=math_path))
            start += n
    assert start == T and len(cache) == T
    return torch.cat(out, dim=1), cache


def test_checkpoint_formats_are_what_they_claim(checkpoint):
    """The three on-disk forms really differ: one file, several safetensors shards, several .bin shards."""
    assert os.listdir(checkpoint("llama_gqa")).count("model.safetensors") == 1
    assert len(glob.glob(os.path.join(checkpoint("llama_gqa", "sharded_safetensors"), "model-*.safetensors"))) > 1
    d = checkpoint("llama_gqa", "bin_shards")
    assert len(glob.glob(os.path.join(d, "*.bin"))) > 1 and not glob.glob(os.path.join(d, "*.safetensors"))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", VARIANTS)
def test_full_prefill_bitwise(checkpoint, name, fmt, dtype):
    """Bitwise: full prefill from position 0 gives HF sdpa's logits and K/V exactly (torch.equal).

    Our code copies HF's op order and casts (RMSNorm in fp32 with rsqrt, then cast back, then the
    weight; inv_freq as an fp32 pow; RoPE angles and cos/sin in fp32; the scale multiplied, not
    divided; Falcon's bias added after the matmul; ALiBi rounded to bf16; HF's "fp64" Llama keeps these
    fp32 steps), so nothing but identical bits is expected,
    from every checkpoint format, in fp32 and fp64. llama_dynamic_long (T 24 > max_pos 16) is included:
    a fresh HF model and ours both stretch the RoPE base for this one prompt length.
    """
    ref_logits, ref_kv = hf_run(name, dtype)
    model = load_model(checkpoint(name, fmt), dtype)
    cache = KVCache(model.cfg, B, T, dtype)
    with torch.no_grad():
        logits = model(tokens(), cache, 0)
    assert logits.dtype == dtype and torch.equal(logits, ref_logits)
    assert len(ref_kv) == model.cfg.n_layers
    for i, (hk, hv) in enumerate(ref_kv):
        k, v = cache.layer(i)
        assert k.shape[1] == model.cfg.n_kv_heads                # ours stays unrepeated
        assert torch.equal(ours(model, k), hk) and torch.equal(ours(model, v), hv), f"layer {i}"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES)
@pytest.mark.parametrize("name", VARIANTS)
def test_incremental_matches_full_prefill(checkpoint, name, schedule, dtype):
    """Tolerance (1e-5 fp32, 1e-10 fp64, rtol 0): prefill in uneven chunks (incl. length 1), or a
    short prefill then one token at a time, continuing the cache via `start`, gives HF's full-prefill
    logits at every position and its K/V. Not bitwise: chunk shapes change the matmul rounding.
    Dynamic RoPE past max_pos is compared with HF fed the same chunks (see CHUNK_DEPENDENT)."""
    ref_logits, ref_kv = hf_run(name, dtype, schedule=schedule if name in CHUNK_DEPENDENT else (T,))
    model = load_model(checkpoint(name), dtype)
    logits, cache = run_chunks(model, dtype, schedule)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL[dtype], rtol=0)
    assert len(ref_kv) == model.cfg.n_layers == len(cache.kv)      # the loop below covers every layer
    for i, (hk, hv) in enumerate(ref_kv):
        k, v = cache.layer(i)
        torch.testing.assert_close(ours(model, k), hk, atol=ATOL[dtype], rtol=0)
        torch.testing.assert_close(ours(model, v), hv, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("schedule", [[T]] + list(SCHEDULES.values()), ids=["full"] + list(SCHEDULES))
@pytest.mark.parametrize("name", VARIANTS)
def test_math_path(checkpoint, name, schedule, dtype):
    """Tolerance (1e-5 fp32, 1e-10 fp64, rtol 0): math_path=True (explicit scores, mask, softmax)
    against HF eager fed the same chunks through its cache. Llama eager runs softmax in fp32 even in
    fp64 (so does our math path); that rounding step puts HF eager's own chunked and full prefill up
    to ~7e-7 apart in fp64 on these models (eager vs sdpa likewise), so the oracle must be eager with
    the same chunking. Falcon-RW is compared with HF sdpa: HF 5.24's eager adds ALiBi twice (a bug in
transformers: eager and sdpa differ by 6e-3 to 1e-1 there)."""
    attn = "sdpa" if VARIANTS[name][1].get("alibi") else "eager"
    ref_logits, _ = hf_run(name, dtype, attn, schedule)
    model = load_model(checkpoint(name), dtype)
    logits, _ = run_chunks(model, dtype, schedule, math_path=True)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_generation(checkpoint, name, dtype):
    """Exact token ids: model.generate equals HF generate(do_sample=False) for 20 new tokens.

    HF is told there is no EOS, so it cannot stop early or mask EOS (min_new_tokens would change the
    argmax); both outputs must hold exactly 20 new tokens."""
    prompt = tokens(seed=2, length=10)
    hf = build_hf(name, dtype)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    model = load_model(checkpoint(name), dtype)
    out, ttft, tpot = generate(model, prompt, 20, KVCache(model.cfg, B, 30, dtype))
    assert ref.shape == (B, 30) and torch.equal(ref[:, :10], prompt)
    assert out.shape == (B, 20) and ttft > 0 and tpot > 0
    assert torch.equal(out, ref[:, 10:])


def test_kvcache_len_overflow_reset():
    """KVCache bookkeeping: len counts tokens in every layer, layer() returns what was written,
    overflow raises without changing the cache, reset empties it and the next write starts at 0."""
    cfg = Config(arch="llama", dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8)
    cache = KVCache(cfg, batch=1, capacity=5)
    assert cache.capacity == 5 and len(cache) == 0
    kv = lambda n, x: (torch.full((1, 2, n, 8), float(x)), torch.full((1, 2, n, 8), -float(x)))
    for layer in range(2):
        k, v = cache.update(layer, *kv(3, 1))
        assert k.shape == (1, 2, 3, 8)
    assert len(cache) == 3
    k, v = cache.update(0, *kv(2, 2))
    assert k.shape[2] == 5 and len(cache) == 3          # layer 1 still holds 3: len is the last layer's
    cache.update(1, *kv(2, 2))
    assert len(cache) == 5
    assert torch.equal(cache.layer(1)[0][0, 0, :, 0], torch.tensor([1.0, 1, 1, 2, 2]))
    assert torch.equal(cache.layer(1)[1][0, 0, :, 0], torch.tensor([-1.0, -1, -1, -2, -2]))
    with pytest.raises(ValueError, match="holds 5 tokens"):
        cache.update(0, *kv(1, 3))
    assert len(cache) == 5 and cache.layer(0)[0].shape[2] == 5
    cache.reset()
    assert len(cache) == 0 and cache.layer(0)[0].shape[2] == 0
    k, _ = cache.update(0, *kv(4, 7))
    assert torch.equal(k, torch.full((1, 2, 4, 8), 7.0))
    with pytest.raises(ValueError, match=r"holds 5 tokens; 4 \+ 2 do not fit"):  # a chunk that starts
        cache.update(0, *kv(2, 8))                                         # inside but ends past it
    assert cache.layer(0)[0].shape[2] == 4


@pytest.mark.parametrize("name", ["llama_gqa", "falcon_7b", "falcon_40b", "falcon_rw"])
def test_fuse_compiles_pre_and_post_without_changing_results(checkpoint, name):
    """fast.compiled.fuse puts every layer's `pre` and `post` through torch.compile. With dynamo's
    'eager' backend (capture, no code generation: no C++ compiler needed) the graphs must run the
    same ops, so a chunked prefill is torch.equal to the unfused model's; inductor's fused kernels
    are checked on the GPU (BENCHMARKS.md)."""
    logits, cache = run_chunks(load_model(checkpoint(name)), torch.float32, (9, 1, 14))
    model = fuse(load_model(checkpoint(name)), backend="eager")
    assert all(type(b.pre).__name__ != "method" for b in model.layers)
    fused_logits, fused_cache = run_chunks(model, torch.float32, (9, 1, 14))
    assert torch.equal(logits, fused_logits)
    assert len(cache.kv) == len(fused_cache.kv) == model.cfg.n_layers
    assert all(torch.equal(a, b) for a, b in zip(cache.kv, fused_cache.kv, strict=True))



@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_the_builtin_models_tokens_wander_so_a_quoted_list_catches_a_wrong_cache(arch):
    """The README quotes the built-in model's greedy tokens as the check of a run. They must not
    settle into a cycle (with std-0.02 weights they alternated two ids whatever the cache held), and
    a few stale positions in the cache must change them."""
    m = builtin(arch)
    ids = torch.randint(3, 1024, (1, 512), generator=torch.Generator().manual_seed(0))
    runs = []
    for spoil in (False, True):
        cache = KVCache(m.cfg, 1, 512 + 16)
        m(ids[:, :256], cache, 0)
        if spoil:                                      # 16 positions of one layer stale (zeros)
            cache.kv[1][:, 100:116] = 0
        first = m(ids[:, 256:], cache, 256, last_only=True)[:, -1].argmax(-1, keepdim=True)
        runs.append(decode(m, first, cache, 15)[0].tolist())
    assert len(set(runs[0])) >= 12, runs[0]
    assert runs[0] != runs[1]
