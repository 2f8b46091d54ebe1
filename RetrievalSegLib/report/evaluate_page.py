"""The evaluate report: Dice and HD95 per label over cases, and per case its worst slice.

Cases are listed worst first (lowest mean Dice over the labels). A case's worst slice is drawn from
its saved prediction (`--save-predictions`, which `--report` turns on), its ground truth and image
(the paths metrics.json records) in the window the prediction's sidecar records: ground truth and
prediction as contours in the label colours, and the errors on a panel of their own.

With `rseg evaluate --compare`, `compare_section` draws the configurations against the reference
from compare.json (tables and paired plots; see its docstring).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .overlay import Picture, error_overlay, label_overlay, labelmap_masks, picture, windowed, worst_slice
from .page import picture_name
from .palette import ERROR_COLORS, css, label_colors
from .plots import metric_plot
from .runs import EvaluateRun, read_label_map, resolve, slice_shape_spacing


def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def compare_section(run: EvaluateRun) -> dict[str, Any] | None:
    """The "configurations compared" section, or None when the run has no `compare.json`.

    From `rseg evaluate --compare`'s compare.json: a table of the configurations (mean, sd, median
    per label), a table of the paired differences against the reference per label and metric
    (mean and median difference, 95% bootstrap CI, Wilcoxon p, n, the small-n note), and per label
    and metric one paired plot (each case a line through its value in every configuration). Returns
    {"reference", "notes", "summary_rows", "difference_rows", "plots"}; `build` adds the plots to
    the report's pictures.
    """
    from .plots import paired_plot

    doc = run.compare
    if doc is None:
        return None
    if not isinstance(doc, dict) or doc.get("format") != "rseg-evaluate-compare" \
            or not isinstance(doc.get("configurations"), list) or not isinstance(doc.get("rows"), list):
        return {"notes": [f"{run.folder / 'compare.json'} was not written by rseg evaluate --compare: not drawn"],
                "plots": [], "summary_rows": [], "difference_rows": [], "reference": None}
    configs = [str(c.get("name")) for c in doc["configurations"] if isinstance(c, dict)]
    reference = str(doc.get("reference"))
    notes = []
    if not doc.get("complete", False):
        notes.append("the comparison did not finish: configurations not finished have fewer cases or none")
    if doc.get("random_weights"):
        notes.append("RANDOM WEIGHTS: every configuration ran with random weights; the differences are meaningless")
    summary_rows, difference_rows = [], []
    for cfg in configs:
        for label, per in (doc.get("summary", {}).get(cfg) or {}).items():
            d, h = per.get("dice") or {}, per.get("hd95") or {}
            summary_rows.append({"configuration": cfg, "reference": cfg == reference, "label": label,
                                 "dice": f"{_fmt(d.get('mean'), '.4f')} / {_fmt(d.get('sd'), '.4f')} / "
                                         f"{_fmt(d.get('median'), '.4f')}",
                                 "hd95": f"{_fmt(h.get('mean'), '.2f')} / {_fmt(h.get('sd'), '.2f')} / "
                                         f"{_fmt(h.get('median'), '.2f')}", "n": d.get("n")})
        for label, per in (doc.get("differences", {}).get(cfg) or {}).items():
            for key, metric, spec in (("dice", "Dice", ".4f"), ("hd95", "HD95 (mm)", ".2f")):
                s = per.get(key) or {}
                difference_rows.append({
                    "configuration": cfg, "label": label, "metric": metric, "n": s.get("n"),
                    "mean": _fmt(s.get("mean_difference"), "+" + spec), "median": _fmt(s.get("median_difference"), "+" + spec),
                    "ci": f"[{_fmt(s.get('ci95_low'), '+' + spec)}, {_fmt(s.get('ci95_high'), '+' + spec)}]",
                    "p": _fmt(s.get("wilcoxon_p"), ".3g"), "note": s.get("note") or ""})
    plots = []
    labels = list(dict.fromkeys(str(r.get("name")) for r in doc["rows"] if isinstance(r, dict)))
    for i, label in enumerate(labels):
        for field, key, metric, unit, higher in (("dice", "dice", "Dice", "", True), ("hd95_mm", "hd95", "HD95", "mm", False)):
            values: dict[str, dict[str, float]] = {}
            for r in doc["rows"]:
                if isinstance(r, dict) and str(r.get("name")) == label and isinstance(r.get(field), (int, float)):
                    values.setdefault(str(r.get("configuration")), {})[str(r.get("case"))] = float(r[field])
            if not values:
                continue
            titles = {reference: "(reference)"}
            for cfg in configs:
                s = ((doc.get("differences", {}).get(cfg) or {}).get(label) or {}).get(key) or {}
                if s:
                    titles[cfg] = f"mean diff {_fmt(s.get('mean_difference'), '+.3g')}, p {_fmt(s.get('wilcoxon_p'), '.2g')}"
            plots.append(paired_plot(label, metric, unit, configs, values, titles, picture_name(f"compare-{key}", label, i),
                                     higher))
    return {"reference": reference, "notes": notes, "summary_rows": summary_rows,
            "difference_rows": difference_rows, "plots": plots,
            "statistics": [f"{k}: {v}" for k, v in (doc.get("statistics") or {}).items()]}


def _case_pictures(run: EvaluateRun, case: str, names: dict[int, str], colors: dict, n: int,
                   longest: int) -> tuple[dict[str, Any], list[Picture]]:
    """Worst-slice panels of one case, or notes saying why they are missing."""
    from ..engine.preprocess import robust_window
    from ..segmentation.provenance import read_sidecar
    from ..data.volume import read_volume, slice_view, through_plane_axis

    info = run.metrics["per_case"].get(case) or {}
    pred_path = run.predictions.get(case)
    if pred_path is None:
        return {"notes": ["prediction not saved: run rseg evaluate with --save-predictions (or --report) to "
                          "see this case's worst slice"]}, []
    try:
        prov = read_sidecar(pred_path)["provenance"]
    except ValueError:
        prov = {}
    base = prov.get("working_dir")
    truth_path = resolve(info.get("ground_truth"), base)
    image_path = resolve(info.get("image"), base)
    if truth_path is None:
        return {"notes": [f"ground truth {info.get('ground_truth')!r} is not there any more"]}, []
    try:
        pred = read_label_map(pred_path)
        truth = read_volume(truth_path)
    except (RuntimeError, ValueError, OSError) as e:
        return {"notes": [f"cannot read this case's files ({e})"]}, []
    notes = []
    if truth.array.shape != pred.array.shape:
        return {"notes": [f"ground truth {truth_path} has shape {truth.array.shape}, the prediction "
                          f"{pred.array.shape}: not drawn"]}, []
    truth_arr = np.where(np.isin(truth.array, list(names)), truth.array, 0)  # as evaluate scored it
    image = None
    if image_path is not None:
        try:
            image = read_volume(image_path)
        except (RuntimeError, ValueError, OSError) as e:
            notes.append(f"image {image_path} cannot be read ({e}): drawn on black")
        if image is not None and image.array.shape != pred.array.shape:
            image = None
            notes.append(f"image {image_path} has another shape than the prediction: drawn on black")
    else:
        notes.append(f"image {info.get('image')!r} is not there any more: drawn on black")
    axis = "ijk".find(str(prov.get("axis", "")))
    if axis < 0:
        axis = through_plane_axis(pred.spacing)
    index, score = worst_slice(pred.array, truth_arr, axis, list(names))
    if index is None:
        notes.append("no label in the prediction or the ground truth on any slice: nothing to draw")
        return {"notes": notes}, []
    window = prov.get("window")
    if image is not None and not window:
        window = robust_window(image.array)
        notes.append("window not recorded in the prediction's sidecar: the automatic window is shown")
    gray = windowed(slice_view(image.array, axis, index), window) if image is not None else None
    (rows, cols), spacing = slice_shape_spacing(pred, axis)
    p2, t2 = slice_view(pred.array, axis, index), slice_view(truth_arr, axis, index)
    pics = [
        picture(picture_name("truth", case, n), label_overlay(gray, labelmap_masks(t2, colors), spacing, longest,
                                                              shape=(rows, cols)), f"{case}: ground truth"),
        picture(picture_name("pred", case, n), label_overlay(gray, labelmap_masks(p2, colors), spacing, longest,
                                                             shape=(rows, cols)), f"{case}: prediction"),
        picture(picture_name("errors", case, n), error_overlay(gray, p2, t2, spacing, longest), f"{case}: errors"),
    ]
    return {"panels": list(zip(("ground truth", "prediction", "errors"), pics)), "worst_index": index,
            "truth_empty": not t2.any(),
            "worst_score": _fmt(score, ".3f"), "axis_name": "ijk"[axis], "notes": notes,
            "window_text": "not known" if not window else f"{window[0]:g} to {window[1]:g}"}, pics


def build(run: EvaluateRun, *, colors_mode: str = "palette", longest: int = 240) -> tuple[dict[str, Any], list[Picture]]:
    """(template context, pictures) of the evaluate report."""
    m = run.metrics
    names = run.labels
    colors = label_colors(names, colors_mode)
    by_name = {n: colors[v] for v, n in names.items()}
    pictures: list[Picture] = []
    dice = {n: [float(r["dice"]) for r in run.rows if r.get("name") == n and r.get("dice") is not None]
            for n in names.values()}
    hd = {n: [float(r["hd95_mm"]) for r in run.rows if r.get("name") == n and r.get("hd95_mm") is not None]
          for n in names.values()}
    undefined = {n: sum(1 for r in run.rows if r.get("name") == n and r.get("hd95_mm") is None) for n in names.values()}
    plots = [metric_plot("Dice", "", dice, {}, by_name, "dice.png", True),
             metric_plot("HD95", "mm", hd, {n: f"{u} undefined" for n, u in undefined.items() if u}, by_name,
                         "hd95.png", False)]
    pictures += plots
    compare = compare_section(run)
    if compare:
        pictures += compare["plots"]

    def mean_dice(case: str) -> float:
        d = [float(r["dice"]) for r in run.rows if r.get("case") == case and r.get("dice") is not None]
        return float(np.mean(d)) if d else math.inf

    cases = []
    for n, case in enumerate(sorted(run.cases, key=lambda c: (mean_dice(c), c))):
        rows = [{"name": r.get("name"), "dice": _fmt(r.get("dice"), ".4f"),
                 "hd95": _fmt(r.get("hd95_mm"), ".2f") + (f" ({r['hd95_undefined']})" if r.get("hd95_undefined") else ""),
                 "pred_voxels": r.get("pred_voxels"), "truth_voxels": r.get("truth_voxels")}
                for r in run.rows if r.get("case") == case]
        extra, pics = _case_pictures(run, case, names, colors, n, longest)
        pictures += pics
        cases.append({"case": case, "rows": rows, "panels": extra.get("panels"), "notes": extra.get("notes", []),
                      **{k: extra.get(k) for k in ("worst_index", "worst_score", "axis_name", "window_text", "truth_empty")}})
    summary_rows = [{"name": name, "dice_mean": _fmt(s.get("dice_mean"), ".4f"), "dice_sd": _fmt(s.get("dice_sd"), ".4f"),
                     "hd95_mean": _fmt(s.get("hd95_mean"), ".2f"), "hd95_sd": _fmt(s.get("hd95_sd"), ".2f"),
                     "cases": s.get("cases"), "hd95_undefined": s.get("hd95_undefined_cases")}
                    for name, s in (m.get("summary") or {}).items()]
    notes = list(m.get("warnings") or [])
    if not m.get("complete", True):
        notes.insert(0, "this evaluation did not finish: the cases below are those finished so far")
    provenance = [("rseg version", m.get("rseg_version")), ("SAM 2", m.get("sam2")), ("DINOv2", m.get("dinov2")),
                  ("random weights", "YES: these results are meaningless" if m.get("random_weights") else "no"),
                  ("precision", m.get("precision")), ("batch size", m.get("batch_size")), ("k", m.get("k")),
                  ("bank", f"{m.get('bank')} (id {m.get('bank_id')}, revision {m.get('bank_revision')}, "
                           f"{m.get('bank_entries')} entries)"),
                  ("test folder", m.get("test")), ("training folder", m.get("train")),
                  ("skipped inputs", "; ".join(f"{where}: {n} {why}" for where, d in (m.get("skipped_inputs") or {}).items()
                                               for why, n in d.items()) or "none"),
                  ("complete", m.get("complete"))]
    context = {
        "title": f"Evaluation: {run.folder.name or run.folder}",
        "subtitle": f"{len(run.cases)} test cases, {len(names)} labels: {run.folder}",
        "random_weights": bool(m.get("random_weights")),
        "notes": notes,
        "summary_rows": summary_rows,
        "legend": [{"name": n, "value": v, "color": css(colors[v])} for v, n in sorted(names.items())],
        "errors": [{"name": k, "color": css(c)} for k, c in ERROR_COLORS.items()],
        "plots": plots,
        "compare": compare,
        "cases": cases,
        "provenance": [(k, "n/a" if v is None else str(v)) for k, v in provenance],
    }
    return context, pictures
