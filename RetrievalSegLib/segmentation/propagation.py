"""Retrieval plus propagation (`propagate` N > 0): neighbour slices as SAM 2 memory (issue 27).

Without propagation every slice is its own pseudo-video [k supports, slice]. With N > 0 the slices
are walked outwards from start slices (the extent stop's start slices: an annotated slice of this
volume, else the slice most similar to the bank, or the ones given) and a slice segmented earlier in
its walk becomes a non-conditioning memory of the next ones, as a tracked frame of a SAM 2 video:

* Each start slice has two walks, up (s, s+1, ...) and down (s, s-1, ...); the start slice is
  segmented once and is frame k of both. Walk position j (the start is j = 0) is frame k + j of a
  pseudo-video [k supports (frames 0..k-1), the walk's slices s_0 .. s_j]. The k supports are the
  slice's own retrieved ones (conditioning frames, temporal code 0, placed by `support_order`).
* The walk's previous slices enter that pseudo-video as SAM 2 tracked frames: their predicted
  masks went through the memory encoder (`Sam2MemoryEngine.query_batch(encode_memory=True)`,
  SAM 2's track_step rule), and `_prepare_memory_conditioned_features` gives them their temporal
  codes and object-pointer distances from their frame positions. Which previous slices are in it
  (`memory_window`): the last N for N < 6; for N = 6 (SAM 2's num_maskmem - 1) the last 15, so
  that SAM 2's own rule applies unchanged (spatial memories of the last 6, object pointers of the
  last 15 = max_obj_ptrs_in_encoder - 1).
* num_frames of both walks of a start slice is k + the longer walk's length to the range edge
  (SAM 2 normalises pointer distances by min(num_frames, 16) - 1; the shorter walk is read as part
  of a video as long as the longer one, which changes nothing once k + length >= 16).
* A walk ends at the range edge, at a slice another walk has segmented, or by the extent stop
  (after `extent_stop` consecutive slices with every label absent; 0 = never).
* A start slice the user annotated in this volume (`annotated`: its bank entry's support memory,
  which is what `add_new_mask` on that frame gives) is not queried: its annotation is its result,
  and it is a *conditioning* frame (frame k, temporal code 0, after the k supports) of every slice
  of its two walks, as in the video [supports, annotated slice, walk...] with add_new_mask on
  frames 0..k. It is not one of the walk's non-conditioning memories, so the walk's slices at
  frames k+1 .. have the last min(j - 1, window) of them (SAM 2 finds frame k among the
  conditioning frames; its pointer distance is frame_idx - k).

Walks advance in lock step: step j segments the next slice of every active walk, batched across
walks and labels (the image encoder on the step's slices in one call, memory attention + decoder on
`batch_size` slices per call). Each slice records the neighbour slices in its pseudo-video.

With the same k supports for every slice (`FixedSupports`, the test hook) one walk equals the
official `SAM2VideoPredictor` on the video [supports with add_new_mask, then the walk's slices]
propagated from frame k, and one walk from an annotated start equals it on [supports, annotated
slice, walk...] with add_new_mask on frames 0..k (Testing/segmentation/test_propagation.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ..engine.sam2_memory import QueryResult, SliceMemory, SupportMemory, autocast
from .queries import BatchSizer, _out_of_memory

#: The largest N: SAM 2's num_maskmem - 1 (the non-conditioning memories it attends to).
MAX_PROPAGATE = 6
#: SAM 2.1's max_obj_ptrs_in_encoder - 1: object pointers of this many previous frames.
POINTER_WINDOW = 15


def widened_runs(runs: Sequence[tuple[int, int]], bank, case_id: str | None, case_policy: str, axis: int | None,
                 array: np.ndarray, propagate: int) -> list[tuple[int, int]]:
    """Runs of slices to re-segment with propagation, each widened by the slice just before and
    the slice just after it where this volume annotated that slice (its usable bank entries of
    `case_id` along `axis`), so that the run's walks start from the user's correction, kept as
    their conditioning frame. Slicer's *Re-segment remaining slices* sends the slices the user has
    not edited as runs: the corrected slices lie just outside them. Unchanged without propagation,
    an axis or a case, and under case_policy 'exclude' (no annotation is used then). The caller
    keeps only each run's own slices of the result (`keep_run`)."""
    from ..data.volume import num_slices
    from .slices import annotation_entries

    runs = [(int(a), int(b)) for a, b in runs]
    if not propagate or axis is None or case_id is None or case_policy == "exclude":
        return runs
    annotated, n = annotation_entries(bank, case_id, int(axis)), num_slices(array, int(axis))
    return [(a - 1 if a > 0 and a - 1 in annotated else a, b + 1 if b < n and b in annotated else b)
            for a, b in runs]


def keep_run(result, run: tuple[int, int]) -> None:
    """Drop from a segmentation of a widened run (`widened_runs`) the slices outside `run`: the
    annotated slices its walks started from stay as the user left them (background here, as every
    slice outside a slice range)."""
    from ..data.volume import slice_view

    for i in [i for i in result.slices if not run[0] <= i < run[1]]:
        del result.slices[i]
        slice_view(result.labelmap.array, result.axis, i)[...] = 0
        result.confidence[i] = np.nan


def check_propagate(n) -> int:
    """`n` as an int if it is an integer in 0..MAX_PROPAGATE, else ValueError."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= MAX_PROPAGATE:
        raise ValueError(f"propagate must be an integer in 0..{MAX_PROPAGATE} (0 = off), got {n!r}")
    return int(n)


def memory_window(n: int) -> int:
    """How many previous slices of a walk are in a slice's pseudo-video (see the module docstring)."""
    n = check_propagate(n)
    return POINTER_WINDOW if n == MAX_PROPAGATE else n


class FixedSupports:
    """The same k support memories for every slice (retrieval off): the fidelity test's hook, with
    the interface of `queries.SupportMemories` that the walk uses."""

    def __init__(self, memories: Sequence[SupportMemory], labels: Sequence[int]) -> None:
        self.labels = list(labels)
        self.memories = [m.select(self.labels) for m in memories]

    def for_slices(self, hits) -> tuple[list[SupportMemory], list[list[int]]]:
        return self.memories, [list(range(len(self.memories))) for _ in hits]


@dataclass
class Walk:
    """One direction from a start slice: the slices segmented so far (walk order) and their memories."""

    start: int
    step: int  # +1 up, -1 down
    num_frames: int
    slices: list[int] = field(default_factory=list)
    memories: list[SliceMemory] = field(default_factory=list)
    streak: int = 0  # consecutive slices with every label absent
    active: bool = True
    annotation: SupportMemory | None = None  # the start slice's annotation: conditioning frame k


@dataclass
class Step:
    """A slice to segment at walk position j of `walks` (several walks share a start slice)."""

    slice: int
    j: int
    walks: list[Walk]
    neighbours: list[int]  # slices whose memories are in its pseudo-video, oldest first

    @property
    def annotation(self) -> int | None:
        """The annotated start slice whose annotation is a conditioning frame of this slice (the
        slice itself at j = 0: it is not queried), else None."""
        return self.walks[0].start if self.walks[0].annotation is not None else None


def plan_walks(starts: Sequence[int], slice_range: tuple[int, int], k: int) -> list[Walk]:
    lo, hi = slice_range
    walks = []
    for s in sorted(set(int(x) for x in starts)):
        longest = max(hi - s, s - lo + 1)  # slices from s to the range edge, s included
        walks += [Walk(s, +1, k + longest), Walk(s, -1, k + longest)]
    return walks


def next_steps(walks: list[Walk], j: int, slice_range: tuple[int, int], done: set[int], window: int) -> list[Step]:
    """The slices of walk position j (j = 0: the start slices, each once for its two walks)."""
    lo, hi = slice_range
    steps: dict[int, Step] = {}
    for w in walks:
        if not w.active:
            continue
        i = w.start + w.step * j
        if not lo <= i < hi or (i in done and j > 0):
            w.active = False  # the range edge, or another walk got there first
            continue
        if j == 0:
            steps.setdefault(i, Step(i, 0, [], []))
            steps[i].walks.append(w)
            continue
        if i in steps:  # two walks meet on a slice at the same step: the first one takes it
            w.active = False
            continue
        # an annotated start is a conditioning frame, not one of the walk's tracked slices
        n = min(j - (w.annotation is not None), window)
        steps[i] = Step(i, j, [w], w.slices[len(w.slices) - n:] if n else [])
    return [steps[i] for i in sorted(steps)]


def propagate(sam, images: Sequence[np.ndarray], first: int, hits, memories, starts: Sequence[int],
              slice_range: tuple[int, int], n: int, k: int, batch_size: int | BatchSizer, precision: str,
              support_order: str, extent_stop: int, present: Callable[[QueryResult], bool],
              record: Callable[[int, QueryResult, list[int]], None], cancelled: Callable[[], bool],
              after_first_step: Callable[[int, float], None] | None = None,
              annotated: Mapping[int, SupportMemory] | None = None) -> set[int]:
    """Walk and segment (see the module docstring); returns the slices segmented.

    `images[i - first]` and `hits[i - first]` are slice i's uint8 image and retrieved supports;
    `record(i, result, neighbour slices)` is called once per segmented slice in walk order.
    `annotated[s]`: the annotation memory (restricted to `memories.labels`, on the device) of a
    start slice s the user annotated; record then gets `annotation=s` for every slice of its walks,
    and `record(s, None, [], annotation=s)` for s itself (not queried: the annotation is its result).
    `batch_size`: slices per memory-attention call, a number or the run's `queries.BatchSizer`; an
    out-of-memory error halves it (or the image encoder's group) and retries, as `query_slices` does.
    """
    import time

    sizer = batch_size if isinstance(batch_size, BatchSizer) else BatchSizer(int(batch_size), sam.device)
    window = memory_window(n)
    walks = plan_walks(starts, slice_range, k)
    for w in walks:
        w.annotation = (annotated or {}).get(w.start)
    done: set[int] = set()
    ctx = autocast(precision, sam.device)
    j = 0
    timed = False  # after_first_step called (an annotated start slice alone takes no time)
    while any(w.active for w in walks) and not cancelled():
        tb = time.perf_counter()
        steps = next_steps(walks, j, slice_range, done, window)
        if not steps:
            break
        # an annotated start slice is not queried (its annotation is its result)
        queried = [b for b, s in enumerate(steps) if not (s.j == 0 and s.annotation is not None)]
        results = _query_step(sam, images, first, hits, memories, steps, queried, k, j, sizer, ctx, support_order,
                              cancelled)
        if results is None:
            return done
        if cancelled():
            return done
        for b, s in enumerate(steps):
            if b not in results:  # the annotated start slice: a conditioning frame, not a memory
                record(s.slice, None, [], annotation=s.slice)
                done.add(s.slice)
                found = any(s.walks[0].annotation.present)
                mem = None
            else:
                res, mem = results[b]
                if s.annotation is None:
                    record(s.slice, res, s.neighbours)
                else:
                    record(s.slice, res, s.neighbours, annotation=s.annotation)
                done.add(s.slice)
                found = present(res)
            for w in s.walks:
                w.slices.append(s.slice)
                if mem is not None:
                    w.memories.append(mem)
                    del w.memories[:-window]  # keep only what later slices can use
                w.streak = 0 if found else w.streak + 1
                if extent_stop and w.streak >= extent_stop:
                    w.active = False
        if not timed and queried and after_first_step is not None:  # the first step that ran SAM 2
            after_first_step(len(queried), time.perf_counter() - tb)
            timed = True
        j += 1
    return done


def _query_step(sam, images, first: int, hits, memories, steps: list[Step], queried: list[int], k: int, j: int,
                sizer: BatchSizer, ctx, support_order: str,
                cancelled: Callable[[], bool]) -> dict[int, tuple[QueryResult, SliceMemory]] | None:
    """SAM 2 on the queried slices of walk step j (`steps[b]` for b in `queried`): {b: (result, its
    memory)}, or None once cancelled. The image encoder on all of them at once (or in groups of
    `sizer.encoder_size`), memory attention + decoder on `sizer.size` rows per call; an
    out-of-memory error frees what it can, halves that size and retries the same slices (the same
    output); one slice that does not fit raises `queries.OutOfDeviceMemory`."""
    from ..engine.device import is_out_of_memory, release_memory

    n_labels = len(memories.labels)
    results: dict[int, tuple[QueryResult, SliceMemory]] = {}
    todo = list(queried)
    while todo:
        chunk = todo[: sizer.encoder_size or len(todo)]
        feats = None  # the previous group's features are freed before this group is encoded
        try:
            with ctx:
                feats = sam.encode_batch([images[steps[b].slice - first] for b in chunk])
        except Exception as e:  # noqa: BLE001 - only out of memory is retried; anything else goes on
            if not is_out_of_memory(e):
                raise
            feats = None
        if feats is None:
            release_memory(sam.device)
            if len(chunk) == 1:
                raise _out_of_memory(sam, "image encoder", k, n_labels) from None
            sizer.halve("image encoder", len(chunk))
            continue
        feat_row = {b: r for r, b in enumerate(chunk)}
        # one pseudo-video layout per call: frame k + j, the walk's num_frames, with or without an
        # annotated slice at frame k
        groups: dict[tuple[int, bool], list[int]] = {}
        for b in chunk:
            s = steps[b]
            groups.setdefault((s.walks[0].num_frames, s.annotation is not None), []).append(b)
        for (num_frames, with_annotation), rows in groups.items():
            r0 = 0
            while r0 < len(rows):
                if cancelled():
                    return None
                sub = rows[r0:r0 + sizer.size]
                mems, index = memories.for_slices([hits[steps[b].slice - first] for b in sub])
                neighbours = None
                nb = len(steps[sub[0]].neighbours)  # the same for every row of a group
                if nb:
                    neighbours = [steps[b].walks[0].memories[len(steps[b].walks[0].memories) - nb:] for b in sub]
                annotations = [steps[b].walks[0].annotation for b in sub] if with_annotation else None
                try:
                    with ctx:
                        out = sizer.measure(len(sub), lambda: sam.query_batch(
                            feats, mems, index, memories.labels, items=[feat_row[b] for b in sub],
                            support_order=support_order, neighbours=neighbours, frame_idx=k + j,
                            num_frames=num_frames, encode_memory=True, annotations=annotations))
                except Exception as e:  # noqa: BLE001 - as above
                    if not is_out_of_memory(e):
                        raise
                    out = None
                if out is None:
                    del mems, neighbours, annotations
                    release_memory(sam.device)
                    if len(sub) == 1:
                        raise _out_of_memory(sam, "memory attention", k, n_labels) from None
                    sizer.halve("memory attention", len(sub))
                    continue
                for b, res, mem in zip(sub, out.to_numpy(), out.memories):
                    results[b] = (res, mem)
                r0 += len(sub)
        todo = todo[len(chunk):]
    return results
