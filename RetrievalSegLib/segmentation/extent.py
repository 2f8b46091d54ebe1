"""The extent stop: segment outwards from start slices, stop where the structure has ended.

A CT holds ~300 slices while an organ spans a fifth of them, and SAM 2 costs as much on a slice
where it finds nothing as on one where it finds the organ. The rule:

* From each start slice, walk up (s, s+1, ...) and down (s, s-1, ...); the start slice itself
  belongs to both walks.
* A slice is *absent* when every requested label's SAM 2 object score is <= the presence
  threshold (threshold 0 is SAM 2's own rule: an object appears where its score is > 0).
* A walk stops after `stop_after` consecutive absent slices (those slices are segmented and kept:
  they are part of the result), or at the edge of the slice range.
* A label that disappears for fewer than `stop_after` slices and comes back is kept. A longer gap
  needs a second start slice on the far side of it, or `stop_after = 0` (every slice).

Slices are independent of each other (each retrieves its own supports; no memory passes from one
slice to the next), so the result on a segmented slice is the one a full run gives, and the set
of slices segmented depends only on the per-slice presence, never on the order or the batch size:
`ExtentWalker` proposes slices speculatively in batches and accepts only those the walks reach.
`extent_slices` applies the rule to a known presence sequence (tests, benchmarks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

#: Default for `rseg segment` and the Slicer panel: a walk ends after 5 consecutive slices with
#: every label absent. Conservative: a structure that vanishes for up to 4 slices (a missed tip,
#: a thin gap) is crossed; it costs at most 2 x 5 extra slices per start slice.
DEFAULT_EXTENT_STOP = 5


@dataclass
class _Walk:
    pos: int
    step: int
    streak: int = 0
    active: bool = True


class ExtentWalker:
    """The rule as a state machine: `next_slices` proposes work, `record` feeds presence back."""

    def __init__(self, starts: Iterable[int], stop_after: int, slice_range: tuple[int, int]) -> None:
        lo, hi = int(slice_range[0]), int(slice_range[1])
        if not lo < hi:
            raise ValueError(f"empty slice range {slice_range}")
        if isinstance(stop_after, bool) or int(stop_after) != stop_after or stop_after < 0:
            raise ValueError(f"extent stop must be an integer >= 0, got {stop_after!r}")
        seeds = sorted({int(s) for s in starts})
        if not seeds:
            raise ValueError("the extent stop needs at least one start slice")
        outside = [s for s in seeds if not lo <= s < hi]
        if outside:
            raise ValueError(f"start slice(s) {outside} outside the slice range {lo}..{hi - 1}")
        self.lo, self.hi = lo, hi
        self.stop_after = int(stop_after)
        self.starts = seeds
        self.walks = [_Walk(s, step) for s in seeds for step in (1, -1)]
        self.known: dict[int, bool] = {}
        self.accepted: set[int] = set()
        self._taken: set[int] = set()

    @property
    def finished(self) -> bool:
        """True when every walk has stopped (at the rule or at the range's edge)."""
        return not any(w.active for w in self.walks)

    def _inside(self, i: int) -> bool:
        return self.lo <= i < self.hi

    def _advance(self) -> None:
        for w in self.walks:
            while w.active and w.pos in self.known:
                self.accepted.add(w.pos)
                w.streak = 0 if self.known[w.pos] else w.streak + 1
                if self.stop_after and w.streak >= self.stop_after:
                    w.active = False
                    break
                w.pos += w.step
                if not self._inside(w.pos):
                    w.active = False

    def next_slices(self, limit: int) -> list[int]:
        """Up to `limit` slices to compute next, taken in turn from the active walks, each walk
        assuming the structure goes on (speculative: `record` decides what is kept)."""
        self._advance()
        heads = [[w.pos, w.step] for w in self.walks if w.active]
        out: list[int] = []
        chosen: set[int] = set()
        while len(out) < limit and heads:
            for h in list(heads):
                while self._inside(h[0]) and (h[0] in self.known or h[0] in chosen):
                    h[0] += h[1]
                if not self._inside(h[0]):
                    heads.remove(h)
                    continue
                out.append(h[0])
                chosen.add(h[0])
                if len(out) >= limit:
                    break
        return out

    def record(self, index: int, present: bool) -> None:
        """The presence of a computed slice."""
        self.known[int(index)] = bool(present)
        self._advance()

    def take_accepted(self) -> list[int]:
        """Slices the walks have reached since the last call (in index order)."""
        self._advance()
        new = sorted(self.accepted - self._taken)
        self._taken.update(new)
        return new

    def reachable(self) -> set[int]:
        """Slices an active walk may still reach (not yet accepted): an upper bound on what is left."""
        out: set[int] = set()
        for w in self.walks:
            if w.active:
                end = self.hi if w.step > 0 else self.lo - 1
                out.update(range(w.pos, end, w.step))
        return out - self.accepted

    def beyond(self) -> set[int]:
        """Slices of the range that the rule leaves out: not accepted and out of every active walk's reach."""
        return set(range(self.lo, self.hi)) - self.accepted - self.reachable()


def extent_slices(
    presence: Sequence[bool],
    starts: int | Iterable[int],
    stop_after: int,
    slice_range: tuple[int, int] | None = None,
) -> list[int]:
    """The slices the extent stop segments, given every slice's presence (in index order).

    presence[i] is True where some requested label is predicted present on slice i. `starts`: one
    start slice or several. stop_after 0 segments the whole range.
    """
    n = len(presence)
    rng = (0, n) if slice_range is None else (int(slice_range[0]), int(slice_range[1]))
    if not 0 <= rng[0] < rng[1] <= n:
        raise ValueError(f"slice range {slice_range} is outside 0..{n}")
    if stop_after == 0:
        return list(range(*rng))
    walker = ExtentWalker([starts] if isinstance(starts, int) else starts, stop_after, rng)
    while not walker.finished:
        for i in walker.next_slices(1):
            walker.record(i, bool(presence[i]))
    return sorted(walker.accepted)
