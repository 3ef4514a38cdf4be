"""Exercise 2: the paper's counts of work and traffic. Check with: python exercises/check.py 2"""


def dot_products(c):
    """QK^T dot products per rank of KV-Runahead: rank i, c[i] queries against S[i] keys.

    (4, 3, 2) -> [16, 21, 18].
    """
    raise NotImplementedError


def chain_kv_entries(c):
    """K and V token entries the chain moves per layer: rank i < p-1 sends K and V of S[i] tokens.

    (4, 3, 2) -> 22.
    """
    raise NotImplementedError


def tsp_dot_products(C, p):
    """QK^T dot products per rank of TSP: an even split, each rank's queries against all C keys.

    (9, 3) -> [27, 27, 27].
    """
    raise NotImplementedError


def tsp_kv_entries(C, p):
    """K and V token entries TSP's all-gather moves per layer: each rank receives what it lacks.

    (9, 3) -> 36.
    """
    raise NotImplementedError


def least_busy(C, p):
    """The partition of C tokens over p ranks (each >= 1) whose busiest rank does the fewest dot
    products, as a list. (9, 3) -> [4, 3, 2].
    """
    raise NotImplementedError
