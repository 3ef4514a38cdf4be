"""fast/ on the CPU: the arithmetic the GPU fast paths rest on, with reference kernels standing in
for the GPU's. (The kernels themselves run in tests/test_gpu.py, on a GPU.)"""
import math

import pytest
import torch

import fast.decode
import generate
import model
from fast import attention
from kvcache import KVCache


def reference(q, k, v, causal_from=None):
    """Softmax attention in float64 and its log-sum-exp per query (what cuDNN returns beside the
    output); with causal_from=s, query i sees keys up to s + i (a chunk's own block)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])       # (B, nh, T, Lk)
    if causal_from is not None:
        T, Lk = scores.shape[-2:]
        scores = scores.masked_fill(torch.arange(Lk) > torch.arange(T)[:, None] + causal_from, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)                             # (B, nh, T)
    return torch.softmax(scores, dim=-1) @ v, lse


@pytest.mark.parametrize("T,P", [(5, 9), (1, 4), (7, 1)])
def test_merging_two_blocks_by_log_sum_exp_is_attention_over_both(T, P):
    """fast.attention.merge of (prefix block, own causal block) equals attention over the whole
    lower-right-causal block, to float64 rounding: the step of the cuDNN path no CPU reaches."""
    g = torch.Generator().manual_seed(T * 100 + P)
    q = torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 3, P + T, 8, generator=g, dtype=torch.float64) for _ in range(2))
    a, lse_a = reference(q, k[:, :, :P], v[:, :, :P])
    b, lse_b = reference(q, k[:, :, P:], v[:, :, P:], causal_from=0)
    whole, _ = reference(q, k, v, causal_from=P)
    torch.testing.assert_close(attention.merge(a, lse_a, b, lse_b), whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(attention.merge(b, lse_b, a, lse_a), whole, atol=1e-12, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_static_decode_steps_compute_what_the_teaching_decode_computes(arch):
    """To float64 rounding, not bitwise: fast/decode.py's static step (position as a tensor, K/V
    written in place, attention over the whole capacity with the unwritten keys masked) gives the
    teaching decode's tokens and cache. Bitwise, the CUDA graph against the same steps run eagerly,
    is tests/test_gpu.py's claim."""
    m = model.builtin(arch, seed=0, dtype=torch.float64)
    prompt = torch.randint(3, 1024, (1, 37), generator=torch.Generator().manual_seed(2))
    out, caches = [], []
    for static in (False, True):
        cache = KVCache(m.cfg, 1, 37 + 12, torch.float64)
        tok = m(prompt, cache, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)
        run = fast.decode.decode if static else generate.decode
        out.append(run(m, tok, cache, 9, graphs=False))
        caches.append(cache)
    assert torch.equal(out[0], out[1]) and len(caches[0]) == len(caches[1]) == 37 + 9
    for a, b in zip(caches[0].kv, caches[1].kv):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_a_static_step_compiled_whole_computes_what_it_computes_eagerly_and_compiles_once():
    """To float32 rounding, not bitwise: the whole static step as one torch.compile graph
    (fast.decode.decode's `compiled`) gives the eager steps' tokens, and their cache in float64 up to
    RoPE's angles, which are float32 (as HF's) and whose compiled sin and cos differ from eager's by
    an ulp (6e-8); a second decode, with a new step, reuses the compiled graph."""
    import torch._dynamo.utils
    m = model.builtin("llama", seed=0, dtype=torch.float64)
    prompt = torch.randint(3, 1024, (1, 37), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out, caches = [], []
    for compiled in (False, True, True):
        cache = KVCache(m.cfg, 1, 37 + 12, torch.float64)
        tok = m(prompt, cache, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)
        out.append(fast.decode.decode(m, tok, cache, 9, graphs=False, compiled=compiled))
        caches.append(cache)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    for a, b in zip(caches[0].kv, caches[1].kv):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_merged_matmuls_compute_the_separate_ones_and_hold_no_second_copy(bias):
    """To float64 rounding: fast.compiled.merge (a Llama layer's Q, K and V as one matmul, gate and
    up as another, what --fuse runs) gives the model's logits and cache, biases included; the
    separate weights become views of the merged ones, so the model holds nothing twice."""
    from dataclasses import replace
    from fast.compiled import merge
    m = model.Transformer(replace(model.builtin("llama").cfg, attn_bias=bias, mlp_bias=bias)).double()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / p.shape[-1] ** 0.5)
    tok = torch.randint(3, 1024, (1, 40), generator=g)
    out, kv = [], []
    for merged in (False, True):
        if merged:
            for block in m.layers:
                merge(block)
        cache = KVCache(m.cfg, 1, 48, torch.float64)
        out.append(m(tok[:, :32], cache, 0))
        out.append(m(tok[:, 32:], cache, 32))            # a chunk after a prefix, as a rank's
        kv.append(torch.stack(cache.kv))
    for a, b in zip(out[:2], out[2:]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    torch.testing.assert_close(kv[0], kv[1], atol=1e-10, rtol=0)
    blk = m.layers[0]
    for lins in ((blk.attn.wq, blk.attn.wk, blk.attn.wv), (blk.w_gate, blk.w_up)):
        storages = {t.untyped_storage().data_ptr() for lin in lins for t in (lin.weight, lin.bias) if t is not None}
        assert len(storages) == 1 + bias, storages     # the weights one tensor, the biases another
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in model.Transformer(m.cfg).parameters())


def test_static_decode_refuses_steps_past_the_capacity():
    m = model.builtin("llama", dtype=torch.float64)
    cache = KVCache(m.cfg, 1, 8, torch.float64)
    m(torch.ones(1, 6, dtype=torch.long), cache, 0)
    with pytest.raises(ValueError, match="KV cache holds 8 tokens; 6 \\+ 3 do not fit"):
        fast.decode.decode(m, torch.ones(1, 1, dtype=torch.long), cache, 3, graphs=False)


@pytest.mark.parametrize("arch", ["llama", "falcon"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("junk", [math.nan, math.inf])
def test_static_decode_does_not_read_what_the_unused_capacity_holds(arch, dtype, junk):
    """The static step attends over the whole capacity, masking the positions not yet written; a
    masked key still meets its value in probs @ v, where 0 * NaN (or inf) is NaN. So decode zeroes
    the unused capacity first: junk there gives the tokens of a zero-filled cache, and the prompt's
    rows are left as they were."""
    m = model.builtin(arch, seed=0, dtype=dtype)
    prompt = torch.randint(3, 1024, (1, 23), generator=torch.Generator().manual_seed(3))
    out = []
    for fill in (0.0, junk):
        cache = KVCache(m.cfg, 1, 23 + 10, dtype)
        tok = m(prompt, cache, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)
        for kv in cache.kv:
            kv[:, len(cache):] = fill
        prompt_rows = [kv[:, :len(cache)].clone() for kv in cache.kv]
        out.append(fast.decode.decode(m, tok, cache, 8, graphs=False))
        assert all(torch.equal(kv[:, :23], rows) for kv, rows in zip(cache.kv, prompt_rows))
    assert torch.equal(out[0], out[1])


def test_decode_bench_bound_is_the_weights_read_once_at_the_measured_bandwidth():
    """bench.measured decode's bound: the device's bandwidth as a copy measures it (here the CPU's,
    a small copy; no timing is asserted), and the weights' bytes over it."""
    from bench import measured                         # imports transformers: slow, so here
    bw = measured.bandwidth("cpu", nbytes=1 << 20, repeats=3)
    assert math.isfinite(bw) and bw > 0
    m = model.builtin("llama", dtype=torch.float32)
    weights, bound = measured.read_once(m, bw)
    assert weights == 4 * sum(p.numel() for p in m.parameters()) and bound == weights / bw


@pytest.mark.parametrize("ran", ["replayed", "eager", None])
def test_a_graphs_prefill_that_did_not_replay_says_so(ran, capfd):
    """--graphs records the chain's segments in the warm-up and replays them in the timed prefill
    only if its KV cache is where the warm-up's was; a timed prefill that ran otherwise is reported
    as not replayed, with a warning line, never as replayed. Without --graphs: neither."""
    from types import SimpleNamespace

    from fast.system import System
    m = model.builtin("llama", dtype=torch.float32)
    if ran:
        m.forward = SimpleNamespace(ran=ran)           # fast/segments.py's wrapper, as it ended
    me = SimpleNamespace(job=SimpleNamespace(model=m), sharing="", args=SimpleNamespace(math=False), warm_ups=1)
    _, _, prefill = System.notes(me, KVCache(m.cfg, 1, 8))
    err = capfd.readouterr().err
    assert prefill.startswith(", after an untimed warm-up prefill")
    assert ("replayed as CUDA graphs" in prefill) == (ran == "replayed")
    assert ("not replayed" in prefill) == ("--graphs: the timed prefill ran" in err) == (ran == "eager")
