"""Synthetic cardiac study: geometry, label anatomy, smoothness and determinism."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from RetrievalSegLib.evaluation.metrics import dice
from RetrievalSegLib.data.synthetic import (
    DEFAULT_DIRECTION,
    LABEL_NAMES,
    LABELS,
    make_synthetic_study,
    rotation_matrix,
    write_study,
)
from RetrievalSegLib.data.volume import read_volume, through_plane_axis


@pytest.fixture(scope="module")
def study():  # type: ignore[no-untyped-def]
    return make_synthetic_study()


def test_labels_table() -> None:
    assert LABEL_NAMES == {1: "RV", 2: "Myo", 3: "LV"}
    colors = [rgb for _, rgb in LABELS.values()]
    assert all(len(c) == 3 and all(0.0 <= x <= 1.0 for x in c) for c in colors)
    assert len(set(colors)) == 3


def test_geometry(study) -> None:  # type: ignore[no-untyped-def]
    assert len(study) == 2
    assert [c.case_id for c in study] == ["synth000_000", "synth000_001"]
    d = np.array(DEFAULT_DIRECTION).reshape(3, 3)
    assert not np.allclose(d, np.eye(3))  # oblique
    np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(d) == pytest.approx(1.0)
    for case in study:
        img, lab = case.image, case.labels
        assert img.array.shape == lab.array.shape == (12, 64, 64)
        assert img.array.dtype == np.int16 and lab.array.dtype == np.uint8
        assert img.spacing == (1.0, 1.0, 4.0) and img.direction == DEFAULT_DIRECTION
        assert img.same_geometry(lab, tol=0.0)
        assert through_plane_axis(img.spacing) == 2


def test_custom_geometry() -> None:
    direction = rotation_matrix(0.0, 0.0, 90.0)
    (case,) = make_synthetic_study(1, shape=(6, 32, 40), spacing=(0.8, 0.9, 6.0), seed=3,
                                   direction=direction)
    assert case.image.array.shape == (6, 32, 40) and case.image.size == (40, 32, 6)
    assert case.labels.spacing == (0.8, 0.9, 6.0)
    np.testing.assert_allclose(case.labels.direction, (0, -1, 0, 1, 0, 0, 0, 0, 1), atol=1e-12)
    assert set(np.unique(case.labels.array)) == {0, 1, 2, 3}


def test_anatomy(study) -> None:  # type: ignore[no-untyped-def]
    for case in study:
        lab = case.labels.array
        present = [set(np.unique(s)) - {0} for s in lab]
        assert present[0] == set() and present[-1] == set()  # slices without any label
        assert sum(1 for p in present if p == {1, 2, 3}) >= 4
        for s in lab:
            lv, myo = s == 3, s == 2
            if lv.any():
                # LV is a disc enclosed by the myocardial ring: its 4-neighbours are LV or Myo.
                ring = np.zeros_like(lv)
                for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    ring |= np.roll(np.roll(lv, dy, 0), dx, 1)
                assert np.all(np.isin(s[ring & ~lv], (2,)))
                assert myo.sum() > 0
        img = case.image.array.astype(float)
        # MR-like contrast: blood pools bright, myocardium darker, plus noise.
        assert img[lab == 3].mean() > 1.8 * img[lab == 2].mean()
        assert img[lab == 1].mean() > 1.5 * img[lab == 2].mean()
        assert img[lab == 3].std() > 5.0
        assert img.min() >= 0 and img.max() < 4096


def test_smooth_through_slices_and_between_cases(study) -> None:  # type: ignore[no-untyped-def]
    a, b = (c.labels.array for c in study)
    for k in range(a.shape[0] - 1):
        if (a[k] == 3).any() and (a[k + 1] == 3).any():
            assert dice(a[k] == 3, a[k + 1] == 3) > 0.5
    assert 0.6 < dice(a > 0, b > 0) < 0.99  # similar hearts, not identical
    assert 0.5 < dice(a == 3, b == 3) < 0.99
    assert not np.array_equal(study[0].image.array, study[1].image.array)


def test_deterministic() -> None:
    first = make_synthetic_study(2, shape=(6, 32, 32), seed=7)
    again = make_synthetic_study(3, shape=(6, 32, 32), seed=7)
    other = make_synthetic_study(1, shape=(6, 32, 32), seed=8)
    for x, y in zip(first, again):  # case i does not depend on n_cases
        assert x.case_id == y.case_id
        assert np.array_equal(x.image.array, y.image.array)
        assert np.array_equal(x.labels.array, y.labels.array)
    assert not np.array_equal(first[0].image.array, other[0].image.array)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="n_cases"):
        make_synthetic_study(0)
    with pytest.raises(ValueError, match="too small"):
        make_synthetic_study(1, shape=(2, 64, 64))
    with pytest.raises(ValueError, match="orthonormal"):
        make_synthetic_study(1, direction=(1.0,) * 9)
    with pytest.raises(ValueError, match="positive"):
        make_synthetic_study(1, spacing=(1.0, 0.0, 1.0))


def test_write_study(tmp_path: Path) -> None:
    cases = make_synthetic_study(1, shape=(5, 24, 24))
    ((img_path, lab_path),) = write_study(cases, tmp_path / "study")
    assert img_path.name == "synth000_000_image.nii.gz"
    back = read_volume(lab_path)
    assert np.array_equal(back.array, cases[0].labels.array)
    assert back.same_geometry(cases[0].labels, tol=1e-5)
