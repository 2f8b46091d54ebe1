"""The segment report: a strip of slices with their retrieved supports, the confidence along the axis,
and the provenance of one segmentation (`rseg segment`, or one prediction of evaluate / a cohort).

Slices shown: `even` slices evenly spaced over the segmented slices (over all slices when none was
segmented) plus the `least` segmented slices of lowest confidence (ties: lower index), in slice
order, each tagged. Extent-stop boundaries: between a segmented slice and a neighbour the stop
left out (status "beyond extent"), as the walk ended there.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .overlay import Picture, label_overlay, labelmap_masks, picture, windowed
from .palette import css, label_colors
from .plots import confidence_plot
from .runs import SegmentRun, slice_shape_spacing

TAG_NAMES = {"even": "evenly spaced", "least": "least confident"}


def choose_slices(confidence: np.ndarray, statuses: list[str], even: int, least: int) -> list[tuple[int, list[str]]]:
    """[(slice index, tags)] in slice order: `even` evenly spaced segmented slices + the `least` least confident."""
    from ..segmentation.provenance import SEGMENTED

    segmented = [i for i, s in enumerate(statuses) if s == SEGMENTED]
    pool = segmented or list(range(len(statuses)))
    tags: dict[int, list[str]] = {}
    if pool and even > 0:
        for pos in np.unique(np.linspace(0, len(pool) - 1, min(even, len(pool))).round().astype(int)):
            tags.setdefault(pool[int(pos)], []).append("even")
    scored = sorted((float(confidence[i]), i) for i in segmented if math.isfinite(float(confidence[i])))
    for _, i in scored[: max(0, least)]:
        tags.setdefault(i, []).append("least")
    return sorted(tags.items())


def extent_boundaries(statuses: list[str]) -> list[float]:
    """x positions (i + 0.5) between a segmented slice and a slice left beyond the extent."""
    from ..segmentation.provenance import BEYOND_EXTENT, SEGMENTED

    out = []
    for i in range(len(statuses) - 1):
        pair = {statuses[i], statuses[i + 1]}
        if pair == {SEGMENTED, BEYOND_EXTENT}:
            out.append(i + 0.5)
    return out


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


class SupportPictures:
    """Support thumbnails from the bank, each loaded once (many slices retrieve the same entry)."""

    def __init__(self, bank, colors: dict, longest: int) -> None:
        self.bank, self.colors, self.longest = bank, colors, longest
        self.entries = {e.id: e for e in bank.entries(include_retired=True)} if bank is not None else {}
        self.done: dict[str, tuple[Picture | None, str]] = {}

    def get(self, entry_id: str, name: str) -> tuple[Picture | None, str, str]:
        """(picture or None, where it comes from, why it is missing)."""
        e = self.entries.get(entry_id)
        where = f"{e.case_id}, {'ijk'[e.axis]}={e.index}" if e is not None else entry_id
        if entry_id not in self.done:
            if self.bank is None or e is None:
                self.done[entry_id] = (None, "not in the bank any more")
            else:
                try:
                    data = self.bank.load_entry(entry_id)
                    masks = [(data.masks[v], c) for v, c in sorted(self.colors.items()) if v in data.masks]
                    rgb = label_overlay(data.image, masks, tuple(e.spacing), self.longest)
                    self.done[entry_id] = (picture(name, rgb, f"support {where}"), "")
                except Exception as err:  # noqa: BLE001 - one damaged entry leaves a gap, not a failed report
                    self.done[entry_id] = (None, f"cannot be read ({err})")
        pic, missing = self.done[entry_id]
        return pic, where, missing


def build(run: SegmentRun, *, even: int = 6, least: int = 4, colors_mode: str = "palette",
          longest: int = 320, support_longest: int = 110) -> tuple[dict[str, Any], list[Picture]]:
    """(template context, pictures) of the segment report."""
    from ..engine.preprocess import robust_window
    from ..data.volume import slice_view

    prov = run.provenance
    statuses = [str(s.get("status")) for s in run.slices]
    conf = run.confidence
    notes = [m for m in (run.image_missing,) if m]
    colors = label_colors(run.labels, colors_mode, run.bank.labels if run.bank is not None else None)
    window = run.window
    if window is None and run.image is not None:
        window = robust_window(run.image.array)
        notes.append("the sidecar does not record the intensity window (written by an older rseg): the "
                     "automatic window (0.5-99.5 percentiles) is shown, which is what the run used unless "
                     "it was given --window/--level")
    chosen = choose_slices(conf, statuses, even, least)
    (rows, cols), spacing = slice_shape_spacing(run.labelmap, run.axis)
    pictures: list[Picture] = []
    supports = SupportPictures(run.bank, colors, support_longest)
    names: set[str] = set()
    if run.bank is None:
        notes.append(f"support thumbnails are not shown: {run.bank_missing}")
    slices = []
    for n, (i, tags) in enumerate(chosen):
        gray = windowed(slice_view(run.image.array, run.axis, i), window) if run.image is not None else None
        lab = slice_view(run.labelmap.array, run.axis, i)
        pic = picture(f"slice-{i:04d}.png", label_overlay(gray, labelmap_masks(lab, colors), spacing, longest,
                                                           shape=(rows, cols)), f"slice {i} with label contours")
        pictures.append(pic)
        rec = run.slices[i]
        sups = []
        for rank, (eid, score) in enumerate(rec.get("retrieved") or []):
            sp, where, missing = supports.get(str(eid), f"support-{len(supports.done):04d}.png")
            if sp is not None and sp.name not in names:
                names.add(sp.name)
                pictures.append(sp)
            sups.append({"entry": str(eid), "picture": sp, "where": where, "missing": missing,
                         "score_text": _fmt(score)})
        slices.append({"index": i, "tags": tags, "status": statuses[i], "confidence": rec.get("confidence"),
                       "picture": pic, "supports": sups,
                       "no_supports": "not segmented: no supports were retrieved" if statuses[i] != "segmented"
                       else "no supports recorded"})
    extent = prov.get("extent") or {}
    plot = confidence_plot(conf, statuses, boundaries=extent_boundaries(statuses),
                           starts=extent.get("start_slices") or [], annotated=prov.get("annotated_slices") or [],
                           shown=[i for i, _ in chosen], least=[i for i, t in chosen if "least" in t],
                           axis_name="ijk"[run.axis])
    pictures.append(plot)
    values, counts = np.unique(run.labelmap.array, return_counts=True)
    voxels = dict(zip(values.tolist(), counts.tolist()))
    by_status = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
    finite = conf[np.isfinite(conf)]
    summary = [
        ("output", str(run.output)),
        ("image", str(prov.get("image"))),
        ("slices", f"{len(statuses)} along {'ijk'[run.axis]}: " + ", ".join(f"{v} {k}" for k, v in by_status.items())),
        ("mean confidence", _fmt(float(finite.mean())) if finite.size else "n/a"),
        *[(f"{name} ({v})", f"{voxels.get(v, 0)} voxels") for v, name in sorted(run.labels.items())],
    ]
    context = {
        "title": f"Segmentation: {run.output.name}",
        "subtitle": f"{prov.get('image')} -> {run.output}",
        "random_weights": bool(prov.get("random_weights")),
        "notes": notes,
        "summary": summary,
        "legend": [{"name": n, "value": v, "color": css(colors[v])} for v, n in sorted(run.labels.items())],
        "confidence_plot": plot,
        "slices": slices,
        "axis_name": "ijk"[run.axis],
        "tag_names": TAG_NAMES,
        "window_text": "not known" if window is None else f"{window[0]:g} to {window[1]:g}",
        "spacing_text": f"{rows} x {cols} voxels of {spacing[0]:g} x {spacing[1]:g} mm (rows x columns)",
        "provenance": provenance_rows(prov),
    }
    return context, pictures


def provenance_rows(prov: dict) -> list[tuple[str, str]]:
    """The provenance as (name, value) rows, in the order a reader checks them."""
    bank = prov.get("bank") or {}
    extent = prov.get("extent") or {}
    rows = [
        ("rseg version", prov.get("rseg_version")),
        ("created", prov.get("created")),
        ("SAM 2", prov.get("sam2")),
        ("DINOv2", prov.get("dinov2")),
        ("random weights", "YES: the output is meaningless" if prov.get("random_weights") else "no"),
        ("image size", prov.get("image_size")),
        ("precision", prov.get("precision")),
        ("batch size", prov.get("batch_size")),
        ("k (supports per slice)", prov.get("k")),
        ("bank", f"{bank.get('path')} (id {bank.get('bank_id')}, revision {bank.get('revision')})"),
        ("labels", ", ".join(f"{v}: {n}" for v, n in (prov.get("labels") or {}).items())),
        ("axis", prov.get("axis")),
        ("intensity window", "not recorded" if not prov.get("window") else
         f"{prov['window'][0]:g} to {prov['window'][1]:g}"),
        ("extent stop", "off (every slice)" if not extent.get("stop") else
         f"{extent.get('stop')} slices, presence threshold {extent.get('presence_threshold', 'n/a')}, "
         f"started at {extent.get('start_slices')} ({extent.get('start_reason', 'n/a')})"),
        ("annotated slices (bank)", ", ".join(str(i) for i in prov.get("annotated_slices") or []) or "none"),
        ("seconds", prov.get("seconds")),
        ("cancelled", prov.get("cancelled")),
    ]
    for key in ("case_id", "case", "subject", "command", "compile", "output_sha256"):
        if key in prov:
            rows.append((key, prov[key]))
    return [(k, "n/a" if v is None else str(v)) for k, v in rows]
