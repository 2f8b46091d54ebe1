"""What the module's logic holds about a result: the merged automatic segmentation of a volume
(`SegmentationState`, with digests of the masks it put in the bank), the undo record of a written
result, the worker's segment result turned back into a `VolumeSegmentation`, the result as
`suggest.LastSegmentation`, and the advice the panel shows when a run measured on a CPU will take
long. Plain data, no MRML and no worker.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .mrml_bridge import SegmentationSnapshot
from ..data.volume import Volume, num_slices

#: On a CPU, a segmentation expected (from its own first batch) to need longer than this for the
#: rest gets the offer to cancel and try 512 px; nothing switches unless the user asks.
LONG_CPU_ESTIMATE_S = 300.0


def estimate_advice(estimate: dict[str, Any] | None, long_s: float = LONG_CPU_ESTIMATE_S) -> str | None:
    """What the panel says when a run measured on a CPU will take long, else None.

    Only this run's measurement is quoted (`segment.TimeEstimate.to_json()`); the time at 512 px
    is not guessed: it is measured on that run's own first batch if the user tries it.
    """
    if not estimate or not str(estimate.get("device", "")).startswith("cpu"):
        return None
    seconds = float(estimate["seconds_left"])
    if seconds <= long_s or int(estimate.get("image_size", 0)) <= 512:
        return None
    from ..segmentation.results import format_seconds

    bound = "up to " if estimate.get("upper_bound") else ""
    return (
        f"On this CPU the rest of this run will take {bound}about {format_seconds(seconds)} "
        f"(first batch: {float(estimate['seconds_per_slice']):.1f} s per slice at {int(estimate['image_size'])} px). "
        "You may cancel and try 512 px (several times less work per slice; its time is measured on its own "
        "first batch, and its accuracy is lower than 1024 px's until measured), or run on a CUDA GPU "
        "(Settings > Device) if this computer has one. The run goes on unless you choose."
    )


@dataclass
class _Request:
    volume_node: Any  # the node itself: IDs are reused after "Close scene"
    runs: list[tuple[int, int]]
    axis: int
    k: int
    case_id: str | None
    case_policy: str
    window: tuple[float, float]
    labels: list[int] | None
    resegment: bool
    extent_stop: int = 0
    start_slice: list[int] | None = None


def _runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Contiguous (start, stop) runs of sorted slice indices."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(int(x) for x in indices)):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


@dataclass
class SegmentationState:
    """The merged automatic result of one volume: label map, per-slice diagnostics, snapshot.

    Nodes are held by reference, never by ID: "Close scene" (`vtkMRMLScene::Clear`) resets the
    scene's unique IDs, so the next scene's first volume has this one's ID.
    """

    volume_node: Any
    segmentation_node: Any | None
    labelmap: Volume
    labels: list[Any]
    axis: int
    window: tuple[float, float]
    case_id: str | None
    slices: dict[int, Any] = field(default_factory=dict)  # index -> segment.SliceResult
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(0))
    snapshot: SegmentationSnapshot | None = None
    banked: dict[int, str] = field(default_factory=dict)  # slice -> digest of masks put in the bank
    beyond_extent: set[int] = field(default_factory=set)  # slices the extent stop left out

    def is_for(self, volume_node: Any, segmentation_node: Any = None) -> bool:
        """True when this result is of this very volume node (and segmentation node, if given)."""
        return (volume_node is not None and self.volume_node is volume_node
                and (segmentation_node is None or self.segmentation_node is segmentation_node))

    def copy(self) -> "SegmentationState":
        """A deep copy that shares the nodes (they are references into the scene, not data)."""
        import copy

        shared = {id(n): n for n in (self.volume_node, self.segmentation_node) if n is not None}
        return copy.deepcopy(self, shared)

    def low_confidence_slices(self, threshold: float) -> list[int]:
        """Segmented slices with confidence below `threshold`, in order."""
        return [i for i in sorted(self.slices) if self.slices[i].confidence < threshold]


@dataclass
class _Undo:
    """What a written result replaced, so that it can be put back (nodes by reference, as above)."""

    volume_node: Any
    segmentation_node: Any
    created_node: bool
    masks: dict[str, np.ndarray | None]  # segment name -> mask before (None: segment was added)
    state: SegmentationState | None


def _digest(codes: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(codes).tobytes()).hexdigest()


def _last_segmentation(state: SegmentationState) -> Any:
    """The automatic result as `suggest.LastSegmentation`: slices it did not segment are gaps."""
    from ..segmentation.provenance import OUTSIDE_RANGE, SEGMENTED
    from ..segmentation.suggest import LastSegmentation
    from ..data.volume import array_axis

    n = num_slices(state.labelmap.array, state.axis)
    other = tuple(a for a in range(3) if a != array_axis(state.axis))
    has_label = (state.labelmap.array != 0).any(axis=other)
    status = [SEGMENTED if i in state.slices else OUTSIDE_RANGE for i in range(n)]
    confidence = np.array([state.slices[i].confidence if i in state.slices else np.nan for i in range(n)])
    return LastSegmentation(status, confidence, np.array([i in state.slices and not has_label[i] for i in range(n)]),
                            axis=state.axis)


def _segmentation_from_result(volume: Volume) -> Callable[[dict[str, Any], Path], list[Any]]:
    """Turn the worker's segment result (JSON + labelmap.npy) back into a VolumeSegmentation."""

    def convert(result: dict[str, Any], folder: Path) -> list[Any]:
        from ..bank.support_bank import LabelInfo
        from ..segmentation.results import SliceResult, VolumeSegmentation
        from ..worker.protocol import load_array

        array = load_array(folder, result["labelmap"])
        if array.shape != volume.array.shape:
            raise ValueError(f"label map of shape {array.shape} for a volume of shape {volume.array.shape}")
        axis = int(result["axis"])
        labels = [LabelInfo(int(d["value"]), str(d["name"]), tuple(d["color"])) for d in result["labels"]]
        out = VolumeSegmentation(
            labelmap=volume.with_array(array), labels=labels, axis=axis,
            confidence=np.full(num_slices(array, axis), np.nan, dtype=np.float32), seconds=float(result["seconds"]),
            precision=str(result["precision"]), batch_size=int(result["batch_size"]),
            beyond_extent={int(i) for i in result.get("beyond_extent", [])},
            support_order=str(result.get("support_order") or "nearest"),
            propagate=int(result.get("propagate") or 0),
        )
        extent = result.get("extent") or {}
        if extent:
            out.extent_stop, out.presence_threshold = int(extent["stop"]), float(extent["presence_threshold"])
            out.start_slices, out.start_reason = [int(i) for i in extent["start_slices"]], str(extent["start_reason"])
        for d in result["slices"]:
            sr = SliceResult(
                int(d["index"]), [(str(e), float(s)) for e, s in d["retrieved"]],
                {int(k): float(v) for k, v in d["iou"]}, {int(k): float(v) for k, v in d["object_score"]},
                float(d["confidence"]),
            )
            if "neighbours" in d:  # propagation: the walk's slices and the annotated slice it started from
                sr.neighbours = [int(i) for i in d["neighbours"]]
                sr.annotated_slice = None if d.get("annotated_slice") is None else int(d["annotated_slice"])
            out.slices[sr.index] = sr
            out.confidence[sr.index] = sr.confidence
        return [out]

    return convert
