"""`rseg evaluate`: the paper's protocol on a folder study.

Bank from training cases (optionally capped at N annotated slices, the paper uses 50), segment
every held-out test case slice by slice, and report Dice and HD95 (mm) per label per case, with
mean and sample standard deviation per label, as CSV, JSON and a printed table.

Rules this module keeps (each has a test in Testing/test_evaluate.py):

- The unit of exclusion is the **subject** (patient): ACDC's `patientXXX` folder, nnU-Net's case
  id, the file stem for `images/ + labels/`. A test case never retrieves supports whose bank case
  id names its subject, exactly or as a prefix up to a separator (`bank.same_subject`:
  `patient005` matches `patient005_frame01`, `patient01` does not match `patient010`). The count
  excluded is reported per case; fewer than k candidates left is a usage error.
- Results from random weights say so everywhere: `random_weights` in metrics.json, the `--json`
  summary and a metrics.csv column, a banner above the printed table, and the provenance sidecar
  (`<prediction>.json`, provenance.py) of every saved prediction.
- A bank is built in a temporary folder and moved into place only when complete, with its build
  parameters (`evaluate_build.json` inside it); it is reused only when they match.
- Output is strict JSON: an undefined number is `null` with a `<field>_undefined` reason.
- Per-case results are written atomically as each case finishes (`cases/<case>.json`, and
  metrics.csv / metrics.json rewritten), so an interrupted run keeps them and `--resume` skips them.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
BUILD_FILE = "evaluate_build.json"  # inside a bank built by `rseg evaluate`
BUILD_FORMAT = "rseg-evaluate-bank"
CASE_FORMAT = "rseg-evaluate-case"
CASES_DIR = "cases"
BUILDING_MARK = ".building-"
MAX_LABEL_VALUES = 255  # more distinct values than this: an image given as a label map

RANDOM_BANNER = ("RANDOM WEIGHTS: these results come from models with random weights "
                 "(--random-weights); they are meaningless as a measure of RetrievalSeg")


class StudyError(ValueError):
    """A study folder that cannot be used as given (missing, empty, wrong layout): a usage error."""


@dataclass
class CaseFiles:
    """One case of a study folder: an image, its label map and the subject (patient) it belongs to."""

    case_id: str
    image: Path
    labels: Path
    subject: str = ""

    def __post_init__(self) -> None:
        if not self.subject:
            self.subject = self.case_id


@dataclass
class Study:
    """The cases of a study folder and the inputs that were skipped, with why."""

    folder: Path
    layout: str
    cases: list[CaseFiles]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def skipped_count(self) -> int:
        return sum(len(v) for v in self.skipped.values())


def _strip(name: str) -> str:
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def _is_image_file(p: Path) -> bool:
    return p.is_file() and _strip(p.name) != p.name


def _scan_acdc(folder: Path) -> Study | None:
    from .bank import same_subject

    files = sorted(p for p in folder.rglob("*") if _is_image_file(p))
    gts = [p for p in files if _strip(p.name).endswith("_gt")]
    if not gts:
        return None
    used: set[Path] = set()
    cases: list[CaseFiles] = []
    skipped: dict[str, list[str]] = {}
    for gt in gts:
        stem = _strip(gt.name)
        ext = gt.name[len(stem):]
        img = gt.with_name(stem[:-3] + ext)
        rel = gt.relative_to(folder).as_posix()
        if not img.is_file():
            skipped.setdefault("ground truth without image", []).append(rel)
            continue
        case_id = stem[:-3]
        # ACDC: the patient folder is the subject (frames of one patient share it).
        parent = gt.parent.name
        subject = parent if gt.parent != folder and same_subject(case_id, parent) else case_id
        cases.append(CaseFiles(case_id, img, gt, subject))
        used.update((gt, img))
    for p in files:
        if p in used:
            continue
        reason = "4D image (not evaluated)" if _strip(p.name).lower().endswith("_4d") else "image without ground truth"
        skipped.setdefault(reason, []).append(p.relative_to(folder).as_posix())
    return Study(folder, "ACDC", cases, skipped)


def _scan_folders(folder: Path) -> Study | None:
    import re

    for img_dir, lab_dir, layout in (("imagesTr", "labelsTr", "nnU-Net"), ("imagesTs", "labelsTs", "nnU-Net"),
                                     ("images", "labels", "images/labels")):
        idir, ldir = folder / img_dir, folder / lab_dir
        if not (idir.is_dir() and ldir.is_dir()):
            continue
        cases: list[CaseFiles] = []
        skipped: dict[str, list[str]] = {}
        used: set[Path] = set()
        for lab in sorted(ldir.iterdir()):
            if not _is_image_file(lab):
                continue
            stem = _strip(lab.name)
            ext = lab.name[len(stem):]
            for cand in (idir / f"{stem}_0000{ext}", idir / lab.name):
                if cand.is_file():
                    cases.append(CaseFiles(stem, cand, lab))
                    used.add(cand)
                    break
            else:
                skipped.setdefault("ground truth without image", []).append(f"{lab_dir}/{lab.name}")
        found = {c.case_id for c in cases}
        for img in sorted(idir.iterdir()):
            if not _is_image_file(img) or img in used:
                continue
            stem = _strip(img.name)
            base = re.sub(r"_\d{4}$", "", stem) if layout == "nnU-Net" else stem
            if base in found:  # another channel of a case that is evaluated
                continue
            skipped.setdefault("image without ground truth", []).append(f"{img_dir}/{img.name}")
        return Study(folder, layout, cases, skipped)
    return None


def scan_study(folder: Path) -> Study:
    """Cases of an ACDC (`X.nii.gz` + `X_gt.nii.gz`), nnU-Net (imagesTr/labelsTr) or images/+labels/ folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StudyError(f"study folder {folder} does not exist" if not folder.exists()
                         else f"{folder} is not a folder")
    study = _scan_acdc(folder) or _scan_folders(folder)
    if study is None or not study.cases:
        raise StudyError(
            f"no cases found in {folder}: expected ACDC files (X.nii.gz with X_gt.nii.gz), "
            "nnU-Net imagesTr/ + labelsTr/ (CASE_0000.nii.gz + CASE.nii.gz), or images/ + labels/ "
            "with the same file names"
        )
    return study


def find_cases(folder: Path) -> list[CaseFiles]:
    """The cases of `scan_study(folder)`."""
    return scan_study(folder).cases


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


def _few(values: Sequence[Any], n: int = 6) -> str:
    """'1, 2, 3' or '0, 1, 2, 3, 4, 5, ... (450 values)': never a wall of numbers."""
    values = list(values)
    if len(values) <= n:
        return ", ".join(str(v) for v in values)
    return ", ".join(str(v) for v in values[:n]) + f", ... ({len(values)} values)"


def check_label_map(vol, path: Path) -> np.ndarray:
    """Distinct values of a ground-truth label map; ValueError for one that is not a label map."""
    arr = vol.array
    if arr.dtype.kind == "f" and (not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr))):
        raise ValueError(f"ground truth {path} holds non-integer values: it must be a label map "
                         "(0 = background, integers for labels)")
    values = np.unique(arr)
    if len(values) > MAX_LABEL_VALUES + 1:
        raise ValueError(
            f"ground truth {path} holds {len(values)} distinct values ({_few(values.astype(np.int64).tolist())}): "
            "it looks like an image, not a label map; check which file is the ground truth"
        )
    return values.astype(np.int64)


def _slice_count(path: Path, axis) -> int:
    """Slices of an image file along the evaluation axis, from its header only."""
    import SimpleITK as sitk

    from .volume import parse_axis, through_plane_axis

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ValueError(f"cannot read {path} as an image: {str(e).strip().splitlines()[-1]}") from None
    ax = parse_axis(axis)
    ax = through_plane_axis(reader.GetSpacing()) if ax is None else ax
    return int(reader.GetSize()[ax])


def _bar(enabled: bool, total: int, desc: str, unit: str, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------- bank
def build_record(train: Study, labels, pool: int | None, axis, window, dinov2: str) -> dict[str, Any]:
    """The parameters a bank built by `rseg evaluate` depends on (compared before reuse)."""
    return {
        "format": BUILD_FORMAT,
        "train": os.path.realpath(train.folder),
        "train_cases": [c.case_id for c in train.cases],
        "pool": pool,
        "labels": {str(lab.value): lab.name for lab in labels},
        "axis": str(axis),
        "window": None if window is None else [float(w) for w in window],
        "dinov2": dinov2,
    }


def read_build_record(bank_path: Path) -> dict[str, Any] | None:
    """The build record of a bank made by `rseg evaluate`, or None (a bank made otherwise)."""
    p = Path(bank_path) / BUILD_FILE
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == BUILD_FORMAT else None


def record_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'pool: 2 (bank) vs 3 (now)' for each parameter that differs."""
    diffs = []
    for key in new:
        if key == "format":
            continue
        if old.get(key) != new[key]:
            a, b = old.get(key), new[key]
            if key == "train_cases":
                a, b = f"{len(a or [])} cases", f"{len(b)} cases"
            diffs.append(f"{key}: {a} (bank) vs {b} (now)")
    return diffs


def build_bank(train: Sequence[CaseFiles], bank_path: Path, labels, embedder, axis, pool: int | None,
               window=None, progress: bool = True, record: dict[str, Any] | None = None):
    """Create a bank from training cases, capped at `pool` annotated slices.

    Refuses (ValueError) a label that no training ground truth holds. With `record`, writes it as
    the bank's build record (`evaluate_build.json`) last, so a bank with a record is complete.
    """
    from .bank import SupportBank
    from .fileio import atomic_write_bytes
    from .volume import parse_axis, read_volume, through_plane_axis

    values = [lab.value for lab in labels]
    vols, annotated = {}, []
    found: set[int] = set()
    bar = _bar(progress, len(train), "bank: reading training cases", "case")
    try:
        for c in train:
            img, lab = read_volume(c.image), read_volume(c.labels)
            found.update(int(v) for v in check_label_map(lab, c.labels))
            ax = parse_axis(axis)
            ax = through_plane_axis(img.spacing) if ax is None else ax
            vols[c.case_id] = (img, lab, ax)
            annotated += [(c.case_id, i) for i in _annotated_slices(lab, ax, values)]
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    missing = [lab for lab in labels if lab.value not in found]
    if missing:
        raise LabelError(
            "label " + ", ".join(f"{lab.value} ({lab.name})" for lab in missing)
            + f" is not in the training ground truth (its values are {_few(sorted(found - {0}))}); "
            "check --labels"
        )
    chosen = choose_pool(annotated, pool)
    by_case: dict[str, list[int]] = {}
    for cid, i in chosen:
        by_case.setdefault(cid, []).append(i)
    bank = SupportBank.create(bank_path, labels, embedder.identity)
    bar = _bar(progress, len(chosen), "bank: embedding support slices", "slice")
    try:
        for cid, idx in by_case.items():
            img, lab, ax = vols[cid]
            # Label values outside the evaluated labels are dropped from the support masks.
            lab = lab.with_array(np.where(np.isin(lab.array, values), lab.array, 0).astype(lab.array.dtype))
            bank.add_volume(img, lab, cid, embedder, axis=ax, window=window, slices=idx)
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    if record is not None:
        atomic_write_bytes(Path(bank_path) / BUILD_FILE,
                           json.dumps(record, indent=1, allow_nan=False).encode("utf-8"))
    return bank


class LabelError(ValueError):
    """--labels that do not fit the data (absent from the training ground truth or the bank)."""


def build_bank_atomically(train: Study, bank_path: Path, labels, embedder, axis, pool, window,
                          progress: bool, record: dict[str, Any]):
    """Build in a sibling temporary folder and rename it to `bank_path` only when complete."""
    from .bank import SupportBank

    bank_path = Path(bank_path)
    tmp = bank_path.with_name(f".{bank_path.name}{BUILDING_MARK}{uuid.uuid4().hex[:8]}")
    try:
        build_bank(train.cases, tmp, labels, embedder, axis, pool, window, progress, record)
        os.rename(tmp, bank_path)  # atomic on one file system; fails if bank_path appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SupportBank.open(bank_path)


def remove_stale_builds(bank_path: Path) -> list[Path]:
    """Remove temporary folders left by an interrupted build of `bank_path` (never through a link)."""
    from .fileio import is_link

    bank_path = Path(bank_path)
    removed = []
    if not bank_path.parent.is_dir():
        return removed
    for p in bank_path.parent.glob(f".{bank_path.name}{BUILDING_MARK}*"):
        if p.is_dir() and not is_link(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------- metrics
def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _sd(values: list[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(rows: list[dict[str, Any]], names: dict[int, str]) -> dict[str, dict[str, Any]]:
    """Per label: mean and sample sd of Dice and HD95 (null with a `<field>_undefined` reason)."""
    summary: dict[str, dict[str, Any]] = {}
    for v, name in names.items():
        mine = [r for r in rows if r["label"] == v]
        d = [r["dice"] for r in mine]
        h = [r["hd95_mm"] for r in mine if r["hd95_mm"] is not None]
        s: dict[str, Any] = {"dice_mean": _mean(d), "dice_sd": _sd(d), "hd95_mean": _mean(h),
                             "hd95_sd": _sd(h), "cases": len(d), "hd95_cases": len(h),
                             "hd95_undefined_cases": len(mine) - len(h)}
        if s["dice_mean"] is None:
            s["dice_mean_undefined"] = "no cases"
        if s["dice_sd"] is None:
            s["dice_sd_undefined"] = "fewer than 2 cases"
        if s["hd95_mean"] is None:
            s["hd95_mean_undefined"] = "HD95 undefined in every case" if mine else "no cases"
        if s["hd95_sd"] is None:
            s["hd95_sd_undefined"] = "fewer than 2 cases with a defined HD95"
        summary[name] = s
    return summary


def case_rows(case: CaseFiles, metrics: dict[str, dict[str, Any]], seconds: float, excluded: int,
              random_weights: bool) -> list[dict[str, Any]]:
    """metrics.csv rows of one case (strict JSON values: an undefined HD95 is None + reason)."""
    rows = []
    for name, m in metrics.items():
        hd = _finite(m["hd95"])
        why = None
        if hd is None:
            why = "empty prediction" if m["pred_voxels"] == 0 else "empty ground truth"
        rows.append({"case": case.case_id, "subject": case.subject, "label": int(m["label"]), "name": name,
                     "dice": float(m["dice"]), "hd95_mm": hd, "hd95_undefined": why,
                     "pred_voxels": int(m["pred_voxels"]), "truth_voxels": int(m["truth_voxels"]),
                     "seconds": round(float(seconds), 3), "excluded_supports": int(excluded),
                     "random_weights": bool(random_weights)})
    return rows


CSV_FIELDS = ["case", "subject", "label", "name", "dice", "hd95_mm", "hd95_undefined", "pred_voxels",
              "truth_voxels", "seconds", "excluded_supports", "random_weights"]


def _write_text(path: Path, text: str) -> None:
    from .fileio import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"), root=path.parent, what="an output folder")


def write_metrics(out: Path, result: dict[str, Any]) -> None:
    """metrics.csv and metrics.json, each written atomically (strict JSON, empty CSV cells for null)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in result["rows"]:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    _write_text(out / "metrics.csv", buf.getvalue())
    _write_text(out / "metrics.json", json.dumps(result, indent=2, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------- per-case records
def run_key(bank, engine, *, k: int, labels: dict[int, str], axis, window, precision: str) -> dict[str, Any]:
    """What a finished case's result depends on: `--resume` reuses a case only when this matches."""
    import hashlib

    # The entries retrieval can return, not the revision: segmenting records SAM 2's memory cache
    # in bank.json, which bumps the revision without changing any support.
    entries = sorted(f"{e.id}:{e.sha256}" for e in bank.entries() if e.usable)
    digest = hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]
    return {"bank_id": bank.bank_id, "bank_supports": digest, "k": int(k),
            "labels": {str(v): n for v, n in labels.items()}, "axis": str(axis),
            "window": None if window is None else [float(x) for x in window],
            "sam2": engine.sam2_identity, "dinov2": engine.dinov2_identity,
            "random_weights": bool(engine.random_weights), "precision": precision}


def _case_file(out: Path, case_id: str) -> Path:
    return out / CASES_DIR / f"{case_id}.json"


def load_finished(out: Path, key: dict[str, Any], cases: Sequence[CaseFiles]) -> dict[str, dict[str, Any]]:
    """Finished-case records in `out/cases` for `cases`; ValueError if made with other settings."""
    done: dict[str, dict[str, Any]] = {}
    for c in cases:
        p = _case_file(out, c.case_id)
        if not p.is_file():
            continue
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable: the case is evaluated again
        if not isinstance(doc, dict) or doc.get("format") != CASE_FORMAT:
            continue
        if doc.get("run") != key:
            diffs = [f"{n}: {doc.get('run', {}).get(n)} (then) vs {v} (now)" for n, v in key.items()
                     if (doc.get("run") or {}).get(n) != v]
            raise ResumeMismatch(
                f"--resume: finished case {c.case_id} in {out / CASES_DIR} was evaluated with other "
                f"settings ({'; '.join(diffs)}); rerun without --resume to evaluate every case again, "
                "or give another --out"
            )
        done[c.case_id] = doc
    return done


class ResumeMismatch(ValueError):
    """--resume with results made under other settings: a usage error."""


# ----------------------------------------------------------------------------- evaluate
def excluded_supports(bank, subject: str) -> tuple[int, int]:
    """(entries of `subject` that retrieval excludes, usable entries in the bank)."""
    from .bank import same_subject

    usable = [e for e in bank.entries() if e.usable]
    return sum(1 for e in usable if same_subject(e.case_id, subject)), len(usable)


def check_plan(test: Sequence[CaseFiles], bank, labels: Sequence[int] | None, k: int
               ) -> tuple[dict[int, str], dict[str, tuple[int, int]]]:
    """({label value: name}, {case: (excluded, usable)}); LabelError / ExclusionError if it cannot run.

    Cheap (no model): `rseg evaluate` calls it before loading SAM 2.
    """
    names = {lab.value: lab.name for lab in bank.labels}
    if labels is not None:
        unknown = [v for v in labels if v not in names]
        if unknown:
            raise LabelError(f"label {_few(unknown)} is not a label of the support bank at {bank.path} "
                             f"(it has {', '.join(f'{v}:{n}' for v, n in names.items())})")
        names = {v: names[v] for v in labels}
    excluded = {c.case_id: excluded_supports(bank, c.subject) for c in test}
    short = [f"{c.case_id} ({excluded[c.case_id][1] - excluded[c.case_id][0]} left after excluding "
             f"{excluded[c.case_id][0]} of subject {c.subject})"
             for c in test if excluded[c.case_id][1] - excluded[c.case_id][0] < k]
    if short:
        raise ExclusionError(
            f"k={k} supports per slice, but excluding each test case's own subject leaves fewer "
            f"candidates in the bank at {bank.path}: {_few(short, 4)}; lower --k or use a bank "
            "with more subjects"
        )
    return names, excluded


def evaluate(test: Sequence[CaseFiles], bank, engine, *, labels=None, k: int = 8, axis=None, window=None,
             out: Path, save_predictions: bool = False, progress: bool = True, precision: str = "auto",
             batch_size: int | None = None, resume: bool = False, extra: dict[str, Any] | None = None,
             on_case: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Segment each test case and compute per-label Dice/HD95; write CSV + JSON into `out`.

    Each case's rows go to `out/cases/<case>.json` and metrics.csv/metrics.json are rewritten
    (atomically) as soon as the case finishes; with `resume`, cases finished before under the same
    settings are skipped. Raises ValueError when exclusion of a case's subject leaves fewer than k
    candidate supports (before segmenting anything).
    """
    from .engine import resolve_precision
    from .metrics import per_label_metrics
    from .provenance import segmentation_provenance, slice_records, write_sidecar
    from .segment import segment_volume
    from .volume import read_volume, write_volume

    out = Path(out)
    names, excluded = check_plan(test, bank, labels, k)
    prec = resolve_precision(precision, engine.sam.device)
    key = run_key(bank, engine, k=k, labels=names, axis=axis, window=window, precision=prec)
    out.mkdir(parents=True, exist_ok=True)
    (out / CASES_DIR).mkdir(exist_ok=True)
    finished = load_finished(out, key, test) if resume else {}
    if not resume:  # earlier per-case results of this folder would be mixed in by a later --resume
        for c in test:
            _case_file(out, c.case_id).unlink(missing_ok=True)

    random_weights = bool(engine.random_weights)
    slices = {c.case_id: _slice_count(c.image, axis) for c in test}
    bar = _bar(progress, sum(slices.values()), "evaluate", "slice",
               initial=sum(slices[c] for c in finished))
    rows: list[dict[str, Any]] = []
    per_case: dict[str, dict[str, Any]] = {}
    truth_seen: set[int] = set()
    used_batch = batch_size

    def result_doc(complete: bool) -> dict[str, Any]:
        present = set(per_case)
        doc = {
            "complete": complete,
            "random_weights": random_weights,
            "cases": [c.case_id for c in test if c.case_id in present],
            "k": k, "labels": {str(v): n for v, n in names.items()},
            "rows": rows, "summary": summarize(rows, names), "per_case": per_case,
            "bank": str(bank.path), "bank_id": bank.bank_id, "bank_revision": int(bank.revision),
            "bank_entries": len(bank),
            "sam2": engine.sam2_identity, "dinov2": engine.dinov2_identity,
            "precision": prec, "batch_size": used_batch,
        }
        from . import __version__

        doc["rseg_version"] = __version__
        if extra:
            doc.update(extra)
        return doc

    try:
        for n, c in enumerate(test):
            if bar is not None:
                bar.set_description(f"evaluate case {n + 1}/{len(test)}")
            if c.case_id in finished:
                doc = finished[c.case_id]
                rows += doc["rows"]
                per_case[c.case_id] = doc["info"]
                truth_seen.update(doc.get("truth_labels", []))
                continue
            img, truth = read_volume(c.image), read_volume(c.labels)
            check_label_map(truth, c.labels)
            base = bar.n if bar is not None else 0

            def update(done: int, total: int, base: int = base) -> None:
                if bar is not None:
                    bar.n = base + done
                    bar.refresh()

            seg = segment_volume(img, bank, engine, labels=list(names), k=k, axis=axis, window=window,
                                 case_id=c.subject, case_policy="exclude", progress=update,
                                 precision=precision, batch_size=batch_size)
            used_batch = seg.batch_size
            truth_arr = np.where(np.isin(truth.array, list(names)), truth.array, 0)
            truth = truth.with_array(truth_arr.astype(np.int32))
            present = sorted(int(v) for v in np.unique(truth_arr) if v)
            truth_seen.update(present)
            pred = seg.labelmap.with_array(seg.labelmap.array.astype(np.int32))
            if not pred.same_geometry(truth, tol=1e-3):
                raise ValueError(f"case {c.case_id}: label map {c.labels} does not share the image's geometry")
            truth = pred.with_array(truth.array)
            metrics = per_label_metrics(pred, truth, names)
            mine = case_rows(c, metrics, seg.seconds, excluded[c.case_id][0], random_weights)
            info: dict[str, Any] = {"subject": c.subject, "image": str(c.image), "ground_truth": str(c.labels),
                                    "excluded_supports": excluded[c.case_id][0],
                                    "candidate_supports": excluded[c.case_id][1] - excluded[c.case_id][0],
                                    "slices": len(seg.slices), "seconds": round(seg.seconds, 3),
                                    "prediction": None}
            if save_predictions:
                (out / "predictions").mkdir(exist_ok=True)
                path = write_volume(seg.labelmap, out / "predictions" / f"{c.case_id}.nii.gz")
                prov = segmentation_provenance(seg, engine, bank, k=k, extra={
                    "image": str(c.image), "case": c.case_id, "subject": c.subject,
                    "excluded_supports": excluded[c.case_id][0], "command": "rseg evaluate"})
                write_sidecar(path, prov, slice_records(seg))
                info["prediction"] = str(path)
            rows += mine
            per_case[c.case_id] = info
            _write_text(_case_file(out, c.case_id), json.dumps(
                {"format": CASE_FORMAT, "run": key, "case": c.case_id, "info": info, "rows": mine,
                 "truth_labels": present}, indent=1, allow_nan=False) + "\n")
            write_metrics(out, result_doc(complete=False))
            if on_case is not None:
                on_case(c.case_id, n + 1, len(test))
    finally:
        if bar is not None:
            bar.close()
    result = result_doc(complete=True)
    absent = [f"{v} ({n})" for v, n in names.items() if v not in truth_seen]
    if absent:
        result["warnings"] = [f"label {a} is absent from every test ground truth: its Dice and HD95 say "
                              "nothing about segmentation quality" for a in absent]
    write_metrics(out, result)
    return result


class ExclusionError(ValueError):
    """Excluding a test case's subject leaves fewer than k candidate supports: a usage error."""


def _cell(x: Any, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def format_table(result: dict[str, Any]) -> str:
    """Per-label mean +- sd table (a banner above it when the models had random weights)."""
    lines = [RANDOM_BANNER] if result.get("random_weights") else []
    lines.append(f"{'label':<12} {'Dice mean':>10} {'sd':>7} {'HD95 mm':>9} {'sd':>7} {'cases':>6}")
    for name, s in result["summary"].items():
        lines.append(f"{name:<12} {_cell(s['dice_mean'], '.4f'):>10} {_cell(s['dice_sd'], '.4f'):>7} "
                     f"{_cell(s['hd95_mean'], '.2f'):>9} {_cell(s['hd95_sd'], '.2f'):>7} {s['cases']:>6}")
    undefined = {n: s["hd95_undefined_cases"] for n, s in result["summary"].items() if s["hd95_undefined_cases"]}
    if undefined:
        lines.append("HD95 undefined (empty prediction or ground truth) in: "
                     + ", ".join(f"{n} {c} case(s)" for n, c in undefined.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command
def _parse_eval_labels(text: str):
    from .bank import LabelInfo
    from .cli_bank import DEFAULT_COLORS, parse_labels

    pairs = parse_labels(text)
    return [LabelInfo(v, n, DEFAULT_COLORS[i % len(DEFAULT_COLORS)]) for i, (v, n) in enumerate(pairs)]


def _skipped_lines(what: str, study: Study) -> list[str]:
    return [f"rseg evaluate: {what}: skipped {len(files)} {reason}: {_few(files, 3)}"
            for reason, files in study.skipped.items()]


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Handler of `rseg evaluate`."""
    from .bank import SupportBank, same_subject
    from .cli_common import _UsageError, _window, make_embedder, make_engine

    def usage(e: Exception) -> _UsageError:
        return _UsageError(str(e))

    # Options and folders first: nothing is created or loaded before they are checked.
    labels = _parse_eval_labels(args.labels)
    window = _window(args)
    try:
        test_study = scan_study(args.test)
        train_study = scan_study(args.train) if args.train is not None else None
    except StudyError as e:
        raise usage(e) from None
    test = test_study.cases
    if args.max_cases is not None:
        test = test[: args.max_cases]
    if train_study is not None:
        overlap = sorted({c.subject for c in train_study.cases
                          if any(same_subject(c.subject, t.subject) for t in test)})
        if overlap:
            raise _UsageError(f"subjects in both --train and --test: {_few(overlap)}; a test subject must not "
                              "be in the training data")
    if args.pool is not None and train_study is None:
        raise _UsageError("--pool caps a bank built from --train; give --train too, or drop --pool to use "
                          "the bank as it is")
    bank_path = args.bank if args.bank is not None else args.out / "bank"
    show = not args.no_progress
    for line in _skipped_lines("--test", test_study) + (_skipped_lines("--train", train_study) if train_study else []):
        print(line, file=sys.stderr)

    has_bank = (bank_path / "bank.json").exists()
    record = read_build_record(bank_path) if has_bank else None
    rebuild_hint = (f"remove it (rm -r '{bank_path}') and run the same command again to rebuild it, "
                    "or give another --out / --bank")
    if has_bank and train_study is not None:
        if record is None:
            raise _UsageError(
                f"the bank at {bank_path} was not built completely by this rseg evaluate (no "
                f"{BUILD_FILE}: an interrupted build of an older version, or a bank made with `rseg bank`); "
                f"to use it as it is, drop --train and --pool; else {rebuild_hint}"
            )
        wanted = build_record(train_study, labels, args.pool, args.axis, window, record.get("dinov2"))
        diffs = record_differences(record, wanted)
        if diffs:
            raise _UsageError(f"the bank at {bank_path} was built with other parameters ({'; '.join(diffs)}); "
                              f"{rebuild_hint}")
    elif not has_bank and train_study is None:
        raise _UsageError("give --train (to build a bank) or --bank with an existing bank"
                          + (f" (no bank at {bank_path})" if args.bank is not None else ""))
    elif not has_bank and bank_path.exists() and any(bank_path.iterdir()):
        raise _UsageError(f"{bank_path} exists and is not a support bank; give another --out / --bank")

    embedder = make_embedder(args)
    if has_bank:
        bank = SupportBank.open(bank_path)
        if record is not None and record.get("dinov2") != embedder.identity:
            raise _UsageError(f"the bank at {bank_path} was built with DINOv2 {record.get('dinov2')}, the "
                              f"engine uses {embedder.identity}; {rebuild_hint}")
        print(f"rseg evaluate: using the bank at {bank_path} ({len(bank)} entries"
              + (", built from the same --train, --pool and --labels)" if record is not None else ")"),
              file=sys.stderr)
    else:
        for stale in remove_stale_builds(bank_path):
            print(f"rseg evaluate: removed {stale} (an interrupted bank build)", file=sys.stderr)
        rec = build_record(train_study, labels, args.pool, args.axis, window, embedder.identity)
        try:
            bank = build_bank_atomically(train_study, bank_path, labels, embedder, args.axis, args.pool,
                                         window, show, rec)
        except LabelError as e:
            raise usage(e) from None
    try:
        check_plan(test, bank, [lab.value for lab in labels], args.k)
    except (LabelError, ExclusionError) as e:
        raise usage(e) from None
    bank_names = {lab.value: lab.name for lab in bank.labels}
    renamed = [f"{lab.value} is {bank_names[lab.value]!r} in the bank, {lab.name!r} in --labels"
               for lab in labels if bank_names.get(lab.value, lab.name) != lab.name]
    if renamed:
        print(f"rseg evaluate: warning: label {'; '.join(renamed)}; results use the bank's names",
              file=sys.stderr)
    engine = make_engine(args)
    skipped = {"test": {r: len(f) for r, f in test_study.skipped.items()},
               **({"train": {r: len(f) for r, f in train_study.skipped.items()}} if train_study else {})}
    if args.max_cases is not None and args.max_cases < len(test_study.cases):
        skipped["test"]["beyond --max-cases"] = len(test_study.cases) - args.max_cases
    extra = {"compile": bool(args.compile), "skipped_inputs": skipped,
             "test": str(args.test), "train": None if args.train is None else str(args.train)}
    try:
        result = evaluate(test, bank, engine, labels=[lab.value for lab in labels], k=args.k, axis=args.axis,
                          window=window, out=args.out, save_predictions=args.save_predictions, progress=show,
                          precision=args.precision, batch_size=args.batch_size, resume=args.resume, extra=extra)
    except (LabelError, ExclusionError, ResumeMismatch) as e:
        raise usage(e) from None
    except KeyboardInterrupt:
        done = len(list((args.out / CASES_DIR).glob("*.json"))) if (args.out / CASES_DIR).is_dir() else 0
        print(f"rseg evaluate: interrupted; {done} finished case(s) kept in {args.out / CASES_DIR} and "
              f"{args.out / 'metrics.csv'}; add --resume to the same command to skip them", file=sys.stderr)
        raise
    for w in result.get("warnings", []):
        print(f"rseg evaluate: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2, allow_nan=False))
    else:
        print(format_table(result))
        excl = ", ".join(f"{cid} {info['excluded_supports']}" for cid, info in result["per_case"].items())
        print(f"supports excluded per case (own subject): {excl}")
        total_skipped = sum(sum(v.values()) for v in skipped.values())
        if total_skipped:
            print("skipped inputs: " + "; ".join(
                f"{where}: " + ", ".join(f"{n} {reason}" for reason, n in d.items())
                for where, d in skipped.items() if d))
        if result["random_weights"]:
            print(RANDOM_BANNER)
        print(f"wrote {args.out / 'metrics.csv'} and {args.out / 'metrics.json'}")
    return 0
