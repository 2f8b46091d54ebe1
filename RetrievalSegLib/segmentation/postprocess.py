"""What other tools give beside a label map (TotalSegmentator's --statistics, nnU-Net's largest
component): per-label voxel counts and volumes in ml, and the largest 3D connected component of a
label. Both work on the finished label map, after segmentation; neither touches the models."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data.volume import Volume


def label_statistics(labelmap: Volume, labels: Sequence) -> dict[str, dict]:
    """{label name: {"value", "voxels", "volume_ml"}} for each of `labels` (objects with .value and
    .name, e.g. the bank's LabelInfo), absent labels included with 0. A voxel's volume is the
    product of the spacing (mm^3); 1 ml = 1000 mm^3."""
    voxel_ml = float(np.prod(np.asarray(labelmap.spacing, dtype=np.float64))) / 1000.0
    out: dict[str, dict] = {}
    for lab in labels:
        n = int(np.count_nonzero(labelmap.array == lab.value))
        out[str(lab.name)] = {"value": int(lab.value), "voxels": n, "volume_ml": n * voxel_ml}
    return out


def keep_largest_component(labelmap: Volume, values: Sequence[int]) -> tuple[Volume, dict[int, int]]:
    """A copy of `labelmap` where each label of `values` keeps only its largest 3D connected component
    (face-connected, SimpleITK `ConnectedComponent` + `RelabelComponent`); the voxels of the other
    components become background (0). Returns the new label map and, per value, the voxels removed.
    Geometry is unchanged."""
    import SimpleITK as sitk

    arr = labelmap.array.copy()
    removed: dict[int, int] = {}
    for v in values:
        mask = arr == v
        if not mask.any():
            removed[int(v)] = 0
            continue
        cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), False)
        largest = sitk.GetArrayFromImage(sitk.RelabelComponent(cc, sortByObjectSize=True)) == 1
        drop = mask & ~largest
        removed[int(v)] = int(np.count_nonzero(drop))
        arr[drop] = 0
    return labelmap.with_array(arr), removed
