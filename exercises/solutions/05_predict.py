"""Exercise 5: predict the partition for an unseen context length. Check: python exercises/check.py 5"""
from partition import from_boundaries, prefix_sums


def predict(C, table):
    """KVR-P: a partition of C tokens, from `table` = {context length: searched partition}.

    Every entry has the same number of ranks p. Read each entry's p - 1 boundaries S[0..p-2] as
    fractions of its context length, interpolate them between the nearest stored lengths below and
    above C, round back to tokens, and make sure every rank keeps at least one token. Beyond the
    stored range, use the nearest entry's fractions; a stored C returns its entry.
    """
    if C in table:
        return list(table[C])

    def fractions(K):
        return [S / K for S in prefix_sums(table[K])[:-1]]

    below, above = [K for K in table if K < C], [K for K in table if K > C]
    if below and above:
        a, z = max(below), min(above)
        w = (C - a) / (z - a)                          # 0 at a, 1 at z
        f = [(1 - w) * x + w * y for x, y in zip(fractions(a), fractions(z))]
    else:
        f = fractions(max(below) if below else min(above))
    p = len(f) + 1
    b = [round(x * C) for x in f]
    for j in range(p - 1):                             # one past the previous, room for those after
        b[j] = min(max(b[j], (b[j - 1] if j else 0) + 1), C - (p - 1 - j))
    return from_boundaries(b, C)
