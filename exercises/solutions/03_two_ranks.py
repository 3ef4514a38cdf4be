"""Exercise 3: the best split of C tokens over two ranks. Check with: python exercises/check.py 3"""
import math


def best_split(C, cost):
    """The c0 in 1..C-1 with the lowest cost.ttft([c0, C - c0]) (cost: a partition.CostModel)."""
    return min(range(1, C), key=lambda c0: cost.ttft([c0, C - c0]))


# c0 / C of the best split as C grows, when only attention costs time: the exact number.
# Over many layers neither rank may wait for the other, so their work per layer must be equal:
# c0 * c0 = (C - c0) * C. With x = c0 / C: x^2 + x - 1 = 0, so x = (sqrt(5) - 1) / 2 = 0.618...,
# the golden ratio: rank 0 takes more, because each of rank 1's tokens attends to all C keys.
LIMIT_FRACTION = (math.sqrt(5) - 1) / 2
