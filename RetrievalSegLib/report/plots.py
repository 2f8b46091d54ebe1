"""Plots of the report, drawn with matplotlib's Agg canvas (no display, no pyplot state).

`Figure` + `FigureCanvasAgg` directly rather than `pyplot`: pyplot keeps global figures and picks
a backend for the whole process, which a library called from Slicer's or a user's process must not
change.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from .overlay import Picture
from .palette import OKABE_ITO, RGB

#: Marker colours of the confidence plot (Okabe-Ito, like everything else).
_PAL = dict(OKABE_ITO)
CONFIDENCE = _PAL["blue"]
SHOWN = _PAL["orange"]
LEAST = _PAL["vermillion"]
ANNOTATED = _PAL["bluish green"]
START = _PAL["reddish purple"]


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig, name: str, alt: str) -> Picture:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    data = buf.getvalue()
    w, h = (int(round(v)) for v in fig.get_size_inches() * 100)
    return Picture(name, data, w, h, alt)


def _rgb01(c: RGB) -> tuple[float, float, float]:
    return (c[0] / 255.0, c[1] / 255.0, c[2] / 255.0)


def confidence_plot(confidence: np.ndarray, statuses: Sequence[str], *, boundaries: Sequence[float],
                    starts: Sequence[int], annotated: Sequence[int], shown: Sequence[int], least: Sequence[int],
                    axis_name: str, name: str = "confidence.png") -> Picture:
    """Per-slice confidence along the slice axis; slices not segmented shaded (by reason), the
    extent-stop boundaries as dashed lines, start / annotated / shown slices marked."""
    from ..segmentation.provenance import BEYOND_EXTENT, CANCELLED, OUTSIDE_RANGE

    n = len(confidence)
    fig = _figure(9.0, 2.8)
    ax = fig.add_axes((0.07, 0.2, 0.74, 0.72))
    x = np.arange(n)
    shade = {BEYOND_EXTENT: ("#d9d9d9", "beyond extent"), OUTSIDE_RANGE: ("#f0f0f0", "outside slice range"),
             CANCELLED: ("#bdbdbd", "cancelled")}
    used: set[str] = set()
    for i, s in enumerate(statuses):
        if s in shade:
            color, text = shade[s]
            ax.axvspan(i - 0.5, i + 0.5, color=color, lw=0, label=None if s in used else f"not segmented: {text}")
            used.add(s)
    ax.plot(x, confidence, "-o", color=_rgb01(CONFIDENCE), ms=2.5 if n > 60 else 4, lw=1.2, label="confidence")
    for b_i, b in enumerate(boundaries):
        ax.axvline(b, color="black", ls="--", lw=1, label="extent stop" if b_i == 0 else None)
    for group, color, marker, text, y in ((annotated, ANNOTATED, "^", "annotated (in the bank)", -0.06),
                                          (starts, START, "v", "extent start", 1.06)):
        if len(group):
            ax.scatter(list(group), [y] * len(group), marker=marker, s=36, color=_rgb01(color), label=text,
                       clip_on=False, zorder=3)
    for group, color, text in ((shown, SHOWN, "shown below"), (least, LEAST, "least confident")):
        pts = [i for i in group if np.isfinite(confidence[i])]
        if pts:
            ax.scatter(pts, confidence[pts], s=40, facecolors="none", edgecolors=_rgb01(color), lw=1.6,
                       label=text, zorder=4)
    ax.set_xlim(-0.5, max(n - 0.5, 0.5))
    ax.set_ylim(-0.1, 1.1)
    ax.set_xlabel(f"slice index along {axis_name}")
    ax.set_ylabel("confidence")
    ax.grid(axis="y", color="#e0e0e0", lw=0.6)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return _png(fig, name, f"per-slice confidence along {axis_name} for {n} slices")


def metric_plot(metric: str, unit: str, values: dict[str, list[float]], notes: dict[str, str],
                colors: dict[str, RGB], name: str, higher_is_better: bool) -> Picture:
    """One box per label with every case as a point (seeded jitter), n and undefined counts below."""
    labels = list(values)
    fig = _figure(max(3.5, 1.3 * len(labels) + 1.5), 3.2)
    ax = fig.add_axes((0.16, 0.24, 0.8, 0.66))
    data = [values[k] for k in labels]
    rng = np.random.default_rng(0)  # jitter only; the same picture each time
    positions = np.arange(1, len(labels) + 1)
    drawn = [d if d else [np.nan] for d in data]
    ax.boxplot(drawn, positions=positions, widths=0.55, showfliers=False,
               medianprops={"color": "black"}, boxprops={"color": "#555555"},
               whiskerprops={"color": "#555555"}, capprops={"color": "#555555"})
    for pos, label, d in zip(positions, labels, data):
        if d:
            ax.scatter(pos + rng.uniform(-0.16, 0.16, len(d)), d, s=16, color=_rgb01(colors[label]),
                       edgecolors="black", linewidths=0.4, zorder=3)
    ax.set_xticks(positions)
    ax.set_xticklabels([f"{k}\nn={len(values[k])}" + (f"\n{notes[k]}" if notes.get(k) else "") for k in labels],
                       fontsize=8)
    ax.set_ylabel(f"{metric} ({unit})" if unit else metric)
    ax.set_title(f"{metric} per label over cases ({'higher' if higher_is_better else 'lower'} is better)", fontsize=9)
    if metric.lower().startswith("dice"):
        ax.set_ylim(-0.03, 1.03)
    ax.grid(axis="y", color="#e0e0e0", lw=0.6)
    return _png(fig, name, f"{metric} per label: " + ", ".join(f"{k} ({len(values[k])} cases)" for k in labels))



def paired_plot(label: str, metric: str, unit: str, configurations: list[str], values: dict[str, dict[str, float]],
                titles: dict[str, str], name: str, higher_is_better: bool) -> Picture:
    """Paired values per configuration: each case a grey line through its value in every configuration
    (the reference first), each configuration's median a black bar; `titles[configuration]` (the
    difference against the reference and its p-value) under each configuration's name."""
    fig = _figure(max(3.6, 1.6 * len(configurations) + 1.4), 3.3)
    ax = fig.add_axes((0.16, 0.3, 0.8, 0.6))
    cases = sorted({c for per in values.values() for c in per})
    x = np.arange(len(configurations))
    line = _rgb01(_PAL["blue"])
    for case in cases:
        ys = np.array([values.get(cfg, {}).get(case, np.nan) for cfg in configurations], dtype=float)
        ax.plot(x, ys, "-o", color=line, alpha=0.55, ms=3.5, lw=1.0)
    for i, cfg in enumerate(configurations):
        v = [y for y in values.get(cfg, {}).values() if y is not None and np.isfinite(y)]
        if v:
            ax.hlines(np.median(v), i - 0.22, i + 0.22, color="black", lw=2.2, zorder=4)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{cfg}\n{titles.get(cfg, '')}" for cfg in configurations], fontsize=7)
    ax.set_xlim(-0.5, len(configurations) - 0.5)
    ax.set_ylabel(f"{metric} ({unit})" if unit else metric)
    if metric.lower().startswith("dice"):
        ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{label}: {metric} per case, paired "
                 f"({'higher' if higher_is_better else 'lower'} is better; bar: median)", fontsize=8)
    ax.grid(axis="y", color="#e0e0e0", lw=0.6)
    return _png(fig, name, f"{label}: {metric} per case in each configuration ({len(cases)} cases, {len(configurations)} "
                           "configurations), each case a line")
