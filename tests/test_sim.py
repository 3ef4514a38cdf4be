"""bench/sim.py and bench/profiling.py: replays computed by hand, agreement with partition.CostModel, links, the
shared device, profiles of the built-in model, the kernel table, the search on it, calibration, and the order
in which the benchmarks interleave their variants."""
import collections
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import calibrate  # noqa: E402
import partition as P  # noqa: E402
from bench import profiling, sim  # noqa: E402
from bench.measured import covered, order, shared  # noqa: E402
from kvcache import bytes_per_token  # noqa: E402
from load_weights import dims_model  # noqa: E402

UNIT = sim.Link(bandwidth=1.0, latency=0.5)            # with 1 byte per token: 0.5 + tokens seconds
INSTANT = sim.Link(bandwidth=1e30, latency=0.0)


# ----------------------------------------------------------------------------- replays by hand

def test_chain_by_hand():
    # c = (2, 1): rank 0 sends 2 tokens per layer, 2.5 s a message; link busy until the previous arrives
    r = sim.replay_chain([[1, 1, 1], [1, 1, 1]], [2, 1], UNIT, 1)
    assert r.finish == [3, 7] and r.ttft == 7
    assert r.timeline[0] == [("compute", 0, 0, 1), ("send", 0, 1, 3.5), ("compute", 1, 1, 2),
                             ("send", 1, 3.5, 6.0), ("compute", "head", 2, 3)]
    assert r.timeline[1] == [("compute", 0, 0, 1), ("recv", 0, 1, 3.5), ("compute", 1, 3.5, 4.5),
                             ("recv", 1, 4.5, 6.0), ("compute", "head", 6.0, 7.0)]


def test_link_carries_one_message_at_a_time():
    r = sim.replay_chain([[0] * 4, [0] * 4], [1, 1], sim.Link(1.0, 0.0), 1)   # 1 s per message
    assert [s[2:] for s in r.timeline[0] if s[0] == "send"] == [(0, 1), (1, 2), (2, 3)]
    assert r.ttft == 3


def test_allgather_by_hand():
    # counts (3, 2): one ring step of the largest chunk, 0.5 + 3 s; the barrier waits for the slower rank
    r = sim.replay_allgather([[1, 2, 1], [2, 1, 1]], [3, 2], UNIT, 1, emitter=1)
    assert r.finish == [12, 12] and r.ttft == 12
    assert ("allgather", 0, 1, 5.5) in r.timeline[0] and ("allgather", 1, 6.5, 11) in r.timeline[1]


def test_one_slow_link_delays_only_the_ranks_behind_it():
    segs = [[1, 1, 1]] * 3
    links = sim.network(3, bandwidth=1e30, latency=0.0, slow={1: 1.0})
    r = sim.replay_chain(segs, [1, 1, 1], links, 1)
    assert r.finish[:2] == [3, 3] and r.finish[2] > 3
    assert sim.replay_allgather(segs, [1, 1, 1], links, 1, 2).ttft > 3     # the ring has it too


def test_jitter_is_seeded_and_only_slows():
    segs, links = [[1e-3] * 5] * 4, sim.network(4, 1e9, jitter=0.5)
    a, b = (sim.replay_allgather(segs, [1000] * 4, links, 1000, 3, seed=s).ttft for s in (0, 1))
    assert a == sim.replay_allgather(segs, [1000] * 4, links, 1000, 3, seed=0).ttft and a != b
    assert min(a, b) > sim.replay_allgather(segs, [1000] * 4, sim.network(4, 1e9), 1000, 3).ttft


def test_shared_device_is_time_sliced_fairly():
    # chain on one device: both ranks always have work, so both run at half speed
    r = sim.replay_chain([[1, 1, 1], [1, 1, 1]], [1, 1], INSTANT, 1, devices=1)
    assert r.finish == [6, 6]
    assert [s[2:] for s in r.timeline[1] if s[0] == "compute"] == [(0, 2), (2, 4), (4, 6)]
    # TSP on one device: rank 0 ends layer 0 at 2 (half speed), rank 1 has the device to itself after
    r = sim.replay_allgather([[1, 2, 1], [2, 1, 1]], [1, 1], INSTANT, 1, emitter=0, devices=1)
    assert r.finish == [8, 8] and ("allgather", 0, 2, 3) in r.timeline[0]
    # a rank that waits leaves the device to the others: rank 1 waits 2.5 s for its first message
    r = sim.replay_chain([[1, 1, 1], [1, 1, 1]], [2, 1], UNIT, 1, devices=1)
    assert r.timeline[1][:2] == [("compute", 0, 0, 2), ("recv", 0, 2, 4.5)] and r.finish == [4, 8]
    # as many devices as ranks: the same as independent devices
    segs = [[0.3, 1, 2, 0.5], [0.2, 2, 1, 0.4], [0.1, 1, 1, 0.3]]
    assert sim.replay_chain(segs, [3, 2, 1], UNIT, 1, devices=3).finish == pytest.approx(
        sim.replay_chain(segs, [3, 2, 1], UNIT, 1).finish)


# ----------------------------------------------------------------------------- against the cost model

@pytest.mark.parametrize("c, cost", [
    ([4096, 3072, 2048, 1024], P.CostModel(head=0)),
    ([500, 300, 200], P.CostModel(head=0, comm_per_token=1e-4, latency=1e-2, n_layers=8)),  # waits on links
    ([7, 1, 9, 3, 5], P.CostModel(lin=1.0, attn=0.1, comm_per_token=2.0, latency=3.0, head=0, n_layers=3)),
])
def test_chain_matches_cost_model(c, cost):
    """CostModel does a layer's work after the K/V arrive and sends at the layer's end; the real rank
    (and the replay) sends at the K/V point, before attention. With all work after that point,
    segments (0, w, .., w), the replay is exactly the CostModel shifted: each hop sends one layer's
    work sooner, so rank i finishes sum_{j<i} w_j earlier than rank_times says."""
    L, S = cost.n_layers, P.prefix_sums(c)
    w = [(cost.lin * ci + cost.attn * ci * Si) / L for ci, Si in zip(c, S)]
    link = sim.Link(bandwidth=L / cost.comm_per_token, latency=cost.latency / L)   # 1 byte per token
    r = sim.replay_chain([[0.0] + [wi] * L for wi in w], c, link, 1)
    assert r.finish == pytest.approx([t - sum(w[:i]) for i, t in enumerate(cost.rank_times(c))], rel=1e-12)


@pytest.mark.parametrize("C, p", [(4096, 4), (1200, 3)])
def test_allgather_matches_cost_model(C, p):
    cost, c = P.CostModel(head=0), P.even(C, p)
    L = cost.n_layers
    w = [(cost.lin * ci + cost.attn * ci * C) / L for ci in c]
    link = sim.Link(bandwidth=L / cost.comm_per_token, latency=cost.latency / L)
    r = sim.replay_allgather([[0.0] + [wi] * L for wi in w], c, link, 1, p - 1)
    assert r.ttft == pytest.approx(cost.ttft_tsp(C, p), rel=1e-12)


# ----------------------------------------------------------------------------- profiles on the CPU

@pytest.fixture(scope="module")
def llama():
    return dims_model("builtin:llama", torch.float32, "cpu")


def test_profiles_give_positive_segments_per_rank(llama):
    L = llama.cfg.n_layers
    for segs, p in [(profiling.profile_kvr(llama, [20, 12, 8], 1, 1), 3), (profiling.profile_tsp(llama, 40, 2, False, 1, 1), 2),
                    (profiling.profile_tsp(llama, 40, 2, True, 1, 1), 2), (profiling.profile_single(llama, 40, 1, 1), 1)]:
        assert len(segs) == p and all(len(s) == L + 1 and min(s) > 0 for s in segs)
    assert sim.expand(segs[0], 32)[1:32] == [sorted(segs[0][1:L])[1]] * 31
    r = profiling.simulate_tsp(llama, 40, 2, sim.FAST, zigzag=True, repeats=1)
    assert r.ttft == r.finish[0] > 0                               # zigzag: rank 0 emits
    assert profiling.simulate_kvr(llama, [30, 10], sim.FAST, devices=1, repeats=1).ttft > 0


def test_dims_model_shapes():
    m = dims_model("falcon7b", torch.bfloat16, "cpu", n_layers=1)
    assert m.cfg.n_layers == 1 and m.cfg.n_kv_heads == 1 and m.lm_head.weight is m.embed.weight
    assert bytes_per_token(m.cfg, torch.bfloat16) == 2 * 64 * 2


# ----------------------------------------------------------------------------- kernel table, search

def synthetic_table(lin, attn, layers=4):
    """A KernelTable from the cost formula itself: a layer costs lin c + attn c (P + c)."""
    cs, Ps = [64, 128, 256, 512, 1024], [0, 256, 512, 768]
    grid = {(c, pre): (0.0, lin * c + attn * c * (pre + c), 0.0) for c in cs for pre in Ps if c + pre <= 1024}
    return sim.KernelTable(grid, dict(layers=layers, bytes_per_token=1024))


def test_kernel_table_interpolation():
    t = synthetic_table(lin=1.0, attn=0.01)
    for (c, pre), (first, middle, last) in t.grid.items():       # grid points: as measured
        assert t.segments(c, pre) == [first, middle, middle, middle, last]
    mid = t.segments(192, 256)[1]
    assert mid == pytest.approx((t.grid[128, 256][1] + t.grid[256, 256][1]) / 2)
    assert t.segments(128, 384)[1] == pytest.approx((t.grid[128, 256][1] + t.grid[128, 512][1]) / 2)
    assert t.segments(32, 0) == t.segments(64, 0)                 # below the grid: clamped
    assert t.segments(1536, 0)[1] == pytest.approx(2 * t.grid[1024, 0][1] - t.grid[512, 0][1])   # above: extended
    noisy = sim.KernelTable({(64, 0): (1.0, 9.0, 1.0), (128, 0): (2.0, 2.0, 2.0)}, dict(layers=2))
    assert noisy.segments(64, 0) == [1.0, 2.0, 1.0]               # slower than a longer chunk: noise


def test_kernel_table_measure_and_json(llama, tmp_path):
    t = profiling.measure_table(llama, [8, 16, 32], [0, 16], repeats=1, warmup=0, layers=6)
    assert sorted(t.grid) == [(8, 0), (8, 16), (16, 0), (16, 16), (32, 0)]
    for c, pre in t.grid:                                         # the least time of chunks not shorter
        least = [min(t.grid[k][j] for k in t.grid if k[1] == pre and k[0] >= c) for j in range(3)]
        assert t.segments(c, pre) == [least[0]] + [least[1]] * 5 + [least[2]]
    t.save(tmp_path / "k.json")
    u = sim.KernelTable.load(tmp_path / "k.json")
    assert u.grid == t.grid and u.segments(20, 9) == t.segments(20, 9)
    assert json.load(open(tmp_path / "k.json"))["meta"]["torch"] == torch.__version__
    assert u.model_key == "llama-d256-L6-h8-kv2-float32-cpu"


def test_search_front_loads_when_attention_dominates():
    t = synthetic_table(lin=1e-6, attn=1e-7)
    c = sim.search(1024, 4, t, sim.FAST, steps=8, levels=2)
    assert sum(c) == 1024 and len(c) == 4 and c == sorted(c, reverse=True) and c[0] > 1.2 * c[-1]
    assert sim.predict(t, c, sim.FAST).ttft < 0.8 * sim.predict(t, P.even(1024, 4), sim.FAST).ttft
    table = sim.build_table(t, [512, 1024], [2], sim.FAST, key="m", levels=2)
    assert table.contexts("m", 2) == [512, 1024] and P.predicted(768, 2, table, "m")[0] > 384


def test_compare_and_trace(tmp_path):
    rows, text = sim.compare({"a": 0.1, "b": 0.2}, {"a": 0.11, "c": 1.0})
    assert rows == [("a", 0.1, 0.11, pytest.approx(0.1))] and "+10.0%" in text
    sim.write_trace(sim.replay_chain([[1, 1, 1], [1, 1, 1]], [2, 1], UNIT, 1), tmp_path / "t.json")
    names = {e["name"] for e in json.load(open(tmp_path / "t.json"))["traceEvents"]}
    assert names == {"thread_name", "compute", "send", "recv"}


def test_calibrate_model_times_each_chunk_after_its_prefix(monkeypatch):
    calls = []

    class FakeKV:
        def __init__(self, cfg, batch, capacity, dtype, device):
            self.capacity, self.n = capacity, 0

        def reset(self):
            self.n = 0

    class FakeModel:
        cfg = SimpleNamespace(n_layers=3, vocab_size=50)

        def __call__(self, tokens, kv, start, last_only=False):
            assert start == kv.n and start + tokens.shape[1] <= kv.capacity
            kv.n += tokens.shape[1]
            calls.append((start, tokens.shape[1], kv.capacity))

    monkeypatch.setattr(calibrate, "KVCache", FakeKV)
    cost = calibrate.calibrate_model(FakeModel(), "cpu", torch.float32, max_len=64, repeats=2, head=0.5)
    assert (cost.n_layers, cost.head) == (3, 0.5)
    timed = [(start, T) for start, T, capacity in calls if start + T == capacity]
    assert sorted(set(timed)) == sorted((prev, c) for c in (8, 16, 32) for prev in (0, 32))
    assert len(timed) == 6 * (1 + 2)                         # a warm-up, then `repeats` timed


def test_fit_link_recovers_latency_and_bandwidth():
    sizes = [2**20 * k for k in (1, 4, 16, 64)]
    link = sim.fit_link(sizes, [20e-6 + n / 50e9 for n in sizes])
    assert link.bandwidth == pytest.approx(50e9) and link.latency == pytest.approx(20e-6)


# ----------------------------------------------------------------------------- interleaving

@pytest.mark.parametrize("n", range(1, 8))
def test_order_balances_positions_and_predecessors(n):
    """Over any n consecutive rounds (2n for an odd n) each variant runs equally often in every position
    and right after every other variant, so a variant that slows its successor biases them all alike."""
    keys, cycle = [f"v{i}" for i in range(n)], n if n % 2 == 0 else 2 * n
    for start in (0, 1, 3):
        rounds = [order(keys, r) for r in range(start, start + cycle)]
        assert all(sorted(row) == keys for row in rounds)
        positions = collections.Counter((i, k) for row in rounds for i, k in enumerate(row))
        assert set(positions.values()) == {cycle // n}
        pairs = collections.Counter(pair for row in rounds for pair in zip(row, row[1:]))
        assert n == 1 or (len(pairs) == n * (n - 1) and set(pairs.values()) == {cycle // n})


def test_shared_counts_overlapping_spans_once():
    """`bench.measured share`'s arithmetic: the GPU's busy time is the union of every rank's spans,
    idle the rest of the window from the first "go", and spans of ranks in flight at once show as
    in_flight > 1 (time-slicing), which summing the ranks' busy times would hide."""
    ms = 1_000_000
    rank0 = [("go", 0, 0), ("kernel", 10 * ms, 50 * ms), ("copy HtoD", 40 * ms, 60 * ms)]
    rank1 = [("go", 5 * ms, 5 * ms), ("kernel", 30 * ms, 70 * ms), ("kernel", 100 * ms, 120 * ms)]
    s = shared([rank0, rank1])
    assert (s["window_ms"], s["busy_ms"], s["idle_ms"]) == (120, 80, 40)
    assert [r["busy_ms"] for r in s["ranks"]] == [50, 60] and s["in_flight"] == 110 / 80
    assert s["copy_ms"] == 20 and s["ranks"][0]["kernel_ms"] == 40 and s["ranks"][1]["kernel_ms"] == 60
    assert covered([]) == 0 and covered([(0, 5), (1, 2), (5, 7)]) == 7
