"""What a run wrote, read back for a report: no model runs, nothing is written here.

Three kinds of result, told apart by their files:

- **segment**: a label map written by `rseg segment` (or one prediction of `rseg evaluate` /
  `rseg segment-cohort`) with its sidecar `<output>.json` (provenance.py);
- **evaluate**: an `rseg evaluate --out` folder (`metrics.json`, `predictions/` with sidecars when
  the run saved them);
- **cohort**: an `rseg segment-cohort --out` folder (`cohort-summary.json` or the shards'
  `cohort-summary-shard-I-of-N.json`, one label map and sidecar per volume).

Paths inside these files are as the run was given them, so relative ones are relative to the
folder the run ran in: the sidecar records it (`working_dir`); they are looked up there and in the
current folder, and a file that is no longer there is reported as missing (the report then draws
what it still has) instead of failing the report.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SEGMENT, EVALUATE, COHORT = "segment", "evaluate", "cohort"


class ReportError(ValueError):
    """A result cannot be reported: the message names the file, what is wrong and what to do."""


def _read_json(path: Path, what: str) -> Any:
    """Strict JSON (NaN refused) or ReportError naming the file."""
    def no_constants(c: str) -> Any:
        raise ValueError(f"{c} is not JSON")

    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file ({what})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ReportError(f"{path}: not a readable {what} ({e}); write it again with the command that made it") from None


def resolve(recorded: str | None, *bases: str | Path | None) -> Path | None:
    """The existing file or folder a recorded path names: absolute as is, else under each base in turn."""
    if not recorded:
        return None
    p = Path(recorded)
    candidates = [p] if p.is_absolute() else [Path(b) / p for b in bases if b] + [p]
    for c in candidates:
        if c.exists():
            return c
    return None


def read_label_map(path: Path):
    """A label map as a Volume, from any format rseg writes (.seg.nrrd through the Slicer reader)."""
    if path.name.endswith(".seg.nrrd"):
        from ..data.segnrrd import read_seg_nrrd

        return read_seg_nrrd(path)[0]
    from ..data.volume import read_volume

    return read_volume(path)


def slice_shape_spacing(volume, axis: int) -> tuple[tuple[int, int], tuple[float, float]]:
    """((rows, columns), (row spacing, column spacing) in mm) of a slice along IJK `axis`, as
    `slice_view` returns it (volume.in_plane_spacing: the spacing rseg itself records per slice)."""
    from ..data.volume import in_plane_spacing, slice_view

    rows, cols = slice_view(volume.array, axis, 0).shape
    sr, sc = in_plane_spacing(volume.spacing, axis)
    return (int(rows), int(cols)), (float(sr), float(sc))


# ----------------------------------------------------------------------------- segment
@dataclass
class SegmentRun:
    """One segmentation: its sidecar, label map, image (None when it is gone) and bank (same)."""

    output: Path
    sidecar: dict
    provenance: dict
    slices: list[dict]
    labelmap: Any
    image: Any | None
    image_missing: str | None
    bank: Any | None
    bank_missing: str | None
    axis: int
    labels: dict[int, str]
    window: tuple[float, float] | None

    @property
    def confidence(self) -> np.ndarray:
        """Per-slice confidence, NaN where the slice was not segmented."""
        return np.array([s.get("confidence") if s.get("confidence") is not None else np.nan
                         for s in self.slices], dtype=float)


def _labels_of(prov: dict, path: Path) -> dict[int, str]:
    try:
        return {int(v): str(n) for v, n in (prov.get("labels") or {}).items()}
    except (TypeError, ValueError):
        raise ReportError(f"{path}: provenance 'labels' is not a {{value: name}} table") from None


def open_bank(prov: dict, base: str | None):
    """(the run's bank opened for reading, None) or (None, why not): only support thumbnails need it."""
    bank_info = prov.get("bank") or {}
    where = resolve(bank_info.get("path"), base)
    if where is None:
        return None, f"the support bank {bank_info.get('path')!r} is not there any more"
    from ..bank.support_bank import SupportBank

    try:
        bank = SupportBank.open(where)
    except Exception as e:  # noqa: BLE001 - a report draws what it can; the reason is shown
        return None, f"the support bank at {where} cannot be opened ({e})"
    if bank.bank_id != bank_info.get("bank_id"):
        return None, f"the folder {where} now holds another bank (id {bank.bank_id}, the run used {bank_info.get('bank_id')})"
    return bank, None


def read_segment_run(output: str | Path, with_bank: bool = True, with_image: bool = True) -> SegmentRun:
    """Read a label map and its sidecar (give either); ReportError when they cannot be used."""
    from ..segmentation.provenance import read_sidecar

    path = Path(output)
    if path.name.endswith(".json"):
        path = path.with_name(path.name[: -len(".json")])
    try:
        doc = read_sidecar(path)
    except ValueError as e:
        raise ReportError(str(e)) from None
    prov = doc.get("provenance") or {}
    if not path.is_file():
        raise ReportError(f"{path}: the label map its sidecar describes is missing")
    try:
        labelmap = read_label_map(path)
    except (RuntimeError, ValueError, OSError) as e:
        raise ReportError(f"{path}: cannot read the label map ({e})") from None
    axis = "ijk".find(str(prov.get("axis", "k")))
    if axis < 0:
        raise ReportError(f"{path}.json: provenance 'axis' must be i, j or k, got {prov.get('axis')!r}")
    n = labelmap.array.shape[2 - axis]
    if len(doc["slices"]) not in (0, n):
        raise ReportError(f"{path}.json: {len(doc['slices'])} slice records for {n} slices along "
                          f"{'ijk'[axis]}: the sidecar belongs to another label map")
    slices = doc["slices"] or [{"index": i, "status": "segmented"} for i in range(n)]
    base = prov.get("working_dir")
    image, image_missing = None, None
    if with_image:
        where = resolve(prov.get("image"), base)
        if where is None:
            image_missing = f"the image {prov.get('image')!r} is not there any more: slices are drawn on black"
        else:
            from ..data.volume import read_volume

            try:
                image = read_volume(where)
            except (RuntimeError, ValueError, OSError) as e:
                image_missing = f"the image {where} cannot be read ({e}): slices are drawn on black"
            if image is not None and image.array.shape != labelmap.array.shape:
                image, image_missing = None, (f"the image {where} now has another size "
                                              f"{image.array.shape} than the label map: slices are drawn on black")
    bank, bank_missing = open_bank(prov, base) if with_bank else (None, "not opened")
    window = prov.get("window")
    return SegmentRun(
        output=path, sidecar=doc, provenance=prov, slices=slices, labelmap=labelmap, image=image,
        image_missing=image_missing, bank=bank, bank_missing=bank_missing, axis=axis,
        labels=_labels_of(prov, path),
        window=(float(window[0]), float(window[1])) if isinstance(window, list) and len(window) == 2
        and None not in window else None,
    )


# ----------------------------------------------------------------------------- evaluate
@dataclass
class EvaluateRun:
    """An `rseg evaluate` folder: metrics.json and where each case's files are."""

    folder: Path
    metrics: dict
    labels: dict[int, str]
    rows: list[dict]
    cases: list[str]
    predictions: dict[str, Path | None] = field(default_factory=dict)
    compare: dict | None = None  # compare.json, once `rseg evaluate --compare` writes it


def read_evaluate_run(folder: str | Path) -> EvaluateRun:
    """Read an evaluate folder; ReportError when metrics.json is missing or not rseg's."""
    folder = Path(folder)
    metrics = _read_json(folder / "metrics.json", "rseg evaluate metrics.json")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("rows"), list) \
            or not isinstance(metrics.get("per_case"), dict):
        raise ReportError(f"{folder / 'metrics.json'}: not written by rseg evaluate (no 'rows' / 'per_case')")
    labels = _labels_of(metrics, folder / "metrics.json")
    cases = [str(c) for c in metrics.get("cases") or metrics["per_case"]]
    predictions: dict[str, Path | None] = {}
    for c in cases:
        info = metrics["per_case"].get(c) or {}
        recorded = info.get("prediction")
        # The folder may have moved since: predictions/ beside metrics.json first.
        here = folder / "predictions" / Path(recorded).name if recorded else None
        predictions[c] = here if here is not None and here.is_file() else resolve(recorded)
    compare = None
    if (folder / "compare.json").is_file():
        compare = _read_json(folder / "compare.json", "rseg evaluate --compare compare.json")
    return EvaluateRun(folder, metrics, labels, metrics["rows"], cases, predictions, compare)


# ----------------------------------------------------------------------------- cohort
@dataclass
class CohortRun:
    """An `rseg segment-cohort` folder: the summaries' per-volume results, in manifest order."""

    folder: Path
    summaries: list[Path]
    summary: dict
    results: list[dict]


def read_cohort_run(folder: str | Path) -> CohortRun:
    """Read a cohort folder's summary (or its shards' summaries, merged); ReportError if there is none."""
    folder = Path(folder)
    full = folder / "cohort-summary.json"
    paths = [full] if full.is_file() else sorted(folder.glob("cohort-summary-shard-*-of-*.json"))
    if not paths:
        raise ReportError(f"{folder}: no cohort-summary.json (rseg segment-cohort writes it when a run ends; "
                          "run the same command again to finish the run and write it)")
    docs = [_read_json(p, "rseg segment-cohort summary") for p in paths]
    results: list[dict] = []
    seen: set[str] = set()
    for p, d in zip(paths, docs):
        if not isinstance(d, dict) or not isinstance(d.get("results"), list):
            raise ReportError(f"{p}: not written by rseg segment-cohort (no 'results' list)")
        for r in d["results"]:
            if not isinstance(r, dict) or not isinstance(r.get("case_id"), str):
                raise ReportError(f"{p}: a result without a case id")
            if r["case_id"] not in seen:
                seen.add(r["case_id"])
                results.append(r)
    summary = dict(docs[0])
    summary["random_weights"] = any(bool(d.get("random_weights")) for d in docs)
    summary["interrupted_by_user"] = any(bool(d.get("interrupted_by_user")) for d in docs)
    return CohortRun(folder, paths, summary, results)


def detect_kind(result: str | Path) -> str:
    """segment, evaluate or cohort, from the files at `result`; ReportError when it is none of them."""
    p = Path(result)
    if p.is_dir():
        if (p / "metrics.json").is_file():
            return EVALUATE
        if (p / "cohort-summary.json").is_file() or any(p.glob("cohort-summary-shard-*-of-*.json")):
            return COHORT
        raise ReportError(f"{p}: neither an rseg evaluate folder (metrics.json) nor an rseg segment-cohort "
                          "folder (cohort-summary.json); for one segmentation give its label map")
    if p.is_file() or p.with_name(p.name + ".json").is_file():
        return SEGMENT
    raise ReportError(f"{p}: no such file or folder")
