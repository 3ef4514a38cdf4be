"""Exercise 5: predictions from a table of searched partitions, scored by the cost model.

The table is searched here, on the default CostModel for 4 ranks (under a second). A prediction
for a length inside the table's range must come within 2% of a search at that length; outside it,
it must be no slower than the even split; and it must always be a valid partition.
"""
import partition
from grade import Fail, load

P, STORED = 4, (2048, 4096, 8192, 16384, 32768, 65536)
INSIDE, OUTSIDE, TINY = (3000, 12000, 24000, 50000), (1000, 100000), (4, 5, 7)


def check(path):
    s = load(path)
    cost = partition.CostModel()
    table = {C: partition.searched(C, P, cost.ttft, levels=4) for C in STORED}

    def predict(C):
        got = s.predict(C, {K: list(c) for K, c in table.items()})
        try:
            return partition.validate(got, C, P)
        except ValueError as e:
            raise Fail(f"predict({C}, table) returned {got!r}, not a partition of {C} tokens over {P} "
                       f"ranks: {e}") from None

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
        if cost.ttft(c) > cost.ttft(even):
            raise Fail(f"predict({C}, table) returned {c}, slower than the even split {even} "
                       f"({cost.ttft(c) * 1e3:.2f} ms vs {cost.ttft(even) * 1e3:.2f} ms)")
    for C in TINY:
        predict(C)
    return f"TTFT at most {100 * (worst[0] - 1):.2f}% above a search (C = {worst[1]})"
