"""Exercise 1: even(C, p) against partition.even, and its errors."""
import partition
from grade import Fail, load


def check(path):
    even = load(path).even
    for C, p in [(9, 3), (10, 3), (11, 3), (7, 1), (5, 5), (4097, 8), (16384, 8), (100, 7), (3, 2)]:
        want, got = partition.even(C, p), even(C, p)
        if not isinstance(got, list) or got != want:
            hint = ""
            if isinstance(got, list) and sorted(got) == sorted(want):
                hint = ": the right sizes in the wrong order; the extra tokens go to the front ranks"
            elif isinstance(got, list) and sum(got) != C:
                hint = f": your chunks sum to {sum(got)}, not C = {C}"
            raise Fail(f"even({C}, {p}) returned {got!r}, expected {want}{hint}")
    for C, p, why in [(3, 4, "more ranks than tokens"), (5, 0, "no ranks"), (5, -1, "negative ranks")]:
        try:
            got = even(C, p)
        except ValueError:
            continue
        raise Fail(f"even({C}, {p}) returned {got!r}; {why} must raise ValueError")
    return "balanced, front-loaded, and bad input refused"
