"""Dice / HD95 on crafted masks with hand-computed values, plus a brute-force cross-check.

Spacing passed to hd95 is in the array's axis order (numpy axis 0, 1, 2).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from RetrievalSegLib.evaluation.metrics import (
    array_spacing,
    dice,
    hd95,
    mean_metrics,
    per_label_metrics,
    surface,
    surface_distances,
)
from RetrievalSegLib.data.volume import Volume


def _cube(shape: tuple[int, int, int], lo: tuple[int, int, int], size: int) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = True
    return m


def _brute_surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]):
    pa = np.argwhere(surface(a)) * np.asarray(spacing)
    pb = np.argwhere(surface(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return d.min(axis=1), d.min(axis=0)


# ---------------------------------------------------------------------------------- dice


def test_dice_crafted_overlaps() -> None:
    a = np.zeros((1, 4, 4), dtype=np.uint8)
    b = np.zeros_like(a)
    a[0, 0, :] = 1  # 4 voxels
    b[0, 0, :2] = 1  # 2 voxels, both inside a
    assert dice(a, b) == pytest.approx(2 * 2 / (4 + 2))
    b[0, 1, :2] = 1  # 4 voxels, 2 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(a, np.roll(a, 1, axis=1)) == 0.0  # disjoint
    # Nonzero means foreground, whatever the value.
    assert dice(a * 7, a.astype(bool)) == 1.0


def test_dice_empty_cases() -> None:
    empty = np.zeros((2, 3, 4), dtype=bool)
    full = np.ones_like(empty)
    assert dice(empty, empty) == 1.0
    assert dice(empty, full) == 0.0
    assert dice(full, empty) == 0.0


def test_dice_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        dice(np.zeros((2, 3)), np.zeros((3, 2)))


# ---------------------------------------------------------------------------------- hd95


def test_surface_of_a_cube() -> None:
    c = _cube((7, 7, 7), (1, 1, 1), 5)
    s = surface(c)
    assert s.sum() == 5**3 - 3**3  # the 3x3x3 core is interior
    assert not s[3, 3, 3] and s[1, 3, 3]
    # Voxels on the array border are surface (outside counts as background).
    assert surface(np.ones((3, 3, 3))).sum() == 26


def test_hd95_single_points_at_known_distance() -> None:
    a = np.zeros((4, 8, 10), dtype=bool)
    b = np.zeros_like(a)
    a[1, 2, 3] = True
    b[1, 5, 7] = True
    spacing = (2.0, 3.0, 0.5)
    expected = math.hypot(3 * 3.0, 4 * 0.5)  # sqrt(85)
    assert hd95(a, b, spacing) == pytest.approx(expected, rel=1e-6)
    assert hd95(b, a, spacing) == pytest.approx(expected, rel=1e-6)
    # Same voxel: distance 0.
    assert hd95(a, a, spacing) == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_shifted_cubes_equal_spacing_along_shift(axis: int) -> None:
    spacing = (4.0, 1.5, 0.7)  # deliberately anisotropic, array axis order
    a = _cube((10, 10, 10), (2, 2, 2), 5)
    b = np.roll(a, 1, axis=axis)
    # Every a-surface voxel is either on b's surface (0) or one step from it along `axis`;
    # a whole face (25 of 98 surface voxels per mask, > 5 %) is exactly one step away.
    assert hd95(a, b, spacing) == pytest.approx(spacing[axis], rel=1e-6)
    d_ab, d_ba = surface_distances(a, b, spacing)
    assert d_ab.max() == pytest.approx(spacing[axis], rel=1e-6)
    assert (np.isclose(d_ab, spacing[axis])).sum() >= 25


def test_hd95_ignores_a_few_outliers() -> None:
    # A big slab and the same slab plus one far voxel: the max (HD) is large, HD95 is 0.
    a = np.zeros((1, 40, 60), dtype=bool)
    a[0, 5:35, 5:30] = True
    b = a.copy()
    b[0, 20, 58] = True
    spacing = (1.0, 1.0, 1.0)
    d_ab, d_ba = surface_distances(a, b, spacing)
    assert max(d_ab.max(), d_ba.max()) == pytest.approx(29.0)
    assert hd95(a, b, spacing) == 0.0


def test_hd95_2d_masks() -> None:
    a = np.zeros((6, 6), dtype=bool)
    b = np.zeros_like(a)
    a[1, 1] = True
    b[4, 5] = True
    assert hd95(a, b, (2.0, 1.0)) == pytest.approx(math.hypot(6.0, 4.0))


def test_hd95_matches_brute_force_on_random_blobs() -> None:
    rng = np.random.default_rng(3)
    spacing = (3.0, 0.8, 1.1)
    for _ in range(3):
        a = rng.random((6, 12, 12)) > 0.7
        b = rng.random((6, 12, 12)) > 0.8
        d_ab, d_ba = surface_distances(a, b, spacing)
        r_ab, r_ba = _brute_surface_distances(a, b, spacing)
        np.testing.assert_allclose(d_ab, r_ab, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(d_ba, r_ba, rtol=1e-5, atol=1e-5)
        expected = np.percentile(np.concatenate([r_ab, r_ba]), 95)
        assert hd95(a, b, spacing) == pytest.approx(expected, rel=1e-5)


def test_hd95_empty_cases() -> None:
    empty = np.zeros((3, 4, 5), dtype=bool)
    one = empty.copy()
    one[1, 1, 1] = True
    assert hd95(empty, empty, (1.0, 1.0, 1.0)) == 0.0
    assert math.isnan(hd95(empty, one, (1.0, 1.0, 1.0)))
    assert math.isnan(hd95(one, empty, (1.0, 1.0, 1.0)))


def test_hd95_bad_spacing() -> None:
    a = np.ones((2, 2, 2))
    with pytest.raises(ValueError, match="3 values"):
        hd95(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        hd95(a, a, (1.0, 0.0, 1.0))


# ---------------------------------------------------------------------------- per label


def test_per_label_metrics_arrays_and_volumes() -> None:
    truth = np.zeros((5, 10, 10), dtype=np.uint8)
    truth[1:4, 2:6, 2:6] = 1
    truth[1:4, 6:9, 6:9] = 2
    pred = truth.copy()
    pred[pred == 2] = 0
    pred[1:4, 7:9, 6:9] = 2  # label 2 shifted/partly missing
    labels = {1: "LV", 2: "Myo", 3: "RV"}  # RV absent from both
    spacing_kji = (4.0, 1.0, 1.0)
    m = per_label_metrics(pred, truth, labels, spacing_kji)
    assert list(m) == ["LV", "Myo", "RV"]
    assert m["LV"] == {"label": 1, "dice": 1.0, "hd95": 0.0, "pred_voxels": 48, "truth_voxels": 48}
    assert m["Myo"]["dice"] == pytest.approx(2 * 18 / (18 + 27))
    assert m["Myo"]["hd95"] == pytest.approx(1.0)
    assert m["RV"]["dice"] == 1.0 and m["RV"]["hd95"] == 0.0 and m["RV"]["truth_voxels"] == 0

    # Volumes: spacing comes from the geometry, converted from ITK (i, j, k) to array order.
    geo = dict(spacing=(1.0, 1.0, 4.0), origin=(1.0, 2.0, 3.0))
    mv = per_label_metrics(Volume(pred, **geo), Volume(truth, **geo), labels)
    assert mv == m
    assert array_spacing(Volume(pred, **geo)) == spacing_kji

    summary = mean_metrics(m)
    assert summary["dice"] == pytest.approx((1.0 + m["Myo"]["dice"] + 1.0) / 3)
    assert summary["hd95_nan_count"] == 0


def test_per_label_metrics_errors() -> None:
    a = np.zeros((2, 3, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="spacing is required"):
        per_label_metrics(a, a, {1: "x"})
    with pytest.raises(ValueError, match="unique"):
        per_label_metrics(a, a, {1: "x", 2: "x"}, (1, 1, 1))
    with pytest.raises(ValueError, match="label 0"):
        per_label_metrics(a, a, {0: "bg"}, (1, 1, 1))
    v1 = Volume(a, spacing=(1.0, 1.0, 1.0))
    v2 = Volume(a, spacing=(1.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="different geometry"):
        per_label_metrics(v1, v2, {1: "x"})


def test_mean_metrics_counts_nan() -> None:
    per = {"a": {"dice": 0.0, "hd95": float("nan")}, "b": {"dice": 1.0, "hd95": 2.0}}
    assert mean_metrics(per) == {"dice": 0.5, "hd95": 2.0, "hd95_nan_count": 1}
