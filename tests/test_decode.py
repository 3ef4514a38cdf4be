"""The KV cache, greedy decode (generate.py), the static decode step (fast/decode.py) and the two K/V
exchanges of the parallel prefills (runahead.ChainKV, tsp.GatherKV), as objects, on the CPU.

Claims:
- KVCache appends, claims, reads and resets per layer, is created zeroed, and refuses to overflow;
- generate/decode give the greedy tokens one process without a cache would give, (B, 1+steps) of
  them, stop at EOS only when asked, and time the first token and the rest by the right counts;
- the static step launches the same ops on the same shapes with the same arguments at every
  position and never reads a tensor back to the host (what a CUDA graph's replay needs; a CPU cannot
  record one), writes at its position and advances it in place, and gives generate.decode's tokens
  for any capacity; fast.decode records one step and replays it for the rest;
- ChainKV receives [0, S_{i-1}) into the cache, sends exactly [0, S_i), finishes and stops after its
  last layer (not on the last rank); GatherKV puts zigzag K/V in position order and stops the ranks
  that do not emit.
Models are model.builtin in float64, so greedy tokens compare exactly (torch.equal).
"""
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import fast.decode
import generate
import model
import runahead
import tsp
from kvcache import KVCache, bytes_per_token, split
from tsp import tsp_layout
from program import Done

F64 = torch.float64
ARCHS = ["llama", "falcon"]
C = 11                                                 # prompt length
# Seeded so that the greedy continuations vary (several distinct tokens within 12 steps on both
# builtin models: see test_the_prompts_give_varied_continuations); row 1 varies most.
PROMPT = torch.randint(3, 1024, (2, C), generator=torch.Generator().manual_seed(0))


def builtin(arch):
    return model.builtin(arch, seed=0, dtype=F64)


def prefill(m, prompt, capacity):
    """Prefill `prompt` into a fresh cache of `capacity`; returns (first greedy token (B, 1), cache)."""
    cache = KVCache(m.cfg, prompt.shape[0], capacity, F64)
    with torch.no_grad():
        tok = m(prompt, cache, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)
    return tok, cache


def greedy_without_cache(m, prompt, n):
    """n greedy tokens, each from a fresh forward over the prompt and every token so far."""
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            cache = KVCache(m.cfg, seq.shape[0], seq.shape[1], F64)
            seq = torch.cat([seq, m(seq, cache, 0)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1]:]


def static_decode(m, tok, cache, steps, stop_at_eos=False):
    return fast.decode.decode(m, tok, cache, steps, stop_at_eos, graphs=False)


DECODES = {"eager": generate.decode, "static": static_decode}


# ----------------------------------------------------------------------------- KVCache

def tiny_cfg(n_layers=3):
    return model.Config(n_layers=n_layers, n_kv_heads=2, head_dim=4)


def chunk(T, base, B=1):
    """k, v (B, 2, T, 4) whose entries are base + position within the chunk (v: negated)."""
    k = (base + torch.arange(T, dtype=torch.float32))[None, None, :, None].expand(B, 2, T, 4).clone()
    return k, -k


def test_cache_is_created_zeroed_with_the_capacity_asked_for():
    """A new cache holds nothing, every layer is (B, capacity, 2, n_kv, hs) in the dtype asked for, and
    every entry is 0, even where the allocator hands back freed NaN memory: the static decode step reads
    the whole capacity (masked), and NaN there would poison it (test_the_static_step_reads_...)."""
    cfg = tiny_cfg()
    for _ in range(20):                                # leave freed NaN blocks of this size around
        junk = [torch.full((2, 7, 2, 2, 4), float("nan"), dtype=F64) for _ in range(cfg.n_layers)]
        del junk
        cache = KVCache(cfg, 2, 7, F64)
        assert cache.capacity == 7 and len(cache) == 0 and cache.n == [0, 0, 0]
        assert [tuple(kv.shape) for kv in cache.kv] == [(2, 7, 2, 2, 4)] * 3
        assert all(kv.dtype == F64 and not kv.any() for kv in cache.kv)
        assert len({kv.data_ptr() for kv in cache.kv}) == 3   # one buffer per layer, not shared


def test_update_appends_and_returns_every_position_so_far():
    """update writes the chunk after what the layer holds and returns K and V of all of it, in order;
    other layers are untouched."""
    cache = KVCache(tiny_cfg(), 1, 10)
    k1, v1 = chunk(3, 100)
    k2, v2 = chunk(4, 200)
    cache.update(1, k1, v1)
    k, v = cache.update(1, k2, v2)
    assert torch.equal(k, torch.cat([k1, k2], dim=2)) and torch.equal(v, torch.cat([v1, v2], dim=2))
    assert cache.n == [0, 7, 0]
    k_held, v_held = split(cache.kv[1][:, :7])
    assert torch.equal(k_held, k) and torch.equal(v_held, v)
    assert not cache.kv[1][:, 7:].any() and not cache.kv[0].any() and not cache.kv[2].any()


def test_len_is_what_every_layer_holds():
    """len(cache) counts the tokens of the last layer to fill (layers fill in order), not the first."""
    cache = KVCache(tiny_cfg(), 1, 10)
    k, v = chunk(4, 0)
    cache.update(0, k, v)
    cache.update(1, k, v)
    assert len(cache) == 0
    cache.update(2, k, v)
    assert len(cache) == 4


def test_claim_hands_out_the_next_positions_in_place():
    """claim counts the next T positions as held and returns them as a view into the cache (where MPI
    writes a received prefix): writing the view writes the cache; the next update goes after it."""
    cache = KVCache(tiny_cfg(), 2, 10)
    room = cache.claim(0, 3)
    assert room.shape == (2, 3, 2, 2, 4) and cache.n == [3, 0, 0]
    room.fill_(7.0)
    assert (cache.kv[0][:, :3] == 7).all() and not cache.kv[0][:, 3:].any()
    room2 = cache.claim(0, 2)
    assert room2.shape[1] == 2 and cache.n[0] == 5
    room2.fill_(9.0)
    assert (cache.kv[0][:, 3:5] == 9).all() and (cache.kv[0][:, :3] == 7).all()
    k, v = chunk(1, 50, B=2)
    k_all, _ = cache.update(0, k, v)
    assert k_all.shape[2] == 6 and torch.equal(k_all[:, :, 5:], k)


def test_layer_returns_views_of_what_each_layer_holds():
    """layer(i) is (k, v) of exactly the positions layer i holds, as views of the cache."""
    cache = KVCache(tiny_cfg(), 1, 10)
    k, v = chunk(5, 1)
    cache.update(0, k, v)
    cache.update(1, k[:, :, :2], v[:, :, :2])
    k0, v0 = cache.layer(0)
    k1, _ = cache.layer(1)
    assert torch.equal(k0, k) and torch.equal(v0, v) and k1.shape[2] == 2 and cache.layer(2)[0].shape[2] == 0
    k0[0, 0, 0, 0] = -1.0                              # a view: the cache sees the write
    assert cache.kv[0][0, 0, 0, 0, 0] == -1.0          # row 0, position 0, K, head 0, entry 0


@pytest.mark.parametrize("extra", [0, 1, 9])
def test_a_cache_fills_to_exactly_its_capacity_and_no_further(extra):
    """Capacity C + extra takes C + extra tokens (in any chunks) and refuses the next one with a
    ValueError that says how much it holds, leaving what it holds unchanged."""
    cache = KVCache(tiny_cfg(), 1, C + extra)
    k, v = chunk(C, 0)
    cache.update(0, k, v)
    for i in range(extra):
        cache.update(0, *chunk(1, 1000 + i))
    assert cache.n[0] == C + extra
    with pytest.raises(ValueError, match=f"KV cache holds {C + extra} tokens; {C + extra} \\+ 1 do not fit"):
        cache.update(0, *chunk(1, 0))
    with pytest.raises(ValueError, match=f"KV cache holds {C + extra} tokens; {C + extra} \\+ 2 do not fit"):
        cache.claim(0, 2)
    assert cache.n[0] == C + extra and torch.equal(cache.layer(0)[0][:, :, :C], k)
    fresh = KVCache(tiny_cfg(), 1, C + extra)
    with pytest.raises(ValueError, match=f"KV cache holds {C + extra} tokens; 0 \\+ {C + extra + 1} do not fit"):
        fresh.claim(2, C + extra + 1)
    assert fresh.n == [0, 0, 0]


def test_reset_empties_every_layer_and_the_next_update_starts_at_position_0():
    cache = KVCache(tiny_cfg(), 1, 10)
    for layer in range(3):
        cache.update(layer, *chunk(6, 0))
    cache.reset()
    assert cache.n == [0, 0, 0] and len(cache) == 0
    k, v = chunk(2, 500)
    out_k, out_v = cache.update(2, k, v)
    assert torch.equal(out_k, k) and torch.equal(split(cache.kv[2][:, :2])[0], k) and cache.n == [0, 0, 2]


def test_bytes_per_token_is_what_one_token_takes_in_one_layer():
    """The chain and the all-gather move this per token per layer: a K and a V of n_kv heads."""
    for arch in ARCHS:
        cfg = builtin(arch).cfg
        for dtype in (torch.float32, torch.bfloat16, F64):
            cache = KVCache(cfg, 1, 8, dtype)
            one = cache.kv[0][:, :1]
            assert bytes_per_token(cfg, dtype) == one.numel() * one.element_size()


# ----------------------------------------------------------------------------- generate.py

@pytest.mark.parametrize("arch", ARCHS)
def test_the_prompts_give_varied_continuations(arch):
    """The other tests' premise: the greedy continuation changes token (else a decode that ignored
    its cache or position could still match)."""
    m = builtin(arch)
    tok, cache = prefill(m, PROMPT[1:], C + 12)
    out = generate.decode(m, tok, cache, 12)
    assert len(set(out[0].tolist())) >= 4


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_gives_the_greedy_tokens_of_uncached_forwards(arch):
    """generate returns (B, max_new_tokens): the prefill's argmax first, then what a fresh forward over
    the prompt and the tokens so far picks each time; the cache then holds every position fed."""
    m = builtin(arch)
    cache = KVCache(m.cfg, 2, C + 20, F64)
    out, ttft, tpot = generate.generate(m, PROMPT, 8, cache)
    assert out.shape == (2, 8) and out.dtype == torch.long
    assert torch.equal(out, greedy_without_cache(m, PROMPT, 8))
    assert len(cache) == C + 7 and all(n == C + 7 for n in cache.n)


@pytest.mark.parametrize("name", DECODES)
@pytest.mark.parametrize("steps", [0, 1, 6])
def test_decode_returns_the_token_it_was_given_and_one_per_step(name, steps):
    """decode returns (B, 1 + steps), starting with the token fed, and the cache grows by steps."""
    m = builtin("llama")
    tok, cache = prefill(m, PROMPT, C + 6)
    out = DECODES[name](m, tok, cache, steps)
    assert out.shape == (2, 1 + steps) and torch.equal(out[:, :1], tok)
    assert torch.equal(out[:, 1:], greedy_without_cache(m, PROMPT, 1 + steps)[:, 1:])
    assert len(cache) == C + steps


def test_generate_times_the_first_token_and_each_later_one(monkeypatch):
    """With a clock that the prefill moves 2 s and each decode step 0.5 s: ttft is 2 s, and tpot is
    0.5 s, the decode time over the tokens after the first (also when EOS ends decode early, and 0 when
    only one token is asked for)."""
    m = builtin("llama")
    now = [0.0]
    monkeypatch.setattr(generate, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    def tick(_, args):                                 # the prefill (C tokens) 2 s, a decode step 0.5 s
        now[0] += 2.0 if args[0].shape[1] > 1 else 0.5

    m.register_forward_pre_hook(tick)
    out, ttft, tpot = generate.generate(m, PROMPT, 6, KVCache(m.cfg, 2, C + 6, F64))
    assert out.shape == (2, 6) and ttft == 2.0 and tpot == 0.5
    out, ttft, tpot = generate.generate(m, PROMPT, 1, KVCache(m.cfg, 2, C, F64))
    assert out.shape == (2, 1) and ttft == 2.0 and tpot == 0.0
    full = generate.generate(m, PROMPT[1:], 12, KVCache(m.cfg, 1, C + 12, F64))[0][0].tolist()
    k = first_repeat_free(full)
    m.cfg.eos_token_id = full[k]
    out, ttft, tpot = generate.generate(m, PROMPT[1:], 12, KVCache(m.cfg, 1, C + 12, F64), stop_at_eos=True)
    assert out.shape == (1, k + 1) and ttft == 2.0 and tpot == 0.5


def first_repeat_free(tokens, at_least=2):
    """The first index >= at_least whose token does not occur before it."""
    return next(i for i in range(at_least, len(tokens)) if tokens[i] not in tokens[:i])


# ----------------------------------------------------------------------------- EOS

@pytest.mark.parametrize("name", DECODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_decode_stops_at_the_first_eos_only_when_asked(name, arch):
    """With the model's EOS set to the token it emits at step k: stop_at_eos returns the k + 1 tokens up
    to and with that EOS, and the cache holds exactly the positions fed (C + k; the static decode
    claims what its steps wrote, and wrote nothing past it); without stop_at_eos every step runs; an
    EOS fed in returns at once."""
    decode, m = DECODES[name], builtin(arch)
    tok, cache = prefill(m, PROMPT[1:], C + 12)
    full = decode(m, tok, cache, 12)[0].tolist()
    k = first_repeat_free(full)
    m.cfg.eos_token_id = full[k]

    tok, cache = prefill(m, PROMPT[1:], C + 12)
    out = decode(m, tok, cache, 12, stop_at_eos=True)
    assert out[0].tolist() == full[:k + 1]
    assert len(cache) == C + k and cache.n == [C + k] * m.cfg.n_layers
    assert all(not kv[:, C + k:].any() for kv in cache.kv)

    tok, cache = prefill(m, PROMPT[1:], C + 12)
    out = decode(m, tok, cache, 12)
    assert out[0].tolist() == full and len(cache) == C + 12

    _, cache = prefill(m, PROMPT[1:], C + 12)
    eos = torch.tensor([[full[k]]])
    assert torch.equal(decode(m, eos, cache, 12, stop_at_eos=True), eos) and len(cache) == C


@pytest.mark.parametrize("name", DECODES)
def test_one_row_at_eos_does_not_stop_the_batch(name):
    """Decode stops only when every row's token is EOS: one row's EOS does not cut the other rows."""
    decode, m = DECODES[name], builtin("llama")
    tok, cache = prefill(m, PROMPT, C + 12)
    full = decode(m, tok, cache, 12)
    row1 = full[1].tolist()
    m.cfg.eos_token_id = row1[first_repeat_free(row1)]
    assert m.cfg.eos_token_id not in full[0].tolist()
    tok, cache = prefill(m, PROMPT, C + 12)
    assert torch.equal(decode(m, tok, cache, 12, stop_at_eos=True), full) and len(cache) == C + 12


# ----------------------------------------------------------------------------- the static step

def shown(a):
    return ("tensor", tuple(a.shape), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else a


class Ops(TorchDispatchMode):
    """Every aten op run under it, with its tensor arguments as (shape, dtype) and the rest as they are."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((str(func), tree_map(shown, args), tree_map(shown, kwargs)))
        return func(*args, **kwargs)


HOST_SYNCS = ("_local_scalar_dense", "item", "is_nonzero", "equal", "lift_fresh", "nonzero")


@pytest.mark.parametrize("arch", ARCHS)
def test_a_static_step_runs_the_same_ops_on_the_same_shapes_at_every_position(arch):
    """What replaying one recorded CUDA graph for every step needs: at positions C and C + 4 the step
    runs the same aten ops, on tensors of the same shapes, with the same non-tensor arguments, and
    none reads a tensor back to the host (.item(), bool(), torch.equal) or makes one from host data."""
    m = builtin(arch)
    tok, cache = prefill(m, PROMPT, C + 10)
    step = fast.decode.Step(m, cache, tok)
    seen = []
    with torch.no_grad():
        for i in range(5):
            if i in (0, 4):
                with Ops() as rec:
                    step()
                seen.append(rec.ops)
            else:
                step()
    assert int(step.pos) == C + 5
    assert len(seen[0]) > 100
    for name, _, _ in seen[0] + seen[1]:
        assert not any(s in name for s in HOST_SYNCS), f"{name} reads back to the host inside a step"
    assert [op[0] for op in seen[0]] == [op[0] for op in seen[1]]
    for a, b in zip(*seen):
        assert a == b, f"position C and C + 4 differ at {a[0]}:\n{a[1:]}\n{b[1:]}"


@pytest.mark.parametrize("arch", ARCHS)
def test_a_static_step_writes_at_its_position_and_advances_it_in_place(arch):
    """Step() feeds its token at `pos`: it writes that position's K/V (what the eager decode writes,
    RoPE'd at the same position), leaves the greedy next token in the same `tok` tensor and pos + 1 in
    the same `pos` tensor (the addresses a graph recorded), and claims nothing in the cache."""
    m = builtin(arch)
    tok, cache = prefill(m, PROMPT, C + 10)
    ref_tok, ref = prefill(m, PROMPT, C + 10)
    fed = tok.clone()
    want = generate.decode(m, ref_tok, ref, 2)
    step = fast.decode.Step(m, cache, tok)
    tok_ptr, pos_ptr = step.tok.data_ptr(), step.pos.data_ptr()
    assert step.pos.tolist() == [C] and step.kv.pos is step.pos
    with torch.no_grad():
        for i in (1, 2):
            step()
            assert step.pos.tolist() == [C + i] and torch.equal(step.tok, want[:, i:i + 1])
            assert step.tok.data_ptr() == tok_ptr and step.pos.data_ptr() == pos_ptr
            assert step.kv.pos is step.pos
    assert torch.equal(tok, fed)                       # the caller's token is not overwritten
    assert len(cache) == C                             # fast.decode claims the positions at the end
    for kv, kv_ref in zip(cache.kv, ref.kv):
        torch.testing.assert_close(kv[:, :C + 2], kv_ref[:, :C + 2], atol=1e-10, rtol=0)
        assert not kv[:, C + 2:].any()


@pytest.mark.parametrize("arch", ARCHS)
def test_static_decode_gives_the_eager_tokens_for_every_capacity(arch):
    """For capacities from exactly full to 50 spare positions, fast.decode's static steps give the
    eager decode's tokens exactly, and both give the tokens of the exactly-full eager run: the unwritten
    capacity is masked away, never attended to."""
    m = builtin(arch)
    tok, cache = prefill(m, PROMPT, C + 10)
    want = generate.decode(m, tok, cache, 10)
    for extra in (0, 1, 7, 50):
        for name, decode in DECODES.items():
            tok, cache = prefill(m, PROMPT, C + 10 + extra)
            assert torch.equal(decode(m, tok, cache, 10), want), f"{name} decode, {extra} spare"
            assert len(cache) == C + 10 and cache.capacity == C + 10 + extra


@pytest.mark.parametrize("arch", ARCHS)
def test_the_static_step_reads_the_whole_capacity_masked(arch):
    """The static step attends over the whole capacity, the unwritten part masked; masked keys still
    enter the arithmetic (0 * NaN is NaN), so fast.decode.decode zeroes that part before the first
    step: neither finite junk nor NaN there changes a token. (A step that sliced the keys at its
    position would never see the junk, and could not be replayed as one graph.)"""
    m = builtin(arch)
    tok, cache = prefill(m, PROMPT, C + 10)
    want = static_decode(m, tok, cache, 10)
    for junk in (1e3, float("nan")):
        tok, cache = prefill(m, PROMPT, C + 10)
        for kv in cache.kv:
            kv[:, C:] = junk * torch.randn(kv[:, C:].shape, generator=torch.Generator().manual_seed(0), dtype=F64)
        assert torch.equal(static_decode(m, tok, cache, 10), want)


def test_static_decode_fits_exactly_its_capacity_and_refuses_more_untouched():
    """len + steps == capacity decodes; one step more raises before any step runs or is claimed."""
    m = builtin("llama")
    tok, cache = prefill(m, PROMPT, C + 4)
    assert static_decode(m, tok, cache, 4).shape == (2, 5) and len(cache) == C + 4
    tok, cache = prefill(m, PROMPT, C + 4)
    before = [kv.clone() for kv in cache.kv]
    with pytest.raises(ValueError, match=f"KV cache holds {C + 4} tokens; {C} \\+ 5 do not fit"):
        static_decode(m, tok, cache, 5)
    assert len(cache) == C and all(torch.equal(a, b) for a, b in zip(before, cache.kv))
    with pytest.raises(ValueError, match="do not fit"):
        generate.decode(m, tok, cache, 5, graphs=False)


class FakeGraphs:
    """torch.cuda.CUDAGraph and torch.cuda.graph on the CPU: a step called while recording is recorded,
    not run (as on a GPU); replay runs the recorded step."""

    def __init__(self, monkeypatch):
        self.recording, self.recorded, self.replays, self.graphs = None, [], 0, 0
        fakes = self
        run = fast.decode.Step.__call__

        def call(step):
            if fakes.recording is not None:
                fakes.recorded.append(lambda: run(step))
                return
            run(step)

        class Graph:
            def __init__(self):
                fakes.graphs += 1

            def replay(self):
                fakes.replays += 1
                fakes.recorded[-1]()

        class Recording:
            def __init__(self, graph):
                self.graph = graph

            def __enter__(self):
                fakes.recording = self.graph

            def __exit__(self, *exc):
                fakes.recording = None

        monkeypatch.setattr(fast.decode.Step, "__call__", call)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", Recording)


@pytest.mark.parametrize("eager_steps", [0, 1, 3, 9])
def test_decode_records_one_step_after_the_eager_ones_and_replays_it(monkeypatch, eager_steps):
    """With graphs: the first eager_steps steps run as they are, then one step is recorded (which does
    not run it) and replayed for every step left; the tokens are those of all-eager static steps."""
    m = builtin("falcon")
    tok, cache = prefill(m, PROMPT, C + 8)
    want = static_decode(m, tok, cache, 8)
    fakes = FakeGraphs(monkeypatch)
    tok, cache = prefill(m, PROMPT, C + 8)
    out = fast.decode.decode(m, tok, cache, 8, graphs=True, eager_steps=eager_steps)
    assert torch.equal(out, want) and len(cache) == C + 8
    recorded = eager_steps < 8
    assert (fakes.graphs, len(fakes.recorded), fakes.replays) == (int(recorded), int(recorded), max(8 - eager_steps, 0))


def test_generate_decode_hands_a_gpu_cache_to_the_static_steps(monkeypatch):
    """generate.decode runs fast.decode.decode, with the same arguments, for a cache on a GPU that
    fast.decode.takes, unless graphs=False or the math path is asked for (--math reaches decode);
    a CPU cache stays in the teaching loop even where takes() would say yes."""
    m = builtin("llama")
    tok, cache = prefill(m, PROMPT, C + 4)
    calls = []
    monkeypatch.setattr(fast.decode, "decode", lambda *a: calls.append(a) or "static")
    monkeypatch.setattr(fast.decode, "takes", lambda model, c: True)
    assert generate.decode(m, tok, cache, 3).shape == (2, 4) and calls == []
    gpu = types.SimpleNamespace(kv=[types.SimpleNamespace(is_cuda=True)])
    assert generate.decode(m, tok, gpu, 3, stop_at_eos=True) == "static"
    assert calls == [(m, tok, gpu, 3, True)]
    assert generate.decode(m, tok, gpu, 0, graphs=False).shape == (2, 1)
    assert generate.decode(m, tok, gpu, 0, math_path=True).shape == (2, 1) and len(calls) == 1


def test_the_math_path_reaches_every_decode_step(monkeypatch):
    """generate.decode(math_path=True) runs every step on the readable attention path (--math), and
    the default runs none there."""
    m = builtin("llama")
    tok, cache = prefill(m, PROMPT, C + 8)
    seen, forward = [], type(m).forward
    monkeypatch.setattr(type(m), "forward", lambda self, *a, **k: seen.append(k.get("math_path")) or forward(self, *a, **k))
    generate.decode(m, tok, cache, 3, math_path=True)
    generate.decode(m, tok, cache, 3)
    assert seen == [True] * 3 + [False] * 3


def test_static_steps_take_a_gpu_cache_unless_a_constant_would_change():
    """takes(): a GPU cache, except ALiBi (a bias built on the host per length) and dynamic-NTK RoPE
    with a capacity past max_position_embeddings (a base that changes with the length)."""
    def cache(cuda, capacity):
        return types.SimpleNamespace(kv=[types.SimpleNamespace(is_cuda=cuda)], capacity=capacity)

    m = builtin("llama")
    assert fast.decode.takes(m, cache(True, 100)) and not fast.decode.takes(m, cache(False, 100))
    m.cfg.alibi = True
    assert not fast.decode.takes(m, cache(True, 100))
    m.cfg.alibi, m.cfg.max_position_embeddings = False, 64
    m.cfg.rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert fast.decode.takes(m, cache(True, 64)) and not fast.decode.takes(m, cache(True, 65))
    m.cfg.rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert fast.decode.takes(m, cache(True, 65))
    m.cfg.rope = None
    assert fast.decode.takes(m, cache(True, 65))


def test_static_decode_refuses_a_model_whose_step_constants_change():
    """Called directly (graphs=False too), the static step refuses dynamic-NTK RoPE past
    max_position_embeddings, whose base changes with the length: before, it froze the base of the
    capacity and decoded other tokens than generate.decode, silently."""
    m = builtin("llama")
    m.cfg.max_position_embeddings = 8
    m.cfg.rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    tok, cache = prefill(m, PROMPT, C + 10)
    with pytest.raises(ValueError, match="dynamic RoPE past max_position_embeddings"):
        fast.decode.decode(m, tok, cache, 5, graphs=False)
    assert len(cache) == C                             # nothing written
    eager = generate.decode(m, tok, cache, 5)          # the teaching loop stretches per length
    assert eager.shape == (2, 6)


# ----------------------------------------------------------------------------- runahead.ChainKV

class FakeTransport:
    """Records what a K/V exchange asks of MPI. recv_into fills `out` from `feed(tag, out)`;
    allgather_into records what `out` holds (this rank's part) and then fills it from `gather(out)`."""

    def __init__(self, rank, size, feed=None, gather=None):
        self.rank, self.size, self.feed, self.gather, self.log = rank, size, feed, gather, []

    def recv_into(self, out, source, tag):
        self.log.append(("recv", tag, source, out))
        self.feed(tag, out)
        return out

    def isend(self, t, dest, tag):
        self.log.append(("send", tag, dest, t.clone()))

    def finish(self):
        self.log.append(("finish",))

    def allgather_into(self, out, spans, dim):
        self.log.append(("allgather", out.clone(), spans, dim))
        out.copy_(self.gather(out))
        return out

    def barrier(self):
        pass

    def of(self, kind):
        return [e for e in self.log if e[0] == kind]


def marked(shape, base):
    """A tensor of `shape` whose entries all differ, starting at base."""
    return base + torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_chain_receives_the_prefix_into_the_cache_and_sends_what_it_holds(rank):
    """Rank i of 3 with chunks [3, 4, 2] (S = 3, 7, 9): per layer it receives [0, S_{i-1}) from rank i-1
    into the cache's first S_{i-1} positions (not rank 0), appends its own K/V, returns all S_i
    positions, and sends exactly those S_i positions to rank i+1 with the layer as tag (not the last
    rank). After its last layer's send a non-last rank calls finish once, then raises Done."""
    cfg, c = tiny_cfg(n_layers=3), [3, 4, 2]
    S_prev, S_i = sum(c[:rank]), sum(c[:rank + 1])
    last = rank == 2
    cache = KVCache(cfg, 1, S_i + (5 if last else 0))
    prefix = {layer: marked((1, S_prev, 2, 2, 4), 1000 * (layer + 1)) for layer in range(3)}
    t = FakeTransport(rank, 3, feed=lambda tag, out: out.copy_(prefix[tag]))
    kv = runahead.ChainKV(cache, t, S_prev)
    for layer in range(3):
        k, v = marked((1, 2, c[rank], 4), -1000 * (layer + 1)), marked((1, 2, c[rank], 4), -500 * (layer + 1))
        if layer == 2 and not last:
            with pytest.raises(Done):
                kv.update(layer, k, v)
            assert t.log[-1] == ("finish",) and t.log[-2][:3] == ("send", 2, rank + 1)
        else:
            k_all, v_all = kv.update(layer, k, v)
            k_prev, v_prev = split(prefix[layer])
            assert torch.equal(k_all, torch.cat([k_prev, k], dim=2))
            assert torch.equal(v_all, torch.cat([v_prev, v], dim=2))
        assert cache.n[layer] == S_i
        assert torch.equal(cache.kv[layer][:, :S_prev], prefix[layer])
        assert torch.equal(cache.kv[layer][:, S_prev:S_i], torch.stack((k.transpose(1, 2), v.transpose(1, 2)), dim=2))
    recvs, sends = t.of("recv"), t.of("send")
    assert [(tag, src) for _, tag, src, _ in recvs] == [(layer, rank - 1) for layer in range(3) if rank > 0]
    for _, tag, _, out in recvs:
        assert out.shape == (1, S_prev, 2, 2, 4) and out.data_ptr() == cache.kv[tag].data_ptr()
    if last:
        assert sends == [] and t.of("finish") == []
    else:
        assert [(tag, dest) for _, tag, dest, _ in sends] == [(0, rank + 1), (1, rank + 1), (2, rank + 1)]
        for _, tag, _, sent in sends:
            assert sent.shape == (1, S_i, 2, 2, 4) and torch.equal(sent, cache.kv[tag][:, :S_i])
        assert len(t.of("finish")) == 1


def test_chain_sends_the_positions_it_holds_not_its_capacity():
    """A sender's cache with room to spare (stale rows beyond S_i): ChainKV sends exactly the S_i
    positions it holds, never the rows after them."""
    cfg = tiny_cfg(n_layers=2)
    cache = KVCache(cfg, 1, 3 + 5)                     # S_0 = 3 held, 5 rows to spare
    for kv in cache.kv:
        kv.fill_(float("nan"))                         # stale rows: must never travel
    t = FakeTransport(0, 2)
    kv = runahead.ChainKV(cache, t, 0)
    kv.update(0, marked((1, 2, 3, 4), 1.0), marked((1, 2, 3, 4), 2.0))
    (_, tag, dest, sent), = t.of("send")
    assert sent.shape == (1, 3, 2, 2, 4) and not sent.isnan().any() and (tag, dest) == (0, 1)


def reference(m, tokens):
    """One process's prefill of the whole prompt: last-position logits and the cache."""
    cache = KVCache(m.cfg, 1, tokens.shape[1], F64)
    with torch.no_grad():
        return m(tokens, cache, 0)[0, -1], cache


def fake_job(m, rank, size, transport):
    return types.SimpleNamespace(rank=rank, size=size, model=m, dtype=F64, device=torch.device("cpu"),
                                 tokens=PROMPT[1:], transport=transport, cache=None)


@pytest.mark.parametrize("arch", ARCHS)
def test_runahead_prefill_on_each_rank_of_a_chain(arch):
    """runahead.prefill on each rank of [4, 5, 2], its left neighbour played by one process's prefill:
    non-last ranks send each layer's first S_i positions (their whole cache, no decode room) and
    return no logits; the last rank's cache has decode room, holds the whole prompt's K/V, and its
    logits are one process's (to float64 rounding)."""
    m, c = builtin(arch), [4, 5, 2]
    logits_ref, ref = reference(m, PROMPT[1:])
    for rank in range(3):
        S_prev, S_i = sum(c[:rank]), sum(c[:rank + 1])
        t = FakeTransport(rank, 3, feed=lambda tag, out: out.copy_(ref.kv[tag][:, :out.shape[1]]))
        logits, cache, _ = runahead.prefill(fake_job(m, rank, 3, t), c, decode_room=6)
        n_layers = m.cfg.n_layers
        assert [e[1] for e in t.of("recv")] == ([] if rank == 0 else list(range(n_layers)))
        assert all(e[3].shape[1] == S_prev for e in t.of("recv"))
        if rank < 2:
            assert logits is None and cache.capacity == S_i and len(t.of("finish")) == 1
            sends = t.of("send")
            assert [(tag, dest) for _, tag, dest, _ in sends] == [(layer, rank + 1) for layer in range(n_layers)]
            for _, tag, _, sent in sends:
                assert sent.shape[1] == S_i
                torch.testing.assert_close(sent, ref.kv[tag][:, :S_i], atol=1e-10, rtol=0)
        else:
            assert t.of("send") == [] and cache.capacity == 11 + 6 and len(cache) == 11
            assert t.of("finish") == []
            torch.testing.assert_close(logits, logits_ref, atol=1e-10, rtol=0)
            for kv, kv_ref in zip(cache.kv, ref.kv):
                torch.testing.assert_close(kv[:, :11], kv_ref, atol=1e-10, rtol=0)


def test_a_rank_prefills_into_the_same_cache_memory_each_time():
    """runahead.prefill again on one rank fills the same KV cache memory (kvcache.cache_for: what
    --graphs' replay and CUDA-aware MPI need), emptied first, so it holds what the first prefill held;
    a longer chunk gets a cache of its own, which a shorter one then fills."""
    m = builtin("llama")
    job = fake_job(m, 0, 3, FakeTransport(0, 3))
    _, first, _ = runahead.prefill(job, [4, 5, 2])
    held = [kv.clone() for kv in first.kv]
    _, again, _ = runahead.prefill(job, [4, 5, 2])
    assert again is first and again.n == [4] * m.cfg.n_layers
    assert all(torch.equal(a, b) for a, b in zip(again.kv, held))
    _, other, _ = runahead.prefill(job, [5, 4, 2])
    assert other is not first and other.capacity == 5 and job.cache is other
    _, shorter, _ = runahead.prefill(job, [3, 6, 2])
    assert shorter is other and shorter.n == [3] * m.cfg.n_layers


# ----------------------------------------------------------------------------- tsp.GatherKV

def by_position(C_, B=1):
    """K/V (B, C_, 2, 2, 4) whose entries at position j are j (K) and -j (V)."""
    pos = torch.arange(C_, dtype=torch.float32)[None, :, None, None].expand(B, C_, 2, 4)
    return torch.stack((pos, -pos), dim=2)


@pytest.mark.parametrize("C_,p", [(9, 3), (11, 3), (8, 4), (17, 5)])
def test_tsp_layout_covers_every_position_once_and_names_the_emitter(C_, p):
    """Plain TSP: p even chunks in order, chunks differ by at most one token, the last rank emits.
    Zigzag: rank r holds chunks r and 2p-1-r of 2p even ones, so rank 0 holds the last token and
    emits; each rank's two runs together are within one token of C/p."""
    for zigzag in (False, True):
        spans, emitter = tsp_layout(C_, p, zigzag)
        held = sorted(a + i for s in spans for a, n in s for i in range(n))
        assert held == list(range(C_)) and all(n >= 1 for s in spans for _, n in s)
        owner = {a + i: r for r, s in enumerate(spans) for a, n in s for i in range(n)}
        assert emitter == owner[C_ - 1] == (0 if zigzag else p - 1)
        sizes = [sum(n for _, n in s) for s in spans]
        assert max(sizes) - min(sizes) <= (2 if zigzag else 1) and len(spans[0]) == 1 + zigzag
        if not zigzag:
            assert [s[0][0] for s in spans] == sorted(s[0][0] for s in spans)


def test_tsp_layout_refuses_too_few_tokens_in_one_line():
    with pytest.raises(ValueError, match="^4 ranks but only 3 prompt tokens$"):
        tsp_layout(3, 4)
    with pytest.raises(ValueError, match="^--zigzag needs at least 2 tokens per rank: 7 tokens for 4 ranks$"):
        tsp_layout(7, 4, zigzag=True)
    assert tsp_layout(8, 4, zigzag=True)[1] == 0


@pytest.mark.parametrize("zigzag", [False, True])
@pytest.mark.parametrize("rank", [0, 1])
def test_gather_puts_every_rank_s_kv_in_position_order(zigzag, rank):
    """Per layer GatherKV writes this rank's K/V at its positions (zigzag: two spans) of a buffer of
    all C, which the all-gather fills in place. The emitting rank's buffer is its cache (it returns
    all C); the other rank's is one buffer for every layer, and it raises Done at its last layer only."""
    C_, p, n_layers = 12, 2, 3
    spans, emitter = tsp_layout(C_, p, zigzag)
    truth = by_position(C_)
    mine = [a + i for a, n in spans[rank] for i in range(n)]
    t = FakeTransport(rank, p, gather=lambda out: truth)
    emits = rank == emitter
    cache = KVCache(tiny_cfg(n_layers), 1, C_ + 4) if emits else None
    buffer = None if emits else torch.full_like(truth, float("nan"))
    kv = tsp.GatherKV(t, spans, not zigzag, cache, buffer, n_layers)
    assert kv.dense == (not zigzag)
    for layer in range(n_layers):
        own = split(truth[:, mine])                   # this rank's k, v, (B, n_kv, its tokens, hs)
        if layer == n_layers - 1 and not emits:
            with pytest.raises(Done):
                kv.update(layer, *own)
            continue
        k, v = kv.update(layer, *own)
        assert torch.equal(k, split(truth)[0]) and torch.equal(v, split(truth)[1])
        if emits:
            assert cache.n[layer] == C_ and torch.equal(cache.kv[layer][:, :C_], truth)
            assert k.data_ptr() == cache.kv[layer].data_ptr()          # gathered into the cache itself
        else:
            assert k.data_ptr() == buffer.data_ptr()
    gathers = t.of("allgather")
    assert len(gathers) == n_layers
    for _, held, spans_, dim in gathers:                 # its own positions written before the gather
        assert torch.equal(held[:, mine], truth[:, mine]) and spans_ == spans and dim == 1


@pytest.mark.parametrize("zigzag", [False, True])
def test_tsp_prefill_on_each_rank(zigzag):
    """tsp.prefill on each of 3 ranks, the all-gather played by one process's prefill: every rank holds
    its own positions' K/V when it gathers each layer; the emitter's cache (with decode room) holds the
    prompt's K/V and its logits are one process's; the other ranks return no logits or cache."""
    m = builtin("llama")
    logits_ref, ref = reference(m, PROMPT[1:])
    spans, emitter = tsp_layout(11, 3, zigzag)
    for rank in range(3):
        mine = [a + i for a, n in spans[rank] for i in range(n)]
        layer = iter(range(m.cfg.n_layers))
        t = FakeTransport(rank, 3, gather=lambda out: ref.kv[next(layer)])
        logits, cache, _, emits = tsp.prefill(fake_job(m, rank, 3, t), zigzag, decode_room=3)
        assert emits == emitter
        gathers = t.of("allgather")
        assert len(gathers) == m.cfg.n_layers
        for i, (_, held, spans_, dim) in enumerate(gathers):
            assert spans_ == spans and dim == 1 and held.shape[1] == 11
            torch.testing.assert_close(held[:, mine], ref.kv[i][:, mine], atol=1e-10, rtol=0)
        if rank == emitter:
            assert cache.capacity == 14 and len(cache) == 11
            torch.testing.assert_close(logits, logits_ref, atol=1e-10, rtol=0)
            for kv, kv_ref in zip(cache.kv, ref.kv):
                torch.testing.assert_close(kv[:, :11], kv_ref, atol=1e-10, rtol=0)
        else:
            assert logits is None and cache is None
