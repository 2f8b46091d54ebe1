"""The Slicer module's logic without Qt: bank, jobs in the worker process, results, corrections.

Runs in Slicer's process on the main thread and never touches a model: everything that needs
SAM 2 or DINOv2 (segment, re-segment, create a bank, add slices, verify, suggest slices to
annotate, download weights) is a job for the worker process (`worker.client`), polled without
blocking. MRML <-> numpy conversion happens here (through `mrml_bridge`), before a job is sent and
after its result arrives; what a result holds is `slicer_logic.results`.

Typical use on the main thread::

    logic.start_segmentation(volume_node, k=8)     # job sent to the worker
    ... every 200 ms: for ev in logic.poll(): ...  # progress / finished / failed
    node = logic.apply_result(scene, volume_node)  # on "finished": write segments
    ... user edits in Segment Editor ...
    logic.start_add_edited_slices(volume_node, node); ... poll ...
    logic.start_resegment_remaining(volume_node, node); ... poll ...

Each `start_*` has a blocking twin (`run`, `add_edited_slices_to_bank`, ...) for scripts and tests.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .bank_access import BankAccess
from .mrml_bridge import (
    SupportThumbnail,
    _explicit_axis,
    _Label,
    _labels,
    _read_masks,
    _replace_masks,
    annotated_labelmap,
    case_id_for_volume,
    labelmap_to_segmentation,
    segment_ids_for_labels,
    segment_slice_masks,
    snapshot_segmentation,
    edited_slices,
    support_thumbnails,
    volume_from_node,
)
from ..segmentation.extent import DEFAULT_EXTENT_STOP
from .results import (  # the first and last re-exported: the panel and tests use them
    LONG_CPU_ESTIMATE_S,
    SegmentationState,
    _Request,
    _runs,
    _digest,
    _last_segmentation,
    _segmentation_from_result,
    _Undo,
    estimate_advice,
)
from ..data.volume import AXIS_NAMES, Volume, in_plane_spacing, num_slices, parse_axis, slice_view, through_plane_axis
from ..worker.client import WorkerClient, WorkerJob, volume_spec
from ..worker.protocol import EngineSettings, JobEvent

__all__ = ["LONG_CPU_ESTIMATE_S", "EngineSettings", "JobEvent", "RetrievalSegLogic", "SegmentationState",
           "estimate_advice"]

class RetrievalSegLogic(BankAccess):
    """Pure-Python logic behind the Slicer module: bank, worker jobs, results, corrections."""

    def __init__(self, bank: Any = None, settings: EngineSettings | None = None, client: WorkerClient | None = None) -> None:
        self.bank = bank
        self.settings = settings or EngineSettings()
        self.precision = "auto"  # 'auto' (bf16 autocast on a CUDA GPU that has it), 'fp32' or 'bf16'
        self.batch_size: int | None = None  # slices per memory-attention call; None: by device
        self.extent_stop = DEFAULT_EXTENT_STOP  # 0: segment every slice (see extent.py)
        self.presence_threshold = 0.0  # SAM 2's own: a label is present where its object score > 0
        self.support_order = "nearest"  # most similar support last in the pseudo-video (SUPPORT_ORDERS)
        self.propagate = 0  # N previous slices of a walk as SAM 2 memory (0 = off; propagation.py)
        self.support_filter = "all"  # 'foreground': each label conditioned on supports that contain it
        self.client = client or WorkerClient()
        self.job: WorkerJob | None = None
        self._after: Callable[[JobEvent], None] | None = None  # main-thread bookkeeping at the job's end
        self._request: _Request | None = None
        self._pending: list[Any] | None = None  # finished VolumeSegmentations not yet written
        self.state: SegmentationState | None = None
        self._undo: _Undo | None = None
        self.suggestions: Any = None  # suggest.Suggestions of the last suggest job
        self.suggestions_volume: Any = None  # ... and the volume node they are for

    def _require_idle(self) -> None:
        if self.busy:
            raise RuntimeError("RetrievalSeg is still running; wait for it or cancel it first")

    # ------------------------------------------------------------------ jobs
    @property
    def busy(self) -> bool:
        """True while a job runs or its result waits to be written."""
        return (self.job is not None and self.job.outcome is None) or bool(self._pending)

    def _submit(
        self,
        kind: str,
        params: dict[str, Any],
        folder: Path | None = None,
        on_result: Callable[[dict[str, Any], Path], Any] | None = None,
        after: Callable[[JobEvent], None] | None = None,
    ) -> WorkerJob:
        self._require_idle()
        settings = self.settings.to_json()
        if self.remote:  # the worker's host has its own weights; it returns the bank's new state
            settings["weights_dir"] = None
            params = {"describe_bank": kind in ("create_bank", "add_slices", "add_volume", "verify"), **params}
        params = {"settings": settings, **params}
        self._after = after
        self.job = self.client.submit(kind, params, folder, on_result)
        self._handle(self.job._events)  # a job that could not even be sent has ended already
        return self.job

    def cancel(self) -> None:
        """Ask the running job to stop (a cancelled segmentation writes nothing)."""
        if self.job is not None:
            self.job.cancel()

    def poll(self) -> list[JobEvent]:
        """Events of the running job since the last poll (never blocks)."""
        if self.job is None:
            return []
        return self._handle(self.job.poll())

    def wait(self, timeout: float | None = None) -> list[JobEvent]:
        """Block until the running job ends; return its remaining events."""
        if self.job is None:
            return []
        return self._handle(self.job.wait(timeout))

    def _handle(self, events: list[JobEvent]) -> list[JobEvent]:
        for ev in events:
            if ev.terminal and self._after is not None:
                after, self._after = self._after, None
                after(ev)  # may replace ev.result by what the main thread made of it
                if self.job is not None:
                    self.job.result = ev.result
        return events

    def shutdown(self) -> None:
        """Stop the worker (the module's cleanup)."""
        self.client.stop()

    def _wait_result(self) -> Any:
        """Block until the job ends; its result, or its error raised."""
        assert self.job is not None
        events = self.wait()
        last = events[-1] if events else None
        if self.job.outcome != "finished":
            if self.job.error is not None:
                raise self.job.error
            raise RuntimeError(f"{self.job.kind} did not finish ({last.message if last else self.job.outcome})")
        return self.job.result

    # ------------------------------------------------------------------ worker-only work
    def start_load_models(self) -> WorkerJob:
        """Load the models of the current settings in the worker (so the first run starts warm)."""
        return self._submit("load", {})

    def start_download(self) -> WorkerJob:
        """Download the weights the current settings need, in the worker, with progress."""
        return self._submit("download", {})

    # ------------------------------------------------------------------ segmenting
    def start_segmentation(
        self,
        volume_node: Any,
        *,
        k: int = 8,
        axis: int | str | None = None,
        slice_range: tuple[int, int] | None = None,
        case_id: str | None = None,
        case_policy: str = "ignore",
        window: tuple[float, float] | None = None,
        labels: Sequence[int] | None = None,
        extent_stop: int | None = None,
        start_slice: int | Sequence[int] | None = None,
    ) -> WorkerJob:
        """Segment the volume (or a slice range) in the worker; poll() for its events.

        extent_stop None: this logic's `extent_stop` (0 = every slice); start_slice None: the
        worker picks it (annotated slices of `case_id`, else the middle of the range, else the
        slice most similar to the bank)."""
        from ..segmentation.slices import window_for_volume

        self._require_idle()
        self._require_bank()
        volume = volume_from_node(volume_node)  # main thread: MRML read here, never in the worker
        ax = parse_axis(axis)
        ax_resolved = ax if ax is not None else through_plane_axis(volume.spacing)
        n = num_slices(volume.array, ax_resolved)
        start, stop = (0, n) if slice_range is None else (int(slice_range[0]), int(slice_range[1]))
        if not 0 <= start < stop <= n:
            raise ValueError(
                f"slice range {slice_range} is outside 0..{n} along axis {AXIS_NAMES[ax_resolved]} "
                "(first slice inclusive, last exclusive)"
            )
        request = _Request(
            volume_node, [(start, stop)], ax_resolved, int(k), case_id, case_policy,
            window_for_volume(volume, window), list(labels) if labels is not None else None, False,
            int(self.extent_stop if extent_stop is None else extent_stop),
            None if start_slice is None else [int(start_slice)] if isinstance(start_slice, (int, np.integer))
            else [int(i) for i in start_slice],
        )
        return self._start(request, volume)

    def remaining_slices(self, volume_node: Any, segmentation_node: Any) -> list[int]:
        """Automatically segmented slices that the user has not edited since they were written."""
        state = self._state_for(volume_node, segmentation_node)
        edited = set(self.edited_slices(volume_node, segmentation_node))
        return [i for i in sorted(state.slices) if i not in edited]

    def start_resegment_remaining(
        self,
        volume_node: Any,
        segmentation_node: Any,
        *,
        k: int = 8,
        case_policy: str = "prefer",
        case_id: str | None = None,
    ) -> WorkerJob:
        """Re-segment the slices the user has not edited, with the bank as it is now.

        With case_policy "prefer" the corrections just added for this case are retrieved first.
        """
        self._require_idle()
        self._require_bank()
        state = self._state_for(volume_node, segmentation_node)
        remaining = self.remaining_slices(volume_node, segmentation_node)
        if not remaining:
            raise ValueError("every segmented slice was edited; there is nothing left to re-segment")
        volume = volume_from_node(volume_node)
        cid = case_id or state.case_id or case_id_for_volume(volume_node)
        request = _Request(
            volume_node, _runs(remaining), state.axis, int(k), cid, case_policy,
            state.window, [lab.value for lab in state.labels], True,
        )
        return self._start(request, volume)

    def _start(self, request: _Request, volume: Volume) -> WorkerJob:
        bank = self._require_bank()
        folder = self.client.new_job_folder()
        params = {
            "bank": str(bank.path), "volume": volume_spec(folder, "volume", volume), "runs": request.runs,
            "axis": request.axis, "k": request.k, "case_id": request.case_id, "case_policy": request.case_policy,
            "window": list(request.window), "labels": request.labels,
            "precision": self.precision, "batch_size": self.batch_size,
            "extent_stop": request.extent_stop, "presence_threshold": float(self.presence_threshold),
            "start_slice": request.start_slice, "support_order": self.support_order,
            "propagate": int(self.propagate), "support_filter": self.support_filter,
            # re-segmenting: walks start from the corrections beside the runs (`propagation.widened_runs`)
            "from_annotations": bool(request.resegment),
        }
        self._request = request
        self._pending = None

        def keep(event: JobEvent) -> None:
            self._pending = event.result if event.kind == "finished" else None

        return self._submit("segment", params, folder, on_result=_segmentation_from_result(volume), after=keep)

    @property
    def has_result(self) -> bool:
        """True when a finished run waits to be written with apply_result."""
        return bool(self._pending)

    def apply_result(
        self, scene: Any, volume_node: Any, segmentation_node: Any = None, name: str | None = None
    ) -> Any:
        """Write the finished run into segments (main thread) and remember it; return the node."""
        if not self._pending or self._request is None:
            raise RuntimeError("there is no finished segmentation to write")
        request, results = self._request, self._pending
        if volume_node is not request.volume_node:
            raise ValueError("the result belongs to another volume than the one given")
        first = results[0]
        state = self.state
        fresh = (
            state is None
            or not request.resegment
            or not state.is_for(request.volume_node)
        )
        previous = self.state.copy() if self.state is not None else None
        if fresh:
            state = SegmentationState(
                request.volume_node, None, first.labelmap.with_array(np.zeros_like(first.labelmap.array)),
                list(first.labels), first.axis, request.window, request.case_id,
                confidence=np.full(num_slices(first.labelmap.array, first.axis), np.nan, np.float32),
                beyond_extent=set().union(*(r.beyond_extent for r in results)),
            )
        assert state is not None
        written: list[int] = []
        for r in results:
            for i, sr in r.slices.items():
                slice_view(state.labelmap.array, state.axis, i)[...] = slice_view(r.labelmap.array, r.axis, i)
                state.slices[i] = sr
                state.confidence[i] = sr.confidence
                written.append(i)
        undo = self._undo_point(volume_node, segmentation_node, state.labels)
        node = labelmap_to_segmentation(
            (state.labelmap, state.labels), scene, volume_node, segmentation_node, name,
            axis=state.axis, slices=written,
        )
        undo.segmentation_node = node
        self._undo = undo
        state.segmentation_node = node
        now = snapshot_segmentation(node, volume_node, state.labels, state.axis, written)
        if not fresh and state.snapshot is not None:
            # Slices not rewritten keep their old reference, so the user's edits stay "edited".
            keep = state.snapshot
            for i in written:
                keep.slice_codes(i)[...] = now.slice_codes(i)
                state.banked.pop(i, None)
            keep.segmented = tuple(sorted(set(keep.segmented) | set(written)))
            now = keep
        state.snapshot = now
        self.state = state
        self._pending = None
        self._undo.state = previous
        return node

    def _undo_point(self, volume_node: Any, segmentation_node: Any, labels: Sequence[Any]) -> _Undo:
        """Record the segments a result is about to overwrite."""
        if segmentation_node is None:
            return _Undo(volume_node, None, True, {}, None)
        labs = _labels(labels)
        ids = segment_ids_for_labels(segmentation_node, labs)
        masks = _read_masks(segmentation_node, volume_node, ids)
        before = {lab.name: (masks[lab.value] if ids[lab.value] else None) for lab in labs}
        return _Undo(volume_node, segmentation_node, False, before, None)

    @property
    def can_undo(self) -> bool:
        """True when the last written result can be taken back."""
        return self._undo is not None

    def undo_last_result(self, scene: Any) -> Any:
        """Put back what the last written result replaced; return the segmentation (None if removed)."""
        self._require_idle()
        undo = self._undo
        if undo is None:
            raise RuntimeError("there is no result to undo")
        node, volume_node = undo.segmentation_node, undo.volume_node
        if node is None or volume_node is None or node.GetScene() is not scene or volume_node.GetScene() is not scene:
            self._undo = None
            raise RuntimeError("the segmentation or volume of the last result was removed; nothing to undo")
        self._undo = None
        self.state = undo.state
        if undo.created_node:
            scene.RemoveNode(node)
            return None
        segmentation = node.GetSegmentation()
        for name, mask in undo.masks.items():
            if mask is None:
                sid = segmentation.GetSegmentIdBySegmentName(name)
                if sid:
                    segmentation.RemoveSegment(sid)
        kept = {name: m for name, m in undo.masks.items() if m is not None}
        ids = {name: segmentation.GetSegmentIdBySegmentName(name) for name in kept}
        ids = {name: sid for name, sid in ids.items() if sid}
        if ids:
            labs = [_Label(n, name, (0.5, 0.5, 0.5)) for n, name in enumerate(ids)]
            now = _read_masks(node, volume_node, {lab.value: ids[lab.name] for lab in labs})
            _replace_masks(
                node, volume_node, ids,
                {lab.name: now[lab.value] for lab in labs}, {name: kept[name] for name in ids},
            )
        return node

    def discard_result(self) -> None:
        """Drop a finished result without writing it (e.g. its volume was removed)."""
        self._pending = None

    def forget_scene(self) -> None:
        """The scene is closing: drop the result, its undo record and the suggestions.

        None of them may touch the next scene, whose nodes can have these nodes' IDs
        (`vtkMRMLScene::Clear` resets the unique IDs). Cancel a running job first (`cancel`)."""
        self._pending = None
        self._request = None
        self.state = None
        self._undo = None
        self.suggestions, self.suggestions_volume = None, None

    def has_result_for(self, volume_node: Any, segmentation_node: Any = None) -> bool:
        """True when the last automatic result is of this volume node (and segmentation node)."""
        return self.state is not None and self.state.is_for(volume_node, segmentation_node)

    def suggestions_for(self, volume_node: Any) -> Any:
        """The last suggestions if they are for this volume node, else None."""
        return self.suggestions if volume_node is not None and self.suggestions_volume is volume_node else None

    def run(
        self, scene: Any, volume_node: Any, segmentation_node: Any = None, **kwargs: Any
    ) -> Any:
        """Segment synchronously (scripts and tests): start, wait, write; return the node."""
        self.start_segmentation(volume_node, **kwargs)
        return self._finish(scene, volume_node, segmentation_node)

    def resegment_remaining(self, scene: Any, volume_node: Any, segmentation_node: Any, **kwargs: Any) -> Any:
        """Re-segment the unedited slices synchronously; return the node."""
        self.start_resegment_remaining(volume_node, segmentation_node, **kwargs)
        return self._finish(scene, volume_node, segmentation_node)

    def _finish(self, scene: Any, volume_node: Any, segmentation_node: Any) -> Any:
        self._wait_result()
        return self.apply_result(scene, volume_node, segmentation_node)

    # ------------------------------------------------------------------ corrections
    def _state_for(self, volume_node: Any, segmentation_node: Any) -> SegmentationState:
        state = self.state
        if (
            state is None
            or not state.is_for(volume_node, segmentation_node)
            or state.snapshot is None
        ):
            raise RuntimeError(
                "no automatic result of this volume is in this segmentation; run Segment first"
            )
        return state

    def edited_slices(self, volume_node: Any, segmentation_node: Any) -> list[int]:
        """Slices the user changed since the last automatic result was written."""
        state = self._state_for(volume_node, segmentation_node)
        assert state.snapshot is not None
        return edited_slices(segmentation_node, volume_node, state.snapshot)

    def _window_for(self, volume_node: Any) -> tuple[float, float] | None:
        state = self.state
        if state is not None and state.is_for(volume_node):
            return state.window
        return None

    def _case_for(self, volume_node: Any, case_id: str | None) -> str:
        if case_id:
            return case_id
        state = self.state
        if state is not None and state.is_for(volume_node) and state.case_id:
            return state.case_id
        return case_id_for_volume(volume_node)

    def start_add_slices(
        self,
        volume_node: Any,
        segmentation_node: Any,
        axis: int | str,
        indices: Sequence[int],
        case_id: str | None = None,
        *,
        origin: str = "correction",
    ) -> WorkerJob:
        """Add these slices with the user's masks to the bank (embedded in the worker).

        Each slice is windowed exactly as the segmentation of this volume windows it, so the bank
        holds what the models will see. An older entry of the same case, axis and slice is retired.
        """
        from ..segmentation.slices import window_for_volume

        self._require_idle()
        bank = self._require_bank()
        ax = _explicit_axis(axis)
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("no slices to add")
        volume = volume_from_node(volume_node)
        window = self._window_for(volume_node) or window_for_volume(volume)
        values = [lab.value for lab in bank.labels]
        per_slice = [segment_slice_masks(segmentation_node, volume_node, ax, i, bank.labels) for i in indices]
        masks = np.stack([np.stack([m[v] for v in values]) for m in per_slice]).astype(bool)
        images = np.stack([np.array(slice_view(volume.array, ax, i)) for i in indices])
        folder = self.client.new_job_folder()
        params = {
            "bank": str(bank.path), "images": _save(folder, "images", images), "masks": _save(folder, "masks", masks),
            "labels": values, "indices": indices, "axis": ax, "spacing": list(in_plane_spacing(volume.spacing, ax)),
            "case_id": self._case_for(volume_node, case_id), "window": list(window), "origin": origin,
        }
        digests = self._digests(volume_node, segmentation_node, indices, ax)

        def added(event: JobEvent) -> None:
            self._reload_bank(event)
            if event.kind == "finished":
                entries = [self.bank.entry(e["id"]) for e in event.result["entries"]]
                state = self.state
                if state is not None:
                    state.banked.update({i: d for i, d in digests.items()})
                event.result = entries

        return self._submit("add_slices", params, folder, after=added)

    def start_add_edited_slices(self, volume_node: Any, segmentation_node: Any, case_id: str | None = None) -> WorkerJob:
        """Add the slices the user edited since the last automatic result (not yet in the bank)."""
        state = self._state_for(volume_node, segmentation_node)
        edited = self.edits_not_in_bank(volume_node, segmentation_node)
        if not edited:
            raise ValueError("no edited slice is missing from the bank")
        return self.start_add_slices(volume_node, segmentation_node, state.axis, edited, case_id)

    def start_add_annotated_slices(
        self, volume_node: Any, segmentation_node: Any, case_id: str | None = None, axis: int | str | None = None
    ) -> WorkerJob:
        """Add the user's hand-drawn slices (first annotations) of a volume to the bank."""
        from ..segmentation.slices import window_for_volume

        self._require_idle()
        bank = self._require_bank()
        state = self.state
        if (
            state is not None and state.is_for(volume_node, segmentation_node)
        ):
            raise ValueError(
                "this segmentation holds an automatic result of this volume; add only the slices "
                "you corrected (Add all edited slices), not every segmented slice"
            )
        volume = volume_from_node(volume_node)
        labelmap = annotated_labelmap(segmentation_node, volume_node, bank.labels)
        folder = self.client.new_job_folder()
        params = {
            "bank": str(bank.path), "volume": volume_spec(folder, "volume", volume),
            "labelmap": _save(folder, "labelmap", labelmap.array), "case_id": self._case_for(volume_node, case_id),
            "axis": parse_axis(axis) if axis is not None else None, "window": list(window_for_volume(volume)),
            "origin": "initial",
        }

        def added(event: JobEvent) -> None:
            self._reload_bank(event)
            if event.kind == "finished":
                event.result = [self.bank.entry(e["id"]) for e in event.result["entries"]]

        return self._submit("add_volume", params, folder, after=added)

    def add_slice_to_bank(
        self, volume_node: Any, segmentation_node: Any, axis: int | str, index: int, case_id: str | None = None
    ) -> Any:
        """Add one corrected slice of the volume to the bank (blocking); return its entry."""
        self.start_add_slices(volume_node, segmentation_node, axis, [int(index)], case_id)
        (entry,) = self._wait_result()
        return entry

    def add_edited_slices_to_bank(self, volume_node: Any, segmentation_node: Any, case_id: str | None = None) -> list[Any]:
        """Add the edited slices not yet in the bank (blocking); return their entries."""
        self._state_for(volume_node, segmentation_node)
        if not self.edits_not_in_bank(volume_node, segmentation_node):
            return []
        self.start_add_edited_slices(volume_node, segmentation_node, case_id)
        return self._wait_result()

    def add_annotated_slices_to_bank(
        self, volume_node: Any, segmentation_node: Any, case_id: str | None = None, axis: int | str | None = None
    ) -> list[Any]:
        """Add the user's first annotations of a volume (blocking); return the entries."""
        self.start_add_annotated_slices(volume_node, segmentation_node, case_id, axis)
        return self._wait_result()

    def _digests(self, volume_node: Any, segmentation_node: Any, slices: Sequence[int], axis: int) -> dict[int, str]:
        """What these slices look like now (to know later whether they changed since banked)."""
        state = self.state
        if (
            state is None
            or not state.is_for(volume_node, segmentation_node)
            or axis != state.axis
            or not slices
        ):
            return {}
        now = snapshot_segmentation(segmentation_node, volume_node, state.labels, state.axis)
        return {int(i): _digest(now.slice_codes(int(i))) for i in slices}

    def edits_not_in_bank(self, volume_node: Any, segmentation_node: Any) -> list[int]:
        """Edited slices whose current masks have not been added to the bank yet."""
        state = self._state_for(volume_node, segmentation_node)
        edited = self.edited_slices(volume_node, segmentation_node)
        if not edited:
            return []
        now = snapshot_segmentation(segmentation_node, volume_node, state.labels, state.axis)
        return [i for i in edited if state.banked.get(i) != _digest(now.slice_codes(i))]

    # ------------------------------------------------------------------ what to annotate next
    def start_suggest(self, volume_node: Any, n: int = 3, axis: int | str | None = None,
                      case_id: str | None = None) -> WorkerJob:
        """Which slices of the volume to annotate next, in the worker; result: a suggest.Suggestions.

        Uses the open bank (none open: the slices that best cover the volume) and, when the last
        result is of this volume, its per-slice confidence (slices it did not segment are gaps).
        This volume's slices already in the bank (its case id) are never suggested.
        """
        from ..segmentation.slices import window_for_volume
        from ..segmentation.suggest import Suggestions

        self._require_idle()
        volume = volume_from_node(volume_node)
        state = self.state if self.state is not None and self.state.is_for(volume_node) else None
        folder = self.client.new_job_folder()
        params = {
            "bank": str(self.bank.path) if self.bank is not None else None,
            "volume": volume_spec(folder, "volume", volume), "n": int(n),
            "axis": parse_axis(axis), "window": list(state.window if state else window_for_volume(volume)),
            "case_id": self._case_for(volume_node, case_id),
            "last": _last_segmentation(state).to_json() if state else None,
        }

        def keep(event: JobEvent) -> None:
            if event.kind == "finished":
                self.suggestions, self.suggestions_volume = event.result, volume_node

        return self._submit("suggest", params, folder, on_result=lambda result, _: Suggestions.from_json(result),
                            after=keep)

    def suggest_slices(self, volume_node: Any, n: int = 3, axis: int | str | None = None,
                       case_id: str | None = None) -> Any:
        """Blocking `start_suggest`; returns the Suggestions."""
        self.start_suggest(volume_node, n, axis, case_id)
        return self._wait_result()

    # ------------------------------------------------------------------ review
    def slice_result(self, index: int) -> Any:
        """The SliceResult of slice `index` of the last result, or None."""
        return None if self.state is None else self.state.slices.get(int(index))

    def low_confidence_slices(self, threshold: float = 0.5) -> list[int]:
        """Segmented slices with confidence below `threshold`."""
        return [] if self.state is None else self.state.low_confidence_slices(threshold)

    def next_low_confidence_slice(self, after: int, threshold: float = 0.5) -> int | None:
        """The next low-confidence slice after `after` (wrapping around), or None."""
        low = self.low_confidence_slices(threshold)
        if not low:
            return None
        later = [i for i in low if i > after]
        return later[0] if later else low[0]

    def thumbnails(self, index: int, size: int = 96) -> list[SupportThumbnail]:
        """Thumbnails of the supports retrieved for slice `index` of the last result."""
        sr = self.slice_result(index)
        if sr is None or self.bank is None:
            return []
        if self.remote:
            raise RuntimeError(f"the supports' images are in the bank on {self.client.where}: thumbnails of a "
                               "remote bank are not shown yet")
        return support_thumbnails(self.bank, sr.retrieved, size)


def _save(folder: Path, name: str, array: np.ndarray) -> str:
    from ..worker.protocol import save_array

    return save_array(folder, name, array)
