"""Which partition a run takes: given, even, or searched/predicted from what this machine measured
(the caches) or the cost model; and where the caches live. No torch, no MPI:

    python choose.py searched --C 16384 -p 4       # stderr says where the partition came from

The caches are a folder of the user's ($KVR_CACHE, else $XDG_CACHE_HOME/kvrunahead, else
~/.cache/kvrunahead): calibration.json, the cost models calibrate.py fitted, and partitions.json,
the partitions --search-live measured. A file that cannot be read as what it holds is a ValueError
naming it; both are written whole or not at all.
"""
import json
import os
import sys
from dataclasses import asdict

import cli
import partition


def cache_dir():
    """Where the caches live: $KVR_CACHE, else $XDG_CACHE_HOME/kvrunahead, else ~/.cache/kvrunahead."""
    return os.environ.get("KVR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser(os.path.join("~", ".cache")), "kvrunahead")


def table_path():
    """Searched partitions, {model: {p: {C: c}}}: --search-live writes them, searched/predicted read them."""
    return os.path.join(cache_dir(), "partitions.json")


def calibration_path():
    """Cost models calibrated on this machine, {model: CostModel fields}."""
    return os.path.join(cache_dir(), "calibration.json")


def calibrations(path=None):
    """Every CostModel in the calibration file, {model: CostModel}; {} if there is none."""
    path = path or calibration_path()
    saved = partition.read_json(path) if os.path.exists(path) else {}
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a set of calibrations ({{model: cost model}})")
    return {m: partition.CostModel.from_dict(entry, f"{path}: entry {m!r}") for m, entry in saved.items()}


def load_calibration(model, path=None):
    """The CostModel calibrated for `model` on this machine, or None."""
    return calibrations(path).get(model)


def save_calibration(model, cost, path=None):
    path = path or calibration_path()
    saved = {m: asdict(c) for m, c in calibrations(path).items()} | {model: asdict(cost)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with cli.replace_whole(path) as tmp, open(tmp, "w") as f:
        json.dump(saved, f, indent=1)


def load_table(path=None):
    """The partitions table (default: the cache's), empty if there is none."""
    path = path or table_path()
    return partition.Table.load(path) if os.path.exists(path) else partition.Table()


def check_caches():
    """Read both caches whole, as a run would, so that a file it could not use is refused at once
    (runahead.py does this before torch loads)."""
    load_table()
    calibrations()


# ----------------------------------------------------------------------------- choosing one

def alignment(device_type):
    """The tokens a run's boundaries are multiples of: a GPU's attention tiles, any token on a CPU."""
    return partition.ALIGN if device_type == "cuda" else 1


def explain(spec, C, p, model="", table=None, cost=None, align=1):
    """The partition to run, and where it came from: spec is even | searched | predicted | 'c0,c1,...'.

    searched and predicted answer in seconds: a table entry for (model, p, C) if there is one;
    for predicted, else an interpolation of the table's entries for (model, p); else a search
    on the cost model: `cost`, else the model's calibration, else CostModel()'s documented defaults.
    Interpolated and searched boundaries fall on multiples of `align` tokens (partition.aligned).
    """
    if spec not in ("even", "searched", "predicted"):
        return partition.parse(spec, C, p), "given"
    if spec == "even":
        return partition.even(C, p), "even split"
    table = table or table_path()
    t = load_table(table)
    if t.get(model, p, C):
        return list(t.get(model, p, C)), f"table {table}"
    if spec == "predicted" and t.contexts(model, p):
        return partition.predicted(C, p, t, model, align), f"interpolated from table {table}"
    source = "given cost model" if cost else "calibration of " + model
    cost = cost or load_calibration(model)
    if cost is None:
        cost, source = partition.CostModel(), "CostModel() defaults (H100, uncalibrated)"
    c, source = partition.searched(C, p, cost.ttft, align=align), source + " (its chunk times measured)" * bool(cost.measured)
    how = "searched" if spec == "searched" else f"predicted: no table entry for {p} ranks, so searched"
    how += f" on multiples of {align} tokens" * (partition.aligned(C, p, align)[2] > 1)
    return c, (f"{how} on {source}: predicted TTFT {cost.ttft(c):.4g} s, "
               f"even split {cost.ttft(partition.even(C, p)):.4g} s, TSP {cost.ttft_tsp(C, p):.4g} s")


def main(argv=None):
    ap = cli.Parser(description="Print a partition c0,c1,... of C prompt tokens over p "
                                "ranks; stderr says where it came from.")
    ap.add_argument("how", choices=["even", "searched", "predicted"])
    ap.add_argument("--C", type=cli.at_least(1), required=True, help="prompt tokens")
    ap.add_argument("-p", type=cli.at_least(1), required=True, help="ranks")
    ap.add_argument("--table", help=f"lookup table JSON of searched partitions (default: {table_path()} if present)")
    ap.add_argument("--model", default="", help="model name in the table (runahead.py's job.model_key)")
    ap.add_argument("--cost", help=f"CostModel JSON (default: --model's entry in {calibration_path()}, "
                                   "else CostModel() defaults)")
    ap.add_argument("--align", type=cli.at_least(1), help="boundaries on multiples of this many tokens (default: "
                    f"{partition.ALIGN} for a GPU's --model, one ending in -cuda, as runahead.py runs it; else 1)")
    a = ap.parse_args(argv)
    if a.how == "even" and (given := [f"--{k}" for k in ("table", "cost", "model", "align") if getattr(a, k)]):
        ap.error(f"{given[0]}: the even split uses no table, cost model or alignment")
    align = a.align or alignment("cuda" if a.model.endswith("-cuda") else "cpu")
    try:
        c, source = explain(a.how, a.C, a.p, a.model, a.table, a.cost and partition.CostModel.load(a.cost), align)
    except (OSError, ValueError) as e:
        sys.exit(f"choose.py: {e}")
    print(f"# {source}", file=sys.stderr)
    print(",".join(map(str, c)))


if __name__ == "__main__":
    main()
