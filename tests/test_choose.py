"""Choosing a partition on this machine: calibrate.py (the fit, the timings, the ranks agreeing on a
calibration, the pick and its check against the even split), choose.py (the caches and where a
partition came from) and fast/table.py (the measured chunk times a GPU's cost model reads).

Everything runs in this process with fakes (a clock, a transport, a model), except one MPI job of two
ranks that must agree on a calibration; it has a time limit, so a hang fails.
"""
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import calibrate
import choose
import partition as P
from conftest import MPIRUN
from fast import table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A cache folder of the test's own ($KVR_CACHE)."""
    monkeypatch.setenv("KVR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Clock:
    """A fake time.perf_counter: it moves only when a fake says the work took time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Agreeing:
    """Transport.agree on the rank that decides: decide() runs and its value is everyone's. Records
    what happened, in order, in `events`."""

    def __init__(self, rank=0):
        self.rank, self.events, self.roots = rank, [], []

    def agree(self, decide, root=0):
        self.roots.append(root)
        self.events.append("agree")
        return decide()

    def finish(self):
        self.events.append("finish")

    def reset_stats(self):
        self.events.append("reset_stats")

    def reserve(self, nbytes, slots=2):
        pass


class Following:
    """Transport.agree on a rank that does not decide: it gets the deciding rank's answers, in order,
    and never runs decide() itself."""

    def __init__(self, answers, rank=1):
        self.answers, self.rank = iter(answers), rank

    def agree(self, decide, root=0):
        return next(self.answers)


# ----------------------------------------------------------------------------- calibrate.fit

POINTS = [(c, prev + c) for c in (256, 1024, 2048) for prev in (0, 2048, 8192)]


def kkt_violation(cost, measure, points):
    """How far a fit is from the optimum of non-negative least squares: a coefficient that is
    positive has zero gradient, one that is zero has a gradient >= 0 (relative to the data's scale)."""
    A = np.array([[1.0, c, c * S] for c, S in points])
    norm = np.linalg.norm(A, axis=0)                 # in units where every column has length 1
    A, x = A / norm, np.array([cost.fixed, cost.lin, cost.attn]) * norm
    y = np.array([measure(c, S) for c, S in points])
    g = A.T @ (A @ x - y) / np.linalg.norm(y)
    return max(abs(gi) if xi > 0 else max(0.0, -gi) for xi, gi in zip(x, g))


@pytest.mark.parametrize("truth, support", [
    (lambda c, S: 2e-3 + 1e-9 * c * S - 1e-7 * c, "fixed attn"),       # lin would fit negative
    (lambda c, S: -1e-3 + 3e-5 * c - 1e-11 * c * S, "lin attn"),       # fixed and attn would
    (lambda c, S: 1e-9 * c * S - 1e-6 * c + 1e-4, "attn"),             # the best is one term alone
    (lambda c, S: 5e-3 - 1e-7 * c + 1e-12 * c * S, "fixed"),
    (lambda c, S: 1e-4 * (1 + (c * S) % 7) - 1e-6 * c, ""),            # noise falling with c: nothing
])
def test_fit_is_the_best_non_negative_fit(truth, support):
    """The fit never has a negative coefficient, and no non-negative one fits the timings better
    (the optimality conditions of non-negative least squares hold), whichever terms it needs."""
    got = calibrate.fit(truth, POINTS)
    assert min(got.fixed, got.lin, got.attn) >= 0
    assert " ".join(k for k in ("fixed", "lin", "attn") if getattr(got, k) > 0) == support
    assert kkt_violation(got, truth, POINTS) < 1e-9


def test_fit_of_timings_that_cost_nothing_is_zero_and_keeps_the_fields():
    """Timings of zero fit as all zero, and the fields the timings cannot show are kept as passed."""
    got = calibrate.fit(lambda c, S: 0.0, POINTS, n_layers=7, comm_per_token=3e-6, latency=2e-4, head=5e-3)
    assert (got.fixed, got.lin, got.attn) == (0.0, 0.0, 0.0)
    assert (got.n_layers, got.comm_per_token, got.latency, got.head) == (7, 3e-6, 2e-4, 5e-3)
    assert all(type(v) is float for v in (got.fixed, got.lin, got.attn))   # JSON writes them as numbers


# ----------------------------------------------------------------------------- calibrate.calibrate_model

class StubModel:
    """model.py's Transformer as calibrate_model sees it, running behind the host as on a GPU: a
    forward of c tokens ending at S (start S - c) queues truth(c, S) of work, which the fake clock
    counts when sync() waits for it. On each fresh KV cache the first timed forward (the warm-up,
    ending at the cache's capacity) takes no time and the third spikes by 1 s; a prefix takes 10 s."""

    def __init__(self, truth, clock):
        self.cfg = SimpleNamespace(vocab_size=50, n_layers=3, n_kv_heads=1, head_dim=2)
        self.truth, self.clock, self.calls, self.timed, self.queued = truth, clock, [], {}, 0.0

    def parameters(self):
        return iter([torch.zeros(1)])

    def sync(self, device):
        self.clock.now += self.queued
        self.queued = 0.0

    def __call__(self, tokens, kv, start, last_only=False):
        c = tokens.shape[1]
        self.calls.append((start, c, kv.capacity))
        if start + c == kv.capacity:                   # the forward calibrate_model times
            n = self.timed[kv] = self.timed.get(kv, 0) + 1      # (keyed by the cache itself: ids are reused)
            self.queued += 0.0 if n == 1 else self.truth(c, start + c) + (1.0 if n == 3 else 0.0)
        else:                                          # the prefix, filled untimed
            self.queued += 10.0


def test_calibrate_model_times_each_chunk_after_its_prefix_and_keeps_the_fastest_run(monkeypatch):
    """On a CPU: six (c, S) up to max_len, varied in both; the prefix filled first and not timed (its
    queued work waited for before the clock starts, the chunk's before it stops); the fastest of
    `repeats` runs after a warm-up that is not counted. The fit recovers the truth, n_layers comes from
    the model, the other fields pass through, and no chunk times are kept."""
    clock = Clock()
    monkeypatch.setattr(calibrate, "time", SimpleNamespace(perf_counter=clock))
    truth = lambda c, S: 4e-3 + 2e-5 * c + 3e-8 * c * S   # noqa: E731
    model = StubModel(truth, clock)
    monkeypatch.setattr(calibrate, "sync", model.sync)
    got = calibrate.calibrate_model(model, max_len=64, repeats=4, head=0.25)
    assert (got.fixed, got.lin, got.attn) == pytest.approx((4e-3, 2e-5, 3e-8), rel=1e-6)
    assert (got.n_layers, got.head, got.measured) == (3, 0.25, [])
    points = {(c, S) for start, c, S in model.calls if start + c == S}
    assert len(points) == 6 and max(S for _, S in points) == 64
    assert len({c for c, _ in points}) > 1 and len({S - c for c, S in points}) > 1
    assert sorted(model.timed.values()) == [5] * 6      # 1 warm-up + 4 repeats, each point
    for start, c, S in model.calls:                     # every forward is a prefix from 0 or the chunk
        assert start == 0 or start + c == S


# ----------------------------------------------------------------------------- calibrate.measure

class Link:
    """Rank 0's transport while calibrate.measure times the link: a round trip (send n tokens' K/V,
    receive the ack) takes 2 one_way + per_token n on the fake clock, the first and the fifth of each
    size 1 s more (a cold start, a spike)."""

    def __init__(self, clock, one_way, per_token):
        self.clock, self.one_way, self.per_token = clock, one_way, per_token
        self.polite, self.polite_seen, self.trips, self.sent = True, [], {}, None

    def agree(self, decide, root=0):
        return decide()

    def reserve(self, nbytes, slots=2):
        pass

    def isend(self, t, dest, tag):
        self.polite_seen.append(self.polite)
        if t.dim() == 5:
            self.sent = t.shape[1]                     # (B, n, 2, n_kv, hs): n tokens

    def finish(self):
        pass

    def recv(self, shape, dtype, source, tag):
        n = self.sent
        self.trips[n] = self.trips.get(n, 0) + 1
        self.clock.now += 2 * self.one_way + self.per_token * n + (1.0 if self.trips[n] in (1, 5) else 0.0)
        return torch.zeros(shape, dtype=dtype)


def measure_job(transport, rank=0, size=2, prompt=100, device="cpu"):
    cfg = SimpleNamespace(n_layers=4, n_kv_heads=2, head_dim=8)
    return SimpleNamespace(transport=transport, rank=rank, size=size, tokens=SimpleNamespace(shape=(1, prompt)),
                           device=torch.device(device) if device == "cpu" else SimpleNamespace(type=device),
                           model=SimpleNamespace(cfg=cfg), dtype=torch.float32)


@pytest.fixture
def chunks(monkeypatch):
    """calibrate_model replaced by a fit of fixed coefficients; records the max_len it was asked for."""
    asked = []

    def fake(model, device, dtype, max_len):
        asked.append(max_len)
        return P.CostModel(lin=1e-5, attn=1e-9, n_layers=4)
    monkeypatch.setattr(calibrate, "calibrate_model", fake)
    return asked


def test_measure_takes_the_link_one_way_from_the_fastest_round_trips(monkeypatch, chunks):
    """The latency is half the round trip of one token (one way), the cost per token the slope of the
    round trip between 1 and 4096 tokens, both for all layers; the fastest of the tries counts, the
    waits spin while timing and are polite again after."""
    clock = Clock()
    monkeypatch.setattr(calibrate, "time", SimpleNamespace(perf_counter=clock))
    link = Link(clock, one_way=1e-5, per_token=3e-9)
    got = calibrate.measure(measure_job(link))
    assert got.latency == pytest.approx((1e-5 + 3e-9 / 2) * 4, rel=1e-9)
    assert got.comm_per_token == pytest.approx(3e-9 * 4, rel=1e-6)
    assert (got.lin, got.attn) == (1e-5, 1e-9)
    assert link.trips == {1: 5, 4096: 5}
    assert link.polite_seen and not any(link.polite_seen) and link.polite is True


class Echo:
    """Rank 1's transport while calibrate.measure times the link: it receives rank 0's K/V and
    sends an ack back, which takes time on the fake clock."""

    def __init__(self, clock):
        self.clock, self.polite, self.got, self.acks = clock, True, [], 0

    def agree(self, decide, root=0):
        return decide()

    def reserve(self, nbytes, slots=2):
        pass

    def recv(self, shape, dtype, source, tag):
        self.got.append((source, shape[1]))            # (B, n, 2, n_kv, hs): n tokens
        self.clock.now += 1e-3 * shape[1]
        return torch.zeros(shape, dtype=dtype)

    def isend(self, t, dest, tag):
        self.acks += dest == 0 and t.numel() == 1

    def finish(self):
        pass


def test_measure_on_rank_1_answers_each_round_trip_and_keeps_the_default_link(monkeypatch, chunks):
    """Rank 1 receives each of rank 0's 5 + 5 messages and acknowledges it; the link figures are rank
    0's alone (rank 1's copy keeps CostModel's defaults, which calibrate never judges)."""
    clock = Clock()
    monkeypatch.setattr(calibrate, "time", SimpleNamespace(perf_counter=clock))
    echo = Echo(clock)
    got = calibrate.measure(measure_job(echo, rank=1))
    assert echo.got == [(0, 1)] * 5 + [(0, 4096)] * 5 and echo.acks == 10 and echo.polite is True
    assert got == P.CostModel(lin=1e-5, attn=1e-9, n_layers=4)


def test_measure_takes_a_round_trip_that_noise_inverted_as_a_free_link(monkeypatch, chunks):
    """4096 tokens back faster than 1 (timings spiked): the cost per token is 0, not negative, and
    the calibration is implausible, so it is measured again."""
    clock = Clock()
    monkeypatch.setattr(calibrate, "time", SimpleNamespace(perf_counter=clock))
    got = calibrate.measure(measure_job(Link(clock, one_way=1e-5, per_token=-1e-9)))
    assert got.comm_per_token == 0.0 and "comm_per_token = 0.0" in got.implausible()


@pytest.mark.parametrize("kv_heads, head_dim, dtype, device, tokens", [
    (32, 128, torch.float16, "cuda", 4096),     # Llama-7B: 4096 tokens are 64 MiB already
    (1, 64, torch.float16, "cuda", 262144),     # Falcon-7B: 256 B a token, 64 MiB on a GPU
    (1, 64, torch.float16, "cpu", 4096),        # on a CPU, 4096 tokens whatever their size
])
def test_the_link_is_timed_with_a_message_above_its_jitter(kv_heads, head_dim, dtype, device, tokens):
    """The large message of the link's timing: 4096 tokens, on a GPU at least 64 MiB (Falcon-7B's
    4096 tokens, 1 MiB, timed no slower than 1 token on the H100)."""
    cfg = SimpleNamespace(n_kv_heads=kv_heads, head_dim=head_dim)
    assert calibrate.link_tokens(cfg, dtype, device) == tokens


@pytest.mark.parametrize("prompt, device, max_len", [
    (100, "cpu", 1024),                    # 1k tokens at least
    (10000, "cpu", 4096),                  # on a CPU, at most 4096
    (10000, "cuda", 10000),                # on a GPU, all of the prompt
])
def test_measure_times_chunks_up_to_the_prompt_within_limits(prompt, device, max_len, chunks):
    """The chunks are timed up to the prompt's length, at least 1024 tokens, on a CPU at most 4096;
    one rank has no link to time, and keeps the fit as it is."""
    got = calibrate.measure(measure_job(Agreeing(), size=1, prompt=prompt, device=device))
    assert chunks == [max_len] and got == P.CostModel(lin=1e-5, attn=1e-9, n_layers=4)


# ----------------------------------------------------------------------------- calibrate.calibrate

def test_calibrate_on_a_rank_that_does_not_decide_saves_and_says_nothing(monkeypatch, cache):
    """Rank 0 alone judges the fit and writes the file: another rank, whose copy of the fit lacks the
    link, follows rank 0's verdicts (refused, then plausible), measures as often, and writes nothing."""
    measured, said = [], []
    monkeypatch.setattr(calibrate, "measure", lambda job: measured.append(1) or P.CostModel(attn=0.0))
    monkeypatch.setattr(calibrate, "say", said.append)
    job = SimpleNamespace(transport=Following(["attn = 0.0 (not positive)", None, None]), rank=1, model_key="m")
    calibrate.calibrate(job, "on first use")
    assert len(measured) == 2 and said == [] and not os.path.exists(choose.calibration_path())


AGREE_JOB = r"""
import faulthandler, json, sys
from types import SimpleNamespace
import calibrate, partition, transport
faulthandler.dump_traceback_later(40, exit=True)     # a rank still waiting then says where, and ends
comm, device = transport.init("cpu")
t = transport.Transport(comm, device, polite=True)
good, no_link = partition.CostModel(comm_per_token=2e-6, latency=1e-4), partition.CostModel(comm_per_token=0.0)
fits = {  # key: each rank's fits, one per call of measure (rank 0's alone holds the link it measured)
    "rank0-bad-once": {0: [no_link, good], 1: [partition.CostModel()] * 2},
    "rank1-bad": {0: [good], 1: [no_link] * 3},
    "rank0-bad-always": {0: [no_link] * 3, 1: [partition.CostModel()] * 3},
}
for key, mine in fits.items():
    count = []
    def measure(job):
        job.transport.agree(lambda: None)            # the chunks are timed for all ranks, as in measure
        count.append(1)
        return mine[t.rank][len(count) - 1]
    calibrate.measure = measure
    calibrate.say = lambda line: None
    try:
        calibrate.calibrate(SimpleNamespace(transport=t, rank=t.rank, model_key=key), "on first use")
        out = "ok"
    except ValueError as e:
        out = str(e)
    with open(sys.argv[1] + f"/rank{t.rank}.jsonl", "a") as f:   # (ranks' prints can interleave)
        f.write(json.dumps({"key": key, "rank": t.rank, "measured": len(count), "out": out}) + "\n")
"""


def run_ranks(n, code, folder, timeout=50):
    """`mpirun -n n python -c code folder` with KVR_CACHE=folder; the lines the ranks wrote to
    folder/rankR.jsonl. A job still running after `timeout` s (under pytest.ini's minute) is ended,
    its ranks with it, and fails."""
    proc = subprocess.Popen([MPIRUN, "-n", str(n), sys.executable, "-c", code, str(folder)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "KVR_CACHE": str(folder)})
    hung = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
        proc.terminate()                               # mpirun passes it on to the ranks
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    wrote = "".join(p.read_text() for p in sorted(folder.glob("rank*.jsonl")))
    assert not hung and proc.returncode == 0, f"hung: {hung}\n" + wrote + out + err[-3000:]
    return [json.loads(line) for line in wrote.splitlines()]


def test_ranks_agree_on_a_calibration_that_only_rank_0_can_judge(tmp_path):
    """Two real ranks whose copies of the fit disagree (rank 0's measured link is free, rank 1's copy
    has the default link, or the other way round): both follow rank 0's verdict, measure as often,
    and end the same way; what is saved is rank 0's plausible fit. Judging each its own copy left
    one rank waiting for ever."""
    lines = run_ranks(2, AGREE_JOB, tmp_path)
    got = {(r["key"], r["rank"]): (r["measured"], r["out"]) for r in lines}
    assert got[("rank0-bad-once", 0)] == got[("rank0-bad-once", 1)] == (2, "ok")
    assert got[("rank1-bad", 0)] == got[("rank1-bad", 1)] == (1, "ok")
    assert got[("rank0-bad-always", 0)] == got[("rank0-bad-always", 1)]
    assert got[("rank0-bad-always", 0)][0] == 3 and "gave comm_per_token = 0.0" in got[("rank0-bad-always", 0)][1]
    good = P.CostModel(comm_per_token=2e-6, latency=1e-4)
    saved = choose.calibrations(str(tmp_path / "calibration.json"))
    assert saved == {"rank0-bad-once": good, "rank1-bad": good}


SLOTS_JOB = """
import json, sys
from bench import measured
from fast.staged import StagedTransport
from transport import MPI
sent, send = [], StagedTransport._send
def _send(self, t, dest, tag):                           # did this message go by a shared slot?
    sent.append(self._shared(self.rank, t.numel() * t.element_size()))
    return send(self, t, dest, tag)
StagedTransport._send = _send
measured.main(["ranks", "--device", "cpu", "--model", "builtin:llama", "--dtype", "float32", "--C", "6400",
               "--variants", "KVR-E", "KVR-S", "--repeats", "1", "--out", sys.argv[1] + "/ranks.json"])
with open(sys.argv[1] + f"/rank{MPI.COMM_WORLD.rank}.jsonl", "w") as f:
    f.write(json.dumps({"rank": MPI.COMM_WORLD.rank, "slotted": sent.count(True), "not": sent.count(False)}) + "\\n")
"""


@pytest.mark.timeout(240)
def test_the_search_of_bench_measured_ranks_is_timed_on_the_route_its_runs_take(tmp_path, monkeypatch):
    """3 staged ranks (their protocol on the CPU) calibrate with 4096 tokens' slots, then KVR-S is
    timed against the even split at 6400 tokens, where rank 1 sends 4267: every message of the
    search and the runs goes by a slot, as in the timed runs, none through MPI's private buffers
    (32 of rank 1's 50 did, so the search timed a slower route than the one it chose for)."""
    monkeypatch.setenv("KVR_ROUTE", "staged")
    lines = run_ranks(3, SLOTS_JOB, tmp_path, timeout=220)
    got = {r["rank"]: (r["slotted"], r["not"]) for r in lines}
    assert got[0][0] > 0 and got[1][0] > 0 and got[2] == (0, 0), got      # the last rank sends nothing
    assert got[0][1] == got[1][1] == 0, got


LIVE_JOB = """
import json, sys
from bench import measured
from transport import MPI
measured.main(["ranks", "--device", "cpu", "--model", "builtin:llama", "--dtype", "float32", "--C", "768",
               "--variants", "KVR-E", "KVR-S", "--repeats", "1", "--live-span", "64", "--out", sys.argv[1] + "/r.json"])
if MPI.COMM_WORLD.rank == 0:
    with open(sys.argv[1] + "/rank0.jsonl", "w") as f:
        f.write(json.dumps(json.load(open(sys.argv[1] + "/r.json"))["rows"]) + "\\n")
"""


@pytest.mark.timeout(120)
def test_bench_measured_ranks_can_search_kvr_s_live(tmp_path):
    """--live-span: KVR-S is what a live search near the cost model's pick measured best, the table's
    entry afterwards, and its row says how it was chosen."""
    (rows,) = run_ranks(2, LIVE_JOB, tmp_path, timeout=110)
    kvrs = next(r for r in rows if r["variant"] == "KVR-S")
    assert kvrs["partition"] == choose.load_table(str(tmp_path / "partitions.json")).get(
        "llama-d256-L4-h8-kv2-float32-cpu", 2, 768)
    assert kvrs["chosen"].startswith("live search within 64 tokens of: searched on calibration of llama-d256")


# ----------------------------------------------------------------------------- calibrate.pick_partition

def pick_job(C, p, device="cpu"):
    return SimpleNamespace(tokens=SimpleNamespace(shape=(1, C)), size=p, model_key="m", rank=0,
                           transport=Agreeing(), device=SimpleNamespace(type=device))


@pytest.fixture
def calibrations(monkeypatch, cache):
    """calibrate.calibrate replaced: records why it was asked, and saves a plausible fit."""
    asked = []

    def fake(job, why):
        asked.append(why)
        choose.save_calibration(job.model_key, FRONT)
    monkeypatch.setattr(calibrate, "calibrate", fake)
    return asked


FRONT = P.CostModel(lin=1e-6, attn=1e-6, comm_per_token=1e-9, latency=0.0)   # attention dominates: front-loaded


def save_table(*partitions, model="m"):
    t = P.Table()
    for c in partitions:
        t.add(model, c)
    t.save(choose.table_path())


@pytest.mark.parametrize("spec, table, saved, device, recalibrate, why", [
    ("even", [], None, "cpu", True, None),                         # no cost model needed
    ("60,40", [], None, "cpu", True, None),
    ("searched", [[70, 30]], None, "cpu", True, None),             # the table has (m, 2, 100)
    ("predicted", [[140, 60]], None, "cpu", True, None),           # ... has (m, 2, 200): interpolated
    ("searched", [[140, 60]], None, "cpu", False, "on first use"),  # searched needs this very C
    ("predicted", [[14, 6, 5]], None, "cpu", False, "on first use"),  # ... and predicted this p
    ("searched", [], FRONT, "cpu", False, None),                   # a plausible calibration is used
    ("searched", [], FRONT, "cpu", True, "as asked (--recalibrate)"),
    ("predicted", [], P.CostModel(attn=0.0), "cpu", False, "again (the saved one has attn = 0.0 (not positive))"),
    ("searched", [], FRONT, "cuda", False, "again (the saved one has no chunk times)"),   # a GPU's needs them
    ("searched", [], P.CostModel(**{**asdict(FRONT), "measured": [[50, 0, 1e-3]]}), "cuda", False, None),
])
def test_pick_partition_calibrates_only_when_the_cost_model_is_needed_and_missing_or_unfit(
        calibrations, spec, table, saved, device, recalibrate, why):
    """A given or even split, or a table entry that answers (for predicted, any context for this p),
    needs no calibration, even with --recalibrate; else the cost model is calibrated on first use, when
    asked, when the saved one is implausible, or on a GPU when it lacks chunk times."""
    save_table(*table)
    if saved:
        choose.save_calibration("m", saved)
    job = pick_job(100, 2, device)
    calibrate.pick_partition(job, spec, recalibrate)
    assert calibrations == ([why] if why else [])
    assert job.c == choose.explain(spec, 100, 2, "m")[0] and P.validate(job.c, 100, 2)


def test_pick_partition_marks_a_partition_searched_on_the_cost_model(calibrations):
    """c_modelled: the pick came from the cost model and is not the even split (versus_even times it);
    a table entry, or a search that ends at the even split, is not."""
    job = pick_job(100, 2)
    calibrate.pick_partition(job, "searched")
    assert calibrations == ["on first use"] and job.c == P.searched(100, 2, FRONT.ttft) != P.even(100, 2)
    assert job.c_modelled and job.c_source.startswith("searched on calibration of m: ")
    job = pick_job(100, 1)                                      # one rank: the only partition is even
    calibrate.pick_partition(job, "searched")
    assert job.c == [100] and not job.c_modelled
    save_table([70, 30])
    job = pick_job(100, 2)
    calibrate.pick_partition(job, "searched")
    assert job.c == [70, 30] and not job.c_modelled and job.c_source == f"table {choose.table_path()}"
    job = pick_job(100, 2)
    calibrate.pick_partition(job, "even")
    assert (job.c, job.c_source, job.c_modelled) == ([50, 50], "even split", False)


# ----------------------------------------------------------------------------- calibrate.versus_even

def versus_job(c, C=100):
    return SimpleNamespace(tokens=SimpleNamespace(shape=(1, C)), size=len(c), model_key="m", transport=Agreeing(),
                           c=list(c), c_source="searched on calibration of m")


def test_versus_even_keeps_the_faster_by_median_stores_only_it_and_counts_the_run_afresh(cache):
    """The two are timed alternately, 3 times each; the lower median wins (the cold first run of the
    pick does not decide), goes into the table and runs; the TTFT figures are the last rank's; the
    message counts start again after the timing."""
    times = {(70, 30): iter([0.050, 0.001, 0.001]), (50, 50): iter([0.002] * 3)}
    job, calls = versus_job([70, 30]), []

    def prefill(job, c):
        calls.append(tuple(c))
        job.transport.events.append("prefill")
        return None, None, next(times[tuple(c)])
    calibrate.versus_even(job, prefill)
    assert calls == [(70, 30), (50, 50)] * 3
    assert job.c == [70, 30] and choose.load_table().entries == {"m": {2: {100: [70, 30]}}}
    assert job.c_source == ("searched on calibration of m; timed against the even split: 1 vs 2 ms, "
                            f"searched kept, saved to {choose.table_path()}")
    assert job.transport.events[-1] == "reset_stats" and "prefill" not in job.transport.events[
        job.transport.events.index("reset_stats"):]
    assert 1 in job.transport.roots                              # rank p - 1 = 1 says what the times were


def test_versus_even_keeps_the_even_split_when_it_is_faster(cache):
    """A pick the cost model misjudged loses to the even split: the even split runs and is stored,
    over what the table held for this (model, p, C)."""
    save_table([90, 10])
    job = versus_job([70, 30])
    calibrate.versus_even(job, lambda job, c: (None, None, 0.003 if c == [70, 30] else 0.002))
    assert job.c == [50, 50] and choose.load_table().get("m", 2, 100) == [50, 50]
    assert job.c_source.endswith(f"3 vs 2 ms, even kept, saved to {choose.table_path()}")


def made(C):
    """A KV cache of C tokens already made (kvcache.cache_for keeps it): for a stand-in prefill."""
    return SimpleNamespace(capacity=C, reset=lambda: None)


@pytest.mark.parametrize("device, C, attn", [("cpu", 60, 1e-8), ("cuda", 1000, 1e-8), ("cuda", 1000, 1e-9)])
def test_live_search_stores_the_best_measured_partition(cache, capsys, device, C, attn):
    """Rank 0 searches with the median of --repeats real prefills as the score; the best goes into
    the table under the model's key. On a GPU an untimed prefill comes first (the cold one), the
    search is on whole tiles (choose.alignment), and the even split, which no tile partition of 1000
    tokens is, is measured too, and kept where it wins (attention cheap enough: 1e-9)."""
    truth = P.CostModel(lin=1e-6, attn=attn, comm_per_token=0, latency=0)
    runs = {}

    def prefill(job, c):
        n = runs[tuple(c)] = runs.get(tuple(c), 0) + 1
        return None, None, truth.ttft(c) * (5 if n == 1 else 1)    # the first run of each is cold
    comm = SimpleNamespace(bcast=lambda value, root=0: value)
    job = SimpleNamespace(comm=comm, tokens=SimpleNamespace(shape=(1, C)), size=3, rank=0, model_key="m",
                          transport=Agreeing(), device=SimpleNamespace(type=device), c=P.even(C, 3), cache=made(C))
    calibrate.live_search(job, SimpleNamespace(repeats=3, search_steps=4, search_levels=3, search_span=None), prefill)
    best = min(P.searched(C, 3, truth.ttft, 4, 3, align=choose.alignment(device)), P.even(C, 3), key=truth.ttft)
    warm = device == "cuda"                            # one untimed prefill first, of job.c
    assert choose.load_table().get("m", 3, C) == best and runs.pop(tuple(P.even(C, 3))) == 3 + warm
    assert set(runs.values()) == {3}
    assert (best == P.even(C, 3)) == (attn == 1e-9)
    assert all(S % 128 == 0 for S in P.prefix_sums(best)[:-1]) == (device == "cuda" and attn == 1e-8)
    assert f"best {','.join(map(str, best))}" in capsys.readouterr().out


def test_a_live_search_with_a_span_starts_at_the_partitions_pick(cache, capsys):
    """--search-span: after the untimed warm-up, the search starts at job.c (what --partition
    picked) on tiles and stays near it; a pick off the tile grid is measured too, and kept where
    nothing beats it."""
    truth = P.CostModel(lin=1e-6, attn=1e-8, comm_per_token=0, latency=0)
    pick = P.searched(16384, 4, truth.ttft)           # the optimum, on tokens: off the tile grid
    runs = []

    def prefill(job, c):
        runs.append(tuple(c))
        return None, None, truth.ttft(c)
    comm = SimpleNamespace(bcast=lambda value, root=0: value)
    job = SimpleNamespace(comm=comm, tokens=SimpleNamespace(shape=(1, 16384)), size=4, rank=0, model_key="m",
                          transport=Agreeing(), device=SimpleNamespace(type="cuda"), c=pick, cache=made(16384))
    calibrate.live_search(job, SimpleNamespace(repeats=1, search_steps=4, search_levels=2, search_span=256), prefill)
    assert runs[0] == tuple(pick) and runs[1] == tuple(P.aligned(16384, 4, 128)[1](P.tiles(pick, 128, 128)))
    assert 10 < len(set(runs)) < 100 and len(runs) == len(set(runs)) + 1 and runs.count(tuple(pick)) == 2
    assert choose.load_table().get("m", 4, 16384) == pick and tuple(P.even(16384, 4)) in runs
    assert max(abs(a - b) for c in runs[:-2] for a, b in zip(P.prefix_sums(c), P.prefix_sums(pick))) <= 1024
    assert f"best {','.join(map(str, pick))}" in capsys.readouterr().out


class FrontOfChain(Agreeing):
    """Rank 0's transport in a chain of 3 whose other ranks are not there: its sends go nowhere."""
    size = 3

    def barrier(self):
        pass

    def isend(self, t, dest, tag):
        pass


def test_a_live_search_fills_one_kv_cache_per_rank(cache):
    """Every candidate of a live search prefills into the same memory on each rank, a cache made for C
    tokens before the first (CUDA-aware MPI keeps each buffer it read from mapped: one per rank, not
    one per candidate). Rank 0's real prefills, its chunk of another size in most candidates."""
    import runahead
    from model import builtin
    C, caches = 48, []

    def prefill(job, c):
        out = runahead.prefill(job, c)
        caches.append((out[1].kv[0].data_ptr(), out[1].capacity, sum(c[:1])))
        return out
    job = SimpleNamespace(comm=SimpleNamespace(bcast=lambda value, root=0: value), size=3, rank=0, model_key="m",
                          tokens=torch.randint(3, 1024, (1, C)), model=builtin("llama"), dtype=torch.float32,
                          device=torch.device("cpu"), transport=FrontOfChain(), c=P.even(C, 3), cache=None)
    calibrate.live_search(job, SimpleNamespace(repeats=1, search_steps=4, search_levels=2, search_span=None), prefill)
    assert len({S for _, _, S in caches}) > 3                # rank 0's chunk took many sizes ...
    assert {(ptr, cap) for ptr, cap, _ in caches} == {(caches[0][0], C)}   # ... in one cache of C tokens


# ----------------------------------------------------------------------------- choose.py: the caches

def test_the_caches_are_saved_into_folders_that_do_not_exist_yet(tmp_path):
    """A first run on a machine: the cache folder, two levels deep, is made for either file."""
    cost, deep = P.CostModel(lin=2e-6), tmp_path / "a" / "b"
    choose.save_calibration("m", cost, str(deep / "calibration.json"))
    assert choose.load_calibration("m", str(deep / "calibration.json")) == cost
    t = P.Table()
    t.add("m", [3, 2])
    t.save(str(tmp_path / "c" / "d" / "partitions.json"))
    assert P.Table.load(str(tmp_path / "c" / "d" / "partitions.json")).entries == {"m": {2: {5: [3, 2]}}}


def test_the_default_caches_are_made_in_a_cache_folder_that_does_not_exist_yet(cache):
    """With no path given, the files go into $KVR_CACHE, made if missing."""
    choose.save_calibration("m", FRONT)
    save_table([3, 2])
    assert sorted(os.listdir(cache)) == ["calibration.json", "partitions.json"]
    assert choose.load_calibration("m") == FRONT and choose.load_table().get("m", 2, 5) == [3, 2]


def test_saving_a_calibration_replaces_that_models_and_keeps_the_others(tmp_path):
    path = str(tmp_path / "cal.json")
    choose.save_calibration("a", P.CostModel(lin=1.0), path)
    choose.save_calibration("b", P.CostModel(lin=2.0), path)
    choose.save_calibration("a", P.CostModel(lin=3.0), path)
    assert choose.calibrations(path) == {"a": P.CostModel(lin=3.0), "b": P.CostModel(lin=2.0)}


def test_no_cache_yet_is_empty_and_a_file_of_the_wrong_shape_is_refused_by_name(cache, tmp_path):
    """No files: no calibrations, an empty table. A calibration file that is not {model: cost model},
    or a table whose entry is not a partition, is a ValueError naming the file (check_caches reads both)."""
    assert choose.calibrations() == {} and choose.load_table().entries == {} and choose.load_calibration("m") is None
    choose.check_caches()
    os.makedirs(cache)
    (cache / "calibration.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(f"{cache / 'calibration.json'}: not a set of calibrations")):
        choose.check_caches()
    (cache / "calibration.json").write_text(json.dumps({"m": {"lin": True}}))
    with pytest.raises(ValueError, match=r"calibration.json: entry 'm': every field of a cost model is a number"):
        choose.check_caches()
    (cache / "calibration.json").unlink()
    (cache / "partitions.json").write_text(json.dumps({"m": {"2": {"12": [5, 5]}}}))
    with pytest.raises(ValueError, match="partitions.json: entry 'm', p=2, C=12: partition 5,5 sums to 10"):
        choose.check_caches()


@pytest.mark.parametrize("raw, fragment", [
    ({"m": {"2": {"12": [5, 5]}}}, "entry 'm', p=2, C=12: partition 5,5 sums to 10, prompt has 12 tokens"),
    ({"m": {"3": {"10": [5, 5]}}}, "entry 'm', p=3, C=10: partition 5,5 has 2 chunks for 3 ranks"),
    ({"m": {"2": {"10": [True, 9]}}}, "entry 'm', p=2, C=10: partition True,9 has a chunk that is not an integer"),
    ({"m": {"2": {"10": [10, 0]}}}, "entry 'm', p=2, C=10: partition 10,0 has an empty chunk"),
    ({"m": {"two": {"10": [5, 5]}}}, "entry 'm', p=two, C=10"),
    ({"m": {"2": {"10": 10}}}, "entry 'm', p=2, C=10"),
    ({"m": [[5, 5]]}, "not a table of partitions"),
    ([["m", 2, 10, [5, 5]]], "not a table of partitions"),
])
def test_table_load_refuses_an_entry_that_is_not_a_partition_of_its_key(tmp_path, raw, fragment):
    """Every entry must be a partition of its own C over its own p ranks, else the file is refused
    with the entry named."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError) as e:
        P.Table.load(str(path))
    assert str(e.value).startswith(f"{path}: ") and fragment in str(e.value)


def test_table_load_reads_keys_as_numbers_and_table_answers_only_its_key(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"m": {"2": {"10": [6, 4], "4": [2, 2]}, "3": {"10": [4, 3, 3]}}}))
    t = P.Table.load(str(path))
    assert t.get("m", 2, 10) == [6, 4] and t.contexts("m", 2) == [4, 10] and t.contexts("m", 3) == [10]
    assert t.get("m", 3, 4) is None and t.get("x", 2, 10) is None and t.contexts("x", 2) == []


@pytest.mark.parametrize("fields, fragment", [
    ({"lin": True}, "every field of a cost model is a number"),
    ({"n_layers": False}, "every field of a cost model is a number"),
    ({"attn": None}, "every field of a cost model is a number"),
    ({"latency": "1e-4"}, "every field of a cost model is a number"),
    ({"measured": [[128, 0, 0.1]], "head": [1]}, "every field of a cost model is a number"),
    ({"lin": 1e-5, "speed": 3}, "unexpected ['speed']"),
    ([1e-5, 1e-9], "not a cost model"),
])
def test_cost_model_from_dict_refuses_what_is_not_a_number(fields, fragment):
    """A cost model's fields are numbers, not booleans, None or strings; an unknown field or a
    value that is not a dict is refused; the message names the source."""
    with pytest.raises(ValueError) as e:
        P.CostModel.from_dict(fields, "here")
    assert str(e.value).startswith("here: ") and fragment in str(e.value)


def test_cost_model_from_dict_takes_integers_and_partial_fields():
    got = P.CostModel.from_dict({"lin": 1, "n_layers": 8, "measured": [[128, 0, 1]]}, "here")
    assert got == P.CostModel(lin=1, n_layers=8, measured=[[128, 0, 1]])


@pytest.mark.parametrize("fields, said", [
    ({}, None),
    ({"lin": 0.0, "fixed": 0.0}, None),                     # the linear term may fit as 0
    ({"attn": 0.0}, "attn = 0.0 (not positive)"),
    ({"attn": -1e-9}, "attn = -1e-09 (not positive)"),
    ({"attn": float("nan")}, "attn = nan (not positive)"),
    ({"comm_per_token": 0.0}, "comm_per_token = 0.0 (not positive)"),
    ({"attn": 0.0, "comm_per_token": 0.0}, "attn = 0.0, comm_per_token = 0.0 (not positive)"),
])
def test_implausible_names_what_costs_nothing(fields, said):
    """Attention or the link that is free (or not a number) makes a calibration implausible, and the
    reason names each; a linear term of 0 does not."""
    assert P.CostModel(**fields).implausible() == said


# ----------------------------------------------------------------------------- choose.explain

def test_explain_says_where_each_partition_came_from(cache, tmp_path):
    """given, even split, the table (its path), interpolated from it, and a search on the given cost
    model, the model's calibration (saying when it read measured chunk times), or the defaults, with
    the predicted TTFT of the pick, of the even split and of TSP."""
    assert choose.explain("6,4", 10, 2) == ([6, 4], "given")
    assert choose.explain("even", 10, 2) == ([5, 5], "even split")
    save_table([70, 30], [14, 6])
    path = choose.table_path()
    assert choose.explain("searched", 100, 2, "m") == ([70, 30], f"table {path}")
    assert choose.explain("predicted", 60, 2, "m") == ([42, 18], f"interpolated from table {path}")

    def searched(how, C, p, cost, source):
        c = P.searched(C, p, cost.ttft)
        return c, (f"{how} on {source}: predicted TTFT {cost.ttft(c):.4g} s, even split "
                   f"{cost.ttft(P.even(C, p)):.4g} s, TSP {cost.ttft_tsp(C, p):.4g} s")
    assert choose.explain("searched", 60, 2, "m") == searched(
        "searched", 60, 2, P.CostModel(), "CostModel() defaults (H100, uncalibrated)")
    choose.save_calibration("m", FRONT)
    assert choose.explain("searched", 60, 2, "m") == searched("searched", 60, 2, FRONT, "calibration of m")
    assert choose.explain("searched", 60, 3, "m") == searched("searched", 60, 3, FRONT, "calibration of m")
    assert choose.explain("predicted", 60, 3, "m") == searched(
        "predicted: no table entry for 3 ranks, so searched", 60, 3, FRONT, "calibration of m")
    given = P.CostModel(lin=1e-6, attn=0, comm_per_token=1e-3)
    assert choose.explain("searched", 60, 2, "m", cost=given) == searched("searched", 60, 2, given, "given cost model")
    timed = P.CostModel(**{**asdict(FRONT), "measured": [[30, 0, 1e-3], [60, 0, 3e-3]]})
    choose.save_calibration("m", timed)
    assert choose.explain("searched", 60, 3, "m") == searched(
        "searched", 60, 3, timed, "calibration of m (its chunk times measured)")
    assert choose.explain("searched", 60, 2, "other") == searched(   # another model's table and fit are not read
        "searched", 60, 2, P.CostModel(), "CostModel() defaults (H100, uncalibrated)")


def test_explain_reads_the_table_it_is_given(cache, tmp_path):
    """A table passed by path is read instead of the cache's."""
    save_table([70, 30])
    mine = P.Table()
    mine.add("m", [20, 80])
    mine.save(str(tmp_path / "mine.json"))
    assert choose.explain("searched", 100, 2, "m", table=str(tmp_path / "mine.json")) == (
        [20, 80], f"table {tmp_path / 'mine.json'}")


def test_the_cli_searches_a_given_cost_model_and_refuses_a_bad_one_in_one_line(cache, tmp_path, capsys):
    cost = P.CostModel(lin=1e-6, attn=1e-9, comm_per_token=0, latency=0)
    cost.save(str(tmp_path / "cost.json"))
    choose.main(["searched", "--C", "1000", "-p", "2", "--cost", str(tmp_path / "cost.json")])
    out, err = capsys.readouterr()
    assert out == ",".join(map(str, P.searched(1000, 2, cost.ttft))) + "\n"
    assert err.startswith("# searched on given cost model: predicted TTFT ")
    (tmp_path / "cost.json").write_text(json.dumps({"lin": 1e-6, "speed": 2}))
    with pytest.raises(SystemExit) as e:
        choose.main(["searched", "--C", "1000", "-p", "2", "--cost", str(tmp_path / "cost.json")])
    assert str(e.value.code).startswith(f"choose.py: {tmp_path / 'cost.json'}: not a cost model (unexpected ['speed']")


# ----------------------------------------------------------------------------- fast/table.py

def test_lerp_is_exact_at_points_linear_between_flat_below_and_extended_above():
    xs, ys = [1, 2, 4], [10.0, 20.0, 40.0]
    for x, y in [(1, 10), (2, 20), (4, 40), (1.5, 15), (3, 30), (0, 10), (-5, 10), (6, 60)]:
        assert table.lerp(xs, ys, x) == pytest.approx(y), x
    assert table.lerp([1, 2], [5.0, 3.0], 4) == pytest.approx(-1.0)        # the last piece, wherever it goes


@pytest.mark.parametrize("x", [0, 4, 5, 6, 1e6])
def test_lerp_through_one_point_is_that_value_everywhere(x):
    """One measured point: its value below, at and beyond it (no division by a zero width)."""
    assert table.lerp([5], [7.0], x) == 7.0


def test_at_interpolates_in_c_within_each_prefix_and_then_in_the_prefix():
    rows = {0: ([100, 200], [(1.0, 10.0), (3.0, 30.0)]), 100: ([100, 200], [(2.0, 20.0), (6.0, 60.0)])}
    assert table.at(rows, 150, 0) == pytest.approx(2.0)
    assert table.at(rows, 150, 50) == pytest.approx(3.0)              # 2.0 at P = 0, 4.0 at P = 100
    assert table.at(rows, 150, 50, k=1) == pytest.approx(30.0)        # time k of each
    assert table.at(rows, 50, 200) == pytest.approx(3.0)              # below c: the first; past P: extended
    assert table.at(rows, 200, 100) == 6.0


def test_at_with_one_prefix_row_or_one_chunk_per_row_never_divides_by_zero():
    """A table of one row (one prefix measured), or of rows of one chunk each, or of one point."""
    one_row = {0: ([100, 200], [(1.0,), (3.0,)])}
    assert table.at(one_row, 150, 0) == pytest.approx(2.0) and table.at(one_row, 150, 900) == pytest.approx(2.0)
    one_each = {0: ([100], [(1.0,)]), 200: ([100], [(3.0,)])}
    assert table.at(one_each, 7, 100) == pytest.approx(2.0) and table.at(one_each, 900, 400) == pytest.approx(5.0)
    assert table.at({50: ([100], [(4.0,)])}, 10, 0) == 4.0 and table.at({50: ([100], [(4.0,)])}, 500, 900) == 4.0
    assert table.interpolate([(128, 0, 0.5)], 64, 0) == 0.5 and table.interpolate([(128, 0, 0.5)], 512, 512) == 0.5


def test_grid_counts_a_time_above_a_longer_chunks_as_the_longer_ones():
    """Per prefix, chunks ascending; a time above that of any longer chunk after the same prefix is
    noise and counts as the longer chunk's (time by time); other prefixes are not compared."""
    rows = table.grid([(400, 0, (5.0, 5.0)), (100, 0, (9.0, 1.0)), (200, 0, (2.0, 3.0)),
                       (100, 64, (0.5, 0.5)), (200, 64, (0.25, 0.75))])
    assert rows == {0: ([100, 200, 400], [(2.0, 1.0), (2.0, 3.0), (5.0, 5.0)]),
                    64: ([100, 200], [(0.25, 0.5), (0.25, 0.75)])}
    assert table.interpolate([(100, 0, 9.0), (200, 0, 2.0)], 150, 0) == 2.0


def test_a_chunk_measured_twice_counts_once_at_its_faster_time():
    """Two rows for the same (c, P) (a hand-edited calibration.json, or a --cost file) are one point:
    before, the row held the chunk twice and interpolating beside it divided by zero."""
    rows = table.grid([(100, 0, (1.0,)), (100, 0, (1.2,)), (100, 200, (2.0,)), (300, 200, (4.0,)), (300, 200, (3.0,))])
    assert rows == {0: ([100], [(1.0,)]), 200: ([100, 300], [(2.0,), (3.0,)])}
    m = P.CostModel.from_dict({"measured": [[100, 0, 1.0], [100, 0, 1.2], [100, 200, 2.0]]}, "x")
    assert m.chunk_time(150, 200) == pytest.approx(1.0 + (2.0 - 1.0) * 50 / 200)


def test_points_cover_the_prompt_in_fifteen_chunks_after_four_prefixes():
    """calibrate.py's GPU grid: chunks of max_len/16 .. max_len/2 after prefixes 0 .. 3/4 max_len,
    none past max_len, and the longest reaching it (so the times cover a prompt of max_len)."""
    pts = table.points(4096)
    assert len(pts) == len(set(pts)) == 15
    assert {c for c, _ in pts} == {256, 512, 1024, 2048} and {S - c for c, S in pts} == {0, 1024, 2048, 3072}
    assert all(0 < c <= S <= 4096 for c, S in pts)
    assert table.reach([[c, S - c, 1.0] for c, S in pts]) == 4096 and table.reach([]) == 0


@pytest.mark.parametrize("fields, ok", [
    ({}, True),
    ({"lin": 1, "attn": 2.5, "measured": [[1, 0, 0.5], [2, 1.5, 1]]}, True),
    ({"lin": True}, False),
    ({"measured": [[1, 0, True]]}, False),
    ({"measured": [(1, 0, 0.5)]}, False),        # JSON holds lists
    ({"measured": [[1, 0, 0.5, 2]]}, False),
    ({"measured": "[[1, 0, 0.5]]"}, False),
    ({"head": "1"}, False),
])
def test_plain_is_numbers_and_rows_of_three(fields, ok):
    assert table.plain(fields) is ok


def test_chunk_time_with_one_measured_row_is_its_time_up_to_its_reach_and_the_fit_beyond():
    """One measured chunk (100 tokens after 50): every chunk ending at or before 150 takes its time
    (plus the fixed cost), a longer prompt the fit."""
    m = P.CostModel(lin=1e-3, attn=1e-6, fixed=0.1, measured=[[100, 50, 0.5]])
    assert m.chunk_time(10, 20) == pytest.approx(0.6)
    assert m.chunk_time(100, 150) == pytest.approx(0.6)
    assert m.chunk_time(100, 151) == pytest.approx(0.1 + 1e-3 * 100 + 1e-6 * 100 * 151)
    assert m.ttft([75, 75]) > 0                     # a whole partition over one point: no division by zero


def test_chunk_time_with_one_prefix_row_interpolates_in_c_for_every_prefix():
    m = P.CostModel(fixed=0.0, measured=[[100, 0, 1.0], [300, 0, 2.0]])
    assert m.chunk_time(200, 200) == pytest.approx(1.5)
    assert m.chunk_time(200, 300) == pytest.approx(1.5)     # a prefix of 100: row P = 0 extended


# ----------------------------------------------------------------------------- KVR-P's rounding

@pytest.mark.parametrize("stored, C, want", [
    ([1, 1, 1, 997], 10, [1, 1, 1, 7]),          # boundaries round to 0: pushed right, one token each
    ([997, 1, 1, 1], 10, [7, 1, 1, 1]),          # ... round to C: pushed left
    ([1, 998, 1], 5, [1, 3, 1]),
    ([1, 1], 5, [3, 2]),                          # a boundary at exactly 2.5 rounds up, as even() does
])
def test_predicted_fixes_up_collapsed_boundaries_in_both_directions(stored, C, want):
    """Interpolated boundaries that collapse when rounded are moved apart, first left to right and
    then right to left, so every chunk keeps a token; a fraction half-way between tokens rounds up."""
    t = P.Table()
    t.add("m", stored)
    assert P.predicted(C, len(stored), t, "m") == want
