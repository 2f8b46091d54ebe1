"""`rseg segment --worker ssh://user@host[:port]`: the segmentation runs in a worker on another host.

The image is read here and its voxels travel to the worker in the protocol (`worker.protocol`
frames); the bank path is the server's (absolute or `~/...`); the label map comes back and is
written here with the image's exact geometry, with its provenance sidecar made by the worker
(which opened the bank). Models are found on the server (its Hub cache or $RSEG_WEIGHTS_DIR).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, _progress_bar, _UsageError


def add_worker_options(p: argparse.ArgumentParser) -> None:
    """--worker and --worker-python (shared by the commands that can run on another host)."""
    p.add_argument("--worker", default=None, metavar="ssh://USER@HOST[:PORT]",
                   help="run the models on another host through your ssh (keys, agent, ~/.ssh/config; strict "
                        "host-key checking); --bank is then a path on that host (absolute or ~/...). "
                        "Extra ssh options: $RSEG_SSH_OPTIONS")
    p.add_argument("--worker-python", default=None, metavar="COMMAND",
                   help="the Python command on the worker host (default python3), e.g. /opt/rseg/.venv/bin/python")


def remote_target(args: argparse.Namespace) -> Any:
    """The SshTarget of --worker; a usage error for a malformed one or for options it cannot honour."""
    from ..worker.remote import SshTarget

    try:
        target = SshTarget.parse(args.worker, args.worker_python)
    except ValueError as e:
        raise _UsageError(f"--worker: {e}") from None
    bank = str(args.bank) if args.bank is not None else "/"
    if not (bank.startswith("/") or bank.startswith("~")):
        raise _UsageError(f"--bank {bank}: with --worker the bank is a path on {target.host}; give it absolute "
                          "or as ~/...")
    local_only = [name for name, value in (
        ("--sam2-checkpoint", args.sam2_checkpoint), ("--dinov2-path", args.dinov2_path), ("--compile", args.compile),
        ("--fill-hole-area", args.fill_hole_area), ("--batch", getattr(args, "batch", None)),
        ("--dinov2-input-size", args.dinov2_input_size != 224), ("--report", getattr(args, "report", False)))
        if value]
    if local_only:
        raise _UsageError(f"{', '.join(local_only)} cannot be used with --worker (the worker host has its own "
                          "weights: its Hub cache or $RSEG_WEIGHTS_DIR)")
    return target


def _settings(args: argparse.Namespace) -> Any:
    from ..worker import protocol as wp

    return wp.EngineSettings(sam2_size=args.sam2, dinov2_size=args.dinov2, device=args.device,
                             image_size=args.image_size, random_weights=bool(args.random_weights), seed=args.seed,
                             retrieval_feature=getattr(args, "retrieval_feature", "cls"))


def suggest_remote(args: argparse.Namespace, image: Any, window: Any, last: Any) -> tuple[Any, str | None]:
    """`rseg suggest --worker`: (Suggestions, the worker's DINOv2 identity); RuntimeError if the job failed."""
    from ..segmentation.suggest import Suggestions
    from ..worker.client import WorkerClient, volume_spec

    target = remote_target(args)
    client = WorkerClient(target=target)
    folder = client.new_job_folder()
    params = {"settings": _settings(args).to_json(), "bank": None if args.bank is None else str(args.bank),
              "volume": volume_spec(folder, "volume", image), "n": int(args.n), "axis": args.axis,
              "window": None if window is None else [float(w) for w in window],
              "last": None if last is None else last.to_json(), "case_id": args.case}
    update, close = _progress_bar(not args.no_progress and not args.json, f"embedding slices on {target.host}")
    try:
        job = client.submit("suggest", params, folder)
        while job.running:
            for event in job.wait(0.2):
                if event.kind == "progress" and update is not None:
                    update(event.done, event.total)
    finally:
        close()
        client.stop()
    if job.outcome != "finished":
        raise RuntimeError(f"the worker on {target} did not finish: {job.error}")
    return Suggestions.from_json(job.result), job.result.get("dinov2_identity")


def segment_remote(args: argparse.Namespace, image: Any, out: Path, window: Any, write_outputs: Any, *,
                   check_bank: Any, post_process: Any, probability_paths: Any, write_probabilities: Any) -> int:
    """Segment `image` in a worker on --worker's host; write the outputs and sidecars here.

    The bank's usage errors (`check_bank`: --labels, --k, --keep-largest, the probability maps'
    names) are found from the worker's description of it before the models load; --keep-largest and
    --statistics (`post_process`) are computed here from the label map the worker returns, and the
    probability maps (--save-probabilities) come back with it."""
    from ..worker.client import WorkerClient
    from ..worker.remote import RemoteBank

    target = remote_target(args)
    client = WorkerClient(target=target)
    try:
        try:
            bank = RemoteBank(client.run("bank_info", {"settings": _settings(args).to_json(), "bank": str(args.bank)},
                                         timeout=600), client.where)
        except Exception as e:  # noqa: BLE001 - no connection, no bank there, another version: said, exit 1
            print(f"rseg segment: error: {e}", file=sys.stderr)
            return EXIT_FAILURE
        check_bank(bank)  # usage errors (exit 2) before the models load
        return _segment_remote(args, image, out, window, write_outputs, client, target, post_process,
                               probability_paths, write_probabilities)
    finally:
        client.stop()


def _segment_remote(args: argparse.Namespace, image: Any, out: Path, window: Any, write_outputs: Any, client: Any,
                    target: Any, post_process: Any, probability_paths: Any, write_probabilities: Any) -> int:
    from ..data.volume import num_slices, parse_axis, through_plane_axis
    from ..segmentation.provenance import write_sidecar
    from ..segmentation.results import VolumeSegmentation
    from ..bank.format import LabelInfo
    from ..worker import protocol as wp
    from ..worker.client import volume_spec

    axis = parse_axis(args.axis)
    axis = through_plane_axis(image.spacing) if axis is None else axis
    n = num_slices(image.array, axis)
    a, b = args.slices if args.slices else (0, n)
    settings = _settings(args)
    folder = client.new_job_folder()
    params = {
        "settings": settings.to_json(), "bank": str(args.bank), "volume": volume_spec(folder, "volume", image),
        "runs": [[int(a), int(b)]], "axis": axis, "k": int(args.k), "labels": args.labels, "case_id": args.case,
        "case_policy": args.case_policy, "window": None if window is None else [float(w) for w in window],
        "precision": args.precision, "batch_size": args.batch_size, "extent_stop": int(args.extent_stop),
        "presence_threshold": float(args.presence_threshold), "start_slice": args.start_slice, "provenance": True,
        "support_order": args.support_order, "propagate": int(args.propagate), "support_filter": args.support_filter,
        "keep_probabilities": bool(args.save_probabilities),
    }
    update, close = _progress_bar(not args.no_progress and not args.json, f"segmenting on {target.host}")
    arrays: dict[str, Any] = {}

    def received(r: dict[str, Any], f: Path) -> dict[str, Any]:
        arrays["labelmap"] = wp.load_array(f, r["labelmap"])
        if r.get("probabilities"):
            arrays["probabilities"] = wp.load_array(f, r["probabilities"])
        return r

    job = client.submit("segment", params, folder, on_result=received)
    try:
        while job.running:
            for event in job.wait(0.2):
                if event.kind == "progress" and update is not None:
                    update(event.done, event.total)
    except KeyboardInterrupt:
        job.cancel()
        job.wait(client.cancel_grace_s + 5)
        return EXIT_INTERRUPTED
    finally:
        close()
    if job.outcome != "finished":
        print(f"rseg segment: error: the worker on {target} did not finish: {job.error}", file=sys.stderr)
        return EXIT_FAILURE
    result = job.result
    labelmap = arrays["labelmap"]
    if labelmap.shape != image.array.shape:
        print(f"rseg segment: error: the worker returned a label map of shape {labelmap.shape} for an image of "
              f"shape {image.array.shape}", file=sys.stderr)
        return EXIT_FAILURE
    labels = [LabelInfo(int(d["value"]), str(d["name"]), tuple(d["color"])) for d in result["labels"]]
    seg = VolumeSegmentation(labelmap=image.with_array(labelmap), labels=labels, axis=int(result["axis"]))
    probabilities = arrays.get("probabilities")
    if args.save_probabilities and (probabilities is None or probabilities.shape != (len(labels), *labelmap.shape)):
        print(f"rseg segment: error: the worker on {target} returned no probability maps of shape "
              f"{(len(labels), *labelmap.shape)}", file=sys.stderr)
        return EXIT_FAILURE
    seg.probabilities = probabilities
    prob_paths = probability_paths(out, seg.labels) if args.save_probabilities else []
    extra = post_process(seg, args)  # --keep-largest, then --statistics, here on the returned label map
    if prob_paths:
        extra["probabilities"] = [str(p) for p in write_probabilities(seg, prob_paths)]
    written = write_outputs(seg, out, args.seg_nrrd)
    prov = {**result["provenance"], "image": str(args.image), "worker": str(target), "compile": False, **extra}
    sidecars = [write_sidecar(p, prov, result["records"]) for p in written]
    if args.json:
        import json

        print(json.dumps({"image": str(args.image), "worker": str(target), "outputs": [str(p) for p in written],
                          "sidecars": [str(p) for p in sidecars], "axis": "ijk"[seg.axis],
                          "seconds": round(float(result["seconds"]), 3), "precision": result["precision"],
                          "batch_size": result["batch_size"], "random_weights": bool(args.random_weights),
                          **extra}, indent=2))
    else:
        print(f"segmented slices {a}:{b} along {'ijk'[seg.axis]} on {target} in {float(result['seconds']):.3f} s")
        stats = extra.get("statistics") or {}
        for name, v in stats.items():
            print(f"  {name}: {v['voxels']} voxels, {v['volume_ml']:.3f} ml")
        for v, n in (extra.get("keep_largest") or {}).get("voxels_removed", {}).items():
            print(f"  --keep-largest: label {v}: {n} voxels outside its largest connected component removed")
        if args.random_weights:
            print("RANDOM WEIGHTS: this output is meaningless (models were not loaded from real weights)")
        for p in written + sidecars:
            print(f"wrote {p}")
    return EXIT_OK


# ---------------------------------------------------------------------------------- segment-cohort
#: segment-cohort options that name this computer's processes, files or caches: usage errors with --worker.
COHORT_LOCAL_ONLY = (("--ray", "ray"), ("--workers", "workers"), ("--threads", "threads"),
                     ("--cache-dir", "cache_dir"), ("--cache-gb", "cache_gb"))


def cohort_remote_client(args: argparse.Namespace) -> tuple[Any, Any]:
    """(SshTarget, WorkerClient) of `segment-cohort --worker`; usage errors before anything connects."""
    from ..worker.client import WorkerClient

    target = remote_target(args)
    local_only = [flag for flag, dest in COHORT_LOCAL_ONLY if getattr(args, dest, None) is not None]
    if local_only:
        raise _UsageError(f"{', '.join(local_only)} cannot be used with --worker: the volumes go one after the other "
                          f"to the one worker on {target.host}, which keeps its own memory cache")
    return target, WorkerClient(target=target)


def cohort_remote_bank(client: Any, args: argparse.Namespace) -> Any:
    """The bank at --bank on the worker's host, as the worker describes it (a RemoteBank)."""
    from ..worker.remote import RemoteBank

    state = client.run("bank_info", {"settings": _settings(args).to_json(), "bank": str(args.bank)}, timeout=600)
    return RemoteBank(state, client.where)


def cohort_remote_identity(client: Any, args: argparse.Namespace, settings: Any) -> dict:
    """What a sidecar must say for an output to count as done (`expected_provenance`), with the
    models' identities and the precision as the worker resolves them on its device (loads them)."""
    import types

    from ..cohort.volume_job import expected_provenance

    loaded = client.run("load", {"settings": _settings(args).to_json(), "precision": args.precision}, timeout=3600)
    engine = types.SimpleNamespace(sam2_identity=loaded["sam2_identity"], dinov2_identity=loaded["dinov2_identity"],
                                   random_weights=loaded["random_weights"],
                                   sam=types.SimpleNamespace(image_size=loaded["image_size"]))
    return expected_provenance(engine, settings, loaded["precision"])


def run_cohort_remote(client: Any, args: argparse.Namespace, volumes: Any, settings: Any, expected: dict,
                      on_event: Any) -> list[dict]:
    """Every volume's job on the worker, one after the other; outputs written here (atomic, resumable).

    Ctrl-C cancels the job in flight and raises CohortInterrupted with every volume's result."""
    from ..cohort.run import CohortInterrupted, interrupted_result

    out = Path(settings.out_dir)
    results: list[dict] = []
    for n, vol in enumerate(volumes):
        try:
            result = _cohort_volume_remote(client, args, vol, settings, expected, on_event)
        except KeyboardInterrupt:
            if client.job is not None and client.job.running:
                client.job.cancel()
                client.job.wait(client.cancel_grace_s + 5)
            raise CohortInterrupted([*results, interrupted_result(vol, out, True),
                                     *(interrupted_result(v, out, False) for v in volumes[n + 1:])]) from None
        results.append(result)
        on_event("result", result)
    return results


def _cohort_volume_remote(client: Any, args: argparse.Namespace, vol: Any, settings: Any, expected: dict,
                          on_event: Any) -> dict:
    """`cohort.volume_job.segment_one` with the models on the worker: resume, record, job, write."""
    import time

    from ..bank.format import LabelInfo
    from ..cohort.volume_job import _write_label_map, failed_result, resume_reason, write_record
    from ..data.fileio import file_sha256
    from ..data.volume import num_slices, parse_axis, read_volume, through_plane_axis
    from ..segmentation.postprocess import label_statistics
    from ..segmentation.provenance import sidecar_path, write_sidecar
    from ..segmentation.results import VolumeSegmentation
    from ..worker import protocol as wp
    from ..worker.client import volume_spec

    out_dir, opts = Path(settings.out_dir), settings.options
    t0 = time.perf_counter()
    base = {"case_id": vol.case_id, "image": vol.image, "output": str(out_dir / vol.output_name)}
    try:
        reason = resume_reason(out_dir, vol, expected)
        if reason is None:
            return {**base, "status": "skipped", "seconds": 0.0, "message": "done earlier with the same settings"}
        write_record(out_dir, vol, "running", slices_done=0, slices_total=None, redo_reason=reason)
        image = read_volume(vol.image)
        axis = parse_axis(opts.get("axis"))
        axis = through_plane_axis(image.spacing) if axis is None else axis
        a, b = opts["slices"] if opts.get("slices") else (0, num_slices(image.array, axis))
        folder = client.new_job_folder()
        params = {
            "settings": _settings(args).to_json(), "bank": settings.bank, "volume": volume_spec(folder, "volume", image),
            "runs": [[int(a), int(b)]], "axis": axis, "k": int(opts["k"]), "labels": opts.get("labels"),
            "case_id": vol.case_id, "case_policy": opts.get("case_policy", "ignore"), "window": opts.get("window"),
            "precision": opts.get("precision", "auto"), "batch_size": opts.get("batch_size"),
            "extent_stop": int(opts.get("extent_stop", 0)), "presence_threshold": float(opts.get("presence_threshold", 0.0)),
            "start_slice": None, "provenance": True, "support_order": opts.get("support_order") or "nearest",
            "propagate": int(opts.get("propagate") or 0), "support_filter": opts.get("support_filter") or "all",
        }
        arrays: dict[str, Any] = {}
        job = client.submit("segment", params, folder, on_result=lambda r, f: arrays.update(
            labelmap=wp.load_array(f, r["labelmap"])) or r)
        while job.running:
            for event in job.wait(0.2):
                if event.kind == "progress":
                    write_record(out_dir, vol, "running", slices_done=int(event.done), slices_total=int(event.total),
                                 redo_reason=reason)
                    on_event("progress", {"case_id": vol.case_id, "done": event.done, "total": event.total})
        if job.outcome != "finished":
            raise RuntimeError(f"the worker on {client.where} did not finish: {job.error}")
        result = job.result
        prov_bank = result["provenance"]["bank"]
        if (prov_bank["bank_id"], int(prov_bank["revision"])) != (settings.bank_id, int(settings.bank_revision)):
            raise RuntimeError(f"the support bank {settings.bank} on {client.where} changed during the cohort run "
                               f"(now id {prov_bank['bank_id']} revision {prov_bank['revision']}); run again")
        labelmap = arrays["labelmap"]
        if labelmap.shape != image.array.shape:
            raise RuntimeError(f"the worker returned a label map of shape {labelmap.shape} for an image of shape "
                               f"{image.array.shape}")
        labels = [LabelInfo(int(d["value"]), str(d["name"]), tuple(d["color"])) for d in result["labels"]]
        seg = VolumeSegmentation(labelmap=image.with_array(labelmap), labels=labels, axis=int(result["axis"]))
        out = out_dir / vol.output_name
        stale = sidecar_path(out)
        if stale.is_file() and not stale.is_symlink():
            stale.unlink()  # an output and a sidecar that both exist always belong together
        written = _write_label_map(seg, out)
        extent = result.get("extent") or {}
        prov = {**result["provenance"], "image": vol.image, "case_id": vol.case_id, "worker": str(client.target),
                "output_sha256": file_sha256(written), "cohort_options": expected["cohort_options"],
                "extent": {"stop": int(extent.get("stop") or 0), "start_slices": list(extent.get("start_slices") or []),
                           "beyond_extent": [int(i) for i in result.get("beyond_extent") or []]}}
        write_sidecar(written, prov, result["records"])
        seconds = round(time.perf_counter() - t0, 3)
        segmented = [int(r["index"]) for r in result["slices"]]
        write_record(out_dir, vol, "done", seconds=seconds, slices_segmented=len(segmented))
        return {**base, "status": "segmented", "seconds": seconds, "message": "", "slices_segmented": len(segmented),
                "slices_beyond_extent": len(result.get("beyond_extent") or []),
                "statistics": label_statistics(seg.labelmap, seg.labels)}
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - one bad volume never stops the others
        return {**failed_result(vol, out_dir, f"{type(e).__name__}: {e}"),
                "seconds": round(time.perf_counter() - t0, 3)}
