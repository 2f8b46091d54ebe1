"""Study folders and the banks built from them, for `rseg evaluate`.

Finds the cases of a study folder (ACDC `patientXXX/`, nnU-Net `imagesTr/` + `labelsTr/`, or
`images/` + `labels/`) with the subject each belongs to, checks label maps, and builds a support
bank from training cases atomically (a temporary folder moved into place when complete, with its
build parameters in `evaluate_build.json`, reused only when they match).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
BUILD_FILE = "evaluate_build.json"  # inside a bank built by `rseg evaluate`
BUILD_FORMAT = "rseg-evaluate-bank"
BUILDING_MARK = ".building-"
MAX_LABEL_VALUES = 255  # more distinct values than this: an image given as a label map


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
    from ..bank.support_bank import same_subject

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
    from ..data.volume import num_slices, slice_view

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

    from ..data.volume import parse_axis, through_plane_axis

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
    from ..bank.support_bank import SupportBank
    from ..data.fileio import atomic_write_bytes
    from ..data.volume import parse_axis, read_volume, through_plane_axis

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
    from ..bank.support_bank import SupportBank

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
    from ..data.fileio import is_link

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
