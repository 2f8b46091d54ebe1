"""`rseg evaluate`: the paper's protocol on a folder study.

Bank from training cases (optionally capped at N annotated slices, the paper uses 50), segment
every held-out test case slice by slice, and report Dice and HD95 (mm) per label per case, with
mean and sample standard deviation per label, as CSV, JSON and a printed table.

Rules this module keeps (each has a test in Testing/evaluation/test_evaluate.py):

- The unit of exclusion is the **subject** (patient): ACDC's `patientXXX` folder, nnU-Net's case
  id, the file stem for `images/ + labels/`. A test case never retrieves supports whose bank case
  id names its subject, exactly or as a prefix up to a separator (`bank.same_subject`:
  `patient005` matches `patient005_frame01`, `patient01` does not match `patient010`). The count
  excluded is reported per case; fewer than k candidates left is a usage error.
- Results from random weights say so everywhere: `random_weights` in metrics.json, the `--json`
  summary and a metrics.csv column, a banner above the printed table, and the provenance sidecar
  (`<prediction>.json`, provenance.py) of every saved prediction.
- A bank is built in a temporary folder and moved into place only when complete, with its build
  parameters (`evaluate_build.json` inside it); it is reused only when they match
  (`evaluation/study.py`, with the study folder discovery; the command is `cli/evaluate.py`).
- Output is strict JSON: an undefined number is `null` with a `<field>_undefined` reason.
- Per-case results are written atomically as each case finishes (`cases/<case>.json`, and
  metrics.csv / metrics.json rewritten), so an interrupted run keeps them and `--resume` skips them.
- Results are never lost by surprise: an output folder that holds results (`existing_results`) is
  refused unless `--resume` (keep finished cases) or `--overwrite` (evaluate every case again) is
  given, and `--overwrite` replaces a case's files only when its new result is written (prediction,
  its sidecar, then the case record, each atomically); an interrupted overwrite keeps the earlier
  results of the cases it had not reached and names them.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..segmentation.provenance import finite_or_none as _finite
from .study import (  # study folders and building the bank
    CaseFiles,
    LabelError,
    _bar,
    _few,
    _slice_count,
    check_label_map,
)

CASE_FORMAT = "rseg-evaluate-case"
CASES_DIR = "cases"
PREDICTIONS_DIR = "predictions"

RANDOM_BANNER = ("RANDOM WEIGHTS: these results come from models with random weights "
                 "(--random-weights); they are meaningless as a measure of RetrievalSeg")


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
    from ..data.fileio import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"), root=path.parent, what="an output folder")


def write_table(out: Path, stem: str, fields: Sequence[str], doc: dict[str, Any]) -> None:
    """<stem>.csv (`doc["rows"]` in `fields`, empty cells for null) and <stem>.json (`doc`, strict
    JSON) in `out`, each written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    for r in doc["rows"]:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    _write_text(out / f"{stem}.csv", buf.getvalue())
    _write_text(out / f"{stem}.json", json.dumps(doc, indent=2, allow_nan=False) + "\n")


def write_metrics(out: Path, result: dict[str, Any]) -> None:
    """metrics.csv and metrics.json, each written atomically (strict JSON, empty CSV cells for null)."""
    write_table(out, "metrics", CSV_FIELDS, result)


# ----------------------------------------------------------------------------- per-case records
def run_key(bank, engine, *, k: int, labels: dict[int, str], axis, window, precision: str,
            support_order: str = "nearest", propagate: int = 0,
            support_filter: str = "all") -> dict[str, Any]:
    """What a finished case's result depends on: `--resume` reuses a case only when this matches.
    (The retrieval feature is part of the `dinov2` identity; the support filter is named only when
    it is not the default, so results made before the switch still resume.)"""
    import hashlib

    # The entries retrieval can return, not the revision: some changes raise the revision without
    # changing any support (retire then restore, a repair that finds nothing to mend).
    entries = sorted(f"{e.id}:{e.sha256}" for e in bank.entries() if e.usable)
    digest = hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]
    return {"bank_id": bank.bank_id, "bank_supports": digest, "k": int(k),
            "labels": {str(v): n for v, n in labels.items()}, "axis": str(axis),
            "window": None if window is None else [float(x) for x in window],
            "sam2": engine.sam2_identity, "dinov2": engine.dinov2_identity,
            "random_weights": bool(engine.random_weights), "precision": precision,
            "support_order": support_order, "propagate": int(propagate),
            **({"support_filter": support_filter} if support_filter != "all" else {})}


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
            then = doc.get("run") if isinstance(doc.get("run"), dict) else {}
            diffs = [f"{n}: {then.get(n)} (then) vs {key.get(n)} (now)" for n in {**then, **key}
                     if then.get(n) != key.get(n)]
            raise ResumeMismatch(
                f"--resume: finished case {c.case_id} in {out / CASES_DIR} was evaluated with other "
                f"settings ({'; '.join(diffs)}); rerun with --overwrite instead of --resume to evaluate every "
                "case again, or give another --out"
            )
        done[c.case_id] = doc
    return done


class ResumeMismatch(ValueError):
    """--resume with results made under other settings: a usage error."""


class ResultsExist(ValueError):
    """The output folder holds results and neither --resume nor --overwrite was given: a usage error."""


class EvaluationInterrupted(KeyboardInterrupt):
    """Ctrl-C during `evaluate`: which cases this run finished and which earlier results it kept."""

    def __init__(self, finished: list[str], kept: list[str]) -> None:
        super().__init__()
        self.finished, self.kept = finished, kept


def existing_results(out: Path) -> list[str]:
    """What in `out` an earlier `rseg evaluate` wrote (metrics files, case records, predictions)."""
    out = Path(out)
    found = [name for name in ("metrics.csv", "metrics.json", "compare.csv", "compare.json") if (out / name).is_file()]
    compared = [p for p in (out / "compare").glob("*/metrics.json")] if (out / "compare").is_dir() else []
    if compared:  # `rseg evaluate --compare`: the other configurations' folders
        found.append(f"{len(compared)} compared configuration(s) in compare/")
    for sub, pattern, what in ((CASES_DIR, "*.json", "finished case(s)"), (PREDICTIONS_DIR, "*", "prediction file(s)")):
        n = len([p for p in (out / sub).glob(pattern) if p.is_file()]) if (out / sub).is_dir() else 0
        if n:
            found.append(f"{n} {what} in {sub}/")
    return found


def check_results_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder with results unless the caller said what to do with them."""
    if resume and overwrite:
        raise ResultsExist("give --resume or --overwrite, not both")
    found = existing_results(out)
    if found and not (resume or overwrite):
        raise ResultsExist(
            f"{out} holds the results of an earlier evaluation ({', '.join(found)}); add --resume to keep its "
            "finished cases and evaluate only the rest, or --overwrite to evaluate every case again (each "
            "case's files are replaced only when its new result is written), or give another --out"
        )


# ----------------------------------------------------------------------------- evaluate
def excluded_supports(bank, subject: str) -> tuple[int, int]:
    """(entries of `subject` that retrieval excludes, usable entries in the bank)."""
    from ..bank.support_bank import same_subject

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
             batch_size: int | None = None, resume: bool = False, overwrite: bool = False,
             extra: dict[str, Any] | None = None, progress_label: str = "evaluate ",
             on_case: Callable[[str, int, int], None] | None = None,
             support_order: str = "nearest", propagate: int = 0,
             support_filter: str = "all") -> dict[str, Any]:
    """Segment each test case and compute per-label Dice/HD95; write CSV + JSON into `out`.

    Each case's rows go to `out/cases/<case>.json` and metrics.csv/metrics.json are rewritten
    (atomically) as soon as the case finishes; with `resume`, cases finished before under the same
    settings are skipped. An `out` with results needs `resume` or `overwrite` (ResultsExist);
    `overwrite` replaces each case's files only when its new result is written. Ctrl-C raises
    `EvaluationInterrupted` (a KeyboardInterrupt) naming the cases finished and the earlier results
    kept. Raises ValueError when exclusion of a case's subject leaves fewer than k candidate
    supports (before segmenting anything). `support_order`, `propagate`: as in `segment_volume`
    (recorded in the results and in the resume key).
    """
    from ..engine.sam2_memory import check_support_order, resolve_precision
    from .metrics import per_label_metrics
    from ..segmentation.provenance import segmentation_provenance, sidecar_path, slice_records, write_sidecar
    from ..segmentation.segment import segment_volume
    from ..data.volume import read_volume, write_volume

    out = Path(out)
    check_results_folder(out, resume, overwrite)
    names, excluded = check_plan(test, bank, labels, k)
    prec = resolve_precision(precision, engine.sam.device)
    check_support_order(support_order)
    from ..segmentation.propagation import check_propagate

    propagate = check_propagate(propagate)
    key = run_key(bank, engine, k=k, labels=names, axis=axis, window=window, precision=prec,
                  support_order=support_order, propagate=propagate, support_filter=support_filter)
    out.mkdir(parents=True, exist_ok=True)
    (out / CASES_DIR).mkdir(exist_ok=True)
    finished = load_finished(out, key, test) if resume else {}
    # --overwrite deletes nothing up front: a case's earlier files stay until its new result
    # replaces them (an interrupted run keeps, and names, the earlier results it had not reached).
    earlier = [] if resume else [c.case_id for c in test if _case_file(out, c.case_id).is_file()]

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
            "precision": prec, "batch_size": used_batch, "support_order": support_order,
            "propagate": int(propagate), "support_filter": support_filter,
        }
        from .. import __version__

        doc["rseg_version"] = __version__
        kept = [cid for cid in earlier if cid not in per_case]
        if kept:  # an --overwrite run not finished yet: these cases' files are an earlier run's
            doc["earlier_results_kept"] = kept
        if extra:
            doc.update(extra)
        return doc

    try:
        for n, c in enumerate(test):
            if bar is not None:
                bar.set_description(f"{progress_label}case {n + 1}/{len(test)}")
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
                                 precision=precision, batch_size=batch_size, support_order=support_order,
                                 propagate=propagate, support_filter=support_filter)
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
            prediction = out / PREDICTIONS_DIR / f"{c.case_id}.nii.gz"
            if save_predictions:
                (out / PREDICTIONS_DIR).mkdir(exist_ok=True)
                path = write_volume(seg.labelmap, prediction)
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
            if not save_predictions:  # replaced by a record without one: an earlier prediction is stale
                for stale in (prediction, sidecar_path(prediction)):
                    if stale.is_file() and not stale.is_symlink():
                        stale.unlink()
            write_metrics(out, result_doc(complete=False))
            if on_case is not None:
                on_case(c.case_id, n + 1, len(test))
    except KeyboardInterrupt:
        raise EvaluationInterrupted(list(per_case), [cid for cid in earlier if cid not in per_case]) from None
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
