"""Overlap and surface-distance metrics for label maps: Dice, HD95, per-label summaries.

Spacing convention
------------------
`hd95` and `per_label_metrics` take plain numpy arrays, so their `spacing` is given **in the
array's own axis order**: `spacing[d]` is the voxel size in mm along numpy axis `d`. For a
`Volume` (array[k, j, i], spacing in ITK (i, j, k) order) that is `vol.spacing[::-1]`;
`array_spacing(vol)` returns exactly that, and `per_label_metrics` does it itself when given
Volumes and no spacing.

HD95
----
Surface = foreground voxels with a background face neighbour (6-connectivity in 3D, 4 in 2D;
outside the array counts as background). Distances from each surface voxel of one mask to the
nearest surface voxel of the other are exact Euclidean distances in mm (SimpleITK's Signed
Maurer distance map). Both directions are pooled and the 95th percentile taken (linear
interpolation), as MedPy's `hd95` does.

`per_label_metrics` takes arrays (then `spacing`, in array order, is required) or two Volumes
with the same geometry (then `spacing` may be left out).

Conventions for empty masks
---------------------------
* dice: both empty -> 1.0 (perfect agreement on "nothing"); exactly one empty -> 0.0.
* hd95: both empty -> 0.0; exactly one empty -> nan (a distance to nothing is undefined).
  Averages over cases should use `np.nanmean` and report how many cases were nan.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..data.volume import Volume


def array_spacing(vol: Volume) -> tuple[float, float, float]:
    """Spacing of `vol.array` in numpy axis order (k, j, i), as `hd95` expects it."""
    return (vol.spacing[2], vol.spacing[1], vol.spacing[0])


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    return pred != 0, truth != 0


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two masks (nonzero = foreground); 1.0 if both are empty."""
    p, t = _check_pair(pred, truth)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: foreground with a background face neighbour (outside = background)."""
    m = np.asarray(mask) != 0
    padded = np.pad(m, 1, constant_values=False)
    interior = padded.copy()
    for axis in range(m.ndim):
        interior &= np.roll(padded, 1, axis=axis) & np.roll(padded, -1, axis=axis)
    inner = tuple(slice(1, -1) for _ in range(m.ndim))
    return m & ~interior[inner]


def _distance_to(sites: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Exact Euclidean distance (mm) from every voxel to the nearest `True` voxel of `sites`."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(sites.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing)))  # SimpleITK wants (x, y, z)
    dist = sitk.SignedMaurerDistanceMap(
        img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    # Outside the sites: distance to the nearest site voxel (the nearest one always lies on the
    # sites' own contour). Inside: negative depth, but a site voxel is at distance 0 to itself.
    return np.maximum(sitk.GetArrayFromImage(dist), 0.0)


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) pred-surface -> truth-surface and truth-surface -> pred-surface."""
    p, t = _check_pair(pred, truth)
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing needs {p.ndim} values (array axis order), got {tuple(spacing)}")
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing values must be positive, got {tuple(spacing)}")
    if p.ndim not in (2, 3):
        raise ValueError(f"surface distances need 2D or 3D masks, got shape {p.shape}")
    if not p.any() or not t.any():
        raise ValueError("surface distances need two non-empty masks")
    # Distances only involve voxels of the two masks: crop to their joint bounding box (+1).
    both = np.argwhere(p | t)
    lo = np.maximum(both.min(axis=0) - 1, 0)
    hi = both.max(axis=0) + 2
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sp, st = surface(p[box]), surface(t[box])
    if p.ndim == 2:  # SimpleITK's distance map is run on a one-slice 3D image
        sp, st, spacing = sp[None], st[None], (1.0, *spacing)
    return _distance_to(st, spacing)[sp], _distance_to(sp, spacing)[st]


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile (mm) of pooled symmetric surface distances; spacing in array order."""
    p, t = _check_pair(pred, truth)
    has_p, has_t = bool(p.any()), bool(t.any())
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return float("nan")
    d_pt, d_tp = surface_distances(p, t, spacing)
    return float(np.percentile(np.concatenate([d_pt, d_tp]), 95))


def per_label_metrics(
    pred_labelmap: np.ndarray | Volume,
    truth_labelmap: np.ndarray | Volume,
    labels: dict[int, str],
    spacing: Sequence[float] | None = None,
) -> dict[str, dict[str, Any]]:
    """{name: {"label", "dice", "hd95", "pred_voxels", "truth_voxels"}} for each label."""
    if isinstance(pred_labelmap, Volume) and isinstance(truth_labelmap, Volume):
        if not pred_labelmap.same_geometry(truth_labelmap):
            raise ValueError(
                "prediction and truth have different geometry: "
                f"size {pred_labelmap.size} vs {truth_labelmap.size}, "
                f"spacing {pred_labelmap.spacing} vs {truth_labelmap.spacing}, "
                f"origin {pred_labelmap.origin} vs {truth_labelmap.origin}"
            )
        if spacing is None:
            spacing = array_spacing(truth_labelmap)
    if spacing is None:
        raise ValueError("spacing is required (array axis order) unless both inputs are Volumes")
    pred = pred_labelmap.array if isinstance(pred_labelmap, Volume) else np.asarray(pred_labelmap)
    truth = (
        truth_labelmap.array if isinstance(truth_labelmap, Volume) else np.asarray(truth_labelmap)
    )
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    names = list(labels.values())
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"label names must be unique, repeated: {duplicates}")
    out: dict[str, dict[str, Any]] = {}
    for value, name in labels.items():
        if int(value) == 0:
            raise ValueError(f"label 0 is background and cannot be scored (name {name!r})")
        p = pred == value
        t = truth == value
        out[name] = {
            "label": int(value),
            "dice": dice(p, t),
            "hd95": hd95(p, t, spacing),
            "pred_voxels": int(p.sum()),
            "truth_voxels": int(t.sum()),
        }
    return out


def mean_metrics(per_label: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Mean Dice and HD95 over labels (HD95 ignores nan) plus how many HD95 values were nan."""
    dices = [float(m["dice"]) for m in per_label.values()]
    hds = np.array([float(m["hd95"]) for m in per_label.values()], dtype=float)
    finite = hds[~np.isnan(hds)]
    return {
        "dice": float(np.mean(dices)) if dices else float("nan"),
        "hd95": float(finite.mean()) if finite.size else float("nan"),
        "hd95_nan_count": int(np.isnan(hds).sum()),
    }
