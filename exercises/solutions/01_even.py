"""Exercise 1: the even partition. Write even(C, p); check with: python exercises/check.py 1"""


def even(C, p):
    """KVR-E: p chunks summing to C that differ by at most one token, the extras to the front ranks.

    even(10, 3) -> [4, 3, 3]. Raises ValueError if p < 1 or p > C (a rank would get no token).
    """
    if p < 1:
        raise ValueError(f"need at least 1 rank, got {p}")
    if p > C:
        raise ValueError(f"{p} ranks but only {C} prompt tokens")
    q, r = divmod(C, p)                                # r ranks get one token more than the rest
    return [q + (i < r) for i in range(p)]
