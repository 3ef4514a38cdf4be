"""Exercise 5: predictions from small tables made by hand, held to the statement's rules token for
token, and from a table of searched partitions, scored by the cost model.

The table is searched here, on the default CostModel for 4 ranks (under a second). A prediction
for a length inside the table's range must come within 2% of a search at that length; outside it,
it must be within 1% of the even split (the nearest entry's fractions may fit a far length
slightly worse); and it must always be a valid partition.
"""
import partition
from grade import Fail, load

P, STORED = 4, (2048, 4096, 8192, 16384, 32768, 65536)
INSIDE, OUTSIDE, TINY = (3000, 12000, 24000, 50000), (1000, 100000), (4, 5, 7)

# Hand-made tables of skewed partitions over 4, 3 and 2 ranks: {C: the partition the rules give, or
# None where rounding leaves a rank without a token and any valid partition will do (for C = p, only
# one is)}. That happens only below the smallest stored length: above it, or between two, neighbouring
# boundaries (and 0 and C) lie more than a token apart before rounding. No C here rounds a tie (x.5).
HAND = (
    ({100: [70, 20, 6, 4]}, {100: [70, 20, 6, 4], 130: [91, 26, 8, 5], 50: [35, 10, 3, 2], 10: None,
                             4: [1, 1, 1, 1]}),
    ({200: [150, 30, 12, 8], 1000: [600, 250, 100, 50]},
     {200: [150, 30, 12, 8], 1000: [600, 250, 100, 50], 300: [219, 49, 20, 12], 600: [405, 120, 48, 27],
      2000: [1200, 500, 200, 100], 20: [15, 3, 1, 1], 8: None, 7: None}),
    ({30: [24, 4, 2], 60: [30, 20, 10], 120: [40, 40, 40]},
     {30: [24, 4, 2], 45: [29, 11, 5], 80: [36, 26, 18], 150: [50, 50, 50], 10: [8, 1, 1], 5: None,
      3: [1, 1, 1]}),
    ({100: [4, 6, 20, 70]}, {10: None}),                # the first rank would get none
    ({100: [40, 2, 2, 56]}, {10: None}),                # the middle ones would get none
    ({10: [9, 1]}, {20: [18, 2], 3: None, 2: [1, 1]}),
)


def rule(C, table):
    """The statement's rule that gives predict(C, table)."""
    below, above = [K for K in table if K < C], [K for K in table if K > C]
    if C in table:
        return "a stored length returns its entry"
    if below and above:
        a, z = max(below), min(above)
        return (f"between {a} and {z}, each boundary's fraction interpolated with weight ({C} - {a}) / "
                f"({z} - {a}) on {z}'s, times {C}, rounded")
    near = max(below) if below else min(above)
    return f"outside the stored lengths, the nearest entry's ({near}) fractions, rounded"


def check(path):
    s = load(path)
    cost = partition.CostModel()
    table = {C: partition.searched(C, P, cost.ttft, levels=4) for C in STORED}

    def predict(C, given=table):
        """The student's predict(C, copy of `given`), which must be a partition of C."""
        got, p = s.predict(C, {K: list(c) for K, c in given.items()}), len(next(iter(given.values())))
        try:
            return partition.validate(got, C, p)
        except ValueError as e:
            raise Fail(f"predict({C}, {'table' if given is table else given}) returned {got!r}, not a partition "
                       f"of {C} tokens over {p} ranks: {e}") from None

    for hand, cases in HAND:
        for C, want in cases.items():
            c = predict(C, hand)
            if want is not None and c != want:
                raise Fail(f"predict({C}, {hand}) returned {c}, but the rule for it gives {want}: {rule(C, hand)}")
    for C in STORED:
        c = predict(C)
        if c != table[C]:
            raise Fail(f"predict({C}, table) returned {c}, but the table holds {table[C]} for C = {C}")
    worst = (0, None)
    for C in INSIDE:
        c, best = predict(C), partition.searched(C, P, cost.ttft, levels=4)
        ratio, even = cost.ttft(c) / cost.ttft(best), cost.ttft(partition.even(C, P)) / cost.ttft(best)
        if ratio > 1.02:
            raise Fail(f"predict({C}, table) returned {c}: TTFT {100 * (ratio - 1):.1f}% above the searched "
                       f"{best} (allowed: 2%; the even split is {100 * (even - 1):.1f}% above). Interpolate "
                       f"the boundaries as fractions between the entries for {max(K for K in STORED if K < C)} "
                       f"and {min(K for K in STORED if K > C)}")
        worst = max(worst, (ratio, C))
    for C in OUTSIDE:
        c, even = predict(C), partition.even(C, P)
        if cost.ttft(c) > 1.01 * cost.ttft(even):
            raise Fail(f"predict({C}, table) returned {c}, over 1% slower than the even split {even} "
                       f"({cost.ttft(c) * 1e3:.2f} ms vs {cost.ttft(even) * 1e3:.2f} ms)")
    for C in TINY:
        predict(C)
    return f"TTFT at most {100 * (worst[0] - 1):.2f}% above a search (C = {worst[1]})"
