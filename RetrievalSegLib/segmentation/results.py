"""What segmenting a volume gives back: the label map with the input's geometry and, per slice,
what happened there (`SliceResult`); the time estimate after the first batch (`TimeEstimate`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data.volume import Volume


@dataclass
class SliceResult:
    """What happened on one slice: its supports, SAM 2's scores, a confidence in 0..1, and per label
    whether it counted as present (object score > the presence threshold; absent = empty mask)."""

    index: int
    retrieved: list[tuple[str, float]]
    iou: dict[int, float]
    object_score: dict[int, float]
    confidence: float
    present: dict[int, bool] = field(default_factory=dict)
    neighbours: list[int] | None = None  # propagation: slices whose memories it used (oldest first)
    # propagation from a slice the user annotated in this volume: on that slice `source` is
    # "annotation" (its annotation is the result, from bank entry `annotation_entry`, not queried);
    # on the slices of its walks `annotated_slice` names it (a conditioning frame of their pseudo-video)
    source: str | None = None
    annotation_entry: str | None = None
    annotated_slice: int | None = None
    # support filter `foreground`: each label's own k supports, and the labels that fell back to
    # `retrieved` (fewer than k retrieved slices contain them); None / [] with the filter `all`
    supports_per_label: dict[int, list[tuple[str, float]]] | None = None
    filter_fallback: list[int] = field(default_factory=list)


@dataclass
class TimeEstimate:
    """How long the rest of a run should take, from its own first batch (never a stored figure)."""

    first_batch_slices: int
    first_batch_seconds: float  # SAM 2 time of the first batch (image encoder + queries)
    slices_done: int
    slices_left: int  # with the extent stop: at most this many (the stop usually ends sooner)
    upper_bound: bool  # True when slices_left is a bound (extent stop on), not a count
    device: str
    image_size: int
    precision: str
    batch_size: int
    peak_memory_bytes: int | None = None  # CUDA: peak allocated during the first batch (None elsewhere)

    @property
    def seconds_per_slice(self) -> float:
        return self.first_batch_seconds / max(1, self.first_batch_slices)

    @property
    def seconds_left(self) -> float:
        return self.seconds_per_slice * self.slices_left

    def to_json(self) -> dict:
        return {
            "first_batch_slices": self.first_batch_slices, "first_batch_seconds": self.first_batch_seconds,
            "seconds_per_slice": self.seconds_per_slice, "slices_done": self.slices_done,
            "slices_left": self.slices_left, "seconds_left": self.seconds_left, "upper_bound": self.upper_bound,
            "device": self.device, "image_size": self.image_size, "precision": self.precision,
            "batch_size": self.batch_size, "peak_memory_bytes": self.peak_memory_bytes,
        }

    def describe(self) -> str:
        """One line for a person: the measurement and what it implies."""
        left = f"at most {self.slices_left}" if self.upper_bound else f"{self.slices_left}"
        tail = " (the extent stop usually ends sooner)" if self.upper_bound else ""
        peak = "" if self.peak_memory_bytes is None else f", peak GPU memory {self.peak_memory_bytes / 2**30:.1f} GiB"
        return (
            f"first batch: {self.first_batch_slices} slices in {self.first_batch_seconds:.1f} s "
            f"({self.seconds_per_slice:.2f} s/slice, {self.device}, {self.image_size} px, {self.precision}, "
            f"batch {self.batch_size}{peak}); {left} slices left: about {format_seconds(self.seconds_left)}{tail}"
        )


def format_seconds(seconds: float) -> str:
    """'42 s', '7 min 5 s', '1 h 3 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {(s % 3600) // 60} min"


@dataclass
class VolumeSegmentation:
    """A label map with the input's geometry plus per-slice diagnostics."""

    labelmap: Volume
    labels: list
    axis: int
    slices: dict[int, SliceResult] = field(default_factory=dict)
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(0))
    cancelled: bool = False
    seconds: float = 0.0
    label_masks: np.ndarray | None = None  # [L, *volume shape] bool, logit > 0 per label, if kept
    probabilities: np.ndarray | None = None  # [L, *volume shape] float32 sigmoid(logit) per label, if kept
    precision: str = "fp32"  # as resolved for the device: 'fp32' or 'bf16'
    batch_size: int = 1  # slices per memory-attention call at the end (1 = the per-slice reference path)
    batch_sizing: dict | None = None  # how the batch size came about (`queries.BatchSizer.to_json`)
    extent_stop: int = 0  # 0: every slice of the range was asked for
    presence_threshold: float = 0.0
    start_slices: list[int] = field(default_factory=list)  # where the extent walks began
    start_reason: str = ""  # 'given', 'annotated', 'middle of the slice range', 'most similar to the bank'
    beyond_extent: set[int] = field(default_factory=set)  # slices the extent stop left out
    estimate: TimeEstimate | None = None
    bank_revision: int | None = None  # the bank's revision when its supports were retrieved
    window: tuple[float, float] | None = None  # intensity bounds every slice was windowed with
    annotated_slices: list[int] = field(default_factory=list)  # this case's bank entries along the axis
    support_order: str = "nearest"  # where the most similar support sat in each pseudo-video
    propagate: int = 0  # N: previous slices of a walk as memory (0 = every slice alone)
    support_filter: str = "all"  # which retrieved slices condition each label ('all' or 'foreground')

    def low_confidence_slices(self, threshold: float = 0.5) -> list[int]:
        """Segmented slices whose confidence is below `threshold`, in slice order."""
        return [i for i in sorted(self.slices) if self.slices[i].confidence < threshold]
