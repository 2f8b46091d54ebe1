"""Planning a volume's segmentation: which axis, which slices, which labels, which intensity
window (one for the whole volume), the slices as uint8 images, and where an extent walk starts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..data.volume import AXIS_NAMES, Volume, num_slices, parse_axis, slice_view, through_plane_axis
from ..engine.preprocess import robust_window, to_uint8


@dataclass
class SlicePlan:
    """What a segmentation covers: slices start..stop-1 along `axis`, the labels segmented (their
    values in order, `label_lut` as the label map's dtype) and the intensity window."""

    axis: int
    n_slices: int  # along the axis, in the whole volume
    start: int
    stop: int  # exclusive
    labels: list[int]
    label_lut: np.ndarray
    bounds: tuple[float, float]

    @property
    def indices(self) -> list[int]:
        return list(range(self.start, self.stop))


def plan_slices(volume: Volume, bank, *, labels: Sequence[int] | None = None, axis: int | str | None = None,
                slice_range: tuple[int, int] | None = None,
                window: tuple[float, float] | None = None) -> SlicePlan:
    """The axis (given, else the through-plane axis: largest spacing), the slice range (checked), the
    labels (given and in the bank, else all of the bank's) and the window (given, else robust
    percentiles of the volume); ValueError naming what is wrong."""
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
    bank_labels = [lab.value for lab in bank.labels]
    if labels is None:
        chosen = list(bank_labels)
    else:
        unknown = [v for v in labels if v not in bank_labels]
        if unknown:
            raise ValueError(f"labels {unknown} are not in the bank (it has {sorted(bank_labels)})")
        chosen = [int(v) for v in labels]
    if not chosen:
        raise ValueError("no labels to segment: the bank defines none")
    dtype = np.uint8 if max(chosen) < 256 else np.uint16
    bounds = window_for_volume(volume, window)
    return SlicePlan(ax, n, start, stop, chosen, np.array(chosen, dtype=dtype), bounds)


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


def start_slices(start_slice, bank, case_id, axis: int, start: int, stop: int, user_range: bool,
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


def annotation_entries(bank, case_id: str | None, axis: int) -> dict[int, str]:
    """Slice index -> id of the bank entry holding this volume's annotation of it (usable entries of
    `case_id` along `axis`; the bank keeps one active entry per slice: the newest)."""
    if case_id is None:
        return {}
    return {
        int(e.index): str(e.id) for e in bank.entries()
        if getattr(e, "case_id", None) == case_id and getattr(e, "axis", None) == axis
        and getattr(e, "index", None) is not None and getattr(e, "usable", True)
    }


def annotated_slices(bank, case_id: str | None, axis: int) -> list[int]:
    """Slices along `axis` of the volume `case_id` that the bank holds as annotated (its active entries)."""
    if case_id is None:
        return []
    return sorted({
        int(e.index) for e in bank.entries()
        if getattr(e, "case_id", None) == case_id and getattr(e, "axis", None) == axis
        and getattr(e, "index", None) is not None
    })
