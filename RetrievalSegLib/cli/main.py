"""`rseg`: the RetrievalSeg command line (weights, support banks, segmentation, evaluation).

Exit codes: 0 success; 1 failure (bad input file, corrupt bank, failed check); 2 usage error;
3 weights unavailable (missing and not downloadable, or offline); 130 interrupted (Ctrl-C);
141 the reader of standard output stopped reading (`| head`; 128 + SIGPIPE, as other tools give).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .. import __version__
from ..engine.build import ImageSizeError, WeightsUnavailable, make_embedder, make_engine
from .common import (  # shared with the other commands
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PIPE_CLOSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    PhaseProgress,
    _non_negative_int,
    _parse_labels_arg,
    _parse_range,
    _positive_int,
    _presence_threshold,
    _progress_bar,
    K_HELP,
    _UsageError,
    add_accuracy_options,
    _window,
    model_options,
)


def write_outputs(seg, out: Path, seg_nrrd: Path | None = None) -> list[Path]:
    """Write the label map (NIfTI/NRRD/MHA, or Slicer .seg.nrrd by extension) and optional .seg.nrrd."""
    from ..data.segnrrd import SegmentInfo, write_seg_nrrd
    from ..data.volume import write_volume

    segments = [SegmentInfo(lab.value, lab.name, lab.color) for lab in seg.labels]
    written = []
    targets = [out] + ([seg_nrrd] if seg_nrrd else [])
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name.endswith(".seg.nrrd"):
            written.append(write_seg_nrrd(seg.labelmap, segments, path))
        else:
            written.append(write_volume(seg.labelmap, path))
    return written


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_outputs(outputs: dict[str, Path], inputs: dict[str, Path], folders: dict[str, Path]) -> None:
    """Refuse (usage error) an output that is an input file or lies inside an input folder.

    Paths are compared after resolving links and `..` (and by inode where both exist, which
    also catches hard links), so that no spelling of the input is overwritten. Runs before any
    model is loaded.
    """
    seen: dict[Path, str] = {}
    for opt, out in outputs.items():
        real = Path(os.path.realpath(out))
        if real in seen:
            raise _UsageError(f"{opt} {out} and {seen[real]} name the same file; give two different paths")
        seen[real] = f"{opt} {out}"
        for what, src in inputs.items():
            same = real == Path(os.path.realpath(src))
            if not same and out.exists() and src.exists():
                try:
                    same = os.path.samefile(out, src)
                except OSError:
                    same = False
            if same:
                raise _UsageError(
                    f"{opt} {out} is the {what} {src} (the same file"
                    + ("" if str(out) == str(src) else ", through a link or another spelling")
                    + "); rseg never writes over its input: choose another output path"
                )
        for what, folder in folders.items():
            if folder.is_dir() and _inside(real, Path(os.path.realpath(folder))):
                raise _UsageError(
                    f"{opt} {out} lies inside the {what} {folder}; write outputs outside it"
                )


# ----------------------------------------------------------------------------- segment
def cmd_segment(args: argparse.Namespace) -> int:
    from ..bank.support_bank import SupportBank
    from ..segmentation.segment import segment_volume
    from ..data.volume import read_volume

    out = Path(args.out)
    if not any(out.name.endswith(s) for s in (".nii", ".nii.gz", ".nrrd", ".mha", ".seg.nrrd", ".dcm")):
        print(f"rseg segment: error: --out must end in .nii.gz, .nii, .nrrd, .mha, .seg.nrrd or .dcm (DICOM SEG), "
              f"got {out}", file=sys.stderr)
        return EXIT_USAGE
    dcm_out = out.name.endswith(".dcm")  # the DICOM SEG is the output: no label map file
    if dcm_out and args.report:
        print("rseg segment: error: --report reads a label map; with --out .dcm use --format dcm-seg and a "
              "label-map --out instead", file=sys.stderr)
        return EXIT_USAGE
    window = _window(args)  # option errors before any file or model is loaded
    dcm_seg = None
    if dcm_out or getattr(args, "format", "label-map") == "dcm-seg":
        from ..segmentation.dicom_seg import dicom_seg_path

        if not Path(args.image).is_dir():
            print(f"rseg segment: error: --format dcm-seg needs a DICOM series folder as IMAGE, got {args.image}",
                  file=sys.stderr)
            return EXIT_USAGE
        if args.worker:
            print("rseg segment: error: --format dcm-seg is not available with --worker", file=sys.stderr)
            return EXIT_USAGE
        dcm_seg = out if dcm_out else dicom_seg_path(out)
    if args.worker:
        from .remote import remote_target

        remote_target(args)
    outputs = {"--out": out, **({"--seg-nrrd": Path(args.seg_nrrd)} if args.seg_nrrd else {}),
               **({"--format dcm-seg": dcm_seg} if dcm_seg and not dcm_out else {})}
    image_path = Path(args.image)
    check_outputs(
        outputs,
        inputs={"input image": image_path} if not image_path.is_dir() else {},
        folders={**({} if args.worker else {"support bank": Path(args.bank)}),
                 **({"input DICOM folder": image_path} if image_path.is_dir() else {})},
    )
    image = read_volume(args.image)

    def check_bank(bank) -> None:
        """Usage errors (exit 2) that need the bank, before any model loads (a bank on the worker's host too)."""
        check_against_bank(bank, args)
        if args.save_probabilities:  # their names need the bank's labels: checked as the other outputs
            wanted = [lab for lab in bank.labels if args.labels is None or lab.value in args.labels]
            check_outputs({**outputs, **{f"--save-probabilities ({p.name})": p for p in probability_paths(out, wanted)}},
                          inputs={"input image": image_path} if not image_path.is_dir() else {},
                          folders={**({} if args.worker else {"support bank": Path(args.bank)}),
                                   **({"input DICOM folder": image_path} if image_path.is_dir() else {})})

    if args.worker:  # the models and the bank are on another host; the outputs are made here
        from .remote import segment_remote

        return segment_remote(args, image, out, window, write_outputs, check_bank=check_bank,
                              post_process=_post_process, probability_paths=probability_paths,
                              write_probabilities=write_probabilities)
    bank = SupportBank.open(args.bank)
    check_bank(bank)
    phases = PhaseProgress(not args.no_progress and not args.json)
    phases.say(f"loading models (DINOv2 {args.dinov2}, SAM 2 {args.sam2}"
               + (", random weights" if args.random_weights else "") + ")")
    engine = make_engine(args)
    bars: list = []
    update, close = _progress_bar(not args.no_progress and not args.json, "segmenting", bars)

    def estimate(e) -> None:  # after the first batch, before the second: what the rest should take
        if bars:
            bars[0].write(f"rseg: estimate: {e.describe()}", file=sys.stderr)

    def log(line: str) -> None:  # the batch size chosen, re-sized, halved after an out-of-memory error
        if args.json:
            return
        if bars:
            bars[0].write(f"rseg: {line}", file=sys.stderr)
        else:
            print(f"rseg: {line}", file=sys.stderr)

    try:
        seg = segment_volume(
            image, bank, engine, labels=args.labels, k=args.k, axis=args.axis, slice_range=args.slices,
            case_id=args.case, case_policy=args.case_policy, window=window,
            encoder_batch=args.batch, progress=update, precision=args.precision, batch_size=args.batch_size,
            extent_stop=args.extent_stop, presence_threshold=args.presence_threshold, start_slice=args.start_slice,
            estimate=estimate, support_order=args.support_order, propagate=args.propagate,
            support_filter=args.support_filter, log=log,
            phase=phases, keep_probabilities=bool(args.save_probabilities),
        )
    finally:
        phases.close()
        close()
    prob_paths = probability_paths(out, seg.labels) if args.save_probabilities else []
    outputs_extra = _post_process(seg, args)  # --keep-largest, --statistics
    if prob_paths:
        outputs_extra["probabilities"] = [str(p) for p in write_probabilities(seg, prob_paths)]
    from ..segmentation.provenance import weights_official

    outputs_extra.update(weights_official(engine))  # published weights or not, by SHA-256
    if dcm_out:
        written = write_outputs(seg, Path(args.seg_nrrd)) if args.seg_nrrd else []
    else:
        written = write_outputs(seg, out, args.seg_nrrd)
    if dcm_seg is not None:
        from .. import __version__
        from ..segmentation.dicom_seg import write_dicom_seg

        written.append(write_dicom_seg(seg.labelmap, seg.labels, Path(args.image), dcm_seg,
                                       software_version=__version__))
    from ..segmentation.provenance import segmentation_provenance, slice_records, write_sidecar

    prov = segmentation_provenance(seg, engine, bank, k=args.k,
                                   extra={"image": str(args.image), "compile": bool(args.compile),
                                          "extent": _extent_json(seg), **outputs_extra})
    records = slice_records(seg, args.slices)
    sidecars = [write_sidecar(p, prov, records) for p in written]
    report = None
    if args.report:
        from .report import report_after_run

        report = report_after_run(written[0], quiet=args.json)
    import numpy as np

    summary = {
        "image": str(args.image),
        "outputs": [str(p) for p in written],
        "sidecars": [str(p) for p in sidecars],
        "axis": "ijk"[seg.axis],
        "slices_segmented": len(seg.slices),
        "slices_beyond_extent": len(seg.beyond_extent),
        "extent": _extent_json(seg),
        "estimate": seg.estimate.to_json() if seg.estimate is not None else None,
        "seconds": round(seg.seconds, 3),
        "labels": {lab.name: int((seg.labelmap.array == lab.value).sum()) for lab in seg.labels},
        "mean_confidence": float(np.nanmean(seg.confidence)) if len(seg.slices) else None,
        "low_confidence_slices": seg.low_confidence_slices(args.low_confidence),
        "random_weights": bool(args.random_weights),
        "precision": seg.precision,
        "batch_size": seg.batch_size,
        "compile": bool(args.compile),
        "sam2": engine.sam2_identity,
        "dinov2": engine.dinov2_identity,
        "report": None if report is None else str(report),
        **outputs_extra,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"segmented {summary['slices_segmented']} slices along {summary['axis']} in {summary['seconds']} s "
              f"({summary['precision']}, batch {summary['batch_size']})")
        if seg.extent_stop:
            x = summary["extent"]
            print(f"extent stop {x['stop']} (presence threshold {x['presence_threshold']:g}), started at slice(s) "
                  f"{x['start_slices']} ({x['start_reason']}): {summary['slices_beyond_extent']} slices beyond the "
                  f"extent not segmented (background; --extent-stop 0 segments every slice)")
        stats = summary.get("statistics") or {}
        for name, n in summary["labels"].items():
            ml = f", {stats[name]['volume_ml']:.3f} ml" if name in stats else ""
            print(f"  {name}: {n} voxels{ml}")
        for v, n in (summary.get("keep_largest") or {}).get("voxels_removed", {}).items():
            print(f"  --keep-largest: label {v}: {n} voxels outside its largest connected component removed")
        if summary["random_weights"]:
            print("RANDOM WEIGHTS: this output is meaningless (models were not loaded from real weights)")
        elif summary["weights_official"] is False:
            differ = [f"{kind} {w['file']} (SHA-256 {w['sha256']}, published {w['published_sha256']})"
                      for kind, w in summary["weights"].items() if w.get("official") is False]
            print("NOT THE PUBLISHED WEIGHTS (a fine-tune or a changed copy): " + "; ".join(differ))
        for p in written + sidecars:
            print(f"wrote {p}")
        if summary["low_confidence_slices"]:
            print(f"low-confidence slices (< {args.low_confidence}): {summary['low_confidence_slices']}")
    return EXIT_OK


# ----------------------------------------------------------------------------- segment outputs
# (issue "What a new user met", items 11 and 14: --statistics, --keep-largest)
def _post_process(seg, args: argparse.Namespace) -> dict:
    """--keep-largest applied to `seg.labelmap` (before anything is written), then --statistics of
    the label map as written; what the summary and the sidecar's provenance record of both."""
    from ..segmentation.postprocess import keep_largest_component, label_statistics

    extra: dict = {}
    if args.keep_largest is not None:
        values = [lab.value for lab in seg.labels] if args.keep_largest == "all" else [
            v for v in args.keep_largest if v in {lab.value for lab in seg.labels}]
        seg.labelmap, removed = keep_largest_component(seg.labelmap, values)
        extra["keep_largest"] = {"labels": values, "connectivity": "face (6-neighbourhood)",
                                 "voxels_removed": {str(v): n for v, n in removed.items()}}
    if args.statistics:
        extra["statistics"] = label_statistics(seg.labelmap, seg.labels)
    return extra


def probability_paths(out: Path, labels) -> list[Path]:
    """--save-probabilities: `<out without its extension>.prob-<value>-<name>.nii.gz` per label."""
    import re

    base = out.name
    for suffix in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".dcm"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return [out.with_name(f"{base}.prob-{lab.value}-{re.sub(r'[^A-Za-z0-9_-]+', '_', lab.name)}.nii.gz")
            for lab in labels]


def write_probabilities(seg, paths: list[Path]) -> list[Path]:
    """Each label's probability map (float32 NIfTI, the label map's geometry; before --keep-largest)."""
    from ..data.volume import write_volume

    return [write_volume(seg.labelmap.with_array(seg.probabilities[i]), p) for i, p in enumerate(paths)]


def _parse_keep_largest(text: str) -> str | list[int]:
    """An argparse type: --keep-largest, `all` or label values like 1,3."""
    if text.strip().lower() == "all":
        return "all"
    values = _parse_labels_arg(text)
    if not values:
        raise argparse.ArgumentTypeError(f"--keep-largest takes label values like 1,3 or 'all', got {text!r}")
    return values


def check_against_bank(bank, args: argparse.Namespace) -> None:
    """Usage errors that need only the bank, found before any model loads: --labels values the bank
    does not define, --k larger than the entries it can retrieve for --case under --case-policy."""
    have = sorted(lab.value for lab in bank.labels)
    unknown = [v for v in (args.labels or []) if v not in have]
    if unknown:
        names = ", ".join(f"{lab.value}:{lab.name}" for lab in bank.labels)
        raise _UsageError(f"--labels {','.join(map(str, unknown))}: not in the support bank at {args.bank} "
                          f"(it has {names}); give some of these values, or leave --labels out for all")
    wanted = args.labels or have
    outside = [v for v in (args.keep_largest if isinstance(args.keep_largest, list) else []) if v not in wanted]
    if outside:
        raise _UsageError(f"--keep-largest {','.join(map(str, outside))}: not among the labels segmented "
                          f"({','.join(map(str, wanted))})")
    if args.case_policy != "ignore" and args.case is None:
        raise _UsageError(f"--case-policy {args.case_policy} needs --case, the case id of IMAGE in the bank")
    try:
        bank.check_k(args.k, args.case, args.case_policy)
    except ValueError as e:
        raise _UsageError(f"--k {args.k}: {e}") from None


def _extent_json(seg) -> dict:
    """The extent stop as it ran (in the summary and the sidecar's provenance)."""
    return {
        "stop": int(seg.extent_stop), "presence_threshold": float(seg.presence_threshold),
        "start_slices": [int(i) for i in seg.start_slices], "start_reason": seg.start_reason,
        "beyond_extent": sorted(int(i) for i in seg.beyond_extent),
    }


def _parse_slice_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--start-slice takes slice indices like 40 or 40,95, got {text!r}") from None


def add_segment_parser(sub, models: argparse.ArgumentParser) -> None:
    from ..segmentation.extent import DEFAULT_EXTENT_STOP

    p = sub.add_parser(
        "segment", parents=[models], help="segment a volume from a support bank",
        description="Segment every slice of IMAGE from the k most similar slices of the support bank.",
    )
    p.add_argument("image", type=Path, metavar="IMAGE", help="NIfTI/NRRD/MHA file or a DICOM series folder")
    p.add_argument("--bank", type=Path, required=True, help="support bank folder (with --worker: on the worker host)")
    p.add_argument("--out", type=Path, required=True,
                   help="output label map (.nii.gz/.nrrd/.mha), Slicer segmentation (.seg.nrrd) or DICOM SEG "
                        "(.dcm: as --format dcm-seg, without a label map file)")
    p.add_argument("--seg-nrrd", type=Path, default=None, help="also write a Slicer .seg.nrrd here")
    p.add_argument("--format", default="label-map", choices=["label-map", "dcm-seg"],
                   help="dcm-seg: also write a DICOM SEG beside --out (<out name>.dcm, e.g. seg.nii.gz -> "
                        "seg.dcm), one BINARY segment per label, referencing the source images; IMAGE must "
                        "be a DICOM series folder (default label-map: --out only)")
    p.add_argument("--k", type=_positive_int, default=8, help=K_HELP)
    p.add_argument("--axis", default="auto", help="slice axis: auto (largest spacing), i, j or k")
    p.add_argument("--labels", type=_parse_labels_arg, default=None, help="label values to segment, e.g. 1,3 (default all)")
    p.add_argument("--slices", type=_parse_range, default=None, metavar="START:STOP",
                   help="only these slices (stop exclusive); others stay background")
    p.add_argument("--extent-stop", type=_non_negative_int, default=DEFAULT_EXTENT_STOP, metavar="N",
                   help="segment outwards from the start slice(s) and stop each direction after N consecutive "
                        "slices where every label is predicted absent; slices beyond stay background and are "
                        f"reported as 'not segmented (beyond extent)' (default {DEFAULT_EXTENT_STOP}; 0 = every slice). "
                        "A gap of N or more slices needs a second --start-slice beyond it, or 0")
    p.add_argument("--presence-threshold", type=_presence_threshold, default=0.0, metavar="T",
                   help="a label is present on a slice when its SAM 2 object score is > T, else absent: its "
                        "mask on that slice is empty (the sidecar records present/absent per slice and label); "
                        "the extent stop counts absent slices by the same rule (default 0, SAM 2's own rule; "
                        "T >= 0)")
    p.add_argument("--start-slice", type=_parse_slice_list, default=None, metavar="I[,I...]",
                   help="where the extent stop starts (default: the annotated slices of --case in the bank, "
                        "else the middle of --slices, else the slice most similar to the bank)")
    add_accuracy_options(p)
    p.add_argument("--case", default=None, help="case id of IMAGE in the bank (for --case-policy)")
    p.add_argument("--case-policy", default="ignore", choices=["ignore", "exclude", "prefer"],
                   help="entries of --case: ignore (default), exclude (evaluation), prefer (corrections)")
    p.add_argument("--window", type=float, default=None, help="intensity window width (with --level)")
    p.add_argument("--level", type=float, default=None, help="intensity window level (with --window)")
    p.add_argument("--batch", type=_positive_int, default=None,
                   help="slices per image-encoder call (default: --batch-size, at least 4)")
    p.add_argument("--low-confidence", type=float, default=0.5, help="threshold for the low-confidence list")
    p.add_argument("--report", action="store_true", help="also write <out>.report/report.html (see `rseg report`)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars or phase lines on stderr (transformers' own bar included)")
    # -- outputs other tools give (issue "What a new user met", items 11 and 14)
    p.add_argument("--statistics", action="store_true",
                   help="voxel count and volume in ml per label (in the summary, --json and the sidecar)")
    p.add_argument("--keep-largest", type=_parse_keep_largest, default=None, metavar="LABELS",
                   help="keep only the largest 3D connected component (face-connected) of these labels, "
                        "e.g. 1,3 or all; the other components become background (voxels removed are "
                        "reported)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write each label's probability map, sigmoid of SAM 2's logit (float32 NIfTI "
                        "<out>.prob-<value>-<name>.nii.gz beside --out; 0 where the label is absent; before "
                        "--keep-largest). The label map is their argmax where the largest is > 0.5")
    from .remote import add_worker_options

    add_worker_options(p)
    p.set_defaults(func=cmd_segment)


# ----------------------------------------------------------------------------- evaluate
def add_evaluate_parser(sub, models: argparse.ArgumentParser) -> None:
    from .evaluate import CompareAction, cmd_evaluate

    p = sub.add_parser(
        "evaluate", parents=[models], help="Dice and HD95 on held-out cases (the paper's protocol)",
        description="Build a support bank from training cases (or use --bank), segment held-out test "
                    "cases, and report Dice and HD95 (mm) per label per case, mean and sd. A test case "
                    "never retrieves supports of its own subject (ACDC: the patient folder; nnU-Net: the "
                    "case id; images/ + labels/: the file stem; bank case ids match a subject exactly or "
                    "as a prefix up to '_', '-', '.'). Results of --random-weights are marked as such in "
                    "every output.",
    )
    p.add_argument("--train", type=Path, default=None,
                   help="folder of training cases (ACDC, nnU-Net imagesTr/labelsTr, or images/ + labels/)")
    p.add_argument("--test", type=Path, required=True, help="folder of test cases (same layouts)")
    p.add_argument("--bank", type=Path, default=None,
                   help="support bank to use (default OUT/bank); built from --train when it does not exist, "
                        "reused only if built from the same --train, --pool, --labels and models")
    p.add_argument("--labels", required=True, metavar="V:NAME,...", help="labels, e.g. '1:RV,2:Myo,3:LV'")
    p.add_argument("--pool", type=_positive_int, default=None, metavar="N",
                   help="cap the bank at N annotated slices drawn evenly from the training cases (paper: 50)")
    p.add_argument("--k", type=_positive_int, default=8, help=K_HELP)
    p.add_argument("--axis", default="auto", help="slice axis: auto (largest spacing), i, j or k")
    p.add_argument("--window", type=float, default=None, metavar="WIDTH",
                   help="intensity window width for every image (with --level; default: a robust automatic "
                        "window per image, from its 0.5-99.5 percentiles)")
    p.add_argument("--level", type=float, default=None, metavar="CENTER",
                   help="intensity window centre (with --window)")
    add_accuracy_options(p)
    p.add_argument("--max-cases", type=_positive_int, default=None, metavar="N",
                   help="evaluate only the first N test cases")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for metrics.csv, metrics.json, cases/ (per-case results), predictions/")
    p.add_argument("--save-predictions", action="store_true",
                   help="write each prediction as NIfTI with a provenance sidecar (<file>.json)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="skip test cases already finished in OUT/cases by an earlier (interrupted) run with "
                            "the same bank, k, labels and models")
    again.add_argument("--overwrite", action="store_true",
                       help="evaluate every test case again into an OUT that holds results; each case's earlier "
                            "files are replaced only when its new result is written (without --resume or "
                            "--overwrite, an OUT with results is refused)")
    p.add_argument("--report", action="store_true",
                   help="also write OUT/report/report.html (see `rseg report`); saves the predictions, which "
                        "its worst-slice pictures need")
    p.add_argument("--json", action="store_true",
                   help="print the summary as JSON on stdout (progress stays on stderr)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--compare", action=CompareAction, default=None, metavar="NAME=V1,V2,...",
                   help="run every combination of these values of evaluate's options (repeatable, e.g. "
                        "--compare k=4,8,16 --compare image-size=512,1024; 'default' names the option's default) "
                        "on the same cases and bank, and write OUT/compare.csv and compare.json: Dice and HD95 per "
                        "case, label and configuration, per configuration mean/sd/median, and against the "
                        "reference (this command's own values, run in OUT; the others in OUT/compare/) the paired "
                        "differences with a 95%% bootstrap CI and the Wilcoxon signed-rank p-value. "
                        "retrieval-feature=cls,mean: one bank with both features' embeddings (added to the bank "
                        "evaluate built), one DINOv2 pass per case for all of them")
    p.set_defaults(func=cmd_evaluate)


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from .bank import add_bank_parser
    from .cohort import add_cohort_parser
    from .suggest import add_suggest_parser
    from .weights import add_weights_parser
    from .report import add_report_parser

    parser = argparse.ArgumentParser(
        prog="rseg",
        description="RetrievalSeg: few-shot segmentation of medical volumes from a support bank of "
                    "annotated slices (DINOv2 retrieval + SAM 2 memory attention), no training.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage error, 3 weights unavailable/offline, 130 interrupted, "
               "141 output pipe closed early (e.g. `| head`). "
               "Environment: RSEG_WEIGHTS_DIR, RSEG_SAM2_CHECKPOINT, RSEG_DINOV2_PATH, RSEG_WEIGHTS_MIRROR, "
               "RSEG_OFFLINE=1, HF_HOME (the Hugging Face cache the weights go to by default).",
    )
    parser.add_argument("--version", action="version", version=f"rseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    models = model_options()
    add_weights_parser(sub)
    add_bank_parser(sub, make_embedder, parents=[models])
    add_segment_parser(sub, models)
    add_cohort_parser(sub, models)
    add_evaluate_parser(sub, models)
    add_suggest_parser(sub, make_embedder, parents=[models])
    add_report_parser(sub)
    from .sample_data import add_sample_data_parser

    add_sample_data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or usage error (2)
        return int(e.code or 0)
    try:
        return int(args.func(args))
    except WeightsUnavailable as e:
        print(f"rseg: error: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (argparse.ArgumentTypeError, _UsageError, ImageSizeError) as e:
        print(f"rseg: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("rseg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError as e:
        if _stdout_closed():
            return _quiet_after_closed_stdout()
        print(f"rseg: error: {e}", file=sys.stderr)  # another pipe (a worker's): a failure like any other
        return EXIT_FAILURE
    except Exception as e:  # noqa: BLE001 - any library error ends as a message, not a traceback
        from ..bank.support_bank import BankError

        if not isinstance(e, (BankError, ValueError, OSError, RuntimeError, LookupError)):
            raise
        print(f"rseg: error: {e}", file=sys.stderr)
        return EXIT_FAILURE


def _stdout_closed() -> bool:
    """Whether the reader of our standard output has gone (`rseg bank list | head`): poll reports
    an error on the write end of a pipe whose read end is closed."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _quiet_after_closed_stdout() -> int:
    """The reader stopped reading (as `head` does): no message, no traceback when Python flushes
    stdout at exit, and the exit status of a program ended by SIGPIPE, as other tools give."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
    return EXIT_PIPE_CLOSED


if __name__ == "__main__":
    sys.exit(main())
