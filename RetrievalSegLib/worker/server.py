"""The model worker: a separate process that owns SAM 2 and DINOv2 and runs one job at a time.

    python -m RetrievalSegLib.worker [--parent-pid PID] [--idle-timeout SECONDS]

Why a process: Slicer's embedded Python keeps the GIL while its event loop is idle, so a Python
thread inside Slicer only advances while main-thread Python runs; torch work there crawls. The
worker keeps the engine (and each bank's support-memory cache) warm between jobs, reports
progress as JSON lines (`worker.protocol`), stops a job cooperatively on "cancel", and exits when
its parent goes away (stdin closes or the parent's pid no longer exists) or after `--idle-timeout` seconds
without a job. A thread inside this process reads stdin so that "cancel" arrives while a job runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import threading
import time
import traceback
from typing import Any, BinaryIO, Callable

import numpy as np

from . import protocol as wp
from .. import __version__
from ..models.registry import sam2_spec

log = logging.getLogger("RetrievalSeg.worker")

DEFAULT_IDLE_TIMEOUT_S = 1800.0
#: After the parent is gone, how long a job may take to notice before the process exits anyway.
ORPHAN_GRACE_S = 10.0
#: How often the watchdog checks that the parent's pid still exists.
PARENT_POLL_S = 0.5


class JobCancelled(Exception):
    """Raised inside a job to stop it as cancelled."""


# ============================================================================ channel
class Channel:
    """The protocol stream back to the parent (thread-safe writes, one message per line)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any], payload: bytes = b"") -> None:
        data = wp.encode(message) + payload
        with self._lock:
            try:
                self._stream.write(data)
                self._stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass  # the parent is gone; the watchdog ends this process

    def send_frame(self, frame: bytes) -> None:
        """Bytes already framed (`protocol.array_frame`), written whole under the lock."""
        with self._lock:
            try:
                self._stream.write(frame)
                self._stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass


def _private_stdout() -> BinaryIO:
    """A duplicate of fd 1 for the protocol; fd 1 and sys.stdout then go to stderr (the log)."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "wb", buffering=0)


# ============================================================================ job context
class JobContext:
    """What a job handler gets: its input arrays, progress reporting, the cancel flag, the engine."""

    def __init__(self, worker: "Worker", job_id: str, arrays: dict[str, np.ndarray], cancel: threading.Event) -> None:
        self.worker = worker
        self.id = job_id
        self.arrays = arrays  # what arrived in the job's frames, by name
        self.outputs: dict[str, np.ndarray] = {}  # sent back as frames before the result
        self._cancel = cancel
        self._t0 = time.monotonic()
        self._progress_t0: float | None = None

    def cancelled(self) -> bool:
        """True once the parent asked to cancel (or went away)."""
        return self._cancel.is_set() or self.worker.stopping.is_set()

    def check_cancelled(self) -> None:
        if self.cancelled():
            raise JobCancelled("cancelled")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def status(self, message: str, estimate: dict[str, Any] | None = None) -> None:
        """Report what the job is doing now (with a segment job's measured `estimate`, once)."""
        self.worker.channel.send({"type": "status", "id": self.id, "message": message, "elapsed_s": self.elapsed,
                                  **({"estimate": estimate} if estimate is not None else {})})

    def progress(self, done: int, total: int, message: str = "") -> None:
        """Report `done` of `total` units; the time left is extrapolated from the rate so far."""
        now = time.monotonic()
        if self._progress_t0 is None:
            self._progress_t0 = now
        remaining = None
        if done > 0 and total >= done:
            remaining = (now - self._progress_t0) / done * (total - done)
        self.worker.channel.send({
            "type": "progress", "id": self.id, "done": int(done), "total": int(total),
            "message": message, "elapsed_s": now - self._t0, "remaining_s": remaining,
        })

    def restart_clock(self) -> None:
        """Measure the rate from the next progress report on (e.g. after models are loaded)."""
        self._progress_t0 = None

    def send(self, message: dict[str, Any]) -> None:
        self.worker.channel.send({**message, "id": self.id})

    def engine(self, settings_json: Any) -> Any:
        return self.worker.engine_for(wp.EngineSettings.from_json(settings_json), self)

    def array(self, name: Any) -> np.ndarray:
        """An input array by the name the job's parameters give (it came in the job's frames)."""
        if not isinstance(name, str) or name not in self.arrays:
            raise wp.ProtocolError(f"job {self.id}: array {name!r} was not sent with the job")
        return self.arrays[name]

    def save(self, name: str, array: np.ndarray) -> str:
        """Return an array with the result (as a frame); its name for the result's JSON."""
        file_name = wp.check_array_name(f"{name}.npy")
        if np.asarray(array).dtype.hasobject:
            raise ValueError(f"array {name!r} holds Python objects; only plain numeric arrays travel")
        self.outputs[file_name] = array
        return file_name


# ============================================================================ handlers
def _volume(ctx: JobContext, spec: Any) -> Any:
    from ..data.volume import Volume

    if not isinstance(spec, dict):
        raise wp.ProtocolError("a volume must be an object with array, spacing, origin, direction")
    return Volume(
        ctx.array(spec.get("array")), tuple(spec["spacing"]), tuple(spec["origin"]), tuple(spec["direction"])
    )


def _open_bank(ctx: JobContext, params: dict[str, Any], engine: Any | None = None) -> Any:
    from ..bank.support_bank import SupportBank

    bank = SupportBank.open(_bank_path(params))
    if engine is not None:
        bank.check_models(engine.embedder.identity)
    return bank


def _bank_path(params: dict[str, Any]) -> str:
    """The bank's path on this host (the worker's: a remote worker opens the server's bank); `~` expanded."""
    path = params["bank"]
    if not isinstance(path, str) or not path:
        raise wp.ProtocolError(f"bank must be a path, got {path!r}")
    return os.path.expanduser(path)


def bank_state(bank: Any) -> dict[str, Any]:
    """What a client on another host needs to show and use a bank it cannot open itself
    (`worker.remote.RemoteBank`): its path here, id, revision, labels and active entries."""
    return {"path": str(bank.path), "bank_id": bank.bank_id, "revision": int(bank.revision),
            "labels": [lab.to_json() for lab in bank.labels], "entries": [_entry_json(e) for e in bank.entries()]}


def _with_state(result: dict[str, Any], params: dict[str, Any], bank: Any) -> dict[str, Any]:
    """The result plus the bank's state after the job, when the client asked (`describe_bank`)."""
    if params.get("describe_bank"):
        bank.reload()
        result["bank_state"] = bank_state(bank)
    return result


def _entry_json(entry: Any) -> dict[str, Any]:
    return {"id": entry.id, "case_id": entry.case_id, "axis": entry.axis, "index": entry.index, "origin": entry.origin}


def _slice_json(sr: Any) -> dict[str, Any]:
    return {
        "index": int(sr.index),
        "retrieved": [[str(e), float(s)] for e, s in sr.retrieved],
        "iou": [[int(k), float(v)] for k, v in sr.iou.items()],
        "object_score": [[int(k), float(v)] for k, v in sr.object_score.items()],
        "confidence": float(sr.confidence),
        **({"supports_per_label": [[int(lab), [[str(e), float(sc)] for e, sc in h]]
                                   for lab, h in sr.supports_per_label.items()],
            "filter_fallback": [int(v) for v in sr.filter_fallback]}
           if getattr(sr, "supports_per_label", None) is not None else {}),
        **({"neighbours": [int(i) for i in sr.neighbours], "annotated_slice": sr.annotated_slice}
           if getattr(sr, "neighbours", None) is not None else {}),  # propagation: what this slice's pseudo-video held
    }


def job_load(ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """Load (warm up) the engine of these settings; report the models' identities (and what a
    cohort's resume compares: the SAM 2 input size, `precision` as resolved on this host's device)."""
    from ..engine.sam2_memory import resolve_precision

    engine = ctx.engine(params["settings"])
    out = {"dinov2_identity": engine.embedder.identity, "sam2_identity": engine.sam.identity,
           "image_size": int(engine.sam.image_size), "random_weights": bool(engine.random_weights)}
    if params.get("precision"):
        out["precision"] = resolve_precision(str(params["precision"]), engine.sam.device)
    return out


def job_segment(ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """Segment runs of slices of a volume from a bank; one merged label map plus diagnostics."""
    from ..segmentation.segment import segment_volume
    from ..segmentation.propagation import keep_run, widened_runs
    from ..data.volume import slice_view

    volume = _volume(ctx, params["volume"])
    engine = ctx.engine(params["settings"])
    ctx.check_cancelled()
    bank = _open_bank(ctx, params, engine)
    runs = [(int(a), int(b)) for a, b in params["runs"]]
    total = sum(b - a for a, b in runs)
    ctx.status(f"Segmenting {total} slices...")
    ctx.restart_clock()
    merged: np.ndarray | None = None
    labels: list[Any] = []
    precision, batch_size = "fp32", 1
    axis = params.get("axis")
    slices: list[dict[str, Any]] = []
    seconds = 0.0
    done_before = 0
    # The extent stop applies to a single run (a first segmentation); re-segmenting runs of
    # unedited slices segments them all.
    extent_stop = int(params.get("extent_stop") or 0) if len(runs) == 1 else 0
    beyond: set[int] = set()
    extent: dict[str, Any] = {}
    estimate: dict[str, Any] = {}

    def progress(d: int, t: int, o: int, size: int) -> None:
        ctx.progress(o + d, total - size + t)  # the extent stop shrinks the total as it goes

    def first_batch(e: Any) -> None:  # before the second batch starts
        if not estimate:
            estimate.update(e.to_json())
            ctx.status(f"Estimate: {e.describe()}", estimate=estimate)

    wide = runs if not params.get("from_annotations") else widened_runs(  # Slicer's re-segment
        runs, bank, params.get("case_id"), params.get("case_policy", "ignore"), axis, volume.array,
        int(params.get("propagate") or 0))
    for (a, b), (lo, hi) in zip(runs, wide):
        r = segment_volume(
            volume, bank, engine, labels=params.get("labels"), k=int(params["k"]), axis=axis,
            slice_range=(lo, hi), case_id=params.get("case_id"), case_policy=params.get("case_policy", "ignore"),
            window=tuple(params["window"]) if params.get("window") is not None else None,
            progress=lambda d, t, o=done_before, size=b - a: progress(d, t, o, size),
            cancel=ctx.cancelled, precision=params.get("precision", "auto"), batch_size=params.get("batch_size"),
            extent_stop=extent_stop, presence_threshold=float(params.get("presence_threshold") or 0.0),
            start_slice=params.get("start_slice"), estimate=first_batch,
            support_order=params.get("support_order") or "nearest", propagate=int(params.get("propagate") or 0),
            support_filter=params.get("support_filter") or "all",
            log=lambda line: (log.info(line), ctx.status(line)),  # batch size chosen / halved after out of memory
            keep_probabilities=bool(params.get("keep_probabilities")) and len(runs) == 1,
        )
        if r.cancelled:
            raise JobCancelled("segmentation cancelled")
        keep_run(r, (a, b))  # a widened run's annotated start slices stay as the user left them
        axis, labels, seconds = r.axis, r.labels, seconds + r.seconds
        precision, batch_size = r.precision, r.batch_size
        if merged is None:
            merged = r.labelmap.array
        else:
            for i in r.slices:
                slice_view(merged, axis, i)[...] = slice_view(r.labelmap.array, axis, i)
        beyond |= r.beyond_extent
        if r.extent_stop:
            extent = {"stop": r.extent_stop, "presence_threshold": r.presence_threshold,
                      "start_slices": list(r.start_slices), "start_reason": r.start_reason}
        run_slices = [_slice_json(r.slices[i]) for i in sorted(r.slices)]
        ctx.send({"type": "diagnostics", "slices": run_slices})
        slices += run_slices
        done_before += b - a
    assert merged is not None
    provenance: dict[str, Any] = {}
    if params.get("provenance") and len(runs) == 1:  # a command-line run: its sidecar, made where the bank is
        from ..segmentation.provenance import segmentation_provenance, slice_records

        provenance = {"provenance": segmentation_provenance(r, engine, bank, k=int(params["k"])),
                      "records": slice_records(r, runs[0])}
    # `rseg segment --save-probabilities --worker` (one run): each label's sigmoid(logit), float32
    probabilities = {} if r.probabilities is None else {"probabilities": ctx.save("probabilities", r.probabilities)}
    return {
        **provenance,
        **probabilities,
        "labelmap": ctx.save("labelmap", merged),
        "axis": int(axis),
        "labels": [lab.to_json() for lab in labels],
        "slices": slices,
        "seconds": seconds,
        "precision": precision,
        "batch_size": batch_size,
        "support_order": params.get("support_order") or "nearest",
        "propagate": int(params.get("propagate") or 0),
        "beyond_extent": sorted(int(i) for i in beyond),
        "extent": extent,
        "estimate": estimate or None,
    }


def job_create_bank(ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """A new bank with these labels, tied to the embedder of the settings."""
    from ..bank.support_bank import LabelInfo, SupportBank

    labels = [LabelInfo(int(d["value"]), str(d["name"]), tuple(d["color"])) for d in params["labels"]]
    engine = ctx.engine(params["settings"])
    bank = SupportBank.create(_bank_path(params), labels, engine.embedder.identity)
    return _with_state({"bank": str(bank.path)}, params, bank)


def job_add_slices(ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """Add single slices (the user's corrections) with their masks; one bank write per slice."""
    images = ctx.array(params["images"])  # [n, H, W] raw intensities
    masks = ctx.array(params["masks"])  # [n, L, H, W] bool, labels in params["labels"] order
    indices = [int(i) for i in params["indices"]]
    values = [int(v) for v in params["labels"]]
    if images.ndim != 3 or masks.shape != (len(indices), len(values), *images.shape[1:]):
        raise wp.ProtocolError(f"add_slices: images {images.shape} and masks {masks.shape} do not match")
    engine = ctx.engine(params["settings"])
    bank = _open_bank(ctx, params, engine)
    added: list[dict[str, Any]] = []
    ctx.restart_clock()
    for n, index in enumerate(indices):
        if ctx.cancelled():
            raise JobCancelled(f"cancelled after adding {len(added)} of {len(indices)} slices")
        entry = bank.add_slice(
            images[n], {v: masks[n, m] for m, v in enumerate(values)}, params["case_id"], int(params["axis"]),
            index, tuple(params["spacing"]), engine.embedder, origin=params.get("origin", "correction"),
            window=tuple(params["window"]),
        )
        added.append(_entry_json(entry))
        ctx.progress(n + 1, len(indices), "slices added")
    return _with_state({"entries": added}, params, bank)


def job_add_volume(ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """Add every annotated slice of a volume (the user's first annotations)."""
    volume = _volume(ctx, params["volume"])
    labelmap = volume.with_array(ctx.array(params["labelmap"]))
    engine = ctx.engine(params["settings"])
    bank = _open_bank(ctx, params, engine)
    ctx.restart_clock()
    entries = bank.add_volume(
        volume, labelmap, params["case_id"], engine.embedder, axis=params.get("axis"),
        window=tuple(params["window"]), origin=params.get("origin", "initial"),
        progress=lambda d, t: ctx.progress(d, t, "slices embedded"),
    )
    return _with_state({"entries": [_entry_json(e) for e in entries]}, params, bank)


def job_verify(ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """Check (and with repair, mend) a bank; re-embedding loads the embedder here."""
    from ..bank.support_bank import SupportBank

    bank = SupportBank.open(_bank_path(params))
    settings = params.get("settings")
    report = bank.verify(
        embedder=(lambda: ctx.engine(settings).embedder) if settings is not None else None,
        repair=bool(params.get("repair", False)),
        reembed=bool(params.get("reembed", False)),
        progress=lambda d, t: ctx.progress(d, t, "files checked"),
    )
    return _with_state({"ok": bool(report.ok), "summary": report.summary(), "report": report.to_json()}, params, bank)


def job_download(ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """Download the weights the settings need (huggingface_hub, integrity check: `weights.download`)."""
    from ..models import weights

    settings = wp.EngineSettings.from_json(params["settings"])
    items = settings.missing_downloads()
    if not items:
        return {"paths": []}
    ctx.restart_clock()
    try:
        paths = weights.download(
            items, progress=lambda done, total, name: ctx.progress(done, total or 0, name), cancel=ctx.cancelled
        )
    except weights.DownloadCancelled as e:
        raise JobCancelled(str(e)) from e
    return {"paths": [str(p) for p in paths]}


def job_suggest(ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """The slices to annotate next (`suggest.suggest_slices`): DINOv2 over the volume, bank optional."""
    from ..segmentation.suggest import LastSegmentation, VolumeEmbeddingCache, suggest_slices

    volume = _volume(ctx, params["volume"])
    engine = ctx.engine(params["settings"])
    bank = _open_bank(ctx, params) if params.get("bank") else None  # suggest_slices checks its DINOv2
    last = LastSegmentation.from_json(params["last"]) if params.get("last") else None
    if ctx.worker.suggest_embeddings is None:  # a refresh reuses the volume's embeddings (same voxels)
        ctx.worker.suggest_embeddings = VolumeEmbeddingCache()
    ctx.restart_clock()

    def progress(done: int, total: int) -> None:
        ctx.check_cancelled()
        ctx.progress(done, total, "slices embedded")

    result = suggest_slices(
        volume, bank, engine.embedder, n=int(params.get("n", 3)), axis=params.get("axis"),
        window=tuple(params["window"]) if params.get("window") is not None else None, last=last,
        case_id=params.get("case_id"), progress=progress, embeddings_cache=ctx.worker.suggest_embeddings,
    )
    return {**result.to_json(), "dinov2_identity": engine.embedder.identity}


def job_bank_info(ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """Open the bank at this host's path (no model) and describe it: the client's bank on another host."""
    from ..bank.support_bank import SupportBank

    return bank_state(SupportBank.open(_bank_path(params)))


HANDLERS: dict[str, Callable[[JobContext, dict[str, Any]], dict[str, Any]]] = {
    "load": job_load,
    "segment": job_segment,
    "create_bank": job_create_bank,
    "add_slices": job_add_slices,
    "add_volume": job_add_volume,
    "verify": job_verify,
    "download": job_download,
    "suggest": job_suggest,
    "bank_info": job_bank_info,
}
assert set(HANDLERS) == set(wp.JOB_KINDS)


# ============================================================================ the process
class Worker:
    """The worker's state: the loaded engine, the job queue, the stop flag."""

    def __init__(self, channel: Channel, parent_pid: int | None, idle_timeout: float) -> None:
        self.channel = channel
        self.parent_pid = parent_pid
        self.idle_timeout = idle_timeout
        self.inbox: "queue.Queue[dict[str, Any] | None]" = queue.Queue()
        self.stopping = threading.Event()
        self.exit_reason = ""
        self._lock = threading.Lock()
        self._current: tuple[str, threading.Event] | None = None
        self._cancelled_early: set[str] = set()
        self._received: dict[str, dict[str, np.ndarray]] = {}  # job id -> arrays sent before its job
        self._refused: dict[str, list[str]] = {}  # job id -> why some of its arrays were refused
        self._engine: Any = None
        self._engine_settings: wp.EngineSettings | None = None
        self.suggest_embeddings: Any = None  # suggest.VolumeEmbeddingCache, made by the first suggest job

    # ---------------------------------------------------------------- engine
    def engine_for(self, settings: wp.EngineSettings, ctx: JobContext | None = None) -> Any:
        """The engine of these settings, loaded once and kept (with its memory caches)."""
        if self._engine is None or self._engine_settings != settings:
            if ctx is not None:
                ctx.status(f"Loading {sam2_spec(settings.sam2_size).display} and DINOv2 {settings.dinov2_size}...")
            self._engine = None  # free the old models before loading new ones
            self._engine = settings.load()
            self._engine_settings = settings
        return self._engine

    # ---------------------------------------------------------------- input
    def read_stdin(self, stream: BinaryIO) -> None:
        """Reader thread: queue jobs, apply cancels at once; EOF means the parent went away.

        Each line is read with a bound and decoded defensively (`protocol.read_frame` /
        `decode`): whatever arrives, the thread reports it and keeps reading; it ends only at EOF.
        """
        skipping = [False]
        while True:
            try:
                line = wp.read_frame(stream, wp.MAX_LINE_BYTES, skipping)
            except wp.ProtocolError as e:
                self._protocol_error(e)
                continue
            except (OSError, ValueError):  # stdin closed under us
                break
            if line is None:
                break
            if not line.strip():
                continue
            try:
                message = wp.decode(line, wp.TO_WORKER)
                if message["type"] == "array":
                    if not self._read_array(stream, message):
                        break
                elif message["type"] == "cancel":
                    self.cancel(str(message.get("id")))
                else:
                    self.inbox.put(message)
                    if message["type"] == "shutdown":
                        self._stop("shutdown")
            except wp.ProtocolError as e:
                self._protocol_error(e)
            except Exception as e:  # a bug here must not leave the worker deaf
                log.exception("reader: unexpected error")
                self._protocol_error(f"{type(e).__name__}: {e}")
        self._stop("eof")
        self.inbox.put(None)

    def _read_array(self, stream: BinaryIO, header: dict[str, Any]) -> bool:
        """The payload of an "array" frame, size checked before reading; False at EOF."""
        try:
            size = wp.array_frame_size(header)
        except wp.FrameTooLong as e:
            size = header["bytes"]
            self._protocol_error(e)
            return wp.skip_exact(stream, size)  # dropped unread: the stream stays in step
        payload = wp.read_exact(stream, size)
        if payload is None:
            return False
        try:
            name, _, array = wp.array_from_frame(header, payload)
        except wp.ProtocolError as e:  # reported now, and again as the job's error
            self._refused.setdefault(str(header.get("id")), []).append(str(e))
            raise
        self._received.setdefault(str(header.get("id")), {})[name] = array
        return True

    def _protocol_error(self, error: Any) -> None:
        log.error("protocol error: %s", error)
        self.channel.send({"type": "protocol_error", "message": str(error)})

    def cancel(self, job_id: str) -> None:
        with self._lock:
            if self._current is not None and self._current[0] == job_id:
                self._current[1].set()
            else:
                self._cancelled_early.add(job_id)

    def _stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            self.exit_reason = reason
            self.stopping.set()

    def watch_parent(self) -> None:
        """Watchdog thread: stop when the parent's pid no longer exists; force the exit if a job hangs.

        "Parent" is the Slicer process that started us, named by --parent-pid. It is usually not
        our direct parent: inside Slicer the worker runs under CTKAppLauncher (`PythonSlicer`),
        which starts the real interpreter as its child and stays alive in between, so
        `os.getppid()` is the launcher's pid. Only the pid's existence says whether Slicer is
        still there (stdin EOF says it too, when nothing else holds the pipe open).
        """
        while not self.stopping.wait(PARENT_POLL_S):
            if self.parent_pid is not None and not _alive(self.parent_pid):
                log.warning("parent %s is gone; stopping", self.parent_pid)
                self._stop("parent")
                self.inbox.put(None)
        if self.exit_reason in ("parent", "eof"):
            time.sleep(ORPHAN_GRACE_S)
            log.warning("job did not stop within %.0f s of the parent leaving; exiting", ORPHAN_GRACE_S)
            self.channel.send({"type": "exit", "reason": "orphaned"})
            sys.stderr.flush()
            os._exit(3)

    # ---------------------------------------------------------------- main loop
    def serve(self) -> str:
        """Run jobs until told to stop, the parent leaves, or the idle timeout passes."""
        last_activity = time.monotonic()
        while not self.stopping.is_set():
            try:
                message = self.inbox.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() - last_activity > self.idle_timeout:
                    self._stop("idle")
                continue
            if message is None or message["type"] == "shutdown":
                break
            self.run_job(message)
            last_activity = time.monotonic()
        return self.exit_reason or "shutdown"

    def run_job(self, message: dict[str, Any]) -> None:
        job_id = str(message.get("id", ""))
        kind = message.get("kind")
        t0 = time.monotonic()
        cancel = threading.Event()
        with self._lock:
            if job_id in self._cancelled_early:
                self._cancelled_early.discard(job_id)
                cancel.set()
            self._current = (job_id, cancel)
        self.channel.send({"type": "started", "id": job_id})
        log.info("job %s (%s) started", job_id, kind)
        try:
            arrays, refused = self._received.pop(job_id, {}), self._refused.pop(job_id, [])
            if not job_id or kind not in HANDLERS:
                raise wp.ProtocolError(f"job needs an id and a kind in {wp.JOB_KINDS}, got id={job_id!r} kind={kind!r}")
            params = message.get("params")
            if not isinstance(params, dict):
                raise wp.ProtocolError(f"job {job_id}: params must be an object")
            expected = message.get("arrays") or []
            missing = sorted(set(map(str, expected)) - set(arrays)) if isinstance(expected, list) else ["?"]
            if missing:
                raise wp.ProtocolError(f"job {job_id}: arrays {missing} did not arrive before the job"
                                       + "".join(f"; {why}" for why in refused))
            ctx = JobContext(self, job_id, arrays, cancel)
            ctx.check_cancelled()
            result = HANDLERS[kind](ctx, params)
            if ctx.cancelled():
                raise JobCancelled(f"{kind} cancelled")
            compress = bool(message.get("compress"))
            for name, array in ctx.outputs.items():
                self.channel.send_frame(wp.array_frame(job_id, name, wp.npy_bytes(array), compress))
        except JobCancelled as e:
            self.channel.send({"type": "cancelled", "id": job_id, "message": str(e), "elapsed_s": time.monotonic() - t0})
            log.info("job %s cancelled", job_id)
        except Exception as e:  # reported to the parent with the traceback; the worker lives on
            tb = traceback.format_exc()
            log.error("job %s failed:\n%s", job_id, tb)
            self.channel.send({
                "type": "error", "id": job_id, "message": f"{type(e).__name__}: {e}",
                "error_type": type(e).__name__, "traceback": tb, "elapsed_s": time.monotonic() - t0,
            })
        else:
            self.channel.send({"type": "result", "id": job_id, "result": result, "elapsed_s": time.monotonic() - t0})
            log.info("job %s finished in %.1f s", job_id, time.monotonic() - t0)
        finally:
            with self._lock:
                self._current = None


def _alive(pid: int) -> bool:
    """True while a process with this pid exists (a zombie counts as gone), on every OS."""
    if os.name == "posix":
        try:
            os.kill(pid, 0)  # signal 0: existence check only
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        try:  # Linux: a zombie has exited and only waits to be reaped
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[-1].split()[0] not in (b"Z", b"X")
        except (OSError, IndexError):
            return True  # no /proc (macOS): existence is all we can know
    try:  # Windows: a handle to a finished process still answers; ask for its exit code
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    except Exception:
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m RetrievalSegLib.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process goes away")
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S,
                        help="exit after this many seconds without a job (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("RSEG_WORKER_LOG_LEVEL", "INFO"), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    channel = Channel(_private_stdout())
    worker = Worker(channel, args.parent_pid, args.idle_timeout)
    threading.Thread(target=worker.read_stdin, args=(sys.stdin.buffer,), name="stdin", daemon=True).start()
    threading.Thread(target=worker.watch_parent, name="parent-watch", daemon=True).start()
    channel.send({"type": "ready", "pid": os.getpid(), "protocol": wp.PROTOCOL_VERSION, "version": __version__,
                  "log": os.environ.get("RSEG_WORKER_LOG", "")})
    log.info("worker %s ready (parent %s, idle timeout %.0f s)", os.getpid(), args.parent_pid, args.idle_timeout)
    reason = worker.serve()
    channel.send({"type": "exit", "reason": reason})
    log.info("worker exiting: %s", reason)
    sys.stderr.flush()
    # Daemon threads may sit in a blocking read: leave without waiting for them.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
