"""Whole-volume segmentation: retrieve supports per slice, segment each slice with SAM 2 memories.

Slices run along one IJK axis (default: the through-plane axis, largest spacing). Every slice
gets its own k supports from the bank (DINOv2 top-k); support memories come from the per-bank
cache, so a support is encoded once however many slices retrieve it. The image encoder runs on
batches of query slices. Overlapping labels are resolved by the highest probability; no other
post-processing is applied.

Two paths give the same result (float reduction order aside, see Testing/engine/test_batched.py):
batch_size=1 is the per-slice reference (`Sam2MemoryEngine.query` per slice, the path the
fidelity tests compare with the official predictor); batch_size > 1 runs B slices x L labels
through one memory-attention + mask-decoder call (`Sam2MemoryEngine.query_batch`). precision
'bf16' runs SAM 2 under bfloat16 autocast (DINOv2 retrieval always runs in float32, so the
supports retrieved do not depend on the precision).

Presence: a label is *present* on a slice when SAM 2's object score for it is > `presence_threshold`
(default 0: SAM 2's own rule, under which the decoder already blanks the mask of an absent
object); an *absent* label gets an empty mask on that slice, whatever its logits. The one rule
(`label_presence`) decides the label map, the per-label masks, the confidence and the extent stop,
on the per-slice and the batched path alike, and `SliceResult.present` records it (the sidecar's
`present`). A threshold below 0 is refused: SAM 2 has already emptied those masks.

extent_stop N > 0 segments outwards from start slices and stops each direction after N
consecutive slices with every label absent (`extent.py`); the slices it leaves out are in
`VolumeSegmentation.beyond_extent`. The default 0 segments every slice (evaluation keeps that);
`rseg segment` and the Slicer panel turn the stop on (`extent.DEFAULT_EXTENT_STOP`).
`estimate` is called once, after the first batch, with the time the rest should take
(`TimeEstimate`, measured on this run only).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..bank.cache import memory_key
from ..engine.sam2_memory import NO_OBJ_SCORE, QueryResult, autocast, resolve_precision
from .extent import ExtentWalker
from ..engine.preprocess import robust_window, to_uint8
from ..data.volume import AXIS_NAMES, Volume, num_slices, parse_axis, slice_view, through_plane_axis

CASE_POLICIES = ("ignore", "exclude", "prefer")


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
            "batch_size": self.batch_size,
        }

    def describe(self) -> str:
        """One line for a person: the measurement and what it implies."""
        left = f"at most {self.slices_left}" if self.upper_bound else f"{self.slices_left}"
        tail = " (the extent stop usually ends sooner)" if self.upper_bound else ""
        return (
            f"first batch: {self.first_batch_slices} slices in {self.first_batch_seconds:.1f} s "
            f"({self.seconds_per_slice:.2f} s/slice, {self.device}, {self.image_size} px, {self.precision}); "
            f"{left} slices left: about {format_seconds(self.seconds_left)}{tail}"
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
    precision: str = "fp32"  # as resolved for the device: 'fp32' or 'bf16'
    batch_size: int = 1  # slices per memory-attention call (1 = the per-slice reference path)
    extent_stop: int = 0  # 0: every slice of the range was asked for
    presence_threshold: float = 0.0
    start_slices: list[int] = field(default_factory=list)  # where the extent walks began
    start_reason: str = ""  # 'given', 'annotated', 'middle of the slice range', 'most similar to the bank'
    beyond_extent: set[int] = field(default_factory=set)  # slices the extent stop left out
    estimate: TimeEstimate | None = None
    bank_revision: int | None = None  # the bank's revision when its supports were retrieved
    window: tuple[float, float] | None = None  # intensity bounds every slice was windowed with
    annotated_slices: list[int] = field(default_factory=list)  # this case's bank entries along the axis

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


def slices_to_uint8(volume: Volume, axis: int, indices: Sequence[int], bounds: tuple[float, float],
                    device=None, chunk: int = 64) -> list[np.ndarray]:
    """`slice_to_uint8` of each index; on a CUDA `device` computed there in chunks (one upload
    per chunk, float64 arithmetic and round-half-to-even as numpy's, so the same uint8 values)."""
    import torch

    lo, hi = float(bounds[0]), float(bounds[1])
    arr = volume.array
    exact = (
        device is not None and torch.device(device).type == "cuda" and hi > lo
        and (np.issubdtype(arr.dtype, np.integer) or arr.dtype in (np.float32, np.float64))
    )
    if not exact:
        return [slice_to_uint8(volume, axis, i, bounds) for i in indices]
    out: list[np.ndarray] = []
    for c0 in range(0, len(indices), chunk):
        stack = np.stack([slice_view(arr, axis, i) for i in indices[c0 : c0 + chunk]])
        if np.issubdtype(stack.dtype, np.floating) and not np.isfinite(stack).all():
            return [slice_to_uint8(volume, axis, i, bounds) for i in indices]  # raises, naming them
        out += list(window_on_device(stack, (lo, hi), device))
    return out


def window_on_device(stack: np.ndarray, bounds: tuple[float, float], device) -> np.ndarray:
    """[N, H, W] uint8 equal to `to_uint8(stack[n], bounds)` for finite input with high > low,
    computed on `device` (float64 subtract and multiply, round half to even, clip)."""
    import torch

    lo, hi = float(bounds[0]), float(bounds[1])
    x = torch.from_numpy(np.ascontiguousarray(stack)).to(device).to(torch.float64)
    x = torch.round((x - lo) * (255.0 / (hi - lo))).clamp_(0.0, 255.0).to(torch.uint8)
    return x.cpu().numpy()


#: Slices per memory-attention call when batch_size is None, by device type. On CPU batching does
#: not pay: on the quiet 2-core development machine (k=8, 3 labels, fp32) batches of 2 or 4 gave
#: 6-16% fewer slices/s than 1 at 512 px and equal within noise at 256 and 1024 px (README, Performance:
#: memory attention is arithmetic-bound there and a batch only makes its attention matrices larger).
#: So the CPU default is the per-slice path, which also makes a cancel take effect after one slice.
CPU_BATCH_SIZE = 1
CUDA_MAX_BATCH = 32


def auto_batch_size(device, image_size: int, k: int, n_labels: int) -> int:
    """Slices per memory-attention call for `device`: the measured-best on CPU; on CUDA up to 32
    (per-slice cost flat from 8 to 32 on an H100), fewer where free memory is short.

    The memory estimate is a deliberately generous bound on the activations of one (slice, label)
    item: float32 tokens x 256 channels x (k memories + query) x 8 live tensors.
    """
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return CPU_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(dev)
    tokens = (int(image_size) // 16) ** 2
    per_slice = 4 * 256 * tokens * (int(k) + 2) * 8 * max(1, int(n_labels))
    return int(max(1, min(CUDA_MAX_BATCH, (free // 2) // per_slice)))


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
    encoder_batch: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    precision: str = "auto",
    batch_size: int | None = None,
    keep_label_masks: bool = False,
    extent_stop: int = 0,
    presence_threshold: float = 0.0,
    start_slice: int | Sequence[int] | None = None,
    estimate: Callable[[TimeEstimate], None] | None = None,
) -> VolumeSegmentation:
    """Segment `volume` slice by slice from the support `bank`; partial result if cancelled.

    slice_range is (start, stop) with stop exclusive; slices outside it stay background.
    precision: 'auto' (bf16 autocast on CUDA with bf16 support, else fp32), 'fp32' or 'bf16'.
    batch_size: slices per memory-attention + decoder call; None picks it for the device
    (`auto_batch_size`), 1 is the per-slice reference path. encoder_batch: slices per image
    encoder call (None: batch_size, at least 4). keep_label_masks: also return each label's own
    foreground mask (logit > 0, overlaps kept) as `label_masks`.
    presence_threshold (>= 0; default 0, SAM 2's own rule): a label whose object score on a slice is
    <= it is absent there: its mask on that slice is empty (both paths; recorded per slice and
    label in `SliceResult.present`). extent_stop: 0 (default) segments every slice of the range;
    N > 0 walks out from the start slices and stops a direction after N consecutive slices where
    every label is absent (see `extent.py`). start_slice: the slice(s) to start from; None picks,
    in this order, the annotated slices of this volume in the bank (entries of `case_id` along
    this axis), the middle of `slice_range` if given, else the slice most similar to the bank
    (highest DINOv2 top-1 score). estimate: called once, after the first batch, with a
    `TimeEstimate` of the rest (before the second batch starts).
    """
    t0 = time.perf_counter()
    if case_policy not in CASE_POLICIES:
        raise ValueError(f"case_policy must be one of {CASE_POLICIES}, got {case_policy!r}")
    if case_policy != "ignore" and case_id is None:
        raise ValueError(f"case_policy={case_policy!r} needs the case_id of the volume")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    for name, value in (("batch_size", batch_size), ("encoder_batch", encoder_batch)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1 (or None for automatic), got {value!r}")
    if isinstance(extent_stop, bool) or not isinstance(extent_stop, (int, np.integer)) or extent_stop < 0:
        raise ValueError(f"extent_stop must be an integer >= 0 (0 = every slice), got {extent_stop!r}")
    presence_threshold = check_presence_threshold(presence_threshold)
    prec = resolve_precision(precision, engine.sam.device)
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
    if extent_stop and start_slice is not None:
        _start_slices(start_slice, bank, None, ax, start, stop, True, [])  # checks it before any work
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
    if batch_size is None:
        batch_size = auto_batch_size(engine.sam.device, engine.sam.image_size, k, len(chosen))
    batch_size = int(batch_size)
    encoder_batch = int(encoder_batch) if encoder_batch is not None else max(batch_size, 4)
    result = VolumeSegmentation(
        labelmap=volume.with_array(out),
        labels=[bank_labels[v] for v in chosen],
        axis=ax,
        precision=prec,
        batch_size=batch_size,
        confidence=np.full(n, np.nan, dtype=np.float32),
        presence_threshold=presence_threshold,
        window=bounds,
        annotated_slices=annotated_slices(bank, case_id, ax),
    )
    if keep_label_masks:
        result.label_masks = np.zeros((len(chosen),) + volume.array.shape, dtype=bool)
    indices = list(range(start, stop))
    total = len(indices)
    if progress is not None:
        progress(0, total)

    # Retrieval for all slices at once (DINOv2 is cheap next to SAM 2).
    images = slices_to_uint8(volume, ax, indices, bounds, engine.sam.device)
    if cancel is not None and cancel():
        result.cancelled = True
        return result
    emb = engine.embedder.embed(images)
    revision = getattr(bank, "revision", None)  # read before the search: what the sidecar records
    result.bank_revision = None if revision is None else int(revision)
    hits = bank.search(emb, k, case_id=case_id, case_policy=case_policy)
    # Memories computed under bf16 autocast differ from float32 ones: they get their own cache.
    cache = engine.memory_cache(bank) if prec == "fp32" else engine.memory_cache(bank, precision=prec)
    entries = {e.id: e for e in bank.entries(include_retired=True)}
    label_lut = np.array(chosen, dtype=dtype)
    ctx = autocast(prec, engine.sam.device)

    def memory(entry_id: str):
        e = entries[entry_id]
        key = memory_key(e)  # the same key `rseg bank cache --warm` fills

        def compute(eid: str = entry_id):
            data = bank.load_entry(eid)
            with ctx:
                return engine.sam.encode_support(data.image, data.masks, list(bank_labels))

        return cache.get_or_compute(key, compute)

    done = 0

    def record(j: int, res: QueryResult) -> None:
        nonlocal done
        present = label_presence(res.object_score, presence_threshold)
        # An absent label's mask is empty on this slice: its logits are set to SAM 2's own
        # "no object" value, as the decoder does itself where the score is <= 0.
        logits = res.logits if all(present) else np.where(
            np.asarray(present)[:, None, None], res.logits, np.float32(NO_OBJ_SCORE))
        slice_view(out, ax, indices[j])[...] = fuse_labels(logits, label_lut)
        if result.label_masks is not None:
            for li in range(len(chosen)):
                slice_view(result.label_masks[li], ax, indices[j])[...] = logits[li] > 0
        conf = slice_confidence(res, presence_threshold)
        result.confidence[indices[j]] = conf
        result.slices[indices[j]] = SliceResult(
            indices[j],
            list(hits[j]),
            {lab: float(v) for lab, v in zip(chosen, res.iou)},
            {lab: float(v) for lab, v in zip(chosen, res.object_score)},
            conf,
            {lab: bool(p) for lab, p in zip(chosen, present)},
        )
        done += 1
        if progress is not None:
            progress(done, total)

    # Support memories of this volume, restricted to the chosen labels and on the device: each
    # distinct support moves there once per volume, not once per slice.
    on_device: dict = {}

    def device_memory(entry_id: str):
        mem = on_device.get(entry_id)
        if mem is None:
            mem = on_device[entry_id] = memory(entry_id).select(chosen).to(engine.sam.device)
        return mem

    def cancelled() -> bool:
        if cancel is not None and cancel():
            result.cancelled = True
        return result.cancelled

    def compute(batch_idx: list[int]):
        """(position, QueryResult) of each position in turn; stops early once cancelled."""
        if batch_size == 1:  # the per-slice reference path
            with ctx:
                feats = engine.sam.encode_images([images[j] for j in batch_idx])
            for j, f in zip(batch_idx, feats):
                if cancelled():
                    return
                mems = [memory(entry_id) for entry_id, _ in hits[j]]
                with ctx:
                    res = engine.sam.query(images[j], mems, chosen, features=f)
                yield j, res
        else:
            with ctx:
                feats = engine.sam.encode_batch([images[j] for j in batch_idx])
            for q0 in range(0, len(batch_idx), batch_size):
                if cancelled():
                    return
                sub = batch_idx[q0 : q0 + batch_size]
                ids: dict[str, int] = {}  # distinct supports of this batch -> position
                index = [[ids.setdefault(eid, len(ids)) for eid, _ in hits[j]] for j in sub]
                mems = [device_memory(eid) for eid in ids]
                with ctx:
                    batch = engine.sam.query_batch(feats, mems, index, chosen, items=list(range(q0, q0 + len(sub))))
                for j, res in zip(sub, batch.to_numpy()):
                    if cancelled():  # computed but cancelled: discarded
                        return
                    yield j, res

    def report_estimate(n_computed: int, seconds: float, left: int) -> None:
        result.estimate = TimeEstimate(
            n_computed, seconds, done, left, bool(extent_stop), str(engine.sam.device),
            int(engine.sam.image_size), prec, batch_size,
        )
        if estimate is not None:
            estimate(result.estimate)

    if not extent_stop:
        for b0 in range(0, total, encoder_batch):
            if cancelled():
                break
            batch_idx = list(range(b0, min(total, b0 + encoder_batch)))
            tb = time.perf_counter()
            for j, res in compute(batch_idx):
                record(j, res)
            if result.cancelled:
                break
            if b0 == 0:
                report_estimate(len(batch_idx), time.perf_counter() - tb, total - done)
    else:
        starts, result.start_reason = _start_slices(start_slice, bank, case_id, ax, start, stop, slice_range is not None, hits)
        result.start_slices = list(starts)
        result.extent_stop = int(extent_stop)
        walker = ExtentWalker(starts, int(extent_stop), (start, stop))
        first = True
        while not walker.finished and not cancelled():
            batch_slices = walker.next_slices(encoder_batch)
            tb = time.perf_counter()
            computed = {indices[j]: res for j, res in compute([i - start for i in batch_slices])}
            if result.cancelled:
                break  # what this batch computed is discarded, as on the full path
            for i in batch_slices:
                walker.record(i, any(label_presence(computed[i].object_score, presence_threshold)))
            # Slices computed past a walk's stop are never accepted: discarded, so the slices
            # segmented do not depend on the batch size.
            accepted = walker.take_accepted()
            total = done + len(accepted) + len(walker.reachable())
            for i in accepted:
                record(i - start, computed[i])
            if first:
                first = False
                report_estimate(len(batch_slices), time.perf_counter() - tb, len(walker.reachable()))
        result.beyond_extent = walker.beyond()
        if not result.cancelled and progress is not None:
            progress(done, done)  # the stop ended the run: the bar is complete
    result.seconds = time.perf_counter() - t0
    return result


def _start_slices(start_slice, bank, case_id, axis: int, start: int, stop: int, user_range: bool,
                  hits: list) -> tuple[list[int], str]:
    """Where the extent walks begin, and why (see `segment_volume`)."""
    if start_slice is not None:
        given = [int(start_slice)] if isinstance(start_slice, (int, np.integer)) else [int(s) for s in start_slice]
        bad = [s for s in given if not start <= s < stop]
        if not given or bad:
            raise ValueError(f"start slice(s) {bad or given} must lie in the slice range {start}..{stop - 1}")
        return sorted(set(given)), "given"
    if case_id is not None:
        own = [i for i in annotated_slices(bank, case_id, axis) if start <= i < stop]
        if own:
            return own, "annotated"
    if user_range:
        return [(start + stop - 1) // 2], "middle of the slice range"
    top1 = [h[0][1] if h else -math.inf for h in hits]  # hits[j]: slice start + j
    return [start + int(np.argmax(top1))], "most similar to the bank"  # first of equals


def annotated_slices(bank, case_id: str | None, axis: int) -> list[int]:
    """Slices along `axis` of the volume `case_id` that the bank holds as annotated (its active entries)."""
    if case_id is None:
        return []
    return sorted({
        int(e.index) for e in bank.entries()
        if getattr(e, "case_id", None) == case_id and getattr(e, "axis", None) == axis
        and getattr(e, "index", None) is not None
    })
