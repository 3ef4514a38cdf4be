"""The command line runahead.py and tsp.py share, and the checks every numeric option of the
project's scripts gets. Standard library only, so `--help` and a bad option answer at once, before
torch loads (seconds).

A bad option is one line, `error: ...`, and exit status 2; under mpirun every rank prints it.
"""
import argparse
import os
import sys


def say(line):
    """One line to stderr in a single write, so lines from several ranks never interleave."""
    os.write(2, (line + "\n").encode())


class Parser(argparse.ArgumentParser):
    def error(self, message):
        say(f"error: {message}")
        sys.exit(2)


def at_least(lo, kind=int):
    """An argparse type: a number of `kind` that is >= lo."""
    def parse(text):
        value = kind(text)                             # not a number: argparse names the option
        if value < lo:
            raise argparse.ArgumentTypeError(f"{text} is out of range (at least {lo})")
        return value
    parse.__name__ = kind.__name__
    return parse


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


def program(description):
    """The options of runahead.py and tsp.py (README, "The command line")."""
    ap = Parser(description=description)
    ap.add_argument("--model", default="builtin:llama",
                    help="HF checkpoint directory, builtin:llama / builtin:falcon (small, random weights), "
                         "or dims:llama7b / dims:falcon7b (the paper's sizes, random weights)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer.json or tokenizer.model)")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    src.add_argument("--prompt-len", type=at_least(1), help="N synthetic token ids (seeded; default 2048)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"],
                    help="weights, activations and the K/V that travel (default float32)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where each rank computes; cuda: the local rank's GPU (default cpu)")
    ap.add_argument("--max-new-tokens", type=at_least(1), default=8, help="tokens to generate, the first included")
    ap.add_argument("--threads", type=at_least(1), help="torch threads per rank (default: cores / ranks here)")
    ap.add_argument("--math", action="store_true", help="the readable masked-softmax attention path")
    ap.add_argument("--fuse", action="store_true",
                    help="compile each layer's elementwise work (torch.compile; for GPUs, slow to start)")
    ap.add_argument("--graphs", action="store_true",
                    help="--fuse, and replay the compiled work as CUDA graphs (GPU; pays under ~1k tokens a rank)")
    ap.add_argument("--trace", help="write a per-rank timeline (Chrome trace JSON) to this file")
    ap.add_argument("--save", help="torch.save logits, KV cache, partition, TTFT and tokens here")
    return ap


def runahead():
    ap = program("KV-Runahead parallel prefill (run under mpirun)")
    ap.add_argument("--partition", default="even",
                    help="even | searched | predicted | c0,c1,... (one chunk per rank, summing to the prompt)")
    ap.add_argument("--search-live", action="store_true",
                    help="instead of one run: search the partition by measured TTFT, store it in the table")
    ap.add_argument("--search-steps", type=at_least(1), default=4,
                    help="--search-live: grid points per boundary and level (default 4)")
    ap.add_argument("--search-levels", type=at_least(1), default=2,
                    help="--search-live: levels of refinement around the best so far (default 2)")
    ap.add_argument("--repeats", type=at_least(1), default=3, help="--search-live: runs per candidate (median)")
    return ap


def tsp():
    ap = program("TSP baseline: sequence-split prefill that all-gathers K/V (run under mpirun)")
    ap.add_argument("--zigzag", action="store_true", help="load-balanced zigzag split, masked work skipped")
    return ap
