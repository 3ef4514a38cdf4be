"""bench/sim.py and bench/profiling.py: replays computed by hand, agreement with partition.CostModel, links, the
shared device, profiles of the built-in model, the kernel table, the search on it, calibration, the order
in which the benchmarks interleave their variants, and the tables `bench.measured ranks` and `merge` print."""
import collections
import contextlib
import itertools
import json
import os
import statistics
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import calibrate  # noqa: E402
import partition as P  # noqa: E402
from bench import measured, profiling, sim  # noqa: E402
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


def test_allgather_of_two_spans_is_two_gathers_by_hand():
    # zigzag's spans (2, 1) and (1, 1): two all-gathers a layer, one after the other, 0.5 + 2 s and
    # 0.5 + 1 s on the ring. Through the host link: the first spans go down 1-3.5 and 3.5-5, up 5-8.5
    # (3 tokens); the second ones, ready at once, down 8.5-10 and 10-11.5, up 11.5-14 (2 tokens)
    r = sim.replay_allgather([[1, 2, 1], [2, 1, 1]], [[2, 1], [1, 1]], UNIT, 1, emitter=1)
    assert ("allgather", 0, 1, 6) in r.timeline[0] and r.ttft == 13
    r = sim.replay_allgather([[1, 2, 1], [2, 1, 1]], [[2, 1], [1, 1]], INSTANT, 1, 1, host=(UNIT, UNIT))
    assert ("allgather", 0, 1, 14) in r.timeline[0]


def test_allgather_through_a_shared_host_link_by_hand():
    # host=(down, up), 0.5 + tokens seconds each: layer 0's parts go down in the order they are ready
    # (rank 0's 3 tokens at 1 until 4.5, rank 1's 2 until 7), then both ranks copy the other's part up
    # at once, 5 tokens through the one up link: 12.5; layer 1 arrives the other way round
    r = sim.replay_allgather([[1, 2, 1], [2, 1, 1]], [3, 2], INSTANT, 1, emitter=1, host=(UNIT, UNIT))
    assert ("allgather", 0, 1, 12.5) in r.timeline[0] and ("allgather", 1, 13.5, 25) in r.timeline[1]
    assert r.finish == [26, 26] and r.ttft == 26
    # the ring's links no longer matter; a faster up link does
    assert sim.replay_allgather([[1, 2, 1], [2, 1, 1]], [3, 2], UNIT, 1, 1, host=(UNIT, UNIT)).ttft == 26
    assert sim.replay_allgather([[1, 2, 1], [2, 1, 1]], [3, 2], UNIT, 1, 1, host=(UNIT, INSTANT)).ttft == 26 - 2 * 5.5


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
    # a capacity of 1.5 ranks' speed (bench.emulated's shares of one GPU): two busy ranks at 0.75 each
    r = sim.replay_chain([[1, 1, 1], [1, 1, 1]], [1, 1], INSTANT, 1, devices=1.5)
    assert r.finish == pytest.approx([4, 4])


# ----------------------------------------------------------------------------- against the cost model

@pytest.mark.parametrize("c, cost, queues", [
    ([4096, 3072, 2048, 1024], P.CostModel(head=0), False),
    ([500, 300, 200], P.CostModel(head=0, comm_per_token=1e-4, latency=1e-2, n_layers=8), True),
    ([7, 1, 9, 3, 5], P.CostModel(lin=1.0, attn=0.1, comm_per_token=2.0, latency=3.0, head=0, n_layers=3), True),
])
def test_chain_matches_cost_model(c, cost, queues):
    """CostModel.rank_times is the replay exactly when all of a layer's work comes after its K/V point,
    segments (0, w, .., w): both receive layer l's prefix, send it on at once, then do the layer's
    work; a rank waits for its prefix, and a send waits for the link to finish the one before it."""
    L, S = cost.n_layers, P.prefix_sums(c)
    w = [(cost.lin * ci + cost.attn * ci * Si) / L for ci, Si in zip(c, S)]
    link = sim.Link(bandwidth=L / cost.comm_per_token, latency=cost.latency / L)   # 1 byte per token
    r = sim.replay_chain([[0.0] + [wi] * L for wi in w], c, link, 1)
    assert r.finish == pytest.approx(cost.rank_times(c), rel=1e-12)
    assert any(s[0] == "recv" for s in r.timeline[-1])                             # ranks wait
    queued = [s for spans in r.timeline for before, s in zip(spans, spans[1:])    # sends that wait for
              if s[0] == "send" and s[2] > before[3]]                              # the link to be free
    assert bool(queued) == queues


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

def synthetic_table(lin, attn, layers=4, device_type="cpu"):
    """A KernelTable from the cost formula itself: a layer costs lin c + attn c (P + c)."""
    cs, Ps = [64, 128, 256, 512, 1024], [0, 256, 512, 768]
    grid = {(c, pre): (0.0, lin * c + attn * c * (pre + c), 0.0) for c in cs for pre in Ps if c + pre <= 1024}
    return sim.KernelTable(grid, dict(layers=layers, bytes_per_token=1024, device_type=device_type))


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
    on_gpu = sim.search(1024, 4, synthetic_table(lin=1e-6, attn=1e-7, device_type="cuda"), sim.FAST, steps=8, levels=2)
    assert on_gpu != c and all(S % P.ALIGN == 0 for S in P.prefix_sums(on_gpu)[:-1])   # as a GPU's run searches


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


# ----------------------------------------------------------------------------- three ranks by hand

def test_chain_three_unequal_ranks_by_hand():
    """p=3, unequal segments and chunks, two different links, 2 bytes per token. Every time below is
    worked out by hand from the rules: rank i sends S_i = c_0 + .. + c_i tokens at each K/V point
    without waiting for the send; a link carries one message at a time; a rank waits for its left
    neighbour's message; TTFT is the last rank's finish even when rank 0 finishes later."""
    links = [sim.Link(bandwidth=2.0, latency=0.5),     # link 0: S_0 = 2 tokens = 4 bytes: 0.5 + 2 = 2.5 s
             sim.Link(bandwidth=4.0, latency=0.25)]    # link 1: S_1 = 3 tokens = 6 bytes: 0.25 + 1.5 = 1.75 s
    segs = [[1, 1, 10], [2, 0.5, 1], [0.5, 1, 1]]
    r = sim.replay_chain(segs, [2, 1, 3], links, 2)
    # rank 0: K/V 0 at 1, sends 1..3.5; K/V 1 at 2, the link is busy until 3.5: sends 3.5..6; head 2..12
    assert r.timeline[0] == [("compute", 0, 0, 1), ("send", 0, 1, 3.5), ("compute", 1, 1, 2),
                             ("send", 1, 3.5, 6.0), ("compute", "head", 2, 12)]
    # rank 1: K/V 0 at 2, waits for 3.5, sends 3.5..5.25; K/V 1 at 4, waits for 6, sends 6..7.75; head 6..7
    assert r.timeline[1] == [("compute", 0, 0, 2), ("recv", 0, 2, 3.5), ("send", 0, 3.5, 5.25),
                             ("compute", 1, 3.5, 4.0), ("recv", 1, 4.0, 6.0), ("send", 1, 6.0, 7.75),
                             ("compute", "head", 6.0, 7.0)]
    # rank 2: waits 0.5..5.25 and 6.25..7.75; it sends nothing
    assert r.timeline[2] == [("compute", 0, 0, 0.5), ("recv", 0, 0.5, 5.25), ("compute", 1, 5.25, 6.25),
                             ("recv", 1, 6.25, 7.75), ("compute", "head", 7.75, 8.75)]
    assert r.finish == [12, 7, 8.75] and r.ttft == 8.75


def test_allgather_three_unequal_ranks_by_hand():
    """p=3 TSP: a layer's all-gather ends for every rank at the latest arrival plus p-1 = 2 ring
    steps, each moving max(counts) tokens and lasting as long as the slowest of the p links; TTFT is
    the emitter's finish (rank 1 here), not the latest one."""
    ring = [sim.Link(4.0, 0.25), sim.Link(2.0, 0.5), sim.Link(8.0, 0.0)]   # 4 tokens: 1.25, 2.5, 0.5 s
    segs = [[1, 2, 1], [3, 1, 0.5], [2, 1, 4]]
    r = sim.replay_allgather(segs, [2, 4, 1], ring, 1, emitter=1)
    # layer 0: last arrival 3 (rank 1), + 2 steps of 2.5 = 8; layer 1: last arrival 8 + 2 = 10, done 15
    assert r.timeline[0] == [("compute", 0, 0, 1), ("allgather", 0, 1, 8), ("compute", 1, 8, 10),
                             ("allgather", 1, 10, 15), ("compute", "head", 15, 16)]
    assert r.timeline[1] == [("compute", 0, 0, 3), ("allgather", 0, 3, 8), ("compute", 1, 8, 9),
                             ("allgather", 1, 9, 15), ("compute", "head", 15, 15.5)]
    assert r.timeline[2] == [("compute", 0, 0, 2), ("allgather", 0, 2, 8), ("compute", 1, 8, 9),
                             ("allgather", 1, 9, 15), ("compute", "head", 15, 19)]
    assert r.finish == [16, 15.5, 19] and r.ttft == 15.5


def test_three_ranks_on_two_devices_by_hand():
    """p=3 chain on 2 shared devices, instant links: while m ranks have work each runs at min(1, 2/m)
    of a device, a rank waiting for its message leaves its share to the others, and a rank alone
    runs at full speed, never faster."""
    segs = [[1, 2, 1], [2, 1, 1], [1, 1, 3]]
    r = sim.replay_chain(segs, [1, 1, 1], INSTANT, 1, devices=2)
    # 0..1.5: three at 2/3: ranks 0 and 2 end segment 0; rank 2 waits for rank 1 (1 s of work left)
    # 1.5..2.5: ranks 0 and 1 at full speed; rank 1 sends at 2.5; 2.5..4: all three at 2/3
    # 4..5.5: three heads at 2/3, ranks 0 and 1 end; 5.5..7.5: rank 2's last 2 s alone at speed 1
    expect = [[("compute", 0, 0, 1.5), ("send", 0, 1.5, 1.5), ("compute", 1, 1.5, 4), ("send", 1, 4, 4),
               ("compute", "head", 4, 5.5)],
              [("compute", 0, 0, 2.5), ("send", 0, 2.5, 2.5), ("compute", 1, 2.5, 4), ("send", 1, 4, 4),
               ("compute", "head", 4, 5.5)],
              [("compute", 0, 0, 1.5), ("recv", 0, 1.5, 2.5), ("compute", 1, 2.5, 4), ("compute", "head", 4, 7.5)]]
    for got, want in zip(r.timeline, expect):
        assert [s[:2] for s in got] == [s[:2] for s in want]
        assert [s[2:] for s in got] == [pytest.approx(s[2:]) for s in want]
    assert r.finish == pytest.approx([5.5, 5.5, 7.5]) and r.ttft == pytest.approx(7.5)


def test_replays_never_touch_their_inputs():
    """A replay reads its segments and partition without changing them (KernelTable.segments hands
    out memoised lists: a replay that wrote into them would change every later prediction)."""
    segs, c = [[1, 2, 1], [3, 1, 0.5], [2, 1, 4]], [2, 4, 1]
    before = [list(s) for s in segs], list(c)
    sim.replay_chain(segs, c, UNIT, 1, devices=2)
    sim.replay_allgather(segs, c, UNIT, 1, 1, devices=1)
    assert ([list(s) for s in segs], list(c)) == before


# ----------------------------------------------------------------------------- links, expand, table

class FixedRandom:
    """A stand-in for random.Random whose random() always returns u."""

    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u


def test_link_time_and_jitter():
    """n bytes take latency + n / bandwidth, scaled by (1 + jitter u) for the generator's draw u;
    without a generator or without jitter, exactly latency + n / bandwidth."""
    link = sim.Link(bandwidth=2.0, latency=1.0, jitter=0.5)
    assert link.time(4) == 3.0
    assert link.time(4, FixedRandom(0.5)) == 3.0 * 1.25
    assert link.time(4, FixedRandom(0.0)) == 3.0
    assert sim.Link(2.0, 1.0).time(4, FixedRandom(0.9)) == 3.0
    assert sim.Link(2.0).time(0) == pytest.approx(10e-6)            # the default latency, 10 us


def test_network_slow_links_and_defaults():
    """network(p) gives p links, one per rank (the ring's last link included), with the given latency
    and jitter; slow= replaces the bandwidth of the named links only."""
    links = sim.network(4, bandwidth=5.0, latency=0.25, jitter=0.1, slow={3: 1.0, 1: 2.0})
    assert [(k.bandwidth, k.latency, k.jitter) for k in links] == [
        (5.0, 0.25, 0.1), (2.0, 0.25, 0.1), (5.0, 0.25, 0.1), (1.0, 0.25, 0.1)]
    # the ring uses link 3 (rank 3 -> rank 0), the chain does not
    segs = [[0, 0, 0]] * 4
    fast_ring = sim.network(4, 1e30, 0.0)
    assert sim.replay_allgather(segs, [1] * 4, sim.network(4, 1e30, 0.0, slow={3: 1.0}), 1, 3).ttft == 6
    assert sim.replay_allgather(segs, [1] * 4, fast_ring, 1, 3).ttft == pytest.approx(0)
    assert sim.replay_chain(segs, [1] * 4, sim.network(4, 1e30, 0.0, slow={3: 1.0}), 1).ttft == pytest.approx(0)


def test_fit_link_least_squares_and_clamped_latency():
    """fit_link is the least-squares line through the points, not through two of them; a fit whose
    intercept falls below zero gives latency 0 (a negative time per message is no link)."""
    sizes = [1.0, 2.0, 3.0, 4.0]
    link = sim.fit_link(sizes, [1.0, 2.0, 2.0, 3.0])              # slope 0.6, intercept 0.5
    assert 1 / link.bandwidth == pytest.approx(0.6) and link.latency == pytest.approx(0.5)
    link = sim.fit_link([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])          # slope 1, intercept -0.5
    assert link.bandwidth == pytest.approx(1.0) and link.latency == 0.0


def test_expand_takes_the_median_middle():
    """expand keeps the first and last segments and repeats the median of the middle ones (not their
    mean, not counting the first or last) n_layers - 1 times: n_layers + 1 segments in all."""
    assert sim.expand([9, 5, 1, 2, 7], 4) == [9, 2, 2, 2, 7]       # middles 5, 1, 2: median 2
    assert sim.expand([9, 1, 4, 7], 3) == [9, 2.5, 2.5, 7]         # middles 1, 4: median 2.5
    assert len(sim.expand([1, 2, 3], 32)) == 33


def test_kernel_table_floors_extrapolation_at_zero():
    """Above the measured prefixes the table extends linearly; a time that would go negative there
    (noise: here longer prefixes measured faster) is 0, never a negative segment."""
    t = sim.KernelTable({(64, 0): (1.0, 1.0, 1.0), (64, 100): (0.5, 0.5, 0.5)}, dict(layers=2))
    assert t.segments(64, 150) == pytest.approx([0.25, 0.25, 0.25])
    assert t.segments(64, 1000) == [0.0, 0.0, 0.0]


def test_predict_replays_each_rank_after_its_prefix():
    """predict gives rank i the table's segments for c_i tokens after the S_{i-1} tokens before it,
    and the table's bytes per token unless told otherwise."""
    t = synthetic_table(lin=1e-4, attn=1e-6)
    link = sim.Link(1e6, 1e-4)
    c = [500, 300, 224]
    segs = [t.segments(500, 0), t.segments(300, 500), t.segments(224, 800)]
    assert sim.predict(t, c, link).finish == sim.replay_chain(segs, c, link, 1024).finish
    assert sim.predict(t, c, link, bpt=7).finish == sim.replay_chain(segs, c, link, 7).finish
    assert sim.predict(t, c, link).finish != sim.replay_chain(segs, c, link, 7).finish


def test_build_table_asks_for_links_per_rank_count():
    """build_table calls a callable `links` with each p and searches each (C, p) on those links; every
    partition is filed under the key, sums to C and has p chunks."""
    t = synthetic_table(lin=1e-6, attn=1e-7)
    asked = []

    def links(p):
        asked.append(p)
        return sim.network(p, 300e9)

    table = sim.build_table(t, [512, 1024], [2, 3], links, key="k", levels=1)
    assert sorted(set(asked)) == [2, 3]
    for p in (2, 3):
        assert table.contexts("k", p) == [512, 1024]
        for C in (512, 1024):
            c = table.get("k", p, C)
            assert len(c) == p and sum(c) == C
            assert list(c) == sim.search(C, p, t, sim.network(p, 300e9), levels=1)


def test_trace_spans_in_microseconds_per_rank(tmp_path):
    """write_trace writes each span as a Chrome 'X' event on its rank's thread, start and duration in
    microseconds, its layer in args."""
    r = sim.replay_chain([[1, 1, 10], [2, 0.5, 1], [0.5, 1, 1]], [2, 1, 3],
                         [sim.Link(2.0, 0.5), sim.Link(4.0, 0.25)], 2)
    sim.write_trace(r, tmp_path / "t.json")
    events = json.load(open(tmp_path / "t.json"))["traceEvents"]
    meta = [e for e in events if e["ph"] == "M"]
    assert [(e["tid"], e["args"]["name"]) for e in meta] == [(0, "rank 0"), (1, "rank 1"), (2, "rank 2")]
    spans = [(e["tid"], e["name"], e["args"]["layer"], e["ts"], e["dur"]) for e in events if e["ph"] == "X"]
    want = [(rank, name, layer, round(a * 1e6, 1), round((b - a) * 1e6, 1))
            for rank, s in enumerate(r.timeline) for name, layer, a, b in s]
    assert spans == want and (1, "send", 1, 6e6, 1.75e6) in spans


# ----------------------------------------------------------------------------- bench.measured ranks' table

# seconds per token of each variant; the TSP row differs per C, so a ratio against another C's row shows
BASE = {"one process": 3.0, "TSP": 2.0, "TSP-zigzag": 1.6, "KVR-E": 1.5, "KVR-S": 0.8}


def markdown_rows(text, first_col):
    """The rows (dicts) of every Markdown table in `text` whose header starts with first_col."""
    rows, names = [], None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells and cells[0] == first_col:
            names = cells
        elif cells and names and not set(cells[0]) <= set("-"):
            rows.append(dict(zip(names, cells)))
        elif not cells:
            names = None
    return rows


@pytest.fixture
def fake_ranks(monkeypatch, tmp_path):
    """bench.measured ranks on 2 fake ranks, no MPI and no model: each variant's run returns a time
    from BASE (per token, scaled by C) times a wobble that changes from run to run. Runs it with the
    given C and returns (what it printed, the rows it saved)."""
    wobble = itertools.cycle([1.0, 1.3, 0.9, 1.1, 0.95])
    job = SimpleNamespace(comm=SimpleNamespace(rank=0, bcast=lambda t, root: t), size=2, rank=0, model_key="m",
                          name="fake", device=torch.device("cpu"), system=None,
                          transport=SimpleNamespace(finish=lambda: None, barrier=lambda: None, path="host"))

    def pick(job, spec):
        C = job.tokens.shape[1]
        job.c, job.c_source, job.c_modelled = [C * 3 // 4, C - C * 3 // 4], "searched", False

    def timed(variant):
        return BASE[variant] * job.tokens.shape[1] * 1e-3 * next(wobble)

    def kvr(job, c):
        C = job.tokens.shape[1]
        return None, None, timed("KVR-E" if list(c) == P.even(C, 2) else "KVR-S")

    monkeypatch.setattr(measured, "setup", lambda args: job)
    monkeypatch.setattr(measured, "abort_on_error", lambda comm: contextlib.nullcontext())
    monkeypatch.setattr(measured, "random_prompt", lambda job, C: torch.zeros(1, C, dtype=torch.long))
    monkeypatch.setattr(measured, "one_process", lambda job: timed("one process"))
    monkeypatch.setattr(measured, "machine", lambda: {})
    monkeypatch.setattr(measured.calibrate, "pick_partition", pick)
    monkeypatch.setattr(measured.runahead, "prefill", kvr)
    monkeypatch.setattr(measured.tsp, "prefill", lambda job, zigzag: (None, None, timed("TSP-zigzag" if zigzag else "TSP")))

    def run(Cs, capsys):
        out = tmp_path / "ranks.json"
        measured.main(["ranks", "--C", *map(str, Cs), "--repeats", "3", "--out", str(out)])
        return capsys.readouterr().out, json.load(open(out))["rows"]
    return run


def test_ranks_speedup_is_tsp_over_the_variant_of_the_same_C(fake_ranks, capsys):
    """The printed speedup of a row is the TSP row's TTFT over its own, at the same C: computed here
    from the saved rows' own ttft_s (each the median of its runs), so a ratio printed upside down, or
    against another C's TSP row, or from another statistic, fails."""
    printed, rows = fake_ranks([64, 128], capsys)
    assert {r["variant"] for r in rows} == set(BASE) | {"KVR-P"} and len(rows) == 12
    for r in rows:
        assert r["ttft_s"] == statistics.median(r["raw_s"]) and len(r["raw_s"]) == 3
    tsp = {r["C"]: r["ttft_s"] for r in rows if r["variant"] == "TSP"}
    table = markdown_rows(printed, "C")
    assert len(table) == len(rows)
    for r, t in zip(rows, table):
        assert (t["C"], t["variant"], t["ttft_ms"]) == (str(r["C"]), r["variant"], f"{r['ttft_s'] * 1e3:.1f}")
        assert t["speedup"] == f"{tsp[r['C']] / r['ttft_s']:.2f}"
    kvrs = next(t for t in table if t["variant"] == "KVR-S" and t["C"] == "128")
    assert float(kvrs["speedup"]) > 1.5 and kvrs["partition"] == "96,32"      # KVR-S is the faster one here


def test_ranks_progress_line_shows_tsp_over_each_variant(fake_ranks, capsys):
    """The line printed per C gives each variant's median in ms and (x TSP's median over it)."""
    printed, rows = fake_ranks([64, 128], capsys)
    for C in (64, 128):
        line = next(x for x in printed.splitlines() if x.startswith(f"C={C}: "))
        mine = [r for r in rows if r["C"] == C]
        tsp = next(r["ttft_s"] for r in mine if r["variant"] == "TSP")
        assert line == f"C={C}: " + ", ".join(f"{r['variant']} {r['ttft_s'] * 1e3:.1f} ms (x{tsp / r['ttft_s']:.2f})"
                                              for r in mine)


def test_merge_summarises_runs_with_ratios_per_run(tmp_path, capsys):
    """merge: per (C, p, variant) the median of the runs' TTFTs with their range, and each ratio
    (TSP over the variant, one process over the variant) taken within each run, then summarised."""
    def run(tsp, kvr, one):
        rows = [dict(C=64, p=2, variant=v, ttft_s=t, partition=c)
                for v, t, c in (("one process", one, None), ("TSP", tsp, None), ("KVR-S", kvr, [40, 24]))]
        return dict(meta={}, rows=rows)
    files = []
    for i, (tsp, kvr, one) in enumerate([(0.2, 0.1, 0.3), (0.3, 0.1, 0.4), (0.25, 0.2, 0.2)]):
        files.append(str(tmp_path / f"run{i}.json"))
        json.dump(run(tsp, kvr, one), open(files[-1], "w"))
    measured.main(["merge", *files, "--out", str(tmp_path / "all.json")])
    table = {r["variant"]: r for r in markdown_rows(capsys.readouterr().out, "C")}
    # KVR-S: 100, 100, 200 ms; TSP over it 2, 3, 1.25; one process over it 3, 4, 1
    assert table["KVR-S"]["ttft_ms"] == "100.0 (100.0-200.0)"
    assert table["KVR-S"]["tsp_over"] == "2.00 (1.25-3.00)"
    assert table["KVR-S"]["one_over"] == "3.00 (1.00-4.00)"
    assert table["TSP"]["tsp_over"] == "1.00 (1.00-1.00)" and table["TSP"]["ttft_ms"] == "250.0 (200.0-300.0)"
    assert table["one process"]["tsp_over"] == "0.75 (0.67-1.25)"             # 0.67, 0.75, 1.25
    assert table["KVR-S"]["partition"] == "40,24"
    saved = json.load(open(tmp_path / "all.json"))
    assert [r["run"] for r in saved["rows"]] == [1, 1, 1, 2, 2, 2, 3, 3, 3] and len(saved["meta"]["runs"]) == 3


def test_spread_median_and_range():
    """spread: the median of the values, with their range only when there are several."""
    assert measured.spread([3.0, 1.0, 2.0, 10.0], "{:.1f}") == "2.5 (1.0-10.0)"
    assert measured.spread([1.5], "{:.2f}") == "1.50" and measured.spread([], "{:.2f}") == "-"
    assert measured.spread([1.0, 2.0], "{:.1f}", ranged=False) == "1.5"
