"""A trace-driven simulator of KV-Runahead and TSP: replay the ranks' measured work against each
other over a modelled network. Pure Python: no torch, no device; bench/profiling.py measures what it replays.

A rank's compute does not depend on the other ranks, only *when* it may go on does. So one device can
time what each of p ranks computes (bench/profiling.py), and a few lines of Python can then play the p ranks
against each other over any network, in microseconds instead of GPU-hours. A rank's work comes in
L+1 segments, cut exactly where a real rank waits for other ranks, the K/V point of each layer (the
recv of the chain, TSP's all-gather):
    0       embedding; layer 0 up to its K/V (norm, QKV, RoPE)
    l       the rest of layer l-1 (attention, o-proj, MLP); layer l up to its K/V
    L       the rest of the last layer; final norm; LM head on the last token

  replay   Play the ranks' segments against each other: the chain's per-layer messages to the
           right neighbour (asynchronous sends, one message at a time per link) or TSP's per-layer
           all-gather (a barrier), over Links of given bandwidth, latency and jitter; each rank
           on a device of its own, or all sharing a few (several ranks on one GPU or core).
  scale    KernelTable: segment times on a grid of (chunk, prefix), interpolated, so that a KVR-S
           search scores thousands of partitions in seconds; build_table makes the KVR-P table.

    python -m bench.profiling --model llama7b --dtype float16 --device cuda --kernels kernels.json
    python -m bench.sim --kernels kernels.json --ps 2,4,8 --Cs 1024,2048,4096,8192,16384
"""
import json
import random
import statistics
import time
from dataclasses import dataclass

import bench
import choose
import cli
import partition
import fast.table

def expand(segs, n_layers):
    """A rank's L+1 segments stretched to n_layers: first, n_layers-1 middles (their median: the
    layers are identical), last. Profile a 4-layer model, simulate 32 layers."""
    assert len(segs) >= 3, "need a model of at least 2 layers to tell a middle segment"
    return [segs[0]] + [statistics.median(segs[1:-1])] * (n_layers - 1) + [segs[-1]]


# ----------------------------------------------------------------------------- links and replays

@dataclass
class Link:
    """One direction of a link: n bytes take (latency + n / bandwidth) * (1 + jitter * u) seconds,
    u uniform in [0, 1), drawn per message from a seeded generator (a noisy network).

    Default latency 10 us: the per-message cost of NCCL or MPI within one node is 5 to 20 us.
    """
    bandwidth: float                                   # bytes / s
    latency: float = 10e-6                             # s per message
    jitter: float = 0.0

    def time(self, nbytes, rng=None):
        t = self.latency + nbytes / self.bandwidth
        return t * (1 + self.jitter * rng.random()) if self.jitter and rng else t


FAST, SLOW = Link(300e9), Link(10e9)                   # the paper's NVLink and its throttled setting


def fit_link(sizes, seconds):
    """The Link through measured one-way times of messages (bytes, s): least squares of
    latency + n / bandwidth. bench/measured.py link measures them (its rows' MiB and one_way_ms)."""
    mx, my = sum(sizes) / len(sizes), sum(seconds) / len(seconds)
    slope = (sum((x - mx) * (y - my) for x, y in zip(sizes, seconds))
             / sum((x - mx) ** 2 for x in sizes))
    return Link(bandwidth=1 / slope, latency=max(0.0, my - slope * mx))


def network(p, bandwidth=300e9, latency=10e-6, jitter=0.0, slow=None):
    """p links, link r from rank r to rank (r+1) % p: the chain uses links 0..p-2, the all-gather's
    ring all p. slow = {r: bandwidth} makes some links slower: a non-uniform network."""
    return [Link((slow or {}).get(r, bandwidth), latency, jitter) for r in range(p)]


def _links(links, n):
    if isinstance(links, Link):
        return [links] * n
    assert len(links) >= n, f"{len(links)} links for {n} hops"
    return list(links[:n])


@dataclass
class Replay:
    finish: list                                       # per rank: when it is done, s after the start
    ttft: float                                        # the emitting rank's finish
    timeline: list                                     # per rank: [(name, layer, start, end)]


def _run(segs, wait, devices, timeline):
    """The event loop both replays share. Returns per-rank finish times.

    Rank i computes segs[i][0], reaches wait point 0 (layer 0's K/V), computes segs[i][1], ...,
    segs[i][L]. wait(i, l, t): rank i reached point l at time t; it returns when the rank may go on,
    or None while that depends on ranks not yet simulated so far (it is asked again later).
    devices=None: each rank has a device of its own, so ranks run one after another, each as far as
    it can. devices=n: all p ranks share n devices (p ranks on one GPU, or on fewer CPU cores),
    time-sliced fairly as the OS or the GPU does: while m ranks have work, each runs at min(1, n/m)
    of a device's speed (processor sharing), simulated event by event.
    """
    p, L = len(segs), len(segs[0]) - 1
    nxt, ready, reached, finish = [0] * p, [0.0] * p, [0.0] * p, [0.0] * p
    left, began = [None] * p, [0.0] * p                # work left in the running segment, its start

    def done(i, t):                                    # rank i ends its current segment at t
        l, nxt[i], left[i] = nxt[i], nxt[i] + 1, None
        timeline[i].append(("compute", l if l < L else "head", began[i], t))
        if l == L:
            finish[i] = t
        else:
            reached[i], ready[i] = t, wait(i, l, t)

    def retry():                                       # waits that may have been answered since
        for i in range(p):
            if ready[i] is None:
                ready[i] = wait(i, nxt[i] - 1, reached[i])

    if devices is None:
        while True:
            retry()
            runnable = [i for i in range(p) if nxt[i] <= L and ready[i] is not None]
            if not runnable:
                return finish
            i = runnable[0]
            while nxt[i] <= L and ready[i] is not None:
                began[i] = ready[i]
                done(i, ready[i] + segs[i][nxt[i]])
    now = 0.0
    while True:
        retry()
        for i in range(p):                             # start what may start now
            if nxt[i] <= L and left[i] is None and ready[i] is not None and ready[i] <= now:
                left[i], began[i] = segs[i][nxt[i]], now
        running = [i for i in range(p) if left[i] is not None]
        later = [ready[i] for i in range(p) if nxt[i] <= L and left[i] is None and ready[i] is not None]
        if not running and not later:
            return finish
        rate = min(1.0, devices / max(1, len(running)))
        t = min([now + left[i] / rate for i in running] + later)     # the next event
        ending = [i for i in running if now + left[i] / rate <= t]
        for i in running:
            left[i] -= (t - now) * rate
        now = t
        for i in ending:
            done(i, now)


def replay_chain(segs, c, links, bytes_per_token, devices=None, seed=0):
    """KV-Runahead: rank i waits at each layer's K/V for layer l's [0, S_{i-1}) from rank i-1, then
    sends [0, S_i) to rank i+1 without waiting for it. Link i carries one message at a time, in order:
    start = max(sent, link free), arrival = start + link.time(S_i * bytes_per_token).

    links: one Link for every hop or a list (link i from rank i to i+1). segs: per rank, L+1 segment
    times (profiling.profile_kvr). devices: see _run; seed: of the links' jitter. Returns a Replay; TTFT is
    the last rank's finish.
    """
    p, S = len(c), partition.prefix_sums(c)
    hops, rngs = _links(links, p - 1), [random.Random(f"{seed}/{i}") for i in range(p)]
    arrive, free = [{} for _ in range(p)], [0.0] * p   # arrive[i][l]: layer l's prefix at rank i
    timeline = [[] for _ in range(p)]

    def wait(i, l, t):
        if i and l not in arrive[i]:
            return None                                # rank i-1 has not sent layer l yet
        go = max(t, arrive[i][l]) if i else t
        if go > t:
            timeline[i].append(("recv", l, t, go))
        if i < p - 1:
            start = max(go, free[i])
            free[i] = arrive[i + 1][l] = start + hops[i].time(S[i] * bytes_per_token, rngs[i])
            timeline[i].append(("send", l, start, free[i]))
        return go

    finish = _run(segs, wait, devices, timeline)
    return Replay(finish, finish[-1], timeline)


def replay_allgather(segs, counts, links, bytes_per_token, emitter, devices=None, seed=0, host=None):
    """TSP: every layer ends in an all-gather, a barrier: it completes for all ranks at the latest
    arrival plus the gather time. The gather is a ring: p-1 steps, each moving the largest rank's
    chunk, max(counts) tokens, over all p links at once; a step lasts as long as its slowest link.
    counts: per rank, its tokens, or the lengths of its spans: then one all-gather per span index, one
    after another, as transport.allgather_into runs them (zigzag: two). counts and emitter: from
    tsp.tsp_layout; links: one Link or a list of p (the ring, link r from rank r to r+1 mod p);
    devices and seed as in replay_chain. Returns a Replay; TTFT is the emitter's finish.

    host=(down, up): instead of the ring, the staged route's gather through shared slots on ranks that
    share one GPU, and so its host link (fast/staged.py): each rank's part goes down as it arrives,
    one copy at a time on the down Link; once all are down, every rank copies the others' parts up
    at once, (p-1) * sum(counts) tokens through the up Link together.
    """
    p = len(segs)
    ring, rngs = _links(links, p), [random.Random(f"{seed}/{i}") for i in range(p)]
    gathers = list(zip(*(n if isinstance(n, (list, tuple)) else [n] for n in counts)))   # per gather, per rank
    reached, done, timeline = [{} for _ in segs[0]], {}, [[] for _ in range(p)]

    def one(arrivals, sizes):            # one all-gather of the ranks' sizes
        if host is None:
            nbytes = max(sizes) * bytes_per_token
            return max(arrivals) + sum(max(link.time(nbytes, rng) for link, rng in zip(ring, rngs))
                                       for _ in range(p - 1))
        down, up = host
        t = 0.0
        for at, n in sorted(zip(arrivals, sizes)):   # the parts go down in the order they are ready
            t = max(t, at) + down.time(n * bytes_per_token)
        return t + up.time((p - 1) * sum(sizes) * bytes_per_token)

    def gather(arrivals):
        for sizes in gathers:
            arrivals = [one(arrivals, sizes)] * p
        return arrivals[0]

    def wait(i, l, t):
        reached[l][i] = t
        if l not in done:
            if len(reached[l]) < p:
                return None                            # someone is still computing this layer
            done[l] = gather([reached[l][r] for r in range(p)])
        timeline[i].append(("allgather", l, t, done[l]))
        return done[l]

    finish = _run(segs, wait, devices, timeline)
    return Replay(finish, finish[emitter], timeline)


def write_trace(replay, path):
    """The replay as Chrome trace JSON, like fast/trace.py writes a real run (open in Perfetto)."""
    events = [dict(name="thread_name", ph="M", pid=0, tid=r, args={"name": f"rank {r}"})
              for r in range(len(replay.timeline))]
    events += [dict(name=name, ph="X", pid=0, tid=r, args={"layer": layer}, ts=round(a * 1e6, 1),
                    dur=round((b - a) * 1e6, 1))
               for r, spans in enumerate(replay.timeline) for name, layer, a, b in spans]
    with cli.replace_whole(path) as tmp, open(tmp, "w") as f:
        json.dump({"traceEvents": events}, f)


def compare(real, simulated):
    """Simulated against measured TTFTs (dicts: case -> s). Returns rows (case, real, simulated,
    error) with error = simulated / real - 1, for the cases in both, and the rows as a text table."""
    rows = [(k, real[k], simulated[k], simulated[k] / real[k] - 1) for k in real if k in simulated]
    text = "\n".join([f"{'case':32} {'real ms':>9} {'sim ms':>9} {'error':>7}"] +
                     [f"{k:32} {r * 1e3:9.2f} {s * 1e3:9.2f} {e:+7.1%}" for k, r, s, e in rows])
    return rows, text


# ----------------------------------------------------------------------------- at scale

class KernelTable:
    """A KV-Runahead rank's segment times on a grid of (chunk c, prefix P), interpolated in between.

    A rank's work depends only on c and P (every rank runs the LM head on its last token), and its
    L-1 middle segments are the same layer: so the grid holds (first, middle, last) per (c, P).
    More tokens never take less time, so within a prefix a time above a longer chunk's is noise (a
    search would exploit it): each is lowered to the least time of the chunks not shorter. Then
    segments(c, P) interpolates piecewise-linearly in c within each measured prefix, then in P
    between prefixes (fast.table.at: clamped below the grid, extended linearly above it), floored at 0.
    """

    def __init__(self, grid, meta):
        self.grid, self.meta, self._memo = grid, meta, {}      # grid {(c, P): (first, middle, last)}
        self.rows = fast.table.grid([(c, P, t) for (c, P), t in grid.items()])

    def save(self, path):
        with cli.replace_whole(path) as tmp, open(tmp, "w") as f:
            json.dump(dict(meta=self.meta, grid=[[c, P, *t] for (c, P), t in sorted(self.grid.items())]), f, indent=1)

    @classmethod
    def load(cls, path):
        with open(path) as f:
            d = json.load(f)
        return cls({(c, P): tuple(t) for c, P, *t in d["grid"]}, d["meta"])

    @property
    def model_key(self):
        """The key runahead.py files partitions under (program.py's job.model_key), at `layers` layers."""
        m = self.meta["cfg"]
        return (f"{m['arch']}-d{m['dim']}-L{self.meta['layers']}-h{m['n_heads']}-kv{m['n_kv_heads']}"
                f"-{self.meta['dtype']}-{self.meta['device_type']}")

    def segments(self, c, P):
        """L+1 segment times (s) of a rank with c tokens after a prefix of P."""
        if (c, P) not in self._memo:
            first, middle, last = (max(0.0, fast.table.at(self.rows, c, P, k)) for k in range(3))
            self._memo[c, P] = [first] + [middle] * (self.meta["layers"] - 1) + [last]
        return self._memo[c, P]


def predict(table, c, links, bpt=None, devices=None):
    """Replay of KV-Runahead with partition c on the table's interpolated segment times."""
    segs = [table.segments(ci, Si - ci) for ci, Si in zip(c, partition.prefix_sums(c))]
    return replay_chain(segs, c, links, bpt or table.meta["bytes_per_token"], devices)


def search(C, p, table, links, bpt=None, steps=8, levels=3):
    """KVR-S on the simulator: partition.searched scored by predicted TTFT, its boundaries aligned as
    a real run on the table's device aligns them (choose.alignment)."""
    return partition.searched(C, p, lambda c: predict(table, c, links, bpt).ttft, steps, levels,
                              align=choose.alignment(table.meta["device_type"]))


def build_table(table, Cs, ps, links, key=None, steps=8, levels=3):
    """KVR-S for every (C, p): a partition.Table, under `key` (default table.model_key), from which
    partition.predicted interpolates KVR-P. `links`: a Link, or p -> list of links."""
    out = partition.Table()
    for p in ps:
        for C in Cs:
            out.add(key or table.model_key, search(C, p, table, links(p) if callable(links) else links, None, steps, levels))
    return out


def main(argv=None):
    ap = cli.Parser(description="KVR-S partitions searched on a KernelTable (bench/profiling.py "
                                             "measures one), saved as a partition.Table")
    ap.add_argument("--kernels", default="kernels.json", help="the KernelTable JSON to read")
    ap.add_argument("--ps", type=bench.ints(1), default=[2, 4, 8])
    ap.add_argument("--Cs", type=bench.ints(1), default=[1024, 2048, 4096, 8192, 12288, 16384])
    ap.add_argument("--bandwidth", type=bench.positive, default=300e9, help="bytes/s per link (paper: 300e9, 10e9)")
    ap.add_argument("--out", default="partitions.json", help="where to write the partition.Table")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    kt, link = KernelTable.load(a.kernels), Link(a.bandwidth)
    table = build_table(kt, a.Cs, a.ps, link)
    table.save(a.out)
    for p in a.ps:
        for C in a.Cs:
            c = table.get(kt.model_key, p, C)
            print(f"p={p} C={C}: {','.join(map(str, c))}  simulated TTFT {predict(kt, c, link).ttft * 1e3:.1f} ms, "
                  f"even split {predict(kt, partition.even(C, p), link).ttft * 1e3:.1f} ms")
    print(f"wrote {a.out} under {kt.model_key} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
