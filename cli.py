"""The command line runahead.py and tsp.py share, and the checks every numeric option of the
project's scripts gets. Standard library only, so `--help` and a bad option answer at once, before
torch loads (seconds): one line, `error: ...`, and exit status 2 on every rank. So does `check_early`
for an output path that cannot be written, and a partition or prompt that cannot fit the ranks.
"""
import argparse
import contextlib
import os
import signal
import sys
import tempfile


def say(line):
    """One line to stderr in a single write, so lines from several ranks never interleave."""
    os.write(2, (line + "\n").encode())


class Parser(argparse.ArgumentParser):
    def error(self, message):
        say(f"error: {message}")
        sys.exit(2)


class Given(argparse.Action):                          # an option one mode reads, remembered as given
    def __call__(self, parser, namespace, value, flag=None):
        setattr(namespace, self.dest, value)
        namespace.given = getattr(namespace, "given", ()) + (flag,)


def at_least(lo, kind=int):
    """An argparse type: a number of `kind` that is >= lo."""
    def parse(text):
        value = kind(text)                             # not a number: argparse names the option
        if value < lo:
            raise argparse.ArgumentTypeError(f"{text} is out of range (at least {lo})")
        return value
    parse.__name__ = kind.__name__
    return parse


def output_file(text):
    """An argparse type: a file path this process can create or replace (its folder exists)."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text}: no directory {folder}")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot write into {folder}")
    return text


@contextlib.contextmanager
def replace_whole(path):
    """Write a file that appears whole or not at all: yields a temporary path beside `path`, which
    replaces it once the block ends without an error (a reader never sees half a file)."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=folder)
    os.close(fd)
    os.umask(umask := os.umask(0))                     # read the umask: set it, and set it back
    try:                                               # mkstemp's 0600 would survive the rename:
        os.chmod(tmp, os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o666 & ~umask)
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


# Ranks as launchers tell it before MPI starts: Hydra, Open MPI, MVAPICH, srun (not salloc's SLURM_NTASKS).
WORLD_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


def launched_ranks():
    """How many ranks the launcher started (1 without one), or None if it does not say."""
    if not any(v.startswith(("PMI_", "OMPI_", "MV2_", "SLURM_STEP_", "HYDRA_")) for v in os.environ):
        return 1                                       # no launcher: MPI starts a single rank
    return next((int(os.environ[v]) for v in WORLD_SIZE if os.environ.get(v, "").isdigit()), None)


def ids(text):
    """--prompt-ids: comma-separated integers."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated integers") from None


def prompt_length(args):
    """The prompt's length when the command line says it (--prompt-len, --prompt-ids), else None."""
    if args.prompt is not None:
        return None                                    # known once the tokenizer has read it
    return len(ids(args.prompt_ids)) if args.prompt_ids is not None else args.prompt_len


interrupted_early = False     # Ctrl-C before MPI runs: program.setup ends the job as soon as it can


def interrupted(signum, frame):
    global interrupted_early
    interrupted_early = True


def check_early(args, check):
    """Refuse what cannot work before torch and the model load (a second, not ten): options that
    contradict each other or come alone, a prompt with fewer tokens than ranks, and `check(C, p)`, a
    program's own (its partition; both again on every rank once MPI runs). Ctrl-C from here on is
    remembered: program.setup ends the job once MPI runs (a rank dead before could hang MPI_Init)."""
    signal.signal(signal.SIGINT, interrupted)
    try:
        if args.graphs and args.device != "cuda":
            raise ValueError("--graphs: CUDA graphs need --device cuda")
        given, live = getattr(args, "given", ()), getattr(args, "search_live", False)
        one_run = [f for f in given if f in ("--max-new-tokens", "--save", "--trace")] + ["--math"] * args.math
        if live and one_run:
            raise ValueError(f"{one_run[0]} is an option of a single run, which --search-live is not")
        if not live and (alone := [f for f in given if f not in one_run]):
            raise ValueError(f"{alone[-1]} is an option of --search-live, which is not given")
        if getattr(args, "recalibrate", False) and args.partition not in ("searched", "predicted"):
            raise ValueError(f"--recalibrate: --partition {args.partition} has no cost model to calibrate")
        C, p = prompt_length(args), launched_ranks()
        if C is not None and p is not None:
            if p > C:
                raise ValueError(f"{p} ranks but only {C} prompt tokens: every rank needs at least one")
            check(C, p)
    except ValueError as e:
        say(f"error: {e}")
        sys.exit(2)


def program(description):
    """The options of runahead.py and tsp.py (README, "The command line")."""
    ap = Parser(description=description)
    ap.add_argument("--model", default="builtin:llama",
                    help="HF checkpoint directory, builtin:llama / builtin:falcon (small, random weights), "
                         "or dims:llama7b / dims:falcon7b[:LAYERS] (the paper's sizes, random weights) "
                         "(default builtin:llama)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer.json or tokenizer.model)")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    src.add_argument("--prompt-len", type=at_least(1), default=2048, help="N seeded synthetic token ids (default 2048)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"],
                    help="weights, activations and the K/V that travel (default float32)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where each rank computes; cuda: the local rank's GPU (default cpu)")
    ap.add_argument("--max-new-tokens", type=at_least(1), default=8, action=Given,
                    help="tokens to generate, the first included (default 8)")
    ap.add_argument("--threads", type=at_least(1), help="torch threads per rank (default: cores / ranks here)")
    ap.add_argument("--math", action="store_true", help="the readable masked-softmax attention path")
    ap.add_argument("--fuse", action="store_true",
                    help="compile each layer's elementwise work (torch.compile; for GPUs, slow to start)")
    ap.add_argument("--graphs", action="store_true",
                    help="--fuse, and prefills as CUDA graphs between K/V exchanges (GPU; pays under ~1k tokens a rank)")
    ap.add_argument("--trace", type=output_file, action=Given, help="each rank's timeline as Chrome trace JSON")
    ap.add_argument("--save", type=output_file, action=Given, help="torch.save logits, KV cache, partition, TTFT, tokens")
    return ap


def runahead():
    ap = program("KV-Runahead parallel prefill (run under mpirun)")
    ap.add_argument("--partition", default="even",
                    help="even | searched | predicted | c0,c1,... (one chunk per rank, summing to the prompt)")
    ap.add_argument("--recalibrate", action="store_true",
                    help="searched/predicted: measure this machine for the cost model again, and save it")
    ap.add_argument("--search-live", action="store_true",
                    help="instead of one run: search the partition by measured TTFT, store it in the table")
    for flag, default, what in (("--search-steps", 4, "grid points per boundary and level (default 4)"),
                                ("--search-levels", 2, "levels of refinement around the best so far (default 2)"),
                                ("--search-span", None, "start at --partition's pick, each boundary at first within "
                                 "this many tokens (default: from the even split, anywhere)"),
                                ("--repeats", 3, "runs per candidate, their median scores it (default 3)")):
        ap.add_argument(flag, type=at_least(1), default=default, action=Given, help=f"--search-live: {what}")
    return ap


def tsp():
    ap = program("TSP baseline: sequence-split prefill that all-gathers K/V (run under mpirun)")
    ap.add_argument("--zigzag", action="store_true", help="load-balanced zigzag split, masked work skipped")
    return ap
