"""Whole-volume segmentation: retrieve supports per slice, segment each slice with SAM 2 memories.

Slices run along one IJK axis (default: the through-plane axis, largest spacing). Every slice
gets its own k supports from the bank (DINOv2 top-k); support memories come from the per-bank
cache, so a support is encoded once however many slices retrieve it. The image encoder runs on
batches of query slices. Overlapping labels are resolved by the highest probability; no other
post-processing is applied.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .engine import QueryResult
from .preprocess import robust_window, to_uint8
from .volume import AXIS_NAMES, Volume, num_slices, parse_axis, slice_view, through_plane_axis

CASE_POLICIES = ("ignore", "exclude", "prefer")


@dataclass
class SliceResult:
    """What happened on one slice: its supports, SAM 2's scores, a confidence in 0..1."""

    index: int
    retrieved: list[tuple[str, float]]
    iou: dict[int, float]
    object_score: dict[int, float]
    confidence: float


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

    def low_confidence_slices(self, threshold: float = 0.5) -> list[int]:
        """Segmented slices whose confidence is below `threshold`, in slice order."""
        return [i for i in sorted(self.slices) if self.slices[i].confidence < threshold]


def window_for_volume(volume: Volume, window: tuple[float, float] | None = None) -> tuple[float, float]:
    """Intensity bounds for the whole volume: explicit, or robust percentiles of its voxels."""
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
        if not hi > lo:
            raise ValueError(f"window must have low < high, got {window}")
        return lo, hi
    arr = volume.array
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(
            f"volume holds {int((~np.isfinite(arr)).sum())} NaN or infinite voxels; fix them first"
        )
    return robust_window(arr)


def slice_to_uint8(volume: Volume, axis: int, index: int, bounds: tuple[float, float]) -> np.ndarray:
    """One slice windowed to uint8 (what both models see)."""
    return to_uint8(slice_view(volume.array, axis, index), bounds)


def slice_confidence(result: QueryResult) -> float:
    """Confidence of one slice: the weakest label's.

    A label predicted present scores sigmoid(object score) x predicted IoU; a label predicted
    absent scores 1 - sigmoid(object score). Heuristic, for ranking slices to review.
    """
    conf = []
    for iou, score in zip(result.iou, result.object_score):
        p = 1.0 / (1.0 + math.exp(-float(np.clip(score, -80, 80))))
        conf.append(p * float(np.clip(iou, 0.0, 1.0)) if score > 0 else 1.0 - p)
    return float(min(conf)) if conf else float("nan")


def segment_volume(
    volume: Volume,
    bank,
    engine,
    *,
    labels: Sequence[int] | None = None,
    k: int = 8,
    axis: int | str | None = None,
    slice_range: tuple[int, int] | None = None,
    case_id: str | None = None,
    case_policy: str = "ignore",
    window: tuple[float, float] | None = None,
    encoder_batch: int = 4,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> VolumeSegmentation:
    """Segment `volume` slice by slice from the support `bank`; partial result if cancelled.

    slice_range is (start, stop) with stop exclusive; slices outside it stay background.
    """
    t0 = time.perf_counter()
    if case_policy not in CASE_POLICIES:
        raise ValueError(f"case_policy must be one of {CASE_POLICIES}, got {case_policy!r}")
    if case_policy != "ignore" and case_id is None:
        raise ValueError(f"case_policy={case_policy!r} needs the case_id of the volume")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    bank.check_models(engine.embedder.identity)
    ax = parse_axis(axis)
    if ax is None:
        ax = through_plane_axis(volume.spacing)
    n = num_slices(volume.array, ax)
    start, stop = (0, n) if slice_range is None else (int(slice_range[0]), int(slice_range[1]))
    if not (0 <= start < stop <= n):
        raise ValueError(
            f"slice range {slice_range} is outside 0..{n} along axis {AXIS_NAMES[ax]} "
            "(start inclusive, stop exclusive)"
        )
    bank_labels = {lab.value: lab for lab in bank.labels}
    if labels is None:
        chosen = list(bank_labels)
    else:
        unknown = [v for v in labels if v not in bank_labels]
        if unknown:
            raise ValueError(f"labels {unknown} are not in the bank (it has {sorted(bank_labels)})")
        chosen = [int(v) for v in labels]
    if not chosen:
        raise ValueError("no labels to segment: the bank defines none")
    bounds = window_for_volume(volume, window)
    dtype = np.uint8 if max(chosen) < 256 else np.uint16
    out = np.zeros(volume.array.shape, dtype=dtype)
    result = VolumeSegmentation(
        labelmap=volume.with_array(out),
        labels=[bank_labels[v] for v in chosen],
        axis=ax,
        confidence=np.full(n, np.nan, dtype=np.float32),
    )
    indices = list(range(start, stop))
    total = len(indices)
    if progress is not None:
        progress(0, total)

    # Retrieval for all slices at once (DINOv2 is cheap next to SAM 2).
    images = [slice_to_uint8(volume, ax, i, bounds) for i in indices]
    if cancel is not None and cancel():
        result.cancelled = True
        return result
    emb = engine.embedder.embed(images)
    hits = bank.search(emb, k, case_id=case_id, case_policy=case_policy)
    cache = engine.memory_cache(bank)
    entries = {e.id: e for e in bank.entries(include_retired=True)}
    label_lut = np.array(chosen, dtype=dtype)

    done = 0
    for b0 in range(0, total, max(1, encoder_batch)):
        if cancel is not None and cancel():
            result.cancelled = True
            break
        batch_idx = list(range(b0, min(total, b0 + max(1, encoder_batch))))
        feats = engine.sam.encode_images([images[j] for j in batch_idx])
        for j, f in zip(batch_idx, feats):
            if cancel is not None and cancel():
                result.cancelled = True
                break
            mems = []
            for entry_id, _ in hits[j]:
                e = entries[entry_id]
                key = f"{e.id}-{e.sha256[:16]}"

                def compute(eid: str = entry_id):
                    data = bank.load_entry(eid)
                    return engine.sam.encode_support(data.image, data.masks, list(bank_labels))

                mems.append(cache.get_or_compute(key, compute))
            res = engine.sam.query(images[j], mems, chosen, features=f)
            prob = res.probabilities
            best = prob.argmax(axis=0)
            fg = prob.max(axis=0) > 0.5  # logit > 0, as the official predictor thresholds
            slab = np.where(fg, label_lut[best], 0).astype(dtype)
            slice_view(out, ax, indices[j])[...] = slab
            conf = slice_confidence(res)
            result.confidence[indices[j]] = conf
            result.slices[indices[j]] = SliceResult(
                indices[j],
                list(hits[j]),
                {lab: float(v) for lab, v in zip(chosen, res.iou)},
                {lab: float(v) for lab, v in zip(chosen, res.object_score)},
                conf,
            )
            done += 1
            if progress is not None:
                progress(done, total)
        if result.cancelled:
            break
    result.seconds = time.perf_counter() - t0
    return result
