"""Slice pictures: the windowed image at its physical aspect, with label contours or error fills.

Each picture is a plain RGB array whose width : height is the slice's physical width : height
(columns x column spacing : rows x row spacing), so an anisotropic slice is never stretched: the
image is resampled to square display pixels (bilinear for intensities, nearest for labels) and
the contours are drawn at display resolution. They are composed with numpy and encoded with
Pillow rather than drawn as matplotlib figures: a figure per thumbnail costs ~50 ms (a 200-volume
cohort would spend its time there), and a plain array makes every drawn pixel exactly a palette
colour (what the tests check). matplotlib draws the plots (plots.py).

Orientation: rows top to bottom and columns left to right as `volume.slice_view` returns them
(array order), the same for every picture of a report.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .palette import FALSE_NEGATIVE, FALSE_POSITIVE, RGB, WRONG_LABEL


@dataclass
class Picture:
    """One PNG of the report: its file name (images/<name>), bytes, pixel size and alt text."""

    name: str
    png: bytes
    width: int
    height: int
    alt: str


def display_size(shape: tuple[int, int], spacing: tuple[float, float], longest: int) -> tuple[int, int]:
    """(width, height) in display pixels of a (rows, columns) slice with (row, column) spacing in mm:
    the physical aspect, the longer side `longest` pixels."""
    rows, cols = int(shape[0]), int(shape[1])
    height_mm, width_mm = rows * float(spacing[0]), cols * float(spacing[1])
    if not (height_mm > 0 and width_mm > 0):
        raise ValueError(f"slice of {rows} x {cols} voxels with spacing {spacing} has no physical size")
    scale = longest / max(height_mm, width_mm)
    return max(1, int(round(width_mm * scale))), max(1, int(round(height_mm * scale)))


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def resample_nearest(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`arr` [rows, cols] (labels, masks) resampled to (width, height) by nearest neighbour."""
    w, h = size
    return arr[_nearest_index(arr.shape[0], h)][:, _nearest_index(arr.shape[1], w)]


def resample_gray(gray: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [rows, cols] resampled to (width, height), bilinear (antialiased when shrinking)."""
    from PIL import Image

    if gray.shape == (size[1], size[0]):
        return gray
    return np.asarray(Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).resize(size, Image.BILINEAR))


def contour(mask: np.ndarray) -> np.ndarray:
    """Inner boundary of a boolean mask: its pixels with a 4-neighbour outside it (image edge: outside)."""
    m = np.pad(mask.astype(bool), 1, constant_values=False)
    inner = m[1:-1, 1:-1]
    interior = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return inner & ~interior


def _thick(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel inwards-and-outwards along rows and columns (2-3 px contours)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:, 1:] |= mask[:, :-1]
    return out


def gray_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(gray, dtype=np.uint8)[:, :, None], 3, axis=2)


def label_overlay(gray: np.ndarray | None, masks: Sequence[tuple[np.ndarray, RGB]], spacing: tuple[float, float],
                  longest: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """RGB picture: `gray` (uint8 slice, or None for black) at physical aspect, each mask's contour in its colour.

    Masks are drawn in order, so a later label's contour lies on top where two meet.
    """
    if shape is None:
        shape = gray.shape if gray is not None else masks[0][0].shape
    size = display_size(shape, spacing, longest)
    base = np.zeros((size[1], size[0]), np.uint8) if gray is None else resample_gray(gray, size)
    rgb = gray_rgb(base)
    thick = longest >= 200  # 1 px contours vanish on large pictures once a browser scales them
    for mask, color in masks:
        edge = contour(resample_nearest(mask, size))
        rgb[_thick(edge) if thick else edge] = color
    return rgb


def labelmap_masks(labels2d: np.ndarray, colors: dict[int, RGB]) -> list[tuple[np.ndarray, RGB]]:
    """(mask, colour) per label value of `colors` (the report's legend), in value order."""
    return [(labels2d == v, c) for v, c in sorted(colors.items())]


#: Opacity of the error fills: the anatomy under an error stays visible.
ERROR_ALPHA = 0.6


def error_overlay(gray: np.ndarray | None, pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float],
                  longest: int) -> np.ndarray:
    """RGB picture: false positives, false negatives and wrong labels filled in their colours
    (blended over the image at ERROR_ALPHA), each region outlined in its full colour."""
    size = display_size(pred.shape, spacing, longest)
    base = np.zeros((size[1], size[0]), np.uint8) if gray is None else resample_gray(gray, size)
    rgb = gray_rgb(base)
    p, t = resample_nearest(pred, size), resample_nearest(truth, size)
    for region, color in (((p != 0) & (t == 0), FALSE_POSITIVE), ((p == 0) & (t != 0), FALSE_NEGATIVE),
                          ((p != 0) & (t != 0) & (p != t), WRONG_LABEL)):
        blend = (1 - ERROR_ALPHA) * rgb[region] + ERROR_ALPHA * np.asarray(color, dtype=float)
        rgb[region] = np.round(blend).astype(np.uint8)
        rgb[contour(region)] = color
    return rgb


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 array (Pillow; no metadata)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def picture(name: str, rgb: np.ndarray, alt: str) -> Picture:
    """A Picture from an RGB array."""
    return Picture(name, encode_png(rgb), int(rgb.shape[1]), int(rgb.shape[0]), alt)


def windowed(array2d: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """uint8 slice through the run's window (the models' own mapping, preprocess.to_uint8)."""
    from ..engine.preprocess import to_uint8

    return to_uint8(np.asarray(array2d), (float(window[0]), float(window[1])))


def worst_slice(pred: np.ndarray, truth: np.ndarray, axis: int, labels: Sequence[int]) -> tuple[int | None, float]:
    """(index, score) of the slice along IJK `axis` where the prediction agrees least with the truth.

    A slice's score is the mean Dice over the labels present on it in either map; the lowest wins,
    ties going to the slice with more wrong voxels, then the lower index. Slices where neither map
    has any label score nothing: (None, nan) when no slice has one.
    """
    from ..data.volume import array_axis

    ax = array_axis(axis)
    p = np.moveaxis(pred, ax, 0)
    t = np.moveaxis(truth, ax, 0)
    n = p.shape[0]
    flat_p, flat_t = p.reshape(n, -1), t.reshape(n, -1)
    sums = np.zeros(n)
    counts = np.zeros(n)
    for v in labels:
        pv, tv = flat_p == v, flat_t == v
        inter = (pv & tv).sum(axis=1)
        size = pv.sum(axis=1) + tv.sum(axis=1)
        present = size > 0
        sums[present] += 2.0 * inter[present] / size[present]
        counts[present] += 1
    if not counts.any():
        return None, float("nan")
    wrong = (flat_p != flat_t).sum(axis=1)
    scored = [(sums[i] / counts[i], -int(wrong[i]), i) for i in range(n) if counts[i]]
    score, _, index = min(scored)
    return int(index), float(score)
