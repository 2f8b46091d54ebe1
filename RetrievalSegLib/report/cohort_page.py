"""The cohort report: one sortable table row per volume, the ones to check first at the top.

Per volume: status, time, mean confidence (over its segmented slices), voxels per label, and a
thumbnail of its slice with the most foreground (contours over the image in the run's window).
Order: failed volumes first, then interrupted ones (and any other status without an output), then
volumes where a label is empty, then the least confident (`LEAST_FRACTION` of the volumes with a
result, at least one, lowest mean confidence first), then the rest by case id. A row carries
every flag that applies; its place is decided by the first.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .overlay import Picture, label_overlay, labelmap_masks, picture, windowed
from .page import picture_name
from .palette import css, label_colors
from .runs import CohortRun, open_bank, read_label_map, resolve, slice_shape_spacing

FLAG_NAMES = {"failed": "failed", "interrupted": "interrupted", "empty": "empty label", "least": "least confident"}
FLAG_ORDER = ("failed", "interrupted", "empty", "least")
LEAST_FRACTION = 0.1
DONE = ("segmented", "skipped")


def _largest_foreground_slice(labels: np.ndarray, axis: int) -> int:
    from ..data.volume import array_axis

    moved = np.moveaxis(labels, array_axis(axis), 0)
    counts = np.count_nonzero(moved.reshape(moved.shape[0], -1), axis=1)
    return int(np.argmax(counts)) if counts.any() else moved.shape[0] // 2


def read_sidecar_of(folder: Path, result: dict) -> dict[str, Any]:
    """Pass 1 (cheap): a volume's result and sidecar; its arrays are read one volume at a time later."""
    from ..segmentation.provenance import read_sidecar

    info: dict[str, Any] = {"result": result, "case": result["case_id"], "status": str(result.get("status")),
                            "message": str(result.get("message") or "")}
    if info["status"] not in DONE:
        return info
    out = folder / Path(str(result.get("output", ""))).name
    try:
        doc = read_sidecar(out)
    except ValueError as e:
        info["missing"] = f"no readable sidecar ({e})"
        return info
    prov = doc.get("provenance") or {}
    conf = [s.get("confidence") for s in doc["slices"] if s.get("confidence") is not None]
    info.update(output=out, provenance=prov, axis=max(0, "ijk".find(str(prov.get("axis", "k")))),
                labels={int(v): str(n) for v, n in (prov.get("labels") or {}).items()},
                confidence=float(np.mean(conf)) if conf else None)
    return info


def draw_volume(info: dict[str, Any], values: list[int], colors: dict, n: int, longest: int) -> None:
    """Pass 2: voxels per label and the thumbnail of one volume (its arrays are dropped afterwards)."""
    from ..data.volume import read_volume, slice_view

    if "output" not in info:
        return
    try:
        lm = read_label_map(info["output"])
    except (ValueError, RuntimeError, OSError) as e:
        info["missing"] = f"output not readable ({e})"
        return
    arr = lm.array
    if arr.dtype.kind in "ub" and arr.size:
        counts = np.bincount(arr.ravel(), minlength=max(values, default=0) + 1)
        info["voxels"] = {v: int(counts[v]) for v in values}
    else:
        info["voxels"] = {v: int(np.count_nonzero(arr == v)) for v in values}
    prov, axis = info["provenance"], info["axis"]
    s = _largest_foreground_slice(arr, axis)
    gray = None
    where = resolve(prov.get("image") or info["result"].get("image"), prov.get("working_dir"))
    window = prov.get("window")
    if where is not None and window:
        try:
            image = read_volume(where)
            if image.array.shape == arr.shape:
                gray = windowed(slice_view(image.array, axis, s), window)
        except (RuntimeError, ValueError, OSError):
            pass
    if gray is None:
        info["picture_note"] = "image or its window not available: drawn on black"
    (rr, cc), spacing = slice_shape_spacing(lm, axis)
    rgb = label_overlay(gray, labelmap_masks(slice_view(arr, axis, s), colors), spacing, longest, shape=(rr, cc))
    info["picture"] = picture(picture_name("volume", info["case"], n), rgb,
                              f"{info['case']}: slice {s} along {'ijk'[axis]}")


def flags_and_order(infos: list[dict[str, Any]], label_values: list[int]) -> list[dict[str, Any]]:
    """Set each volume's flags and return the volumes in report order (see the module docstring)."""
    scored = sorted((i["confidence"], i["case"]) for i in infos if i.get("confidence") is not None)
    n_least = max(1, math.ceil(LEAST_FRACTION * len(scored))) if scored else 0
    least = {case for _, case in scored[:n_least]}
    for i in infos:
        flags = []
        if i["status"] == "failed":
            flags.append("failed")
        elif i["status"] not in DONE:
            flags.append("interrupted")
        voxels = i.get("voxels")
        if voxels is not None and any(voxels[v] == 0 for v in label_values):
            flags.append("empty")
        if i["case"] in least:
            flags.append("least")
        i["flags"] = flags

    def key(i: dict[str, Any]) -> tuple:
        group = min([FLAG_ORDER.index(f) for f in i["flags"]] or [len(FLAG_ORDER)])
        conf = i.get("confidence")
        by_conf = group == FLAG_ORDER.index("least") and conf is not None
        return (group, conf if by_conf else 0.0, i["case"])

    return sorted(infos, key=key)


def build(run: CohortRun, *, colors_mode: str = "palette", longest: int = 120) -> tuple[dict[str, Any], list[Picture]]:
    """(template context, pictures) of the cohort report."""
    infos = [read_sidecar_of(run.folder, r) for r in run.results]
    labels: dict[int, str] = {}
    for i in infos:
        labels.update(i.get("labels") or {})
    values = sorted(labels)
    bank = None
    if colors_mode == "bank":
        first = next((i["provenance"] for i in infos if i.get("provenance")), None)
        bank = open_bank(first, first.get("working_dir"))[0] if first else None
    colors = label_colors(values, colors_mode, bank.labels if bank is not None else None)
    for n, i in enumerate(infos):
        draw_volume(i, values, colors, n, longest)
    pictures = [i["picture"] for i in infos if i.get("picture") is not None]
    rows = []
    for i in flags_and_order(infos, values):
        seconds = i["result"].get("seconds")
        conf = i.get("confidence")
        voxels = i.get("voxels")
        rows.append({
            "case": i["case"], "status": i["status"], "flags": i["flags"], "message": i["message"],
            "picture": i.get("picture"),
            "no_picture": i.get("missing") or f"no output ({i['status']})",
            "seconds": "n/a" if seconds is None else f"{float(seconds):.1f}", "seconds_sort": "" if seconds is None else seconds,
            "confidence": "n/a" if conf is None else f"{conf:.3f}", "confidence_sort": "" if conf is None else conf,
            "voxels": [voxels[v] if voxels is not None else "" for v in values],
            "empty_labels": [labels[v] for v in values if voxels is not None and voxels[v] == 0],
        })
    s = run.summary
    counts: dict[str, int] = {}
    for i in infos:
        counts[i["status"]] = counts.get(i["status"], 0) + 1
    summary = [("volumes", f"{len(infos)}: " + ", ".join(f"{v} {k}" for k, v in counts.items())),
               ("bank", f"{s.get('bank')} (id {s.get('bank_id')}, revision {s.get('bank_revision')})"),
               ("manifest", s.get("manifest")), ("workers", s.get("workers")), ("seconds", s.get("seconds")),
               ("volumes per minute", s.get("volumes_per_minute")),
               ("interrupted by the user", s.get("interrupted_by_user")),
               ("summaries read", ", ".join(p.name for p in run.summaries))]
    first = next((i["provenance"] for i in infos if i.get("provenance")), {})
    for key, name in (("sam2", "SAM 2"), ("dinov2", "DINOv2"), ("precision", "precision"), ("k", "k"),
                      ("rseg_version", "rseg version")):
        summary.append((name, first.get(key)))
    notes = []
    if s.get("interrupted_by_user"):
        notes.append("the run was interrupted: volumes not finished are listed as interrupted; run the same "
                     "command again to finish them")
    context = {
        "title": f"Cohort: {run.folder.name or run.folder}",
        "subtitle": f"{len(infos)} volumes in {run.folder}",
        "random_weights": bool(s.get("random_weights")),
        "notes": notes,
        "summary": [(k, "n/a" if v is None else str(v)) for k, v in summary],
        "legend": [{"name": labels[v], "value": v, "color": css(colors[v])} for v in values],
        "label_names": [labels[v] for v in values],
        "rows": rows,
        "flag_names": FLAG_NAMES,
        "least_text": f"{int(LEAST_FRACTION * 100)}% (at least one)",
    }
    return context, pictures
