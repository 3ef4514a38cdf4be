"""Exercise 1: the even partition. Write even(C, p); check with: python exercises/check.py 1"""


def even(C, p):
    """KVR-E: p chunks summing to C that differ by at most one token, the extras to the front ranks.

    even(10, 3) -> [4, 3, 3]. Raises ValueError if p < 1 or p > C (a rank would get no token).
    """
    raise NotImplementedError
