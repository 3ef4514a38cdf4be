"""Plots of benchmark results (bench/measured.py, bench/simulated.py, bench/figures.py): TTFT against context, and the
speed-up over TSP, one subplot per (model, link, ranks), measured solid and simulated dashed.
"""
import os
import statistics
import textwrap
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DPI = 120


VARIANTS = ["one process", "TSP", "TSP-zigzag", "KVR-E", "KVR-S", "KVR-P", "ideal"]
VARIANT_COLORS = {"one process": "#7f7f7f", "TSP": "#c44e52", "TSP-zigzag": "#8172b3", "KVR-E": "#55a868",
                  "KVR-S": "#4c72b0", "KVR-P": "#64b5cd", "ideal": "#000000"}


def over_runs(rows):
    """Rows of the plotted variants, one per point: with several independent runs (simulate's "run"
    field), the median of their TTFTs."""
    groups = defaultdict(list)
    for r in rows:
        if r["variant"] in VARIANTS:
            groups[r["model"], r["link"], r["p"], r["C"], r["variant"], r["source"]].append(r)
    return [dict(rs[0], ttft_s=statistics.median(r["ttft_s"] for r in rs)) for rs in groups.values()]


def _groups(rows):
    """Rows grouped by (model, link, p): one subplot each, in a stable order. A "one process" row
    with p = 1 is drawn in every subplot of its model and link (it is the same run for every p)."""
    groups = defaultdict(list)
    single = [r for r in rows if r["variant"] == "one process" and r["p"] == 1]
    for r in rows:
        if not (r["variant"] == "one process" and r["p"] == 1):
            groups[(r["model"], r["link"], r["p"])].append(r)
    for r in single:
        mine = [k for k in groups if k[:2] == (r["model"], r["link"])] or [(r["model"], r["link"], 1)]
        for k in mine:
            groups[k].append(r)
    return [(k, groups[k]) for k in sorted(groups, key=lambda k: (k[0], k[1], k[2]))]


def _style(variant, source):
    if variant == "ideal":
        return dict(color=VARIANT_COLORS["ideal"], ls=":", marker=None, lw=1)
    return dict(color=VARIANT_COLORS.get(variant, "#999999"), ls="-" if source == "measured" else "--",
                marker="o" if source == "measured" else None, ms=3.5, lw=1.5)


def _subplots(n):
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.4, 4.3 * cols), 3.3 * rows + 1.3), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _context_axis(ax, Cs):
    ax.set_xscale("log", base=2)
    ax.set_xticks(Cs, [f"{C // 1024}k" if C % 1024 == 0 else str(C) for C in Cs], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("context C (prompt tokens)")
    ax.grid(alpha=0.3)


def _legend_note(rows):
    sources = {r["source"] for r in rows}
    if sources == {"measured"}:
        return "all measured"
    if sources == {"simulated"}:
        return "all simulated"
    return "solid: measured, dashed: simulated"


def plot_ttft(rows, out_png, title=None):
    """TTFT vs context: one subplot per (model, link, p), one line per (variant, source).

    rows: dicts with model, C, p, variant (see VARIANTS), ttft_s, source ("measured" or
    "simulated"), link. Measured lines are solid with dots, simulated dashed, ideal dotted.
    """
    groups = _groups(rows)
    fig, axes = _subplots(len(groups))
    for ax, ((model, link, p), rs) in zip(axes, groups):
        lines = defaultdict(list)
        for r in rs:
            lines[(r["variant"], r["source"])].append((r["C"], r["ttft_s"]))
        for (variant, source), pts in sorted(lines.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1])):
            pts.sort()
            ax.plot([C for C, _ in pts], [t * 1e3 for _, t in pts], label=f"{variant} ({source})"
                    if variant != "ideal" else "ideal: one process / p", **_style(variant, source))
        _context_axis(ax, sorted({r["C"] for r in rs}))
        ax.set_yscale("log")
        ax.set_ylabel("TTFT (ms)")
        ax.set_title(f"{model}, p = {p}, {link}", fontsize=9)
    _finish(fig, axes, title or f"Time to first token vs context ({_legend_note(rows)})", out_png)


def plot_speedup(rows, out_png, title=None):
    """TSP's TTFT divided by each variant's, vs context: above 1 beats TSP. Same rows as plot_ttft
    (ideal left out).

    A variant is compared with the TSP row of the same model, link, p, C and source (measured with
    measured, simulated with simulated); where that is missing, with TSP of the other source.
    """
    tsp = {(r["model"], r["link"], r["p"], r["C"], r["source"]): r["ttft_s"] for r in rows if r["variant"] == "TSP"}
    groups = _groups(rows)
    fig, axes = _subplots(len(groups))
    for ax, ((model, link, p), rs) in zip(axes, groups):
        lines = defaultdict(list)
        for r in rs:
            if r["variant"] in ("TSP", "ideal"):       # ideal's p-fold would squash the rest
                continue
            other = "simulated" if r["source"] == "measured" else "measured"
            base = tsp.get((model, link, p, r["C"], r["source"])) or tsp.get((model, link, p, r["C"], other))
            if base:
                lines[(r["variant"], r["source"])].append((r["C"], base / r["ttft_s"]))
        for (variant, source), pts in sorted(lines.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1])):
            pts.sort()
            ax.plot([C for C, _ in pts], [s for _, s in pts], label=f"{variant} ({source})"
                    if variant != "ideal" else "ideal: one process / p", **_style(variant, source))
        ax.axhline(1, color="#c44e52", lw=1, label="TSP")
        _context_axis(ax, sorted({r["C"] for r in rs}))
        ax.set_ylabel("speed-up over TSP (TSP TTFT / TTFT)")
        ax.set_title(f"{model}, p = {p}, {link}", fontsize=9)
    _finish(fig, axes, title or f"Speed-up over TSP vs context ({_legend_note(rows)})", out_png)


def _finish(fig, axes, title, out_png):
    """One legend for all subplots, below them; the title, wrapped, above."""
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    ncol = min(len(handles), 4 if fig.get_figwidth() > 8 else 3)
    rows = (len(handles) + ncol - 1) // ncol
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    text = textwrap.fill(title, width=int(fig.get_figwidth() * 11))
    fig.suptitle(text, fontsize=9)
    h = fig.get_figheight()
    fig.tight_layout(rect=(0, (0.1 + 0.2 * rows) / h, 1, 1 - (0.1 + 0.16 * text.count("\n")) / h))
    save(fig, out_png)


def _order(variant):
    return VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS)


def rel(path):
    return os.path.relpath(path, ROOT) if path.startswith(ROOT) else path


def save(fig, out_png):
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    with cli.replace_whole(out_png) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    print(f"wrote {rel(os.path.abspath(out_png))} ({os.path.getsize(out_png) // 1024} KB)")
