"""Which slices to annotate next: greedy k-center over the volume's DINOv2 slice embeddings.

A support bank helps a slice as much as it holds a similar slice (retrieval is DINOv2 cosine
similarity). So the slices worth annotating next are those far, in DINOv2 space, from every
usable bank entry, and those whose last segmentation was unsure. `suggest_slices` embeds every
slice of the volume (the same windowing and DINOv2 as segmentation), counts the bank as already
covering its neighbourhood, and picks n slices by farthest-point selection (greedy k-center):

* each slice's gap is its cosine distance (1 - cosine) to the nearest centre; the centres are the
  bank's usable entries and the slices picked so far, so the n picks are diverse, not n
  neighbours of one gap;
* the next pick maximises gap x (1 + uncertainty), where uncertainty is 1 - confidence of the
  last segmentation on a segmented slice, 1 on a slice it did not segment (a gap: outside the
  range, beyond the extent, cancelled), 0 where nothing is known;
* with no centre yet (empty bank) the first pick is the medoid: the slice with the smallest mean
  distance to the others, the single slice that best covers the volume; farthest-point follows;
* empty slices (nearly constant intensity after windowing, or nothing found there by the last
  segmentation) are picked only once every other slice is taken, and are flagged;
* ties (equal scores within 1e-6) go to the slice farthest along the axis from the picks and
  from this volume's slices already in the bank, then to the one nearest the middle, then to the
  lower index; so a volume of identical slices gets picks spread along it.

Coverage (`coverage`): the mean over the volume's slices of the cosine distance to the nearest
bank entry (lower is better). Each suggestion reports it before and after adding the picks (a
pick's own embedding standing in for its future bank entry).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..data.volume import AXIS_NAMES, Volume, array_axis, num_slices, parse_axis, through_plane_axis

#: A windowed (uint8) slice whose 1st-99th percentile spread is below this many grey levels is
#: 'empty' (nearly constant: air, padding, a blank slice). 10 of 255 is ~4% of the window.
EMPTY_SPREAD = 10
#: Scores closer than this are ties (float noise of unit-vector inner products is ~1e-7).
TIE_TOLERANCE = 1e-6

EMPTY_INTENSITY = "nearly constant intensity"
EMPTY_SEGMENTATION = "the last segmentation found nothing here"


# ============================================================================ building blocks
def cosine_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] 1 - cosine of unit vectors, clipped to 0..2."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return np.clip(1.0 - a @ b.T, 0.0, 2.0)


def coverage(slice_embeddings: np.ndarray, bank_embeddings: np.ndarray) -> float | None:
    """Mean over the slices of the cosine distance to the nearest bank entry (None: empty bank)."""
    if len(bank_embeddings) == 0 or len(slice_embeddings) == 0:
        return None
    return float(cosine_distances(slice_embeddings, bank_embeddings).min(axis=1).mean())


def blank_slices(images_u8: Sequence[np.ndarray], spread: float = EMPTY_SPREAD) -> np.ndarray:
    """True for windowed slices whose 1st-99th percentile spread is below `spread` grey levels."""
    out = np.zeros(len(images_u8), dtype=bool)
    for i, img in enumerate(images_u8):
        lo, hi = np.percentile(np.asarray(img, dtype=np.float64), (1.0, 99.0))
        out[i] = (hi - lo) < spread
    return out


@dataclass
class Pick:
    """One slice chosen by `select_slices`."""

    index: int
    gap: float | None  # distance to the nearest centre when picked (None: no centre yet, the medoid)
    score: float | None  # gap x (1 + uncertainty), or None for the medoid
    mean_distance: float | None = None  # the medoid's mean distance to the other slices


def _choose(pool: np.ndarray, score: np.ndarray, picked: Sequence[int], anchors: Sequence[int], n: int,
            higher: bool) -> int:
    """The best of `pool` by `score`, ties broken as the module docstring says."""
    s = score[pool]
    best = s.max() if higher else s.min()
    tied = pool[np.abs(s - best) <= TIE_TOLERANCE] if math.isfinite(best) else pool[s == best]
    if len(tied) == 1:
        return int(tied[0])
    fixed = np.array(list(picked) + list(anchors), dtype=np.int64)
    middle = (n - 1) / 2.0

    def key(i: int) -> tuple[float, float, int]:
        along = float(np.abs(fixed - i).min()) if len(fixed) else math.inf
        return (-along, abs(i - middle), i)

    return min((int(i) for i in tied), key=key)


def select_slices(
    slice_embeddings: np.ndarray,
    bank_embeddings: np.ndarray,
    n: int,
    *,
    uncertainty: np.ndarray | None = None,
    empty: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    anchors: Sequence[int] = (),
) -> list[Pick]:
    """Greedy k-center (farthest-point) choice of up to `n` slices, best first.

    slice_embeddings [N, d] and bank_embeddings [M, d] are unit vectors (M may be 0).
    uncertainty [N] in 0..1 weighs the gap (NaN counts as 0); empty [N] slices come last;
    exclude [N] slices are never picked (e.g. already in the bank); anchors are slice indices
    already in the bank, used only to break ties along the axis.
    """
    emb = np.asarray(slice_embeddings, dtype=np.float64)
    n_slices = len(emb)
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    u = np.zeros(n_slices) if uncertainty is None else np.nan_to_num(np.clip(np.asarray(uncertainty, float), 0, 1))
    is_empty = np.zeros(n_slices, bool) if empty is None else np.asarray(empty, bool)
    excluded = np.zeros(n_slices, bool) if exclude is None else np.asarray(exclude, bool)
    for name, arr in (("uncertainty", u), ("empty", is_empty), ("exclude", excluded)):
        if arr.shape != (n_slices,):
            raise ValueError(f"{name} must have one value per slice ({n_slices}), got shape {arr.shape}")
    gap = (cosine_distances(emb, bank_embeddings).min(axis=1) if len(bank_embeddings)
           else np.full(n_slices, math.inf))
    weight = 1.0 + u
    taken = excluded.copy()
    picks: list[Pick] = []
    while len(picks) < n and not taken.all():
        free = ~taken
        pool = np.flatnonzero(free & ~is_empty)
        if len(pool) == 0:
            pool = np.flatnonzero(free)  # only empty slices are left: they come last
        picked = [p.index for p in picks]
        if not np.isfinite(gap[pool]).any():
            # No centre yet: the medoid of the slices that matter (non-empty, not excluded).
            basis = np.flatnonzero(~is_empty & ~excluded)
            basis = basis if len(basis) else np.flatnonzero(~excluded)
            mean = cosine_distances(emb, emb[basis]).mean(axis=1)
            i = _choose(pool, mean, picked, anchors, n_slices, higher=False)
            picks.append(Pick(i, None, None, float(mean[i])))
        else:
            score = np.where(np.isfinite(gap), gap * weight, -1.0)
            i = _choose(pool, score, picked, anchors, n_slices, higher=True)
            picks.append(Pick(i, float(gap[i]), float(score[i])))
        taken[i] = True
        gap = np.minimum(gap, cosine_distances(emb, emb[i : i + 1])[:, 0])
    return picks


# ============================================================================ the last segmentation
@dataclass
class LastSegmentation:
    """What the last segmentation says about each slice: status, confidence, found nothing."""

    status: list[str]  # one of provenance.SLICE_STATUSES per slice
    confidence: np.ndarray  # [N] float, NaN where unknown
    found_nothing: np.ndarray  # [N] bool: segmented, and no label there
    axis: int | None = None
    bank_revision: int | None = None
    bank_id: str | None = None

    def __post_init__(self) -> None:
        n = len(self.status)
        self.confidence = np.asarray(self.confidence, dtype=np.float64).reshape(-1)
        self.found_nothing = np.asarray(self.found_nothing, dtype=bool).reshape(-1)
        if self.confidence.shape != (n,) or self.found_nothing.shape != (n,):
            raise ValueError(f"last segmentation: {n} statuses but {self.confidence.shape} confidences "
                             f"and {self.found_nothing.shape} found-nothing flags")

    @property
    def segmented(self) -> np.ndarray:
        from .provenance import SEGMENTED

        return np.array([s == SEGMENTED for s in self.status], dtype=bool)

    def uncertainty(self) -> np.ndarray:
        """1 - confidence on segmented slices, 1 on slices it did not segment (gaps)."""
        conf = np.clip(np.nan_to_num(self.confidence, nan=1.0), 0.0, 1.0)
        return np.where(self.segmented, 1.0 - conf, 1.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": list(self.status),
            "confidence": [None if not math.isfinite(c) else float(c) for c in self.confidence],
            "found_nothing": [bool(x) for x in self.found_nothing],
            "axis": self.axis, "bank_revision": self.bank_revision, "bank_id": self.bank_id,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LastSegmentation":
        return cls(
            [str(s) for s in d["status"]],
            np.array([math.nan if c is None else float(c) for c in d["confidence"]]),
            np.array(d["found_nothing"], dtype=bool),
            None if d.get("axis") is None else int(d["axis"]),
            d.get("bank_revision"), d.get("bank_id"),
        )

    @classmethod
    def from_sidecar(cls, doc: dict[str, Any], labelmap: np.ndarray | None = None) -> "LastSegmentation":
        """From a prediction sidecar (`provenance.read_sidecar`); with its label map, 'found nothing'
        means no label voxel on the slice, without it: every label absent (the sidecar's `present`,
        or, in sidecars written before it, every label's object score <= 0: SAM 2's 'object absent')."""
        from .provenance import SEGMENTED

        prov = doc.get("provenance") or {}
        axis = parse_axis(prov.get("axis")) if prov.get("axis") is not None else None
        records = sorted(doc["slices"], key=lambda r: int(r["index"]))
        if [int(r["index"]) for r in records] != list(range(len(records))):
            raise ValueError("sidecar: the per-slice records must cover slices 0..N-1 once each")
        status = [str(r["status"]) for r in records]
        conf = np.array([
            float(r["confidence"]) if r["status"] == SEGMENTED and r.get("confidence") is not None else math.nan
            for r in records
        ])
        if labelmap is not None:
            if axis is None:
                raise ValueError("sidecar: no slice axis in its provenance")
            if num_slices(labelmap, axis) != len(records):
                raise ValueError(f"the label map has {num_slices(labelmap, axis)} slices along {AXIS_NAMES[axis]}, "
                                 f"its sidecar describes {len(records)}")
            other = tuple(a for a in range(3) if a != array_axis(axis))
            has_label = (labelmap != 0).any(axis=other)
            nothing = np.array([s == SEGMENTED and not has_label[i] for i, s in enumerate(status)])
        else:
            nothing = np.array([
                r["status"] == SEGMENTED and (
                    not any(r["present"].values()) if r.get("present") else
                    bool(r.get("object_score")) and all(v is not None and v <= 0 for v in r["object_score"].values()))
                for r in records
            ], dtype=bool)
        bank = prov.get("bank") or {}
        return cls(status, conf, nothing, axis, bank.get("revision"), bank.get("bank_id"))


# ============================================================================ suggestions
@dataclass
class Suggestion:
    """One slice to annotate, with why."""

    rank: int  # 1 = best
    index: int  # slice index along the axis
    distance_to_bank: float | None  # cosine distance to the nearest usable bank entry (None: empty bank)
    nearest_entry: str | None
    gap: float | None  # distance to the bank and the picks ranked above when chosen
    confidence: float | None  # in the last segmentation (None: unknown)
    status: str | None  # the last segmentation's status for the slice (None: no last segmentation)
    empty: bool
    empty_reason: str | None
    covers: list[int] = field(default_factory=list)  # slices it would bring closer to a centre
    reasons: list[str] = field(default_factory=list)


    def summary(self) -> str:
        """One line for a list: slice, distance to the bank, confidence, what it covers."""
        parts = [f"{self.rank}. slice {self.index}"]
        if self.distance_to_bank is not None:
            parts.append(f"distance to bank {self.distance_to_bank:.3f}")
        if self.confidence is not None:
            parts.append(f"confidence {self.confidence:.2f}")
        elif self.status is not None and self.status.startswith("not segmented"):
            parts.append("not segmented")
        parts.append(f"covers {ranges_text(self.covers)}")
        if self.empty:
            parts.append("EMPTY")
        return ", ".join(parts)


@dataclass
class Suggestions:
    """The picks, best first, and the coverage before and after adding them."""

    axis: int
    n_slices: int
    picks: list[Suggestion]
    bank_entries: int  # usable entries
    coverage_before: float | None
    coverage_after: float | None
    empty_slices: list[int]
    in_bank: list[int]  # slices of this volume already in the bank (never suggested)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["axis"] = AXIS_NAMES[self.axis]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Suggestions":
        picks = [Suggestion(**p) for p in d["picks"]]
        return cls(parse_axis(d["axis"]), int(d["n_slices"]), picks, int(d["bank_entries"]),  # type: ignore[arg-type]
                   d["coverage_before"], d["coverage_after"], list(d["empty_slices"]), list(d["in_bank"]),
                   list(d.get("notes", [])))


def ranges_text(indices: Sequence[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    out: list[str] = []
    for i in sorted(indices):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))  # type: ignore[arg-type]
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)  # type: ignore[misc]


def bank_rows(bank: Any, embedder_identity: str | None = None) -> tuple[list[Any], np.ndarray]:
    """(usable entries, their embedding rows) from one consistent snapshot of the bank: the rows of
    the retrieval feature `embedder_identity` names (a bank may hold several), else the primary's."""
    for _ in range(3):
        entries = bank.entries(include_retired=True)
        rows = bank.embeddings(embedder_identity) if embedder_identity is not None else bank.embeddings()
        if [e.id for e in bank.entries(include_retired=True)] == [e.id for e in entries] and len(rows) == len(entries):
            break
        bank.reload()  # a writer changed the bank between the two reads
    else:
        raise RuntimeError(f"the support bank at {bank.path} kept changing while it was read; try again")
    keep = [n for n, e in enumerate(entries) if e.usable and np.isfinite(rows[n]).all()]
    return [entries[n] for n in keep], np.asarray(rows[keep], dtype=np.float32)


def build_suggestions(
    slice_embeddings: np.ndarray,
    bank_embeddings: np.ndarray,
    bank_ids: Sequence[str],
    n: int,
    axis: int,
    *,
    blank: np.ndarray | None = None,
    last: LastSegmentation | None = None,
    in_bank: Sequence[int] = (),
) -> Suggestions:
    """Select and explain: the part of `suggest_slices` that needs no model."""
    from .provenance import SEGMENTED

    emb = np.asarray(slice_embeddings, dtype=np.float64)
    n_slices = len(emb)
    blank = np.zeros(n_slices, bool) if blank is None else np.asarray(blank, bool)
    if last is not None and len(last.status) != n_slices:
        raise ValueError(f"the last segmentation describes {len(last.status)} slices, the volume has "
                         f"{n_slices} along {AXIS_NAMES[axis]}")
    found_nothing = last.found_nothing if last is not None else np.zeros(n_slices, bool)
    empty = blank | found_nothing
    exclude = np.zeros(n_slices, bool)
    exclude[[i for i in in_bank if 0 <= i < n_slices]] = True
    picks = select_slices(emb, bank_embeddings, n, uncertainty=last.uncertainty() if last is not None else None,
                          empty=empty, exclude=exclude, anchors=in_bank)
    to_bank = cosine_distances(emb, bank_embeddings)
    nearest = to_bank.argmin(axis=1) if len(bank_ids) else None
    d_bank = to_bank.min(axis=1) if len(bank_ids) else np.full(n_slices, math.inf)
    # Who covers whom once the picks are in the bank: each slice's nearest centre among bank + picks.
    to_picks = cosine_distances(emb, emb[[p.index for p in picks]]) if picks else np.zeros((n_slices, 0))
    owner = to_picks.argmin(axis=1) if picks else None
    out: list[Suggestion] = []
    for rank, p in enumerate(picks, 1):
        i = p.index
        covers = [] if owner is None else [
            int(j) for j in np.flatnonzero(owner == rank - 1)
            if not exclude[j] and to_picks[j, rank - 1] < d_bank[j] - TIE_TOLERANCE
        ]
        if i not in covers:
            covers = sorted(set(covers) | {i})
        reasons: list[str] = []
        dist = float(d_bank[i]) if math.isfinite(d_bank[i]) else None
        entry = str(bank_ids[int(nearest[i])]) if nearest is not None else None
        if p.gap is None:
            reasons.append(f"represents the volume best (mean cosine distance {p.mean_distance:.3f} to its slices)")
        else:
            if dist is not None:
                reasons.append(f"cosine distance {dist:.3f} to the nearest bank entry ({entry})")
            if dist is None or p.gap < dist - TIE_TOLERANCE:
                reasons.append(f"cosine distance {p.gap:.3f} to the slices ranked above"
                               + (" and the bank" if dist is not None else ""))
        status = last.status[i] if last is not None else None
        conf = None
        if last is not None:
            c = float(last.confidence[i])
            conf = c if math.isfinite(c) else None
            if status == SEGMENTED and conf is not None:
                reasons.append(f"confidence {conf:.2f} in the last segmentation")
            elif status != SEGMENTED:
                reasons.append(f"{status} in the last segmentation: a gap")
        reason = EMPTY_INTENSITY if blank[i] else EMPTY_SEGMENTATION if found_nothing[i] else None
        if reason:
            reasons.append(f"looks empty ({reason}): ranked after every non-empty slice")
        reasons.append(f"would cover {len(covers)} slice(s): {ranges_text(covers)}")
        out.append(Suggestion(rank, i, dist, entry, p.gap, conf, status, bool(empty[i]), reason, covers,
                              [r for r in reasons if r]))
    with_picks = np.concatenate([np.asarray(bank_embeddings, np.float64).reshape(-1, emb.shape[1]),
                                 emb[[p.index for p in picks]]]) if picks else bank_embeddings
    result = Suggestions(
        axis, n_slices, out, len(bank_ids), coverage(emb, bank_embeddings), coverage(emb, with_picks),
        [int(i) for i in np.flatnonzero(empty)], sorted(int(i) for i in in_bank if 0 <= i < n_slices),
    )
    free = n_slices - int(exclude.sum())
    if n > free:
        result.notes.append(f"{n} slices asked for, {free} can be suggested (the volume has {n_slices} slices"
                            + (f", {int(exclude.sum())} already in the bank)" if exclude.any() else ")"))
    if picks and all(s.empty for s in out) and len(result.empty_slices) >= free:
        result.notes.append("every slice that can be suggested looks empty: check the window or the volume")
    return result


def revision_note(last: LastSegmentation, bank: Any | None) -> str | None:
    """What the last segmentation's bank (id, revision) says next to `bank` as it is now; None
    when it is this bank at this revision (or the sidecar records no revision)."""
    if last.bank_revision is None:
        return None
    then = int(last.bank_revision)
    if bank is None:
        return f"confidences are from a segmentation made with revision {then} of its bank (give --bank to compare)"
    now = int(bank.revision)
    if last.bank_id is not None and last.bank_id != bank.bank_id:
        return (f"confidences are from a segmentation made with another support bank (id {last.bank_id}, "
                f"revision {then}), not this one (id {bank.bank_id}): they may not hold for this bank")
    if now == then:
        return None
    if now > then:
        return (f"confidences are from a segmentation made with revision {then} of this bank, which is now at "
                f"revision {now}: slices near the entries changed since may be better than their confidence "
                "says (segment again for current confidences)")
    return (f"confidences are from a segmentation made with revision {then} of this bank, but the bank is at "
            f"revision {now} (an older copy of it?)")


class VolumeEmbeddingCache:
    """The DINOv2 embeddings (and blank flags) of the last few volumes `suggest_slices` saw, so that
    refreshing the suggestions after an annotation does not embed the same volume again (a CT of
    300 slices costs about a minute of DINOv2 on a 2-core CPU). Keyed by the embedder's identity,
    the axis, the window and a SHA-256 of the voxels (dtype, shape, bytes): any change recomputes.
    The reused values are the ones computed before with the same batches, so bit for bit the same.
    Kept in memory by the Slicer worker (`worker.Worker`), least recently used first out."""

    def __init__(self, max_volumes: int = 4) -> None:
        from collections import OrderedDict

        self.max_volumes = int(max_volumes)
        self._items: "OrderedDict[tuple, tuple[np.ndarray, np.ndarray]]" = OrderedDict()

    @staticmethod
    def key(embedder_identity: str, axis: int, bounds: tuple[float, float], volume: Volume) -> tuple:
        import hashlib

        arr = np.ascontiguousarray(volume.array)
        h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(memoryview(arr).cast("B"))
        return (str(embedder_identity), int(axis), (float(bounds[0]), float(bounds[1])), h.hexdigest())

    def get(self, key: tuple) -> tuple[np.ndarray, np.ndarray] | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple, emb: np.ndarray, blank: np.ndarray) -> None:
        self._items[key] = (emb, blank)
        self._items.move_to_end(key)
        while len(self._items) > self.max_volumes:
            self._items.popitem(last=False)


REUSED_NOTE = "DINOv2 embeddings of this volume reused from an earlier suggestion (same voxels, axis and window)"


def suggest_slices(
    volume: Volume,
    bank: Any | None,
    embedder: Any,
    *,
    n: int = 3,
    axis: int | str | None = None,
    window: tuple[float, float] | None = None,
    last: LastSegmentation | None = None,
    case_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    embeddings_cache: VolumeEmbeddingCache | None = None,
) -> Suggestions:
    """The n slices of `volume` to annotate next, best first, with their reasons.

    bank: a SupportBank (possibly empty) or None (no bank yet: the slices that best cover the
    volume). A bank made with another DINOv2 is refused with the re-embed command. axis: the
    slice axis (None/'auto': the last segmentation's, else the through-plane axis). window: the
    intensity bounds (default: the volume's robust percentiles, as `segment_volume`). last: the
    last segmentation's per-slice status and confidence. case_id: this volume's case in the bank;
    its slices already in the bank are never suggested. progress(done, total) follows the DINOv2
    pass and may raise to stop it. embeddings_cache: reuse the embeddings of a volume seen before
    (`VolumeEmbeddingCache`; the result then carries `REUSED_NOTE`).
    """
    from .slices import slices_to_uint8, window_for_volume

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if bank is not None:
        bank.check_models(embedder.identity)  # another DINOv2: refused, with the re-embed command
    ax = parse_axis(axis)
    if ax is None:
        ax = last.axis if last is not None and last.axis is not None else through_plane_axis(volume.spacing)
    elif last is not None and last.axis is not None and last.axis != ax:
        raise ValueError(f"the last segmentation ran along axis {AXIS_NAMES[last.axis]}, not {AXIS_NAMES[ax]}")
    count = num_slices(volume.array, ax)
    bounds = window_for_volume(volume, window)
    key = VolumeEmbeddingCache.key(embedder.identity, ax, bounds, volume) if embeddings_cache is not None else None
    cached = embeddings_cache.get(key) if embeddings_cache is not None else None
    if cached is not None:
        emb, blank = cached
        if progress is not None:
            progress(count, count)
    else:
        images = slices_to_uint8(volume, ax, list(range(count)), bounds, getattr(embedder.dinov2, "device", None))
        emb = embedder.embed(images, progress=progress)
        blank = blank_slices(images)
        if embeddings_cache is not None:
            embeddings_cache.put(key, emb, blank)
    entries, rows = bank_rows(bank, embedder.identity) if bank is not None else ([], np.zeros((0, emb.shape[1]), np.float32))
    in_bank = sorted({e.index for e in entries if case_id is not None and e.case_id == case_id and e.axis == ax})
    result = build_suggestions(emb, rows, [e.id for e in entries], int(n), ax, blank=blank,
                               last=last, in_bank=in_bank)
    note = revision_note(last, bank) if last is not None else None
    if note:
        result.notes.append(note)
    if cached is not None:
        result.notes.append(REUSED_NOTE)
    return result
