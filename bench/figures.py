"""The README's pictures, drawn with matplotlib; `python -m bench.figures` redraws every PNG in figures/.

    python -m bench.figures                 all of them (about a minute on 2 cores)
    python -m bench.figures attention       figures/attention_map.png: which QK^T cells each rank computes
    python -m bench.figures timeline        figures/timeline.png: per-rank spans of real 3-rank runs (--trace)
    python -m bench.figures example         the paper's worked example (C = 9, p = 3, 4,3,2), printed

bench/measured.py draws its own measurements with plot_timeline here, and bench/plots.py's plot_ttft and plot_speedup
(`bench/measured.py plot`: TTFT against context from a results file).
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

import cli  # noqa: E402
import partition  # noqa: E402
import tsp  # noqa: E402
from bench import plots  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = os.path.join(ROOT, "figures")
_sibling = os.path.join(os.path.dirname(sys.executable), "mpirun")
MPIRUN = _sibling if os.path.exists(_sibling) else "mpirun"
RANK_COLORS = plt.get_cmap("tab10").colors


def _fmt(c):
    return ",".join(map(str, c))


# ----------------------------------------------------------------------------- which cells are computed

def tsp_spans(C, p, zigzag):
    """TSP's positions per rank, [(start, length), ...] each, as tsp.py lays them out."""
    return tsp.tsp_layout(C, p, zigzag)[0]


def kvr_spans(c):
    """KV-Runahead's positions per rank: one contiguous chunk each."""
    S = partition.prefix_sums(c)
    return [[(S[i] - c[i], c[i])] for i in range(len(c))]


def attention_cells(spans, C, dense):
    """owner[i, j]: the rank that computes query i against key j, or -1 if no rank does.

    The same rule as model.attend: a run of n queries starting at position a scores the keys
    0..a+n-1 (and masks the future ones inside that block), unless `dense`, in which case it scores
    all C keys and masks every future one (the paper's TSP).
    """
    owner = np.full((C, C), -1)
    for r, runs in enumerate(spans):
        for a, n in runs:
            owner[a:a + n, :C if dense else a + n] = r
    return owner


def cells_per_rank(owner, p):
    return [int((owner == r).sum()) for r in range(p)]


def _panels(C, p, c):
    """(title, owner map) for TSP, zigzag TSP, KVR-E and KV-Runahead with partition c."""
    kvr = attention_cells(kvr_spans(c), C, dense=False)
    if cells_per_rank(kvr, p) != partition.dot_products(c):     # the picture counts what partition.py counts
        raise AssertionError(f"cells {cells_per_rank(kvr, p)} != partition.dot_products {partition.dot_products(c)}")
    zz = tsp_spans(C, p, zigzag=True)
    return [
        (f"TSP, even split {_fmt(partition.even(C, p))}, dense", attention_cells(tsp_spans(C, p, False), C, True)),
        ("TSP zigzag, chunks " + ",".join("+".join(str(n) for _, n in s) for s in zz), attention_cells(zz, C, False)),
        (f"KV-Runahead, even split {_fmt(partition.even(C, p))}",
         attention_cells(kvr_spans(partition.even(C, p)), C, False)),
        (f"KV-Runahead, partition {_fmt(c)}", kvr),
    ]


def example(C, p, c):
    """Print the paper's worked example: dot products per rank and K/V entries moved."""
    print(f"C = {C} prompt tokens, p = {p} ranks; KV-Runahead's chunks end at S = {_fmt(partition.prefix_sums(c))}")
    print("QK^T dot products per rank (cells computed, masked ones included):")
    for title, owner in _panels(C, p, c):
        n = cells_per_rank(owner, p)
        print(f"  {title:<42} {' '.join(f'{x:3d}' for x in n)}   busiest {max(n):3d}   total {sum(n):3d}")
    print(f"  {'causally needed (key <= query)':<42} {'':{4 * p - 1}}                 total {C * (C + 1) // 2:3d}")
    zz = [sum(n for _, n in s) for s in tsp_spans(C, p, zigzag=True)]
    print("K/V token entries moved per layer (a K and a V per token):")
    for label, n in [("TSP all-gather (tsp_kv_tokens)", partition.tsp_kv_tokens(C, p)),
                     ("TSP zigzag all-gather", 2 * sum(C - n for n in zz)),
                     (f"KV-Runahead chain {_fmt(c)} (chain_kv_tokens)", partition.chain_kv_tokens(c))]:
        print(f"  {label:<42} {n:3d}")


def draw_attention(C, p, c, out_png):
    """Four C x C maps side by side; cells coloured by the rank computing them."""
    panels = _panels(C, p, c)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 4.3))
    for ax, (title, owner) in zip(axes, panels):
        for i in range(C):
            for j in range(C):
                r = owner[i, j]
                if r >= 0 and j <= i:
                    ax.add_patch(Rectangle((j, i), 1, 1, facecolor=RANK_COLORS[r], lw=0))
                elif r >= 0:
                    ax.add_patch(Rectangle((j, i), 1, 1, facecolor=_pale(RANK_COLORS[r]), edgecolor=RANK_COLORS[r],
                                           hatch="////", lw=0))
        ax.hlines(range(C + 1), 0, C, color="#dddddd", lw=0.6)
        ax.vlines(range(C + 1), 0, C, color="#dddddd", lw=0.6)
        n = cells_per_rank(owner, p)
        ax.set_title(f"{title}\ndot products per rank: {' / '.join(map(str, n))}", fontsize=9)
        ax.set_xlim(0, C)
        ax.set_ylim(C, 0)
        ax.set_aspect("equal")
        ax.set_xticks(np.arange(C) + 0.5, [str(j) for j in range(C)], fontsize=7)
        ax.set_yticks(np.arange(C) + 0.5, [str(i) for i in range(C)], fontsize=7)
        ax.tick_params(length=0)
        ax.set_xlabel("key position", fontsize=8)
    axes[0].set_ylabel("query position", fontsize=8)
    handles = [Patch(facecolor=RANK_COLORS[r], label=f"rank {r}") for r in range(p)]
    handles += [Patch(facecolor="#777777", label="computed, needed (key <= query)"),
                Patch(facecolor=_pale("#777777"), hatch="////", edgecolor="#777777", lw=0,
                      label="computed, then masked: wasted"),
                Patch(facecolor="white", edgecolor="#bbbbbb", label="never computed")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"QK^T of a {C}-token prompt on {p} ranks: who computes which query x key cell", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    plots.save(fig, out_png)


def _pale(color, amount=0.75):
    """color mixed with white."""
    return tuple(1 - (1 - x) * (1 - amount) for x in matplotlib.colors.to_rgb(color))


# ----------------------------------------------------------------------------- timelines

SPAN_COLORS = {"compute": "#4c72b0", "recv": "#dd8452", "send": "#55a868", "allgather": "#c44e52"}
SPAN_MEANING = {"compute": "compute: Ln = layer n's attention and MLP, then the next QKV",
                "recv": "recv: waiting for the left rank's K/V",
                "send": "send (asynchronous: start only)",
                "allgather": "allgather: waiting for every rank's K/V"}


def read_trace(path):
    """{rank: [(name, layer, start_ms, duration_ms), ...]} from a --trace file (fast/trace.py)."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    spans = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("pid", 0) == 0:   # pid 1: a GPU's staging copies
            spans[e["tid"]].append((e["name"], e.get("args", {}).get("layer"), e["ts"] / 1e3, e["dur"] / 1e3))
    return dict(spans)


def _compute_label(layer, trace):
    """A compute span ends where layer `layer` exchanges K/V, so it holds mostly the attention and
    MLP of the layer before (and that layer's QKV): label it with that layer. 'head': the last layer
    and the LM head."""
    if layer == "head":
        last = max(l for spans in trace.values() for _, l, _, _ in spans if isinstance(l, int))
        return f"L{last}+head"
    return f"L{layer - 1}" if layer else ""


def plot_timeline(trace_paths, titles, out_png, ttfts=None):
    """One panel per Chrome-trace file (runahead.py/tsp.py --trace), one row per rank, a shared time axis.

    Spans are coloured by name: compute, recv, send, allgather (fast/trace.py). A compute span runs
    from one K/V exchange to the next, so the one before layer l's exchange holds layer l-1's
    attention and MLP: wide ones are labelled that way (L0, L1, ..., last: L{n-1}+head). Each
    panel's title gets the time each rank's last span ends. What the picture shows is written
    beside it as JSON (<out>.json: per panel, each rank's spans by name and layer, when each rank
    finishes, and the TTFT): tests/test_readme.py holds the README and today's code to it.
    """
    traces = [read_trace(p) for p in trace_paths]
    ranks = max(len(t) for t in traces)
    fig, axes = plt.subplots(len(traces), 1, figsize=(11, 0.9 + (0.55 * ranks + 0.6) * len(traces)),
                             sharex=True, squeeze=False)
    end_all = max(s + d for t in traces for spans in t.values() for _, _, s, d in spans)
    seen = set()
    for ax, trace, title in zip(axes[:, 0], traces, titles):
        end = max(s + d for spans in trace.values() for _, _, s, d in spans)
        for rank, spans in sorted(trace.items()):
            for name, layer, start, dur in spans:
                color = SPAN_COLORS.get(name, "#999999")
                ax.broken_barh([(start, dur)], (rank - 0.4, 0.8), facecolors=color, edgecolor="white", lw=0.3)
                seen.add(name)
                if name == "compute" and dur > 0.035 * end_all:
                    ax.text(start + dur / 2, rank, _compute_label(layer, trace),
                            ha="center", va="center", fontsize=7, color="white")
        ax.set_yticks(range(ranks), [f"rank {r}" for r in range(ranks)], fontsize=8)
        ax.set_ylim(ranks - 0.5, -0.5)
        ends = [max(s + d for _, _, s, d in spans) for _, spans in sorted(trace.items())]
        ax.set_title(f"{title}: ranks finish at {' / '.join(f'{e:.0f}' for e in ends)} ms", fontsize=9, loc="left")
        ax.axvline(end, color="black", lw=0.8, ls=":")
        ax.grid(axis="x", alpha=0.3)
    panels = [dict(title=title, ttft_ms=ttft, finish_ms=[round(max(s + d for _, _, s, d in spans), 1)
                                                        for _, spans in sorted(trace.items())],
                   spans={r: [[n, l] for n, l, _, _ in spans] for r, spans in sorted(trace.items())})
              for trace, title, ttft in zip(traces, titles, ttfts or [None] * len(traces))]
    with cli.replace_whole(os.path.splitext(out_png)[0] + ".json") as tmp, open(tmp, "w") as f:
        json.dump(dict(panels=panels), f, indent=1)
    axes[-1, 0].set_xlabel("ms since the barrier")
    handles = [Patch(facecolor=SPAN_COLORS[n], label=SPAN_MEANING[n]) for n in SPAN_COLORS if n in seen]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.25 + 0.22 * ((len(handles) + 1) // 2)) / fig.get_figheight(), 1, 1))
    plots.save(fig, out_png)


def run_program(n, script, args, timeout=600):
    """`mpirun -n n python script args` from the repository root; its stdout, or an error."""
    cmd = [MPIRUN, "-n", str(n), sys.executable, os.path.join(ROOT, script), *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


def ttft_ms(stdout):
    return float(re.search(r"^TTFT: ([\d.]+) ms", stdout, re.M).group(1))


def draw_timeline(p, C, partitions, out_png, threads=1):
    """Run TSP, then KV-Runahead once per partition spec, each with --trace; draw them stacked."""
    cores = len(os.sched_getaffinity(0))
    common = ["--prompt-len", str(C), "--threads", str(threads), "--max-new-tokens", "1"]
    paths, titles, ttfts, lines = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate([None] + partitions):
            paths.append(os.path.join(tmp, f"{i}.json"))
            if spec is None:
                out = run_program(p, "tsp.py", common + ["--trace", paths[-1]])
                titles.append(f"TSP, even split ({p} ranks on {cores} cores, {threads} thread each, "
                              f"built-in model, {C} tokens)")
            else:
                out = run_program(p, "runahead.py", common + ["--partition", spec, "--trace", paths[-1]])
                c = re.search(r"^partition \([^)]*\): ([\d,]+)", out, re.M).group(1)
                titles.append(f"KV-Runahead, partition {c}")
            ttfts.append(round(ttft_ms(out), 1))
            lines.append(f"{titles[-1].split(' (')[0]}: TTFT {ttfts[-1]:.0f} ms")
        plot_timeline(paths, titles, out_png, ttfts)
    for line in lines:
        print(line)


# ----------------------------------------------------------------------------- the command line

def _ratio(spec, C):
    """'5:4:3' -> chunks of C in those proportions (the last takes the rounding); else spec itself."""
    if ":" not in spec:
        return spec
    w = [float(x) for x in spec.split(":")]
    c = [round(C * x / sum(w)) for x in w[:-1]]
    return _fmt(c + [C - sum(c)])


def main(argv=None):
    ap = cli.Parser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", default="all", choices=["all", "attention", "timeline", "example"])
    ap.add_argument("--C", type=cli.at_least(1), help="attention/example: prompt tokens (9); timeline: (3072)")
    ap.add_argument("-p", type=cli.at_least(1), help="ranks (attention/example: 3, timeline: 3)")
    ap.add_argument("--partition", help="attention/example: KV-Runahead's chunks (4,3,2); timeline: runahead.py's --partition, "
                         "several separated by ';', a:b:c for proportions (default: even and 5:4:3)")
    ap.add_argument("--traces", nargs="+", help="timeline: draw these --trace files instead of running")
    ap.add_argument("--out", help="the PNG to write (default: figures/<name>.png)")
    a = ap.parse_args(argv)
    what = ["attention", "timeline"] if a.what == "all" else [a.what]
    if a.out and len(what) > 1:
        ap.error("--out needs one picture")
    if a.out and a.what == "example":
        ap.error("--out: example prints its partition, it draws no picture")
    if a.traces and a.what in ("attention", "example"):
        ap.error(f"--traces: {a.what} draws no trace; timeline does")
    if a.traces and a.what == "timeline" and (a.C or a.p or a.partition):
        ap.error("--traces draws runs made before: --C, -p and --partition make new ones")
    for w in what:
        if w in ("attention", "example"):
            C, p = a.C or 9, a.p or 3
            c = partition.parse(a.partition, C, p) if a.partition else ([4, 3, 2] if (C, p) == (9, 3) else partition.even(C, p))
            if w == "example":
                example(C, p, c)
            else:
                draw_attention(C, p, c, a.out or os.path.join(FIGURES, "attention_map.png"))
        elif w == "timeline":
            out = a.out or os.path.join(FIGURES, "timeline.png")
            if a.traces:
                plot_timeline(a.traces, [os.path.basename(t) for t in a.traces], out)
            else:
                C, p = a.C or 3072, a.p or 3
                specs = a.partition.split(";") if a.partition else ["even", ":".join(map(str, range(p + 2, 2, -1)))]
                draw_timeline(p, C, [_ratio(s, C) for s in specs], out)


if __name__ == "__main__":
    main()
