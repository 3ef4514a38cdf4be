"""The cost model on a GPU: chunk times measured on a grid and interpolated (the kernel table).

On a CPU a chunk's time is close to CostModel's fixed + lin c + attn c S. On a GPU it is not: small
chunks are launch-bound, attention switches kernels with the chunk's shape, and a chunk after a long
prefix runs at its own rate. A partition searched on three coefficients fitted to such times loses to
the even split (BENCHMARKS.md). So on a GPU calibrate.py keeps the times themselves, on GRID, and
CostModel.chunk_time reads them from here, interpolated, where they reach; bench/sim.py's KernelTable
does the same with a rank's segments.
"""
import bisect

GRID = [(c, P) for P in (0, 1 / 4, 1 / 2, 3 / 4) for c in (1 / 16, 1 / 8, 1 / 4, 1 / 2) if P + c <= 1]   # of max_len


def points(max_len):
    """The (c, S) that calibrate.py times on a GPU, chunks of max_len/16 to max_len/2 after prefixes."""
    return [(round(c * max_len), round((P + c) * max_len)) for c, P in GRID]


def lerp(xs, ys, x):
    """Piecewise linear through (xs, ys), xs ascending: below xs[0] the first value (small work is
    launch-bound, not proportionally cheaper), above xs[-1] the last piece extended."""
    j = bisect.bisect_left(xs, x)
    if j < len(xs) and xs[j] == x:
        return ys[j]
    if j == 0 or len(xs) == 1:
        return ys[0]
    j = min(j, len(xs) - 1)
    return ys[j - 1] + (ys[j] - ys[j - 1]) * (x - xs[j - 1]) / (xs[j] - xs[j - 1])


def grid(measured):
    """{P: ([c, ...] ascending, [times, ...])} from [(c, P, times), ...], times a tuple (bench/sim.py's
    KernelTable keeps three per chunk). A time above a longer chunk's after the same prefix is noise,
    and a search would exploit it: it counts as the longer chunk's. A chunk measured twice counts once,
    at its faster time."""
    rows = {}
    for c, P, t in sorted(measured, key=lambda r: (r[1], -r[0])):   # per prefix, the longest chunk first
        cs, ts = rows.setdefault(P, ([], []))
        if cs and cs[0] == c:
            ts[0] = tuple(map(min, t, ts[0]))
            continue
        cs.insert(0, c)
        ts.insert(0, tuple(map(min, t, ts[0])) if ts else tuple(t))
    return rows


def at(rows, c, P, k=0):
    """Time k for c tokens after a prefix of P: piecewise linear in c within each measured prefix, then in P."""
    Ps = sorted(rows)
    return lerp(Ps, [lerp(rows[Q][0], [t[k] for t in rows[Q][1]], c) for Q in Ps], P)


def interpolate(measured, c, P):
    """Seconds for c tokens after a prefix of P, from the times CostModel keeps, [(c, P, s), ...]."""
    return at(grid([(ci, Pi, (s,)) for ci, Pi, s in measured]), c, P)


def plain(fields):
    """Are these a CostModel's fields as JSON holds them: numbers, and `measured` a list of [c, P, s]?"""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    rows = fields.get("measured", [])
    return (all(number(v) for k, v in fields.items() if k != "measured") and isinstance(rows, list)
            and all(isinstance(r, list) and len(r) == 3 and all(map(number, r)) for r in rows))


def reach(measured):
    """The longest prompt (c + P) the times cover: beyond it CostModel falls back on its fit."""
    return max((c + P for c, P, _ in measured), default=0)
