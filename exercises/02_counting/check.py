"""Exercise 2: the KV-Runahead paper's worked example, then partition.py's counts on random partitions."""
import itertools
import random

import partition
from grade import Fail, load


def expect_equal(call, got, want, why=""):
    if got != want:
        raise Fail(f"{call} returned {got!r}, expected {want!r}{why}")


def check(path):
    s = load(path)
    expect_equal("dot_products([4, 3, 2])", s.dot_products([4, 3, 2]), [16, 21, 18],
                 ": rank i does c[i] * S[i], its queries against every key up to its last")
    expect_equal("chain_kv_entries([4, 3, 2])", s.chain_kv_entries([4, 3, 2]), 22,
                 ": K and V of S[0] = 4 and S[1] = 7 tokens; the last rank sends nothing")
    expect_equal("tsp_dot_products(9, 3)", s.tsp_dot_products(9, 3), [27, 27, 27],
                 ": each rank's 3 queries against all 9 keys, masked or not")
    expect_equal("tsp_kv_entries(9, 3)", s.tsp_kv_entries(9, 3), 36,
                 ": each rank receives K and V of the 6 tokens it lacks")
    rng = random.Random(0)
    for _ in range(200):
        p = rng.randint(1, 8)
        C = rng.randint(p, 60)
        c = partition.from_boundaries(sorted(rng.sample(range(1, C), p - 1)), C)
        expect_equal(f"dot_products({c})", s.dot_products(c), partition.dot_products(c))
        expect_equal(f"chain_kv_entries({c})", s.chain_kv_entries(c), partition.chain_kv_tokens(c))
        expect_equal(f"tsp_dot_products({C}, {p})", s.tsp_dot_products(C, p),
                     [ci * C for ci in partition.even(C, p)])
        expect_equal(f"tsp_kv_entries({C}, {p})", s.tsp_kv_entries(C, p), partition.tsp_kv_tokens(C, p))
    for C, p in [(9, 3), (12, 3), (10, 4), (7, 1), (5, 5), (16, 2)]:
        best = min(max(partition.dot_products(partition.from_boundaries(b, C)))
                   for b in itertools.combinations(range(1, C), p - 1))
        got = s.least_busy(C, p)
        try:
            got = partition.validate(got, C, p)
        except ValueError as e:
            raise Fail(f"least_busy({C}, {p}) returned {got!r}, not a partition: {e}") from None
        if max(partition.dot_products(got)) != best:
            raise Fail(f"least_busy({C}, {p}) returned {got}, whose busiest rank does "
                       f"{max(partition.dot_products(got))} dot products; the best partition's does {best}")
    return "(4, 3, 2): busiest rank 21 dot products against TSP's 27, 22 K/V entries moved against 36"
