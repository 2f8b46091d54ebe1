"""Whole-volume segmentation: retrieve supports per slice, segment each slice with SAM 2 memories.

Slices run along one IJK axis (default: the through-plane axis, largest spacing). Every slice
gets its own k supports from the bank (DINOv2 top-k); support memories come from the per-bank
cache, so a support is encoded once however many slices retrieve it. The image encoder runs on
batches of query slices. Overlapping labels are resolved by the highest probability; no other
post-processing is applied.

The steps, each its own function or class (each tested alone):

1. plan the slices: axis, slice range, labels, intensity window (`slices.plan_slices`), the slices
   as uint8 images (`slices.slices_to_uint8`);
2. embed and retrieve: DINOv2 on every slice, the bank's top-k per slice (`queries.retrieve`);
3. load memories: each retrieved entry's SAM 2 memory from the memory cache, on the device once
   per volume (`queries.SupportMemories`);
4. encode and query: the image encoder on a batch of slices, then memory attention + mask
   decoder on `batch_size` slices x L labels per call (`queries.query_slices`, one query path:
   `Sam2MemoryEngine.query_batch`; a batch of one is the per-slice case the fidelity tests
   compare with the official predictor);
5. assemble the label map: presence, label fusion, confidence, diagnostics per slice
   (`labelmap.LabelMapAssembler`);

walking either every slice of the range in order or, with the extent stop, outwards from start
slices (`extent.ExtentWalker`). precision 'bf16' runs SAM 2 under bfloat16 autocast (DINOv2
retrieval always runs in float32, so the supports retrieved do not depend on the precision).

Presence: a label is *present* on a slice when SAM 2's object score for it is > `presence_threshold`
(default 0: SAM 2's own rule, under which the decoder already blanks the mask of an absent
object); an *absent* label gets an empty mask on that slice, whatever its logits. The one rule
(`label_presence`) decides the label map, the per-label masks, the confidence and the extent stop,
whatever the batch size, and `SliceResult.present` records it (the sidecar's
`present`). A threshold below 0 is refused: SAM 2 has already emptied those masks.

extent_stop N > 0 segments outwards from start slices and stops each direction after N
consecutive slices with every label absent (`extent.py`); the slices it leaves out are in
`VolumeSegmentation.beyond_extent`. The default 0 segments every slice (evaluation keeps that);
`rseg segment` and the Slicer panel turn the stop on (`extent.DEFAULT_EXTENT_STOP`).
`estimate` is called once, after the first batch, with the time the rest should take
(`TimeEstimate`, measured on this run only).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from ..data.volume import Volume
from ..engine.device import reset_peak
from ..engine.sam2_memory import check_support_order, resolve_precision
from .extent import ExtentWalker
from .labelmap import LabelMapAssembler, check_presence_threshold, label_presence
from .propagation import check_propagate, propagate as propagate_walks
from .queries import (BatchSizer, Retrieval, SupportMemories, auto_batch_size, check_support_filter, query_slices,
                      retrieve)
from .results import TimeEstimate, VolumeSegmentation
from .slices import SlicePlan, annotated_slices, annotation_entries, plan_slices, slices_to_uint8, start_slices

CASE_POLICIES = ("ignore", "exclude", "prefer")


def _check_options(k, batch_size, encoder_batch, extent_stop, case_id, case_policy) -> None:
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
    keep_probabilities: bool = False,
    extent_stop: int = 0,
    presence_threshold: float = 0.0,
    start_slice: int | Sequence[int] | None = None,
    estimate: Callable[[TimeEstimate], None] | None = None,
    support_order: str = "nearest",
    propagate: int = 0,
    support_filter: str = "all",
    log: Callable[[str], None] | None = None,
    phase: Callable[[str, int, int], None] | None = None,
) -> VolumeSegmentation:
    """Segment `volume` slice by slice from the support `bank`; partial result if cancelled.

    slice_range is (start, stop) with stop exclusive; slices outside it stay background.
    precision: 'auto' (bf16 autocast on CUDA with bf16 support, else fp32), 'fp32' or 'bf16'.
    batch_size: slices per memory-attention + decoder call; None picks it for the device
    (`auto_batch_size`; on CUDA re-sized from the footprint the first batch measures and the free
    memory, `queries.BatchSizer`), 1 is the per-slice reference path. An out-of-memory error halves
    the batch and retries it (same output); one slice that does not fit raises
    `queries.OutOfDeviceMemory` with what to try. `result.batch_size` is the size at the end,
    `result.batch_sizing` how it came about; `log` receives those decisions as lines. encoder_batch: slices per image
    encoder call (None: batch_size, at least 4). keep_label_masks: also return each label's own
    foreground mask (logit > 0, overlaps kept) as `label_masks`. keep_probabilities: also return each
    label's probability sigmoid(logit) as `probabilities` (float32; 0 where the label is absent and on
    slices not segmented): the label map is their argmax where the largest is > 0.5.
    presence_threshold (>= 0; default 0, SAM 2's own rule): a label whose object score on a slice is
    <= it is absent there: its mask on that slice is empty (both paths; recorded per slice and
    label in `SliceResult.present`). extent_stop: 0 (default) segments every slice of the range;
    N > 0 walks out from the start slices and stops a direction after N consecutive slices where
    every label is absent (see `extent.py`). start_slice: the slice(s) to start from; None picks,
    in this order, the annotated slices of this volume in the bank (entries of `case_id` along
    this axis), the middle of `slice_range` if given, else the slice most similar to the bank
    (highest DINOv2 top-1 score). estimate: called once, after the first batch, with a
    `TimeEstimate` of the rest (before the second batch starts).
    support_order: where the most similar support sits in each slice's pseudo-video: 'nearest'
    (default; frame k-1, object-pointer distance 1) or 'farthest' (frame 0, distance k; the order
    before this option existed). See `engine.sam2_memory.SUPPORT_ORDERS`.
    propagate: N in 0..6 (default 0, off): walk out from the start slices (chosen as for the
    extent stop, which applies if extent_stop > 0) and give each slice the memories of the slices
    segmented before it in its walk, as SAM 2 tracks a video (`propagation.py`); each slice's
    `SliceResult.neighbours` lists them. A start slice this volume has an annotation of (a bank
    entry of `case_id` along the axis) keeps it as its result (`SliceResult.source` "annotation")
    and is a conditioning frame of every slice of its walks (`SliceResult.annotated_slice`), as
    add_new_mask on that frame of a SAM 2 video; not with case_policy 'exclude', under which this
    volume's entries are never used (it is still a start slice, predicted as any other).
    support_filter: 'all' (default) conditions every label on the slice's top k; 'foreground'
    conditions each label on the top k retrieved slices that contain it (searching deeper than k),
    falling back to the top k for a label with fewer such slices in the bank (recorded per slice:
    `SliceResult.filter_fallback`).
    phase: called as phase(name, done, total) for the steps before the slices' own progress:
    "embedding" (DINOv2 on every slice: 0 of n, then n of n) and "support memories" (each SAM 2
    support memory computed, of those the retrieved entries lack in the cache: an upper bound with
    the extent stop; a last call with done == total ends it). Memories are still computed when
    first needed, in the same order as without `phase`.
    """
    t0 = time.perf_counter()
    _check_options(k, batch_size, encoder_batch, extent_stop, case_id, case_policy)
    check_support_filter(support_filter)
    presence_threshold = check_presence_threshold(presence_threshold)
    check_support_order(support_order)
    propagate = check_propagate(propagate)
    prec = resolve_precision(precision, engine.sam.device)
    bank.check_models(engine.embedder.identity)
    plan = plan_slices(volume, bank, labels=labels, axis=axis, slice_range=slice_range, window=window)
    if (extent_stop or propagate) and start_slice is not None:
        start_slices(start_slice, bank, None, plan.axis, plan.start, plan.stop, True, [])  # checked before any work
    auto = batch_size is None
    if auto:
        batch_size = auto_batch_size(engine.sam.device, engine.sam.image_size, k, len(plan.labels))
    batch_size = int(batch_size)
    sizer = BatchSizer(batch_size, engine.sam.device, auto=auto, log=log)
    reset_peak(engine.sam.device)  # CUDA: the peak the time estimate reports is this run's
    if log is not None and auto and sizer.device.type == "cuda":
        log(f"batch size {batch_size}: estimated for the free memory of {sizer.device} (re-sized after the first batch)")
    encoder_batch = int(encoder_batch) if encoder_batch is not None else max(batch_size, 4)
    bank_labels = {lab.value: lab for lab in bank.labels}
    result = VolumeSegmentation(
        labelmap=volume.with_array(np.zeros(volume.array.shape, dtype=plan.label_lut.dtype)),
        labels=[bank_labels[v] for v in plan.labels],
        axis=plan.axis,
        precision=prec,
        batch_size=batch_size,
        confidence=np.full(plan.n_slices, np.nan, dtype=np.float32),
        presence_threshold=presence_threshold,
        window=plan.bounds,
        annotated_slices=annotated_slices(bank, case_id, plan.axis),
        support_order=support_order,
        propagate=propagate,
        support_filter=support_filter,
    )
    if keep_label_masks:
        result.label_masks = np.zeros((len(plan.labels),) + volume.array.shape, dtype=bool)
    if keep_probabilities:
        result.probabilities = np.zeros((len(plan.labels),) + volume.array.shape, dtype=np.float32)
    total = plan.stop - plan.start
    if progress is not None:
        progress(0, total)

    images = slices_to_uint8(volume, plan.axis, plan.indices, plan.bounds, engine.sam.device)
    if cancel is not None and cancel():
        result.cancelled = True
        return result
    if phase is not None:
        phase("embedding", 0, len(images))
    found = retrieve(engine.embedder, bank, images, k, case_id, case_policy, support_filter, plan.labels)
    supports = found.supports()
    if phase is not None:
        phase("embedding", len(images), len(images))
    result.bank_revision = found.bank_revision
    memories = SupportMemories(engine, bank, plan.labels, prec)
    n_memories = memories.to_compute(found.hits) if phase is not None else 0
    if n_memories:
        memories.on_computed = lambda done: phase("support memories", done, max(done, n_memories))
        phase("support memories", 0, n_memories)
    out = LabelMapAssembler(result, plan.label_lut, presence_threshold, progress, total)

    def cancelled() -> bool:
        if cancel is not None and cancel():
            result.cancelled = True
        return result.cancelled

    def compute(positions: list[int]):
        return query_slices(engine.sam, images, positions, supports, memories, sizer, prec, cancelled,
                            support_order)

    def report_estimate(n_computed: int, seconds: float, left: int) -> None:
        result.estimate = TimeEstimate(
            n_computed, seconds, out.done, left, bool(extent_stop), str(engine.sam.device),
            int(engine.sam.image_size), prec, sizer.size, sizer.peak_bytes,
        )
        if estimate is not None:
            estimate(result.estimate)

    if propagate:
        result.start_slices, result.start_reason = start_slices(
            start_slice, bank, case_id, plan.axis, plan.start, plan.stop, slice_range is not None, found.hits)
        result.extent_stop = int(extent_stop)
        # the volume's own annotations, unless its entries are excluded (`rseg evaluate`: a case's
        # own slices must never help segment it)
        annotated = annotation_entries(bank, case_id, plan.axis) if case_policy != "exclude" else {}
        _walk_propagating(plan, found, out, memories, engine.sam, images, k, sizer, prec, support_order,
                          propagate, int(extent_stop), presence_threshold, cancelled, report_estimate,
                          bank, annotated, log)
    elif not extent_stop:
        _walk_every_slice(plan, found, out, compute, cancelled, encoder_batch, report_estimate)
    else:
        result.start_slices, result.start_reason = start_slices(
            start_slice, bank, case_id, plan.axis, plan.start, plan.stop, slice_range is not None, found.hits)
        result.extent_stop = int(extent_stop)
        _walk_out_to_the_extent(plan, found, out, compute, cancelled, encoder_batch, report_estimate,
                                int(extent_stop), presence_threshold)
    _record_label_supports(result, found, plan.start)
    result.batch_size = sizer.size
    result.batch_sizing = sizer.to_json()
    if n_memories and memories.computed < n_memories:  # the extent stop needed fewer: the phase ends
        phase("support memories", memories.computed, memories.computed)
    result.seconds = time.perf_counter() - t0
    return result


def _record_label_supports(result: VolumeSegmentation, found: Retrieval, start: int) -> None:
    """With the `foreground` filter: each segmented slice's supports per label and its fallbacks."""
    if found.per_label is None or found.fallback is None:
        return
    for i, r in result.slices.items():
        r.supports_per_label = {lab: list(h) for lab, h in found.per_label[i - start].items()}
        r.filter_fallback = list(found.fallback[i - start])


def _walk_every_slice(plan: SlicePlan, found: Retrieval, out: LabelMapAssembler, compute, cancelled,
                      encoder_batch: int, report_estimate) -> None:
    """Every slice of the range, in order, `encoder_batch` slices per image-encoder call."""
    total = plan.stop - plan.start
    for b0 in range(0, total, encoder_batch):
        if cancelled():
            break
        batch_idx = list(range(b0, min(total, b0 + encoder_batch)))
        tb = time.perf_counter()
        for j, res in compute(batch_idx):
            out.record(plan.start + j, found.hits[j], res)
        if out.result.cancelled:
            break
        if b0 == 0:
            report_estimate(len(batch_idx), time.perf_counter() - tb, total - out.done)


def _walk_propagating(plan: SlicePlan, found: Retrieval, out: LabelMapAssembler, memories, sam, images, k: int,
                      batch_size: int | BatchSizer, prec: str, support_order: str, n: int, extent_stop: int,
                      presence_threshold: float, cancelled, report_estimate, bank=None,
                      annotated: dict[int, str] | None = None, log=None) -> None:
    """Outwards from the start slices, each slice with its walk's previous slices as memory; a start
    slice this volume has an annotation of (`annotated`: slice -> bank entry) keeps it as its
    result and is a conditioning frame of its walks (`propagation.py`)."""
    result, start = out.result, plan.start
    conditioning, masks = {}, {}
    for s in result.start_slices:
        eid = (annotated or {}).get(s)
        if eid is None:
            continue
        shape = tuple(images[s - start].shape[:2])
        data = bank.load_entry(eid)
        if tuple(data.image.shape[:2]) != shape:  # not this volume's slice after all: predicted instead
            if log is not None:
                log(f"bank entry {eid} of slice {s} is {data.image.shape[:2]}, the slice is {shape}: "
                    "predicted, not taken as the annotation")
            continue
        conditioning[s] = memories.on_device(eid)
        masks[s] = (eid, np.stack([np.asarray(data.masks.get(lab, np.zeros(shape, bool)), dtype=bool)
                                   for lab in plan.labels]))

    def record(i: int, res, neighbours: list[int], annotation: int | None = None) -> None:
        if res is None:  # an annotated start slice: its annotation, not a prediction
            out.record_annotation(i, masks[i][1], masks[i][0])
            return
        out.record(i, found.hits[i - start], res)
        result.slices[i].neighbours = [int(x) for x in neighbours]
        result.slices[i].annotated_slice = annotation

    def first_step(n_slices: int, seconds: float) -> None:
        report_estimate(n_slices, seconds, plan.stop - plan.start - out.done)

    done = propagate_walks(
        sam, images, start, found.supports(), memories, result.start_slices, (plan.start, plan.stop), n, k,
        batch_size, prec, support_order, extent_stop,
        lambda res: any(label_presence(res.object_score, presence_threshold)), record, cancelled, first_step,
        annotated=conditioning)
    if not result.cancelled:
        result.beyond_extent = set(range(plan.start, plan.stop)) - done
        if out.progress is not None:
            out.progress(out.done, out.done)


def _walk_out_to_the_extent(plan: SlicePlan, found: Retrieval, out: LabelMapAssembler, compute, cancelled,
                            encoder_batch: int, report_estimate, extent_stop: int,
                            presence_threshold: float) -> None:
    """Outwards from the start slices; a direction stops after `extent_stop` slices with every label absent."""
    result, start = out.result, plan.start
    walker = ExtentWalker(result.start_slices, extent_stop, (plan.start, plan.stop))
    first = True
    while not walker.finished and not cancelled():
        batch_slices = walker.next_slices(encoder_batch)
        tb = time.perf_counter()
        computed = {start + j: res for j, res in compute([i - start for i in batch_slices])}
        if result.cancelled:
            break  # what this batch computed is discarded, as on the full walk
        for i in batch_slices:
            walker.record(i, any(label_presence(computed[i].object_score, presence_threshold)))
        # Slices computed past a walk's stop are never accepted: discarded, so the slices
        # segmented do not depend on the batch size.
        accepted = walker.take_accepted()
        out.total = out.done + len(accepted) + len(walker.reachable())
        for i in accepted:
            out.record(i, found.hits[i - start], computed[i])
        if first:
            first = False
            report_estimate(len(batch_slices), time.perf_counter() - tb, len(walker.reachable()))
    result.beyond_extent = walker.beyond()
    if not result.cancelled and out.progress is not None:
        out.progress(out.done, out.done)  # the stop ended the run: the bar is complete
