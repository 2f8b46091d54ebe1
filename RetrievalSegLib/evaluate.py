"""`rseg evaluate`: the paper's protocol on a folder study.

Bank from training cases (optionally capped at N annotated slices, the paper uses 50), segment
every held-out test case slice by slice, and report Dice and HD95 (mm) per label per case, with
mean and sample standard deviation per label, as CSV, JSON and a printed table.
Test cases are always excluded from retrieval of their own slices (case_policy="exclude").
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass
class CaseFiles:
    """One case of a study folder: an image and its label map."""

    case_id: str
    image: Path
    labels: Path


def _strip(name: str) -> str:
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def find_cases(folder: Path) -> list[CaseFiles]:
    """Cases in ACDC (`X.nii.gz` + `X_gt.nii.gz`), nnU-Net (imagesTr/labelsTr) or images/+labels/ layout."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"study folder {folder} does not exist")
    cases: list[CaseFiles] = []
    # ACDC: patientXXX/patientXXX_frameYY.nii.gz with patientXXX_frameYY_gt.nii.gz
    for gt in sorted(folder.rglob("*")):
        stem = _strip(gt.name)
        if gt.is_file() and stem.endswith("_gt") and stem != gt.name:
            ext = gt.name[len(stem):]
            img = gt.with_name(stem[:-3] + ext)
            if img.is_file():
                cases.append(CaseFiles(stem[:-3], img, gt))
    if cases:
        return cases
    for img_dir, lab_dir in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"), ("images", "labels")):
        idir, ldir = folder / img_dir, folder / lab_dir
        if idir.is_dir() and ldir.is_dir():
            for lab in sorted(ldir.iterdir()):
                stem = _strip(lab.name)
                if stem == lab.name:
                    continue
                ext = lab.name[len(stem):]
                for cand in (idir / f"{stem}_0000{ext}", idir / lab.name):
                    if cand.is_file():
                        cases.append(CaseFiles(stem, cand, lab))
                        break
    if not cases:
        raise FileNotFoundError(
            f"no cases found in {folder}: expected ACDC files (X.nii.gz with X_gt.nii.gz), "
            "nnU-Net imagesTr/ + labelsTr/ (CASE_0000.nii.gz + CASE.nii.gz), or images/ + labels/ "
            "with the same file names"
        )
    return cases


def choose_pool(annotated: Sequence[tuple[str, int]], n: int | None) -> list[tuple[str, int]]:
    """At most `n` (case, slice) pairs spread evenly over the ordered list (deterministic)."""
    if n is None or n >= len(annotated):
        return list(annotated)
    if n < 1:
        raise ValueError(f"--pool must be >= 1, got {n}")
    picks = np.linspace(0, len(annotated) - 1, n).round().astype(int)
    return [annotated[i] for i in sorted(set(picks.tolist()))]


def _annotated_slices(labelmap, axis: int, values: Sequence[int]) -> list[int]:
    from .volume import num_slices, slice_view

    return [i for i in range(num_slices(labelmap.array, axis))
            if np.isin(slice_view(labelmap.array, axis, i), values).any()]


def build_bank(train: Sequence[CaseFiles], bank_path: Path, labels, embedder, axis, pool: int | None,
               window=None, progress: bool = True):
    """Create a bank from training cases, capped at `pool` annotated slices."""
    from .bank import SupportBank
    from .volume import parse_axis, read_volume, through_plane_axis

    bank = SupportBank.create(bank_path, labels, embedder.identity)
    values = [lab.value for lab in labels]
    vols, annotated = {}, []
    for c in train:
        img, lab = read_volume(c.image), read_volume(c.labels)
        ax = parse_axis(axis)
        ax = through_plane_axis(img.spacing) if ax is None else ax
        vols[c.case_id] = (img, lab, ax)
        annotated += [(c.case_id, i) for i in _annotated_slices(lab, ax, values)]
    chosen = choose_pool(annotated, pool)
    by_case: dict[str, list[int]] = {}
    for cid, i in chosen:
        by_case.setdefault(cid, []).append(i)
    for cid, idx in by_case.items():
        img, lab, ax = vols[cid]
        # Label values outside the evaluated labels are dropped from the support masks.
        lab = lab.with_array(np.where(np.isin(lab.array, values), lab.array, 0).astype(lab.array.dtype))
        bank.add_volume(img, lab, cid, embedder, axis=ax, window=window, slices=idx)
        if progress:
            print(f"  bank: {cid}: {len(idx)} slices", file=sys.stderr)
    return bank


def _sd(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


def _mean(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def evaluate(test: Sequence[CaseFiles], bank, engine, *, labels=None, k: int = 8, axis=None, window=None,
             out: Path, save_predictions: bool = False, progress: bool = True, precision: str = "auto",
             batch_size: int | None = None) -> dict[str, Any]:
    """Segment each test case and compute per-label Dice/HD95; write CSV + JSON into `out`."""
    from .engine import resolve_precision

    from .metrics import per_label_metrics
    from .segment import segment_volume
    from .volume import read_volume, write_volume

    out.mkdir(parents=True, exist_ok=True)
    names = {lab.value: lab.name for lab in bank.labels}
    if labels is not None:
        names = {v: names[v] for v in labels}
    rows: list[dict[str, Any]] = []
    used_batch = batch_size
    for n, c in enumerate(test):
        img, truth = read_volume(c.image), read_volume(c.labels)
        bar = None
        update = None  # no progress callback unless asked
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=0, desc=f"[{n + 1}/{len(test)}] {c.case_id}", unit="slice", file=sys.stderr)

            def _update(done: int, total: int, bar=bar) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            update = _update

        try:
            seg = segment_volume(img, bank, engine, labels=list(names), k=k, axis=axis, window=window,
                                 case_id=c.case_id, case_policy="exclude", progress=update,
                                 precision=precision, batch_size=batch_size)
            used_batch = seg.batch_size
        finally:
            if bar is not None:
                bar.close()
        truth_arr = np.where(np.isin(truth.array, list(names)), truth.array, 0)
        truth = truth.with_array(truth_arr.astype(np.int32))
        pred = seg.labelmap.with_array(seg.labelmap.array.astype(np.int32))
        if not pred.same_geometry(truth, tol=1e-3):
            raise ValueError(f"case {c.case_id}: label map {c.labels} does not share the image's geometry")
        truth = pred.with_array(truth.array)
        metrics = per_label_metrics(pred, truth, names)
        for name, m in metrics.items():
            rows.append({"case": c.case_id, "label": m["label"], "name": name, "dice": float(m["dice"]),
                         "hd95_mm": float(m["hd95"]), "pred_voxels": int(m["pred_voxels"]),
                         "truth_voxels": int(m["truth_voxels"]), "seconds": round(seg.seconds, 3)})
        if save_predictions:
            (out / "predictions").mkdir(exist_ok=True)
            write_volume(seg.labelmap, out / "predictions" / f"{c.case_id}.nii.gz")
    summary: dict[str, Any] = {}
    for v, name in names.items():
        d = [r["dice"] for r in rows if r["label"] == v]
        h = [r["hd95_mm"] for r in rows if r["label"] == v]
        summary[name] = {"dice_mean": _mean(d), "dice_sd": _sd(d), "hd95_mean": _mean(h), "hd95_sd": _sd(h),
                         "cases": len(d), "hd95_undefined": sum(math.isnan(x) for x in h)}
    result = {"cases": [c.case_id for c in test], "k": k, "rows": rows, "summary": summary,
              "bank": str(bank.path), "bank_entries": len(bank),
              "sam2": engine.sam2_identity, "dinov2": engine.dinov2_identity,
              "precision": resolve_precision(precision, engine.sam.device), "batch_size": used_batch}
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case"])
        w.writeheader()
        w.writerows(rows)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def format_table(result: dict[str, Any]) -> str:
    """Per-label mean +- sd table."""
    lines = [f"{'label':<12} {'Dice mean':>10} {'sd':>7} {'HD95 mm':>9} {'sd':>7} {'cases':>6}"]
    for name, s in result["summary"].items():
        lines.append(f"{name:<12} {s['dice_mean']:>10.4f} {s['dice_sd']:>7.4f} {s['hd95_mean']:>9.2f} "
                     f"{s['hd95_sd']:>7.2f} {s['cases']:>6}")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Handler of `rseg evaluate`."""
    from .bank import LabelInfo, SupportBank
    from .cli import _window, make_embedder, make_engine
    from .cli_bank import DEFAULT_COLORS, parse_labels

    pairs = parse_labels(args.labels)
    labels = [LabelInfo(v, n, DEFAULT_COLORS[i % len(DEFAULT_COLORS)]) for i, (v, n) in enumerate(pairs)]
    test = find_cases(args.test)
    if args.max_cases is not None:
        test = test[: args.max_cases]
    bank_path = args.bank if args.bank is not None else args.out / "bank"
    window = _window(args)
    show = not args.no_progress and not args.json
    if (bank_path / "bank.json").exists():
        bank = SupportBank.open(bank_path)
        if args.pool is not None or args.train is not None:
            print(f"rseg evaluate: using the existing bank at {bank_path} (--train/--pool ignored)",
                  file=sys.stderr)
    else:
        if args.train is None:
            print("rseg evaluate: error: give --train (to build a bank) or --bank with an existing bank",
                  file=sys.stderr)
            return 2
        train = find_cases(args.train)
        overlap = {c.case_id for c in train} & {c.case_id for c in test}
        if overlap:
            print(f"rseg evaluate: error: cases in both --train and --test: {sorted(overlap)}", file=sys.stderr)
            return 2
        bank = build_bank(train, bank_path, labels, make_embedder(args), args.axis, args.pool, window, show)
    engine = make_engine(args)
    result = evaluate(test, bank, engine, labels=[lab.value for lab in labels], k=args.k, axis=args.axis,
                      window=window, out=args.out, save_predictions=args.save_predictions, progress=show,
                      precision=args.precision, batch_size=args.batch_size)
    result["compile"] = bool(args.compile)
    result["random_weights"] = bool(args.random_weights)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2, default=float))
    else:
        print(format_table(result))
        print(f"wrote {args.out / 'metrics.csv'} and {args.out / 'metrics.json'}")
    return 0
