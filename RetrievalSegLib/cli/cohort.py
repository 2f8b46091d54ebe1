"""`rseg segment-cohort`: segment every volume of a manifest with one bank (resumable, sharded, parallel).

The per-volume work is `cohort.volume_job.segment_one`; where it runs is `cohort.run` (local processes or Ray),
or, with `--worker ssh://...`, one worker on another host, volume after volume (`cli.remote`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    _non_negative_int,
    _presence_threshold,
    _parse_labels_arg,
    _parse_range,
    _positive_int,
    K_HELP,
    _UsageError,
    add_accuracy_options,
    _window,
)

#: The model options handed to each worker's `make_engine` (plain values only).
MODEL_ARGS = ("sam2", "dinov2", "sam2_checkpoint", "dinov2_path", "device", "image_size", "dinov2_input_size",
              "retrieval_feature",
              "fill_hole_area", "precision", "batch_size", "compile", "random_weights", "seed")


def _shard(text: str) -> tuple[int, int]:
    from ..cohort.volume_job import parse_shard

    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cache_gb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a size in GB >= 0 (e.g. 4 or 0.5), got {text!r}")
    return value


def add_cohort_parser(sub, models: argparse.ArgumentParser) -> None:
    from ..segmentation.extent import DEFAULT_EXTENT_STOP

    p = sub.add_parser(
        "segment-cohort", parents=[models], help="segment many volumes with one bank (resumable, parallel)",
        description="Segment every volume of MANIFEST from the support bank into OUT: one label map and its "
                    "provenance sidecar (<output>.json) per volume, written atomically. A volume whose output "
                    "and sidecar exist and match this run (models, precision, k, bank id and revision, rseg "
                    "version, the segmentation options) is skipped, so rerunning the same command resumes; a "
                    "volume that fails is recorded (OUT/cohort-records/) and retried by the next run, and never "
                    "stops the others. The bank is only read: memories go to --cache-dir. Ends with a table "
                    "and OUT/cohort-summary.json. Exit code 1 when a volume failed; Ctrl-C stops the workers, "
                    "still writes the table and summary (volumes in flight or not started: interrupted) and "
                    "exits 130; SIGTERM (a scheduler cancelling or preempting the job) does the same.",
    )
    p.add_argument("manifest", type=Path, metavar="MANIFEST",
                   help="CSV with rows image,case_id[,output] (optional header row naming these columns; "
                        "relative paths are relative to the CSV) or a folder of volumes")
    p.add_argument("--bank", type=Path, required=True, help="support bank folder (opened read-only)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--format", default=".nii.gz", choices=[".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"],
                   help="file ending of outputs named by case id (default .nii.gz)")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="local worker processes, each loading the models once (default: one per visible GPU, "
                        "else 1); with --ray: CPU actors when the cluster has no GPU")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="T",
                   help="torch CPU threads per local worker (default: the CPU cores divided by --workers when "
                        "there are several, else torch's default). Float results can differ in their last bits "
                        "with another thread count, as in any torch run: keep T to reproduce outputs exactly")
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="process only shard I of N (0 <= I < N): every N-th volume in case-id order, so N "
                        "scheduler tasks (a SLURM array, a Kubernetes indexed job) split the cohort with no "
                        "coordination")
    p.add_argument("--ray", default=None, metavar="auto|local|ADDRESS",
                   help="run on Ray (pip install 'retrievalseg[ray]'): 'auto' joins the running cluster, an "
                        "address joins that one, 'local' starts one on this machine; one actor per GPU")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="folder for SAM 2 support memories (default: the per-user cache, $RSEG_CACHE_DIR or "
                        "~/.cache/retrievalseg, keyed by bank id and revision); never inside the bank. "
                        "`rseg bank cache BANK --warm --cache-dir DIR` fills it once before a run")
    p.add_argument("--cache-gb", type=_cache_gb, default=None, metavar="GB",
                   help="cap on the memory cache, in RAM and on disk per worker, least recently used "
                        "evicted first (default: $RSEG_MEMORY_CACHE_GB or 4)")
    p.add_argument("--k", type=_positive_int, default=8, help=K_HELP)
    p.add_argument("--axis", default="auto", help="slice axis: auto (largest spacing), i, j or k")
    p.add_argument("--labels", type=_parse_labels_arg, default=None, help="label values to segment, e.g. 1,3 (default all)")
    p.add_argument("--slices", type=_parse_range, default=None, metavar="START:STOP",
                   help="only these slices of every volume (stop exclusive)")
    p.add_argument("--extent-stop", type=_non_negative_int, default=DEFAULT_EXTENT_STOP, metavar="N",
                   help=f"as in `rseg segment` (default {DEFAULT_EXTENT_STOP}; 0 = every slice)")
    p.add_argument("--presence-threshold", type=_presence_threshold, default=0.0, metavar="T",
                   help="as in `rseg segment` (default 0)")
    add_accuracy_options(p)
    p.add_argument("--case-policy", default="ignore", choices=["ignore", "exclude", "prefer"],
                   help="bank entries of each volume's case id: ignore (default), exclude, prefer")
    p.add_argument("--window", type=float, default=None, help="intensity window width (with --level)")
    p.add_argument("--level", type=float, default=None, help="intensity window level (with --window)")
    p.add_argument("--batch", type=_positive_int, default=None, help="slices per image-encoder call")
    p.add_argument("--report", action="store_true",
                   help="also write OUT/report/report.html, every volume with a thumbnail (see `rseg report`)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    from .remote import add_worker_options

    add_worker_options(p)  # the volumes go one after the other to that host's worker; outputs written here
    p.set_defaults(func=cmd_segment_cohort)


def _check_paths(out: Path, bank: Path, volumes, cache_dir: Path | None = None, remote: bool = False) -> None:
    """Before anything runs: OUT and the cache outside the bank, no output over any input.

    `volumes` is the whole manifest, not this task's shard: the other shards run at the same time.
    `remote`: the bank is a path on the worker's host, not here.
    """
    from ..bank.cache import check_cache_dir
    from ..cohort.volume_job import ManifestError, check_outputs

    real_out = Path(os.path.realpath(out))
    real_bank = Path(os.path.realpath(bank))
    if not remote and (real_out == real_bank or real_bank in real_out.parents):
        raise _UsageError(f"--out {out} lies inside the support bank {bank}; write outputs outside it")
    if cache_dir is not None:
        try:
            check_cache_dir(bank, cache_dir)
        except ValueError as e:
            raise _UsageError(f"--cache-dir: {e}") from None
    try:
        check_outputs(volumes, out)
    except ManifestError as e:
        raise _UsageError(str(e)) from None


def cohort_settings(args: argparse.Namespace, bank, window) -> tuple:
    """(CohortSettings, model options for `make_engine`) of a parsed `segment-cohort` command line."""
    from ..cohort.volume_job import COHORT_OPTIONS, CohortSettings

    options = {
        "k": args.k, "labels": args.labels, "axis": args.axis, "slices": list(args.slices) if args.slices else None,
        "extent_stop": args.extent_stop, "presence_threshold": args.presence_threshold,
        "window": list(window) if window else None, "case_policy": args.case_policy,
        "fill_hole_area": args.fill_hole_area, "dinov2_input_size": args.dinov2_input_size,
        "retrieval_feature": args.retrieval_feature, "support_filter": args.support_filter,
        "precision": args.precision, "batch_size": args.batch_size, "encoder_batch": args.batch,
        "support_order": args.support_order, "propagate": args.propagate,
    }
    assert set(COHORT_OPTIONS) <= set(options)
    settings = CohortSettings(bank=str(args.bank), out_dir=str(args.out), bank_id=bank.bank_id,
                              bank_revision=int(bank.revision), options=options,
                              cache_dir=str(args.cache_dir) if args.cache_dir else None,
                              cache_gb=args.cache_gb)
    model_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k in MODEL_ARGS}
    return settings, model_args


def _sigterm_as_ctrl_c():
    """While the volumes run, SIGTERM (a scheduler preempting or cancelling the job: SLURM sends it
    before SIGKILL) stops the run as Ctrl-C does: workers stopped, summary written. Once: a second
    SIGTERM is ignored while stopping. Returns the function that puts the old handler back."""
    import signal
    import threading

    from ..cohort.run import sigterm_as_ctrl_c

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = signal.signal(signal.SIGTERM, sigterm_as_ctrl_c)
    return lambda: signal.signal(signal.SIGTERM, old)


def _check_against_bank(bank, args: argparse.Namespace) -> None:
    """--labels the bank lacks and --k above its usable entries are usage errors, found before any
    model loads (as `rseg segment`); a volume's own exclusions (--case-policy exclude) are per volume."""
    have = sorted(lab.value for lab in bank.labels)
    unknown = [v for v in (args.labels or []) if v not in have]
    if unknown:
        raise _UsageError(f"--labels {','.join(map(str, unknown))}: not in the support bank at {args.bank} "
                          f"(it has {','.join(map(str, have))})")
    try:
        bank.check_k(args.k, None, "ignore")
    except ValueError as e:
        raise _UsageError(f"--k {args.k}: {e}") from None


def cmd_segment_cohort(args: argparse.Namespace) -> int:
    from ..cohort.volume_job import ManifestError, read_manifest, select_shard

    window = _window(args)
    client = None
    if args.worker:  # usage errors before anything connects
        from .remote import cohort_remote_client

        _, client = cohort_remote_client(args)
    try:
        volumes = read_manifest(args.manifest, args.format)
    except ManifestError as e:
        raise _UsageError(str(e)) from None
    total = len(volumes)
    _check_paths(args.out, args.bank, volumes, args.cache_dir, remote=client is not None)
    if args.shard is not None:
        volumes = select_shard(volumes, *args.shard)
    try:
        return _segment_cohort(args, volumes, total, window, client)
    finally:
        if client is not None:
            client.stop()


def _segment_cohort(args: argparse.Namespace, volumes, total: int, window, client) -> int:
    from ..bank.support_bank import SupportBank
    from ..cohort.run import CohortFatal, CohortInterrupted, run_local, run_ray, visible_gpus, worker_devices

    expected = None
    if client is not None:  # the bank is the worker host's: it opens it and says what it is
        from .remote import cohort_remote_bank, cohort_remote_identity, run_cohort_remote

        try:
            bank = cohort_remote_bank(client, args)
        except Exception as e:  # noqa: BLE001 - no connection, no bank there, another version: said, exit 1
            print(f"rseg: error: {e}", file=sys.stderr)
            return EXIT_FAILURE
    else:
        bank = SupportBank.open(args.bank)  # read only: id, revision and labels for the provenance
    _check_against_bank(bank, args)  # usage errors (exit 2) before any model loads
    args.out.mkdir(parents=True, exist_ok=True)
    settings, model_args = cohort_settings(args, bank, window)
    if client is not None:
        try:
            expected = cohort_remote_identity(client, args, settings)
        except Exception as e:  # noqa: BLE001 - e.g. the weights are missing on the worker's host
            print(f"rseg: error: the models could not be loaded on {client.where}: {e}", file=sys.stderr)
            return EXIT_FAILURE
    gpus = visible_gpus() if args.ray is None and client is None and str(args.device) in ("auto", "cuda") else 0
    workers, devices = worker_devices(str(args.device), args.workers, gpus)  # one per GPU by default
    want_bar = not args.no_progress
    bar = None
    if want_bar and volumes:
        from tqdm import tqdm

        bar = tqdm(total=len(volumes), desc="volumes", unit="vol", file=sys.stderr, dynamic_ncols=True)

    def on_event(kind: str, info: dict) -> None:
        if bar is None:
            return
        if kind == "result":
            bar.update(1)
            note = f" ({info['message']})" if info["status"] == "failed" else ""
            bar.write(f"rseg: {info['case_id']}: {info['status']} {info['seconds']:.1f} s{note}", file=sys.stderr)
        elif kind == "progress":
            bar.set_postfix_str(f"{info['case_id']} slice {info['done']}/{info['total']}")
        elif kind == "worker" and str(info.get("state", "")).startswith("killed"):
            bar.write(f"rseg: worker {info.get('pid')} {info['state']}", file=sys.stderr)

    shard_text = f"{args.shard[0]}/{args.shard[1]}" if args.shard else None
    if args.random_weights:
        print("rseg: WARNING: --random-weights: models have random weights, the output is meaningless",
              file=sys.stderr)
    t0 = time.perf_counter()
    interrupted = False
    restore_sigterm = _sigterm_as_ctrl_c()
    try:
        if not volumes:
            results = []
        elif client is not None:
            results = run_cohort_remote(client, args, volumes, settings, expected, on_event)
        elif args.ray:
            results = run_ray(volumes, model_args, settings, args.ray, args.workers or 1, on_event)
        else:
            results = run_local(volumes, model_args, settings, workers, on_event, devices, args.threads)
    except CohortInterrupted as e:  # Ctrl-C or SIGTERM: the summary of what finished, then exit 130
        results, interrupted = e.results, True
    except CohortFatal as e:
        print(f"rseg: error: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE if e.exit_code == 3 else (e.exit_code or EXIT_FAILURE)
    finally:
        restore_sigterm()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    counts = {s: sum(r["status"] == s for r in results) for s in ("segmented", "skipped", "failed", "interrupted")}
    summary = {
        "manifest": str(args.manifest), "bank": str(args.bank), "bank_id": bank.bank_id,
        "bank_revision": int(bank.revision), "out": str(args.out), "shard": shard_text,
        "volumes_in_manifest": total, "volumes": len(volumes), "interrupted_by_user": interrupted, **counts,
        "seconds": round(seconds, 3),
        "volumes_per_minute": round(60.0 * counts["segmented"] / seconds, 3) if counts["segmented"] and seconds > 0 else None,
        "workers": ("ray:" + args.ray) if args.ray else workers,
        **({"worker": str(client.target)} if client is not None else {}),
        "random_weights": bool(args.random_weights),
        "results": results,
    }
    name = "cohort-summary.json" if shard_text is None else f"cohort-summary-shard-{args.shard[0]}-of-{args.shard[1]}.json"
    from ..data.fileio import atomic_write_bytes

    atomic_write_bytes(args.out / name, json.dumps(summary, indent=1).encode("utf-8"), root=args.out,
                       what="a cohort output folder")
    if args.report:
        from .report import report_after_run

        summary["report"] = str(report_after_run(args.out, quiet=args.json))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        width = max([len("case"), *(len(r["case_id"]) for r in results)])
        print(f"{'case':<{width}}  {'status':<10}  {'seconds':>8}  output / message")
        for r in results:
            detail = r["message"] if r["status"] == "failed" else r["output"]
            print(f"{r['case_id']:<{width}}  {r['status']:<10}  {r['seconds']:>8.1f}  {detail}")
        stopped = f", {counts['interrupted']} interrupted or not started" if interrupted else ""
        print(f"{len(volumes)} volumes{f' (shard {shard_text} of {total})' if shard_text else ''}: "
              f"{counts['segmented']} segmented, {counts['skipped']} skipped (done earlier), {counts['failed']} failed"
              f"{stopped} in {seconds:.1f} s; summary {args.out / name}")
        if counts["failed"] and not interrupted:
            print("rerun the same command to retry the failed volumes", file=sys.stderr)
        if args.random_weights:
            print("RANDOM WEIGHTS: these outputs are meaningless (models were not loaded from real weights)")
    if interrupted:
        print(f"rseg: interrupted: {counts['segmented'] + counts['skipped']} of {len(volumes)} volumes are done; "
              "run the same command again to segment the rest (finished volumes are skipped)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILURE if counts["failed"] else EXIT_OK
