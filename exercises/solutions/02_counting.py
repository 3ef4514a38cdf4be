"""Exercise 2: the paper's counts of work and traffic. Check with: python exercises/check.py 2"""
import itertools

from partition import even, from_boundaries, prefix_sums


def dot_products(c):
    """QK^T dot products per rank of KV-Runahead: rank i, c[i] queries against S[i] keys.

    (4, 3, 2) -> [16, 21, 18].
    """
    return [ci * Si for ci, Si in zip(c, prefix_sums(c))]


def chain_kv_entries(c):
    """K and V token entries the chain moves per layer: rank i < p-1 sends K and V of S[i] tokens.

    (4, 3, 2) -> 22.
    """
    return 2 * sum(prefix_sums(c)[:-1])                # the last rank sends nothing


def tsp_dot_products(C, p):
    """QK^T dot products per rank of TSP: an even split, each rank's queries against all C keys.

    (9, 3) -> [27, 27, 27].
    """
    return [ci * C for ci in even(C, p)]


def tsp_kv_entries(C, p):
    """K and V token entries TSP's all-gather moves per layer: each rank receives what it lacks.

    (9, 3) -> 36.
    """
    return 2 * sum(C - ci for ci in even(C, p))        # = 2 (p - 1) C


def least_busy(C, p):
    """The partition of C tokens over p ranks (each >= 1) whose busiest rank does the fewest dot
    products, as a list. (9, 3) -> [4, 3, 2].
    """
    splits = (from_boundaries(b, C) for b in itertools.combinations(range(1, C), p - 1))
    return min(splits, key=lambda c: max(dot_products(c)))
