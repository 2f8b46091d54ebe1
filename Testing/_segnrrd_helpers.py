"""World (RAS) points of a label, and reading a .seg.nrrd back through Slicer's own MRML reader:
shared by the .seg.nrrd and command-line tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from RetrievalSegLib.data.segnrrd import image_to_ras_matrix
from RetrievalSegLib.data.volume import Volume


def _ras_points(vol: Volume, value: int) -> np.ndarray:
    """RAS positions of the voxels of `vol` equal to `value`, sorted."""
    kji = np.argwhere(vol.array == value)
    ijk1 = np.c_[kji[:, ::-1], np.ones(len(kji))]
    return _sorted_rows((image_to_ras_matrix(vol) @ ijk1.T).T[:, :3])


def _sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(np.round(a, 6).T[::-1])]


def _slicer_read(slicer, scene, path: Path):  # type: ignore[no-untyped-def]
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    messages = storage.GetUserMessages()
    texts = [messages.GetNthMessageText(i) for i in range(messages.GetNumberOfMessages())]
    assert texts == [], texts
    return node


def _labelmap_points(rep, value: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """RAS positions of voxels equal to `value` in a Slicer vtkOrientedImageData, sorted."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    e = rep.GetExtent()
    dims = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    voxels = vtk_to_numpy(rep.GetPointData().GetScalars()).reshape(dims)
    kji = np.argwhere(voxels == value) + np.array([e[4], e[2], e[0]])
    m = vtk.vtkMatrix4x4()
    rep.GetImageToWorldMatrix(m)
    mat = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    ijk1 = np.c_[kji[:, ::-1], np.ones(len(kji))]
    return _sorted_rows((mat @ ijk1.T).T[:, :3])
