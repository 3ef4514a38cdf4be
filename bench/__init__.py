"""Tools that measure and draw; nothing in the root imports them. Run from the repository root:

  python -m bench.measured   single | ranks | link | merge | plot: real runs (BENCHMARKS.md 4, 5, 7)
  python -m bench.simulated  profile | simulate | validate | summary: the simulated tables (sections 3, 6)
  python -m bench.emulated   run | summary: p small GPUs emulated on one by MPS, against the whole GPU
  python -m bench.profiling  a kernel table: one rank's segment times on a grid of (chunk, prefix)
  python -m bench.sim        KVR-S searched on a kernel table
  python -m bench.figures    the README's pictures and the paper's worked example

profiling.py times each rank's work alone on one device; sim.py (no torch) replays the ranks
against each other over modelled links; plots.py draws results files.
"""

import argparse

from cli import at_least


def positive(text):
    """An argparse type: a float > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is out of range (must be > 0)")
    return value


def ints(lo=1):
    """An argparse type: comma-separated integers, each >= lo."""
    def parse(text):
        return [at_least(lo)(x) for x in text.split(",")]
    parse.__name__ = "comma-separated int"
    return parse
