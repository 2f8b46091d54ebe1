"""From SAM 2's per-label output on a slice to the label map: which labels are present (the one
presence rule), how overlapping labels fuse, the slice's confidence, and `LabelMapAssembler`,
which writes each segmented slice into the volume's label map with its diagnostics."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from ..data.volume import slice_view
from ..engine.sam2_memory import NO_OBJ_SCORE, QueryResult
from .results import SliceResult, VolumeSegmentation

#: The logit magnitude SAM 2 gives a frame whose mask was given (`_use_mask_as_output`: out_scale
#: 20, out_bias -10): an annotated slice's result is written with it.
ANNOTATION_LOGIT = 10.0


def fuse_labels(logits: np.ndarray, label_lut: np.ndarray) -> np.ndarray:
    """[H, W] label map from per-label logits [L, H, W]: the most probable label where its
    probability exceeds 0.5 (logit > 0, as the official predictor thresholds), else 0.

    Probabilities are computed exactly as `QueryResult.probabilities` (ties between saturated
    labels go to the first, as argmax does), but only on pixels with some positive logit: every
    other pixel has all probabilities <= 0.5 and stays background.
    """
    out = np.zeros(logits.shape[1:], dtype=label_lut.dtype)
    cand = (logits > 0).any(axis=0)
    if not cand.any():
        return out
    sub = logits[:, cand]
    prob = 1.0 / (1.0 + np.exp(-np.clip(sub, -80.0, 80.0)))
    best = prob.argmax(axis=0)
    fg = prob.max(axis=0) > 0.5
    out[cand] = np.where(fg, label_lut[best], 0)
    return out


def label_presence(object_score: Sequence[float], threshold: float = 0.0) -> list[bool]:
    """Per label: present when its SAM 2 object score is > `threshold` (0: SAM 2's own rule)."""
    return [float(score) > threshold for score in object_score]


def check_presence_threshold(threshold: float) -> float:
    """The threshold as a float; ValueError unless finite and >= 0 (below 0 SAM 2 already blanks the mask)."""
    t = float(threshold)
    if not math.isfinite(t) or t < 0:
        raise ValueError(
            f"presence_threshold must be a finite number >= 0, got {threshold!r}: SAM 2 itself empties the mask "
            "of a label whose object score is <= 0, so a lower threshold cannot make it present "
            "(to segment every slice, turn the extent stop off)"
        )
    return t


def slice_confidence(result: QueryResult, threshold: float = 0.0) -> float:
    """Confidence of one slice: the weakest label's.

    A label present (object score > `threshold`) scores sigmoid(object score) x predicted IoU; a
    label absent scores 1 - sigmoid(object score). Heuristic, for ranking slices to review.
    """
    conf = []
    for iou, score, present in zip(result.iou, result.object_score, label_presence(result.object_score, threshold)):
        p = 1.0 / (1.0 + math.exp(-float(np.clip(score, -80, 80))))
        conf.append(p * float(np.clip(iou, 0.0, 1.0)) if present else 1.0 - p)
    return float(min(conf)) if conf else float("nan")


class LabelMapAssembler:
    """Writes segmented slices into `result` (its label map, per-label masks, confidence, slices) and
    reports progress: `record(index, retrieved, query_result)` once per accepted slice."""

    def __init__(self, result: VolumeSegmentation, label_lut: np.ndarray, presence_threshold: float,
                 progress: Callable[[int, int], None] | None, total: int) -> None:
        self.result = result
        self.labels = [int(v) for v in label_lut]
        self.label_lut = label_lut
        self.presence_threshold = presence_threshold
        self.progress = progress
        self.total = total
        self.done = 0

    def record(self, index: int, retrieved: Sequence[tuple[str, float]], res: QueryResult) -> None:
        """Slice `index` (along the result's axis) is segmented: write it, count it."""
        present = label_presence(res.object_score, self.presence_threshold)
        self._write(index, retrieved, res, present, slice_confidence(res, self.presence_threshold))

    def record_annotation(self, index: int, masks: np.ndarray, entry_id: str) -> None:
        """Slice `index` is one the user annotated (bank entry `entry_id`, `masks` [L, H, W] bool in
        label order): the annotation is its result, not a prediction. Written as SAM 2 outputs a
        frame given a mask (`_use_mask_as_output`): logits +-ANNOTATION_LOGIT, object score
        +ANNOTATION_LOGIT where the label is drawn (else -ANNOTATION_LOGIT), IoU 1; present = drawn,
        whatever the presence threshold; confidence 1."""
        masks = np.asarray(masks, dtype=bool)
        drawn = masks.reshape(len(masks), -1).any(axis=1)
        res = QueryResult(
            tuple(self.labels),
            np.where(masks, np.float32(ANNOTATION_LOGIT), np.float32(-ANNOTATION_LOGIT)),
            np.ones(len(masks), dtype=np.float32),
            np.where(drawn, np.float32(ANNOTATION_LOGIT), np.float32(-ANNOTATION_LOGIT)),
        )
        self._write(index, [], res, [bool(d) for d in drawn], 1.0)
        sr = self.result.slices[index]
        sr.source, sr.annotation_entry, sr.neighbours = "annotation", str(entry_id), []

    def _write(self, index: int, retrieved: Sequence[tuple[str, float]], res: QueryResult, present: list[bool],
               conf: float) -> None:
        result, ax = self.result, self.result.axis
        # An absent label's mask is empty on this slice: its logits are set to SAM 2's own
        # "no object" value, as the decoder does itself where the score is <= 0.
        logits = res.logits if all(present) else np.where(
            np.asarray(present)[:, None, None], res.logits, np.float32(NO_OBJ_SCORE))
        slice_view(result.labelmap.array, ax, index)[...] = fuse_labels(logits, self.label_lut)
        if result.label_masks is not None:
            for li in range(len(self.labels)):
                slice_view(result.label_masks[li], ax, index)[...] = logits[li] > 0
        if result.probabilities is not None:
            prob = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float32), -80.0, 80.0)))
            for li in range(len(self.labels)):
                slice_view(result.probabilities[li], ax, index)[...] = prob[li]
        result.confidence[index] = conf
        result.slices[index] = SliceResult(
            index,
            list(retrieved),
            {lab: float(v) for lab, v in zip(self.labels, res.iou)},
            {lab: float(v) for lab, v in zip(self.labels, res.object_score)},
            conf,
            {lab: bool(p) for lab, p in zip(self.labels, present)},
        )
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
