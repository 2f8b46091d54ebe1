"""segmentation.postprocess: label statistics (voxels, ml) and the largest connected component."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from RetrievalSegLib.data.volume import Volume
from RetrievalSegLib.segmentation.postprocess import keep_largest_component, label_statistics

LABELS = [SimpleNamespace(value=1, name="liver"), SimpleNamespace(value=2, name="spleen"),
          SimpleNamespace(value=3, name="absent")]


def _labelmap() -> Volume:
    a = np.zeros((6, 8, 8), dtype=np.uint8)
    a[0:2, 0:2, 0:2] = 1  # 8 voxels: label 1's largest component
    a[4, 5, 5:8] = 1  # 3 voxels, apart
    a[2, 2, 2] = 1  # touches the 8-voxel block only at a corner: another component (face-connected rule)
    a[3:5, 0:2, 5:7] = 2  # 8 voxels
    a[5, 7, 0] = 2  # 1 voxel, apart
    d = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    return Volume(a, spacing=(2.0, 2.5, 4.0), origin=(10.0, -5.0, 3.0), direction=d)


def test_statistics_count_voxels_and_millilitres_from_the_spacing():
    stats = label_statistics(_labelmap(), LABELS)
    assert stats["liver"] == {"value": 1, "voxels": 12, "volume_ml": pytest.approx(12 * 0.02)}  # 2*2.5*4 mm^3
    assert stats["spleen"]["voxels"] == 9 and stats["spleen"]["volume_ml"] == pytest.approx(9 * 0.02)
    assert stats["absent"] == {"value": 3, "voxels": 0, "volume_ml": 0.0}


def test_keep_largest_keeps_one_face_connected_component_per_label_asked():
    lm = _labelmap()
    out, removed = keep_largest_component(lm, [1])
    assert removed == {1: 4}
    want = lm.array.copy()
    want[4, 5, 5:8] = 0
    want[2, 2, 2] = 0
    np.testing.assert_array_equal(out.array, want)  # label 2 untouched: not asked
    assert out.same_geometry(lm) and lm.array[2, 2, 2] == 1  # the input is not changed
    out, removed = keep_largest_component(lm, [1, 2, 3])
    assert removed == {1: 4, 2: 1, 3: 0}
    assert int((out.array == 2).sum()) == 8 and out.array[5, 7, 0] == 0
