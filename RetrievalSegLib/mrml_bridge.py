"""Between 3D Slicer's MRML nodes and RetrievalSegLib's numpy world, plus the module's logic.

Everything that touches `slicer` / `vtk` imports them inside the function, so this module imports
(and its pure-Python parts run) without Slicer. Conventions:

* A volume node's IJKToRAS matrix is Slicer's geometry; `Volume` keeps ITK/LPS geometry. The two
  differ only by the sign of the first two world axes (RAS = diag(-1, -1, 1) LPS), so converting is
  exact: spacing, origin and direction round-trip bit for bit.
* Node-local coordinates are used throughout (parent transforms are not applied); a volume and a
  segmentation under different parent transforms are refused, since "the same slice" would then
  mean different voxels.
* Segments are matched to bank labels by name (case-insensitive, as Slicer matches them).
* MRML is touched only from the thread that calls these functions; `RetrievalSegLogic` runs the
  models on a worker thread that sees numpy arrays only and reports through a queue.
"""
from __future__ import annotations

import copy
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .volume import (
    AXIS_NAMES,
    Volume,
    in_plane_spacing,
    num_slices,
    parse_axis,
    slice_view,
    through_plane_axis,
)

#: RAS = LPS_TO_RAS @ LPS (and back: the matrix is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
#: Segment tag recording the bank label value a segment was written from.
LABEL_VALUE_TAG = "RetrievalSeg.LabelValue"
#: Default name of a segmentation node made for a volume: "<volume name> RetrievalSeg".
SEGMENTATION_SUFFIX = " RetrievalSeg"


# ============================================================================ geometry
def ijk_to_ras_matrix(volume_node: Any) -> np.ndarray:
    """4x4 IJK -> RAS matrix of a volume node (node-local, no parent transform)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_ijk_to_ras(vol: Volume) -> np.ndarray:
    """4x4 IJK -> RAS matrix of a `Volume` (exact: only signs change from LPS)."""
    m = np.eye(4)
    direction = np.asarray(vol.direction, dtype=float).reshape(3, 3)
    m[:3, :3] = (LPS_TO_RAS @ direction) * np.asarray(vol.spacing)[None, :]
    m[:3, 3] = LPS_TO_RAS @ np.asarray(vol.origin, dtype=float)
    return m


def _node_geometry(volume_node: Any) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, LPS origin, LPS direction row-major) of a volume node, exactly."""
    import vtk

    directions = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(directions)
    ras_dir = np.array([[directions.GetElement(r, c) for c in range(3)] for r in range(3)])
    lps_dir = LPS_TO_RAS @ ras_dir
    origin = LPS_TO_RAS @ np.asarray(volume_node.GetOrigin(), dtype=float)
    spacing = tuple(float(s) for s in volume_node.GetSpacing())
    return spacing, tuple(float(o) + 0.0 for o in origin), tuple(float(d) + 0.0 for d in lps_dir.ravel())


def _set_node_geometry(volume_node: Any, vol: Volume) -> None:
    """Give a volume node `vol`'s geometry (spacing, origin, directions)."""
    import vtk

    ras_dir = LPS_TO_RAS @ np.asarray(vol.direction, dtype=float).reshape(3, 3)
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, float(ras_dir[r, c]) + 0.0)
    volume_node.SetIJKToRASDirectionMatrix(m)
    volume_node.SetSpacing(*vol.spacing)
    origin = LPS_TO_RAS @ np.asarray(vol.origin, dtype=float)
    volume_node.SetOrigin(*(float(o) + 0.0 for o in origin))


def slice_index_from_ras(volume_node: Any, axis: int | str, ras: Sequence[float]) -> int:
    """Index of the slice along IJK `axis` nearest to the RAS point (may lie outside the volume)."""
    ax = _explicit_axis(axis)
    ijk = np.linalg.solve(ijk_to_ras_matrix(volume_node), np.r_[np.asarray(ras, float)[:3], 1.0])
    return int(np.floor(ijk[ax] + 0.5))


def slice_center_ras(volume_node: Any, axis: int | str, index: int) -> tuple[float, float, float]:
    """RAS position of the centre of slice `index` along IJK `axis`."""
    ax = _explicit_axis(axis)
    dims = volume_node.GetImageData().GetDimensions()
    ijk = np.array([(d - 1) / 2.0 for d in dims] + [1.0])
    ijk[ax] = index
    ras = ijk_to_ras_matrix(volume_node) @ ijk
    return (float(ras[0]), float(ras[1]), float(ras[2]))


def _explicit_axis(axis: int | str) -> int:
    ax = parse_axis(axis)
    if ax is None:
        raise ValueError("an explicit slice axis (i, j or k) is needed here, not 'auto'")
    return ax


# ============================================================================ volumes
def volume_from_node(volume_node: Any) -> Volume:
    """The voxels ([k, j, i] copy) and exact ITK/LPS geometry of a scalar volume node."""
    from vtk.util.numpy_support import vtk_to_numpy

    if volume_node is None:
        raise ValueError("no volume node given")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"volume {volume_node.GetName()!r} holds no image data")
    ncomp = image.GetNumberOfScalarComponents()
    if ncomp != 1:
        raise ValueError(
            f"volume {volume_node.GetName()!r} has {ncomp} components per voxel; RetrievalSeg needs "
            "a scalar volume (convert it with the Vector to Scalar Volume module)"
        )
    dims = image.GetDimensions()  # (i, j, k)
    if min(dims) < 1:
        raise ValueError(f"volume {volume_node.GetName()!r} is empty (dimensions {dims})")
    array = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).copy()
    spacing, origin, direction = _node_geometry(volume_node)
    metadata = {"name": volume_node.GetName() or ""}
    return Volume(array, spacing, origin, direction, metadata)


def volume_to_node(vol: Volume, scene: Any, name: str) -> Any:
    """A new vtkMRMLScalarVolumeNode in `scene` holding `vol` with its exact geometry."""
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    array = vol.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    image = vtk.vtkImageData()
    k, j, i = array.shape
    image.SetDimensions(i, j, k)
    scalars = numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    _set_node_geometry(node, vol)
    node.CreateDefaultDisplayNodes()
    return node


def _grid_image(volume_node: Any, extent: Sequence[int] | None = None, allocate: bool = False) -> Any:
    """A vtkOrientedImageData on the volume's grid (optionally a sub-extent), uint8 zeros."""
    import slicer
    import vtk

    dims = volume_node.GetImageData().GetDimensions()
    full = (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*(extent if extent is not None else full))
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    image.SetImageToWorldMatrix(m)
    if allocate:
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        image.GetPointData().GetScalars().Fill(0)
    return image


def _image_array(image: Any) -> np.ndarray:
    """[k, j, i] numpy view of a single-component vtkImageData."""
    from vtk.util.numpy_support import vtk_to_numpy

    e = image.GetExtent()
    shape = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)


def _slice_extent(volume_node: Any, axis: int, index: int) -> tuple[int, ...]:
    dims = volume_node.GetImageData().GetDimensions()
    if not 0 <= index < dims[axis]:
        raise IndexError(
            f"slice {index} is outside 0..{dims[axis] - 1} along axis {AXIS_NAMES[axis]} of "
            f"volume {volume_node.GetName()!r}"
        )
    extent = [0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1]
    extent[2 * axis] = extent[2 * axis + 1] = index
    return tuple(extent)


# ============================================================================ labels & segments
@dataclass(frozen=True)
class _Label:
    value: int
    name: str
    color: tuple[float, float, float]


def _labels(labels: Iterable[Any]) -> list[_Label]:
    """Normalise LabelInfo / SegmentInfo / (value, name, color) items."""
    out = []
    for lab in labels:
        if isinstance(lab, tuple):
            value, name, color = lab
        else:
            value = getattr(lab, "value", None)
            if value is None:
                value = lab.label_value  # segnrrd.SegmentInfo
            name, color = lab.name, getattr(lab, "color", (0.5, 0.5, 0.5))
        out.append(_Label(int(value), str(name), tuple(float(c) for c in color)))  # type: ignore[arg-type]
    names = [lab.name.lower() for lab in out]
    if len(set(names)) != len(names):
        raise ValueError(f"label names must be unique (segments are matched by name): {names}")
    return out


def _check_same_transform(volume_node: Any, segmentation_node: Any) -> None:
    a, b = volume_node.GetTransformNodeID(), segmentation_node.GetTransformNodeID()
    if a != b:
        raise ValueError(
            f"volume {volume_node.GetName()!r} (transform {a}) and segmentation "
            f"{segmentation_node.GetName()!r} (transform {b}) are under different parent "
            "transforms; harden the transforms or put both under the same one"
        )


def segment_ids_for_labels(segmentation_node: Any, labels: Iterable[Any]) -> dict[int, str | None]:
    """{label value: ID of the segment with that label's name, or None when there is none}."""
    seg = segmentation_node.GetSegmentation()
    out: dict[int, str | None] = {}
    for lab in _labels(labels):
        sid = seg.GetSegmentIdBySegmentName(lab.name)
        out[lab.value] = sid or None
    return out


def labels_from_segmentation(segmentation_node: Any) -> list[Any]:
    """Bank labels (LabelInfo, values 1..N in segment order) from a segmentation's segments."""
    from .bank import LabelInfo

    seg = segmentation_node.GetSegmentation()
    labels = []
    for n in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(n)
        color = tuple(min(1.0, max(0.0, float(c))) for c in segment.GetColor())
        labels.append(LabelInfo(n + 1, segment.GetName(), color))
    if not labels:
        raise ValueError(
            f"segmentation {segmentation_node.GetName()!r} has no segments; create one segment "
            "per structure in the Segment Editor first"
        )
    return labels


def _read_masks(
    segmentation_node: Any,
    reference_volume_node: Any,
    segment_ids: Mapping[int, str | None],
    extent: Sequence[int] | None = None,
) -> dict[int, np.ndarray]:
    """{value: bool [k, j, i] mask on the volume grid (or its sub-extent)} of the given segments."""
    import slicer

    _check_same_transform(reference_volume_node, segmentation_node)
    reference = _grid_image(reference_volume_node, extent)
    e = reference.GetExtent()
    shape = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    if any(sid for sid in segment_ids.values()):
        segmentation_node.GetSegmentation().CreateRepresentation(
            slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        )
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    out: dict[int, np.ndarray] = {}
    for value, sid in segment_ids.items():
        mask = np.zeros(shape, dtype=bool)
        if sid:
            rep = slicer.vtkOrientedImageData()
            ok = logic.GetSegmentBinaryLabelmapRepresentation(segmentation_node, sid, rep, False)
            re = rep.GetExtent()
            if ok and re[0] <= re[1] and re[2] <= re[3] and re[4] <= re[5]:
                resampled = slicer.vtkOrientedImageData()
                slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                    rep, reference, resampled, False, False
                )
                if resampled.GetPointData().GetScalars() is not None:
                    # A shared labelmap layer holds every segment of the layer, each with its
                    # own label value: keep only this segment's.
                    value_in_layer = segmentation_node.GetSegmentation().GetSegment(sid).GetLabelValue()
                    voxels = _image_array(resampled)
                    if voxels.shape != shape:
                        raise RuntimeError(
                            f"segment {sid!r} resampled to {voxels.shape} voxels, expected {shape}"
                        )
                    mask = voxels == value_in_layer
        out[value] = mask
    return out


def _write_mask(segmentation_node: Any, segment_id: str, volume_node: Any, mask: np.ndarray) -> None:
    """Replace a segment's voxels by a bool [k, j, i] mask on the volume grid."""
    import slicer

    image = _grid_image(volume_node, allocate=True)
    _image_array(image)[...] = mask
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise RuntimeError(f"Slicer could not write segment {segment_id!r} of {segmentation_node.GetName()!r}")


def segment_masks(
    segmentation_node: Any, reference_volume_node: Any, labels: Iterable[Any]
) -> dict[int, np.ndarray]:
    """{label value: bool [k, j, i] mask on the volume grid} of the segments named like `labels`."""
    return _read_masks(segmentation_node, reference_volume_node, segment_ids_for_labels(segmentation_node, labels))


def labelmap_from_segmentation(
    segmentation_node: Any, reference_volume_node: Any, labels: Iterable[Any]
) -> Volume:
    """One label map on the volume grid from the segments named like `labels` (later labels win)."""
    labs = _labels(labels)
    masks = segment_masks(segmentation_node, reference_volume_node, labs)
    dtype = np.uint8 if max(lab.value for lab in labs) < 256 else np.uint16
    spacing, origin, direction = _node_geometry(reference_volume_node)
    out = np.zeros(next(iter(masks.values())).shape, dtype=dtype)
    for lab in labs:
        out[masks[lab.value]] = lab.value
    return Volume(out, spacing, origin, direction)


def segment_slice_masks(
    segmentation_node: Any,
    reference_volume_node: Any,
    axis: int | str,
    index: int,
    labels: Iterable[Any],
) -> dict[int, np.ndarray]:
    """{label value: bool 2D mask} of one slice (as `slice_view` orders it), on the volume grid.

    Labels without a segment of that name give empty masks; no matching segment at all is an
    error (the user probably renamed the segments).
    """
    ax = _explicit_axis(axis)
    labs = _labels(labels)
    ids = segment_ids_for_labels(segmentation_node, labs)
    if not any(ids.values()):
        names = ", ".join(lab.name for lab in labs)
        raise ValueError(
            f"segmentation {segmentation_node.GetName()!r} has no segment named like the bank's "
            f"labels ({names}); rename the segments to match"
        )
    masks = _read_masks(segmentation_node, reference_volume_node, ids, _slice_extent(reference_volume_node, ax, index))
    return {v: np.array(slice_view(m, ax, 0)) for v, m in masks.items()}


def _place_in_study(scene: Any, volume_node: Any, segmentation_node: Any) -> None:
    """Put the segmentation beside the volume in the subject hierarchy (its study), if any."""
    sh = scene.GetSubjectHierarchyNode()
    if sh is None:
        return
    invalid = sh.GetInvalidItemID()
    volume_item = sh.GetItemByDataNode(volume_node)
    if volume_item == invalid:
        return
    parent = sh.GetItemParent(volume_item)
    if parent == invalid:
        return
    item = sh.GetItemByDataNode(segmentation_node)
    if item == invalid:
        sh.CreateItem(parent, segmentation_node)
    elif sh.GetItemParent(item) != parent:
        sh.SetItemParent(item, parent)


def labelmap_to_segmentation(
    seg: Any,
    scene: Any,
    reference_volume_node: Any,
    segmentation_node: Any = None,
    name: str | None = None,
    *,
    axis: int | str | None = None,
    slices: Iterable[int] | None = None,
) -> Any:
    """Write a result into segments named and coloured from the bank labels; return the node.

    `seg` is a `segment.VolumeSegmentation` (its segmented slices along its axis are written) or a
    `(labelmap Volume, labels)` pair (every slice is written unless `axis` and `slices` say
    which). Segments that already exist with a label's name are updated in place, keeping their
    other slices, colour and ID; missing ones are added with the bank's name and colour. A new
    node gets the volume's reference geometry, parent transform and subject-hierarchy study.
    """
    import slicer

    if hasattr(seg, "labelmap"):
        labelmap, labels = seg.labelmap, seg.labels
        if slices is None:
            slices = sorted(seg.slices)
            axis = seg.axis
    else:
        labelmap, labels = seg
    labs = _labels(labels)
    spacing, origin, direction = _node_geometry(reference_volume_node)
    dims = reference_volume_node.GetImageData().GetDimensions()
    if labelmap.array.shape != tuple(dims[::-1]) or not _same_geometry(labelmap, spacing, origin, direction):
        raise ValueError(
            f"label map (size {labelmap.size}, spacing {labelmap.spacing}, origin "
            f"{labelmap.origin}) is not on the grid of volume {reference_volume_node.GetName()!r} "
            f"(size {tuple(dims)}, spacing {spacing}, origin {origin}); resample it onto the "
            "volume first (volume.resample_like)"
        )
    region: np.ndarray | None = None  # bool [k, j, i]: voxels this call owns
    if slices is not None:
        ax = _explicit_axis(axis if axis is not None else through_plane_axis(labelmap.spacing))
        region = np.zeros(labelmap.array.shape, dtype=bool)
        n = num_slices(region, ax)
        for i in slices:
            if not 0 <= int(i) < n:
                raise IndexError(f"slice {i} is outside 0..{n - 1} along axis {AXIS_NAMES[ax]}")
            slice_view(region, ax, int(i))[...] = True

    if segmentation_node is None:
        node_name = name or f"{reference_volume_node.GetName()}{SEGMENTATION_SUFFIX}"
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", node_name)
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
    elif name:
        segmentation_node.SetName(name)
    _check_same_transform(reference_volume_node, segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0 or not segmentation_node.GetNodeReference(
        segmentation_node.GetReferenceImageGeometryReferenceRole()
    ):
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    _place_in_study(scene, reference_volume_node, segmentation_node)

    ids: dict[int, str] = {}
    new: set[int] = set()
    for lab in labs:
        sid = segmentation.GetSegmentIdBySegmentName(lab.name)
        if not sid:
            sid = segmentation.AddEmptySegment("", lab.name, list(lab.color))
            new.add(lab.value)
        segment = segmentation.GetSegment(sid)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        segment.SetTag(LABEL_VALUE_TAG, str(lab.value))
        ids[lab.value] = sid

    old = _read_masks(reference_volume_node=reference_volume_node, segmentation_node=segmentation_node,
                      segment_ids={v: (None if v in new else ids[v]) for v in ids})
    wanted: dict[int, np.ndarray] = {}
    for lab in labs:
        target = labelmap.array == lab.value
        wanted[lab.value] = target if region is None else np.where(region, target, old[lab.value])
    _replace_masks(segmentation_node, reference_volume_node, ids, old, wanted, force=new)
    return segmentation_node


def _replace_masks(
    segmentation_node: Any,
    volume_node: Any,
    ids: Mapping[Any, str],
    old: Mapping[Any, np.ndarray],
    wanted: Mapping[Any, np.ndarray],
    force: Iterable[Any] = (),
) -> None:
    """Give segments `ids[key]` the masks `wanted[key]` (currently `old[key]`), changed ones only."""
    segmentation = segmentation_node.GetSegmentation()
    force = set(force)
    current = dict(old)
    was_modified = segmentation_node.StartModify()
    try:
        layers_before = segmentation.GetNumberOfLayers()
        # Two passes so that no segment ever overlaps another in the shared labelmap (an overlap
        # would split the segments into separate layers): first remove voxels, then add them.
        for key, sid in ids.items():
            shrunk = current[key] & wanted[key]
            if not np.array_equal(shrunk, current[key]):
                _write_mask(segmentation_node, sid, volume_node, shrunk)
                current[key] = shrunk
        for key, sid in ids.items():
            if key in force or not np.array_equal(wanted[key], current[key]):
                _write_mask(segmentation_node, sid, volume_node, wanted[key])
        if segmentation.GetNumberOfLayers() > max(1, layers_before):
            segmentation.CollapseBinaryLabelmaps(False)
    finally:
        segmentation_node.EndModify(was_modified)


def _same_geometry(
    vol: Volume, spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float], tol: float = 1e-6
) -> bool:
    """True when `vol` has this spacing, origin and direction (within `tol`)."""
    return (
        np.allclose(vol.spacing, spacing, atol=tol)
        and np.allclose(vol.origin, origin, atol=tol)
        and np.allclose(vol.direction, direction, atol=tol)
    )


# ============================================================================ edits
@dataclass
class SegmentationSnapshot:
    """The bank-label segments of a segmentation as last written, to find the user's edits.

    `codes` holds one bit per label (bit n = labels[n]), so overlapping segments are kept exactly.
    """

    codes: np.ndarray  # [k, j, i] unsigned
    labels: tuple[tuple[int, str], ...]  # (value, name) in bit order
    axis: int
    segmented: tuple[int, ...]  # slices the automatic result wrote

    def slice_codes(self, index: int) -> np.ndarray:
        """The bit codes of one slice along `axis`."""
        return slice_view(self.codes, self.axis, index)


def _encode(masks: Mapping[int, np.ndarray], values: Sequence[int]) -> np.ndarray:
    n = len(values)
    dtype = next(t for t, bits in ((np.uint8, 8), (np.uint16, 16), (np.uint32, 32), (np.uint64, 64)) if n <= bits)
    if n > 64:
        raise ValueError(f"at most 64 labels can be tracked for edits, got {n}")
    shape = next(iter(masks.values())).shape
    codes = np.zeros(shape, dtype=dtype)
    for bit, value in enumerate(values):
        codes |= masks[value].astype(dtype) << dtype(bit)
    return codes


def snapshot_segmentation(
    segmentation_node: Any,
    reference_volume_node: Any,
    labels: Iterable[Any],
    axis: int | str,
    segmented: Iterable[int] = (),
) -> SegmentationSnapshot:
    """Remember the bank-label segments as they are now (call right after writing a result)."""
    labs = _labels(labels)
    masks = segment_masks(segmentation_node, reference_volume_node, labs)
    return SegmentationSnapshot(
        _encode(masks, [lab.value for lab in labs]),
        tuple((lab.value, lab.name) for lab in labs),
        _explicit_axis(axis),
        tuple(sorted(int(i) for i in segmented)),
    )


def edited_slices(
    segmentation_node: Any, reference_volume_node: Any, snapshot: SegmentationSnapshot
) -> list[int]:
    """Slices (along the snapshot's axis) where the segments now differ from the snapshot."""
    labs = [_Label(v, name, (0.5, 0.5, 0.5)) for v, name in snapshot.labels]
    masks = segment_masks(segmentation_node, reference_volume_node, labs)
    codes = _encode(masks, [lab.value for lab in labs])
    if codes.shape != snapshot.codes.shape:
        raise ValueError("the volume's size changed since the result was written")
    differs = codes != snapshot.codes
    other = tuple(a for a in range(3) if a != 2 - snapshot.axis)
    return [int(i) for i in np.flatnonzero(differs.any(axis=other))]


# ============================================================================ bank
def _embedder(engine_or_embedder: Any) -> Any:
    return getattr(engine_or_embedder, "embedder", engine_or_embedder)


def add_slice_to_bank(
    bank: Any,
    engine_or_embedder: Any,
    volume_node: Any,
    segmentation_node: Any,
    axis: int | str,
    index: int,
    case_id: str,
    *,
    window: tuple[float, float] | None = None,
    volume: Volume | None = None,
    origin: str = "correction",
) -> Any:
    """Add one slice of the volume with the user's masks from the segmentation to the bank.

    The slice is windowed exactly as `segment_volume` windows it (`window`, default the whole
    volume's robust percentiles), so the bank holds what the models will see. An older entry of the
    same case, axis and slice is retired by the bank.
    """
    from .segment import window_for_volume

    ax = _explicit_axis(axis)
    vol = volume if volume is not None else volume_from_node(volume_node)
    masks = segment_slice_masks(segmentation_node, volume_node, ax, int(index), bank.labels)
    bounds = window_for_volume(vol, window)
    image = np.array(slice_view(vol.array, ax, int(index)))
    return bank.add_slice(
        image,
        masks,
        case_id,
        ax,
        int(index),
        in_plane_spacing(vol.spacing, ax),
        _embedder(engine_or_embedder),
        origin=origin,
        window=bounds,
    )


def add_annotated_slices_to_bank(
    bank: Any,
    engine_or_embedder: Any,
    volume_node: Any,
    segmentation_node: Any,
    case_id: str,
    *,
    axis: int | str | None = None,
    window: tuple[float, float] | None = None,
    origin: str = "initial",
) -> list[Any]:
    """Add every slice that holds any bank-label segment voxel (the user's first annotations)."""
    from .segment import window_for_volume

    vol = volume_from_node(volume_node)
    labelmap = labelmap_from_segmentation(segmentation_node, volume_node, bank.labels)
    if not labelmap.array.any():
        names = ", ".join(lab.name for lab in bank.labels)
        raise ValueError(
            f"segmentation {segmentation_node.GetName()!r} has nothing drawn in segments named "
            f"like the bank's labels ({names}) on volume {volume_node.GetName()!r}"
        )
    return bank.add_volume(
        vol,
        labelmap,
        case_id,
        _embedder(engine_or_embedder),
        axis=axis,
        window=window_for_volume(vol, window),
        origin=origin,
    )


def case_id_for_volume(volume_node: Any) -> str:
    """A stable case ID: the DICOM study UID of the volume's study if known, else its name."""
    scene = volume_node.GetScene()
    sh = scene.GetSubjectHierarchyNode() if scene is not None else None
    if sh is not None:
        item = sh.GetItemByDataNode(volume_node)
        if item != sh.GetInvalidItemID():
            parent = sh.GetItemParent(item)
            if parent != sh.GetInvalidItemID():
                uid = sh.GetItemUID(parent, "DICOM")
                if uid:
                    return uid
    name = (volume_node.GetName() or "").strip()
    return name or volume_node.GetID()


# ============================================================================ thumbnails
@dataclass
class SupportThumbnail:
    """A retrieved support slice drawn for the "Why this mask" panel."""

    entry_id: str
    score: float
    case_id: str
    axis: int
    index: int
    origin: str
    rgb: np.ndarray  # [H, W, 3] uint8, masks blended in the label colours

    @property
    def caption(self) -> str:
        """Short text under the thumbnail."""
        return f"{self.score:.3f}  {self.case_id} {AXIS_NAMES[self.axis]}={self.index}"


def overlay_masks(
    image_u8: np.ndarray,
    masks: Mapping[int, np.ndarray],
    colors: Mapping[int, Sequence[float]],
    alpha: float = 0.45,
) -> np.ndarray:
    """RGB uint8 of a grey slice with each mask blended in its colour (RGB 0..1)."""
    rgb = np.repeat(np.asarray(image_u8, dtype=np.float32)[..., None], 3, axis=2)
    for value, mask in masks.items():
        m = np.asarray(mask, dtype=bool)
        if m.any():
            color = np.asarray(colors.get(value, (1.0, 1.0, 0.0)), dtype=np.float32) * 255.0
            rgb[m] = (1.0 - alpha) * rgb[m] + alpha * color
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _fit(rgb: np.ndarray, size: int, spacing: Sequence[float] | None) -> np.ndarray:
    """Resize to fit a size x size box, keeping the physical aspect ratio."""
    from PIL import Image

    h, w = rgb.shape[:2]
    sy, sx = (float(spacing[0]), float(spacing[1])) if spacing else (1.0, 1.0)
    ph, pw = h * sy, w * sx
    scale = size / max(ph, pw)
    nh, nw = max(1, int(round(ph * scale))), max(1, int(round(pw * scale)))
    return np.array(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))


def support_thumbnails(
    bank: Any, retrieved: Sequence[tuple[str, float]], size: int = 96
) -> list[SupportThumbnail]:
    """Thumbnails of the retrieved supports (entry id, score) with their masks in label colours."""
    colors = {lab.value: lab.color for lab in bank.labels}
    entries = {e.id: e for e in bank.entries(include_retired=True)}
    out = []
    for entry_id, score in retrieved:
        e = entries.get(entry_id)
        if e is None:
            continue
        data = bank.load_entry(entry_id)
        rgb = _fit(overlay_masks(data.image, data.masks, colors), size, e.spacing)
        out.append(SupportThumbnail(entry_id, float(score), e.case_id, e.axis, e.index, e.origin, rgb))
    return out


# ============================================================================ background jobs
@dataclass
class JobEvent:
    """One message from a background job to the main thread."""

    kind: str  # "status", "progress", "finished", "cancelled", "failed"
    message: str = ""
    done: int = 0
    total: int = 0
    elapsed_s: float = 0.0
    remaining_s: float | None = None  # estimated, once some progress is made
    result: Any = None
    error: BaseException | None = None
    traceback: str = ""

    @property
    def terminal(self) -> bool:
        """True for the job's last event."""
        return self.kind in ("finished", "cancelled", "failed")


class JobCancelled(Exception):
    """Raised inside a job's function to stop it as cancelled."""


class JobContext:
    """What a job function gets: progress reporting and the cancel flag."""

    def __init__(self, events: "queue.Queue[JobEvent]", cancel_event: threading.Event) -> None:
        self._events = events
        self._cancel = cancel_event
        self._t0 = time.monotonic()
        self._progress_t0: float | None = None

    def cancelled(self) -> bool:
        """True once the user asked to cancel."""
        return self._cancel.is_set()

    def status(self, message: str) -> None:
        """Report what the job is doing now."""
        self._events.put(JobEvent("status", message, elapsed_s=time.monotonic() - self._t0))

    def progress(self, done: int, total: int, message: str = "") -> None:
        """Report `done` of `total` units; the time left is extrapolated from the rate so far."""
        now = time.monotonic()
        if self._progress_t0 is None:
            self._progress_t0 = now
        remaining = None
        if done > 0 and total >= done:
            remaining = (now - self._progress_t0) / done * (total - done)
        self._events.put(
            JobEvent("progress", message, int(done), int(total), now - self._t0, remaining)
        )

    def restart_clock(self) -> None:
        """Measure the rate from the next progress report on (e.g. after models are loaded)."""
        self._progress_t0 = None


class BackgroundJob:
    """Run `function(context)` on a worker thread; the main thread polls its events."""

    def __init__(self, name: str, function: Callable[[JobContext], Any]) -> None:
        self.name = name
        self._function = function
        self._events: "queue.Queue[JobEvent]" = queue.Queue()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.outcome: str | None = None  # the terminal event kind, once known

    def start(self) -> "BackgroundJob":
        """Start the worker thread."""
        if self._thread is not None:
            raise RuntimeError(f"job {self.name!r} was already started")
        self._thread = threading.Thread(target=self._run, name=f"RetrievalSeg-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        ctx = JobContext(self._events, self._cancel)
        t0 = time.monotonic()
        try:
            result = self._function(ctx)
        except JobCancelled:
            self._events.put(JobEvent("cancelled", f"{self.name} cancelled", elapsed_s=time.monotonic() - t0))
        except BaseException as e:  # reported to the main thread, never swallowed
            self._events.put(
                JobEvent(
                    "failed", f"{type(e).__name__}: {e}", elapsed_s=time.monotonic() - t0,
                    error=e, traceback=traceback.format_exc(),
                )
            )
        else:
            kind = "cancelled" if self._cancel.is_set() else "finished"
            self._events.put(JobEvent(kind, self.name, elapsed_s=time.monotonic() - t0, result=result))

    @property
    def running(self) -> bool:
        """True while the worker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def cancel(self) -> None:
        """Ask the job to stop at its next check."""
        self._cancel.set()

    def poll(self) -> list[JobEvent]:
        """All events reported since the last poll (never blocks)."""
        out = []
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                break
            self._note(ev)
            out.append(ev)
        return out

    def wait(self, timeout: float | None = None) -> list[JobEvent]:
        """Block until the job ends (or `timeout`), then return the pending events."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.poll()

    def _note(self, ev: JobEvent) -> None:
        if ev.terminal:
            self.outcome = ev.kind
            self.result, self.error = ev.result, ev.error


# ============================================================================ engine settings
@dataclass(frozen=True)
class EngineSettings:
    """Which models to load and where from; equal settings reuse the loaded engine."""

    sam2_size: str = "tiny"
    dinov2_size: str = "small"
    device: str = "auto"
    image_size: int = 1024
    weights_dir: str | None = None  # None: $RSEG_WEIGHTS_DIR or the per-user cache
    random_weights: bool = False  # tests and demos only: meaningless output
    seed: int = 0

    def load(self) -> Any:
        """Load the RetrievalEngine these settings describe."""
        from .pipeline import RetrievalEngine

        kwargs: dict[str, Any] = {}
        if self.weights_dir and not self.random_weights:
            from .weights import dinov2_folder_path, sam2_checkpoint_path

            kwargs["sam2_checkpoint"] = sam2_checkpoint_path(self.sam2_size, self.weights_dir)
            kwargs["dinov2_path"] = dinov2_folder_path(self.dinov2_size, self.weights_dir)
        return RetrievalEngine.load(
            self.sam2_size,
            self.dinov2_size,
            device=self.device,
            image_size=int(self.image_size),
            random_weights=self.random_weights,
            seed=self.seed,
            **kwargs,
        )

    def missing_downloads(self) -> list[Any]:
        """The weight files these settings need that are not in the weights folder yet."""
        if self.random_weights:
            return []
        from .weights import is_complete, plan_downloads

        items = plan_downloads((self.sam2_size,), (self.dinov2_size,), dest_dir=self.weights_dir)
        return [it for it in items if not is_complete(it)]


def download_job(items: Sequence[Any]) -> BackgroundJob:
    """A job that downloads weight files (weights.download) with progress and cancel."""
    from . import weights

    items = list(items)

    def run(ctx: JobContext) -> list[Path]:
        def progress(done: int, total: int | None, name: str) -> None:
            ctx.progress(done, total or 0, name)

        try:
            return weights.download(items, progress=progress, cancel=ctx.cancelled)
        except weights.DownloadCancelled as e:
            raise JobCancelled(str(e)) from e

    return BackgroundJob("download weights", run)


# ============================================================================ logic
@dataclass
class SegmentationState:
    """The merged automatic result of one volume: label map, per-slice diagnostics, snapshot."""

    volume_node_id: str
    segmentation_node_id: str | None
    labelmap: Volume
    labels: list[Any]
    axis: int
    window: tuple[float, float]
    case_id: str | None
    slices: dict[int, Any] = field(default_factory=dict)  # index -> segment.SliceResult
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(0))
    snapshot: SegmentationSnapshot | None = None
    banked: dict[int, str] = field(default_factory=dict)  # slice -> digest of masks put in the bank

    def low_confidence_slices(self, threshold: float) -> list[int]:
        """Segmented slices with confidence below `threshold`, in order."""
        return [i for i in sorted(self.slices) if self.slices[i].confidence < threshold]


@dataclass
class _Undo:
    """What a written result replaced, so that it can be put back."""

    volume_node_id: str
    segmentation_node_id: str
    created_node: bool
    masks: dict[str, np.ndarray | None]  # segment name -> mask before (None: segment was added)
    state: SegmentationState | None


@dataclass
class _Request:
    volume_node_id: str
    volume: Volume
    runs: list[tuple[int, int]]
    axis: int | None
    k: int
    case_id: str | None
    case_policy: str
    window: tuple[float, float]
    labels: list[int] | None
    resegment: bool


def _digest(codes: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(codes).tobytes()).hexdigest()


def _runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Contiguous (start, stop) runs of sorted slice indices."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(int(x) for x in indices)):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class RetrievalSegLogic:
    """Pure-Python logic behind the Slicer module: engine, bank, background runs, corrections.

    Typical use on the main thread::

        logic.start_segmentation(volume_node, k=8)     # worker thread starts
        ... every 100 ms: for ev in logic.poll(): ...  # progress / finished / failed
        node = logic.apply_result(scene, volume_node)  # on "finished": write segments
        ... user edits in Segment Editor ...
        logic.add_edited_slices_to_bank(volume_node, node)
        logic.start_resegment_remaining(volume_node, node)
    """

    def __init__(self, engine: Any = None, bank: Any = None, settings: EngineSettings | None = None) -> None:
        self.engine = engine
        self.bank = bank
        self.settings = settings or EngineSettings()
        self._engine_settings: EngineSettings | None = settings if engine is not None else None
        self._engine_lock = threading.Lock()
        self.job: BackgroundJob | None = None
        self._request: _Request | None = None
        self._pending: list[Any] | None = None  # finished VolumeSegmentations not yet written
        self.state: SegmentationState | None = None
        self._undo: _Undo | None = None

    # ------------------------------------------------------------------ engine and bank
    def engine_for(self, settings: EngineSettings | None = None, ctx: JobContext | None = None) -> Any:
        """The loaded engine for `settings` (loads it when the settings changed)."""
        settings = settings or self.settings
        with self._engine_lock:
            if self.engine is None or (self._engine_settings is not None and self._engine_settings != settings):
                if ctx is not None:
                    ctx.status(f"Loading SAM 2.1 {settings.sam2_size} and DINOv2 {settings.dinov2_size}...")
                self.engine = settings.load()
                self._engine_settings = settings
            return self.engine

    def open_bank(self, path: str | Path) -> Any:
        """Open the support bank at `path` and use it."""
        from .bank import SupportBank

        self._require_idle()
        self.bank = SupportBank.open(path)
        return self.bank

    def create_bank(self, path: str | Path, labels: Sequence[Any], embedder_identity: str | None = None) -> Any:
        """Make a new support bank with these labels (embedder of the current settings)."""
        from .bank import SupportBank

        self._require_idle()
        identity = embedder_identity or self.engine_for().embedder.identity
        self.bank = SupportBank.create(path, list(labels), identity)
        return self.bank

    def create_bank_from_segmentation(self, path: str | Path, segmentation_node: Any) -> Any:
        """Make a new bank whose labels are the segmentation's segments (names and colours)."""
        return self.create_bank(path, labels_from_segmentation(segmentation_node))

    def _require_bank(self) -> Any:
        if self.bank is None:
            raise RuntimeError("no support bank is open; open one or create one from a segmentation")
        return self.bank

    def _require_idle(self) -> None:
        if self.busy:
            raise RuntimeError("RetrievalSeg is still running; wait for it or cancel it first")

    # ------------------------------------------------------------------ running
    @property
    def busy(self) -> bool:
        """True while a job runs or its result waits to be written."""
        return (self.job is not None and (self.job.running or self.job.outcome is None)) or bool(self._pending)

    def start_segmentation(
        self,
        volume_node: Any,
        *,
        k: int = 8,
        axis: int | str | None = None,
        slice_range: tuple[int, int] | None = None,
        case_id: str | None = None,
        case_policy: str = "ignore",
        window: tuple[float, float] | None = None,
        labels: Sequence[int] | None = None,
    ) -> BackgroundJob:
        """Segment the volume (or a slice range) on a worker thread; poll() for its events."""
        from .segment import window_for_volume

        self._require_idle()
        self._require_bank()
        volume = volume_from_node(volume_node)  # main thread: MRML read here, never in the worker
        ax = parse_axis(axis)
        ax_resolved = ax if ax is not None else through_plane_axis(volume.spacing)
        n = num_slices(volume.array, ax_resolved)
        start, stop = (0, n) if slice_range is None else (int(slice_range[0]), int(slice_range[1]))
        if not 0 <= start < stop <= n:
            raise ValueError(
                f"slice range {slice_range} is outside 0..{n} along axis {AXIS_NAMES[ax_resolved]} "
                "(first slice inclusive, last exclusive)"
            )
        request = _Request(
            volume_node.GetID(), volume, [(start, stop)], ax_resolved, int(k), case_id, case_policy,
            window_for_volume(volume, window), list(labels) if labels is not None else None, False,
        )
        return self._start(request)

    def remaining_slices(self, volume_node: Any, segmentation_node: Any) -> list[int]:
        """Automatically segmented slices that the user has not edited since they were written."""
        state = self._state_for(volume_node, segmentation_node)
        edited = set(self.edited_slices(volume_node, segmentation_node))
        return [i for i in sorted(state.slices) if i not in edited]

    def start_resegment_remaining(
        self,
        volume_node: Any,
        segmentation_node: Any,
        *,
        k: int = 8,
        case_policy: str = "prefer",
        case_id: str | None = None,
    ) -> BackgroundJob:
        """Re-segment the slices the user has not edited, with the bank as it is now.

        With case_policy "prefer" the corrections just added for this case are retrieved first.
        """
        self._require_idle()
        self._require_bank()
        state = self._state_for(volume_node, segmentation_node)
        remaining = self.remaining_slices(volume_node, segmentation_node)
        if not remaining:
            raise ValueError("every segmented slice was edited; there is nothing left to re-segment")
        volume = volume_from_node(volume_node)
        cid = case_id or state.case_id or case_id_for_volume(volume_node)
        request = _Request(
            volume_node.GetID(), volume, _runs(remaining), state.axis, int(k), cid, case_policy,
            state.window, [lab.value for lab in state.labels], True,
        )
        return self._start(request)

    def _start(self, request: _Request) -> BackgroundJob:
        from .segment import segment_volume

        bank = self._require_bank()
        settings = self.settings

        def run(ctx: JobContext) -> list[Any]:
            engine = self.engine_for(settings, ctx)
            bank.check_models(engine.embedder.identity)
            total = sum(b - a for a, b in request.runs)
            ctx.status(f"Segmenting {total} slices...")
            ctx.restart_clock()
            results = []
            done_before = 0
            for a, b in request.runs:
                offset = done_before
                r = segment_volume(
                    request.volume, bank, engine, labels=request.labels, k=request.k,
                    axis=request.axis, slice_range=(a, b), case_id=request.case_id,
                    case_policy=request.case_policy, window=request.window,
                    progress=lambda d, t, o=offset: ctx.progress(o + d, total),
                    cancel=ctx.cancelled,
                )
                results.append(r)
                if r.cancelled:
                    raise JobCancelled("segmentation cancelled")
                done_before += b - a
            return results

        self._request = request
        self._pending = None
        self.job = BackgroundJob("segmentation", run).start()
        return self.job

    def cancel(self) -> None:
        """Ask the running job to stop (its partial result is discarded)."""
        if self.job is not None:
            self.job.cancel()

    def poll(self) -> list[JobEvent]:
        """Events of the running job since the last poll; keeps a finished result for apply_result."""
        if self.job is None:
            return []
        return self._keep(self.job.poll())

    def wait(self, timeout: float | None = None) -> list[JobEvent]:
        """Block until the running job ends; return its remaining events."""
        if self.job is None:
            return []
        return self._keep(self.job.wait(timeout))

    def _keep(self, events: list[JobEvent]) -> list[JobEvent]:
        for ev in events:
            if ev.kind == "finished":
                self._pending = ev.result
            elif ev.terminal:
                self._pending = None
        return events

    @property
    def has_result(self) -> bool:
        """True when a finished run waits to be written with apply_result."""
        return bool(self._pending)

    def apply_result(
        self, scene: Any, volume_node: Any, segmentation_node: Any = None, name: str | None = None
    ) -> Any:
        """Write the finished run into segments (main thread) and remember it; return the node."""
        if not self._pending or self._request is None:
            raise RuntimeError("there is no finished segmentation to write")
        request, results = self._request, self._pending
        if volume_node.GetID() != request.volume_node_id:
            raise ValueError("the result belongs to another volume than the one given")
        first = results[0]
        state = self.state
        fresh = (
            state is None
            or not request.resegment
            or state.volume_node_id != request.volume_node_id
        )
        previous = copy.deepcopy(self.state)
        if fresh:
            state = SegmentationState(
                request.volume_node_id, None, first.labelmap.with_array(np.zeros_like(first.labelmap.array)),
                list(first.labels), first.axis, request.window, request.case_id,
                confidence=np.full(num_slices(first.labelmap.array, first.axis), np.nan, np.float32),
            )
        assert state is not None
        written: list[int] = []
        for r in results:
            for i, sr in r.slices.items():
                slice_view(state.labelmap.array, state.axis, i)[...] = slice_view(r.labelmap.array, r.axis, i)
                state.slices[i] = sr
                state.confidence[i] = sr.confidence
                written.append(i)
        undo = self._undo_point(volume_node, segmentation_node, state.labels)
        node = labelmap_to_segmentation(
            (state.labelmap, state.labels), scene, volume_node, segmentation_node, name,
            axis=state.axis, slices=written,
        )
        undo.segmentation_node_id = node.GetID()
        self._undo = undo
        state.segmentation_node_id = node.GetID()
        now = snapshot_segmentation(node, volume_node, state.labels, state.axis, written)
        if not fresh and state.snapshot is not None:
            # Slices not rewritten keep their old reference, so the user's edits stay "edited".
            keep = state.snapshot
            for i in written:
                keep.slice_codes(i)[...] = now.slice_codes(i)
                state.banked.pop(i, None)
            keep.segmented = tuple(sorted(set(keep.segmented) | set(written)))
            now = keep
        state.snapshot = now
        self.state = state
        self._pending = None
        self._undo.state = previous
        return node

    def _undo_point(self, volume_node: Any, segmentation_node: Any, labels: Sequence[Any]) -> _Undo:
        """Record the segments a result is about to overwrite."""
        if segmentation_node is None:
            return _Undo(volume_node.GetID(), "", True, {}, None)
        labs = _labels(labels)
        ids = segment_ids_for_labels(segmentation_node, labs)
        masks = _read_masks(segmentation_node, volume_node, ids)
        before = {lab.name: (masks[lab.value] if ids[lab.value] else None) for lab in labs}
        return _Undo(volume_node.GetID(), segmentation_node.GetID(), False, before, None)

    @property
    def can_undo(self) -> bool:
        """True when the last written result can be taken back."""
        return self._undo is not None

    def undo_last_result(self, scene: Any) -> Any:
        """Put back what the last written result replaced; return the segmentation (None if removed)."""
        self._require_idle()
        undo = self._undo
        if undo is None:
            raise RuntimeError("there is no result to undo")
        node = scene.GetNodeByID(undo.segmentation_node_id)
        volume_node = scene.GetNodeByID(undo.volume_node_id)
        if node is None or volume_node is None:
            self._undo = None
            raise RuntimeError("the segmentation or volume of the last result was removed; nothing to undo")
        self._undo = None
        self.state = undo.state
        if undo.created_node:
            scene.RemoveNode(node)
            return None
        segmentation = node.GetSegmentation()
        for name, mask in undo.masks.items():
            if mask is None:
                sid = segmentation.GetSegmentIdBySegmentName(name)
                if sid:
                    segmentation.RemoveSegment(sid)
        kept = {name: m for name, m in undo.masks.items() if m is not None}
        ids = {name: segmentation.GetSegmentIdBySegmentName(name) for name in kept}
        ids = {name: sid for name, sid in ids.items() if sid}
        if ids:
            labs = [_Label(n, name, (0.5, 0.5, 0.5)) for n, name in enumerate(ids)]
            now = _read_masks(node, volume_node, {lab.value: ids[lab.name] for lab in labs})
            _replace_masks(
                node, volume_node, ids,
                {lab.name: now[lab.value] for lab in labs}, {name: kept[name] for name in ids},
            )
        return node

    def discard_result(self) -> None:
        """Drop a finished result without writing it (e.g. its volume was removed)."""
        self._pending = None

    def run(
        self, scene: Any, volume_node: Any, segmentation_node: Any = None, **kwargs: Any
    ) -> Any:
        """Segment synchronously (scripts and tests): start, wait, write; return the node."""
        self.start_segmentation(volume_node, **kwargs)
        return self._finish(scene, volume_node, segmentation_node)

    def resegment_remaining(self, scene: Any, volume_node: Any, segmentation_node: Any, **kwargs: Any) -> Any:
        """Re-segment the unedited slices synchronously; return the node."""
        self.start_resegment_remaining(volume_node, segmentation_node, **kwargs)
        return self._finish(scene, volume_node, segmentation_node)

    def _finish(self, scene: Any, volume_node: Any, segmentation_node: Any) -> Any:
        events = self.wait()
        last = events[-1] if events else None
        if last is None or last.kind != "finished":
            if last is not None and last.error is not None:
                raise last.error
            raise RuntimeError(f"segmentation did not finish ({last.kind if last else 'no events'})")
        return self.apply_result(scene, volume_node, segmentation_node)

    # ------------------------------------------------------------------ corrections
    def _state_for(self, volume_node: Any, segmentation_node: Any) -> SegmentationState:
        state = self.state
        if (
            state is None
            or state.volume_node_id != volume_node.GetID()
            or state.segmentation_node_id != segmentation_node.GetID()
            or state.snapshot is None
        ):
            raise RuntimeError(
                "no automatic result of this volume is in this segmentation; run Segment first"
            )
        return state

    def edited_slices(self, volume_node: Any, segmentation_node: Any) -> list[int]:
        """Slices the user changed since the last automatic result was written."""
        state = self._state_for(volume_node, segmentation_node)
        assert state.snapshot is not None
        return edited_slices(segmentation_node, volume_node, state.snapshot)

    def _window_for(self, volume_node: Any) -> tuple[float, float] | None:
        state = self.state
        if state is not None and state.volume_node_id == volume_node.GetID():
            return state.window
        return None

    def _case_for(self, volume_node: Any, case_id: str | None) -> str:
        if case_id:
            return case_id
        state = self.state
        if state is not None and state.volume_node_id == volume_node.GetID() and state.case_id:
            return state.case_id
        return case_id_for_volume(volume_node)

    def add_slice_to_bank(
        self, volume_node: Any, segmentation_node: Any, axis: int | str, index: int, case_id: str | None = None
    ) -> Any:
        """Add one corrected slice of the volume to the bank (origin "correction")."""
        self._require_idle()
        bank = self._require_bank()
        entry = add_slice_to_bank(
            bank, self.engine_for(), volume_node, segmentation_node, axis, index,
            self._case_for(volume_node, case_id), window=self._window_for(volume_node),
        )
        self._record_banked(volume_node, segmentation_node, [int(index)], _explicit_axis(axis))
        return entry

    def add_edited_slices_to_bank(
        self, volume_node: Any, segmentation_node: Any, case_id: str | None = None
    ) -> list[Any]:
        """Add the slices the user edited since the last automatic result (not yet in the bank)."""
        self._require_idle()
        state = self._state_for(volume_node, segmentation_node)
        bank = self._require_bank()
        edited = self.edits_not_in_bank(volume_node, segmentation_node)
        volume = volume_from_node(volume_node)
        cid = self._case_for(volume_node, case_id)
        entries = [
            add_slice_to_bank(
                bank, self.engine_for(), volume_node, segmentation_node, state.axis, i, cid,
                window=state.window, volume=volume,
            )
            for i in edited
        ]
        self._record_banked(volume_node, segmentation_node, edited, state.axis)
        return entries

    def add_annotated_slices_to_bank(
        self, volume_node: Any, segmentation_node: Any, case_id: str | None = None, axis: int | str | None = None
    ) -> list[Any]:
        """Add the user's hand-drawn slices (first annotations) of a volume to the bank."""
        self._require_idle()
        state = self.state
        if (
            state is not None
            and state.volume_node_id == volume_node.GetID()
            and state.segmentation_node_id == segmentation_node.GetID()
        ):
            raise ValueError(
                "this segmentation holds an automatic result of this volume; add only the slices "
                "you corrected (Add all edited slices), not every segmented slice"
            )
        return add_annotated_slices_to_bank(
            self._require_bank(), self.engine_for(), volume_node, segmentation_node,
            self._case_for(volume_node, case_id), axis=axis,
        )

    def _record_banked(self, volume_node: Any, segmentation_node: Any, slices: Sequence[int], axis: int) -> None:
        """Remember what these slices looked like when they went into the bank."""
        state = self.state
        if (
            state is None
            or state.volume_node_id != volume_node.GetID()
            or state.segmentation_node_id != segmentation_node.GetID()
            or axis != state.axis
            or not slices
        ):
            return
        now = snapshot_segmentation(segmentation_node, volume_node, state.labels, state.axis)
        for i in slices:
            state.banked[int(i)] = _digest(now.slice_codes(int(i)))

    def edits_not_in_bank(self, volume_node: Any, segmentation_node: Any) -> list[int]:
        """Edited slices whose current masks have not been added to the bank yet."""
        state = self._state_for(volume_node, segmentation_node)
        edited = self.edited_slices(volume_node, segmentation_node)
        if not edited:
            return []
        now = snapshot_segmentation(segmentation_node, volume_node, state.labels, state.axis)
        return [i for i in edited if state.banked.get(i) != _digest(now.slice_codes(i))]

    # ------------------------------------------------------------------ review
    def slice_result(self, index: int) -> Any:
        """The SliceResult of slice `index` of the last result, or None."""
        return None if self.state is None else self.state.slices.get(int(index))

    def low_confidence_slices(self, threshold: float = 0.5) -> list[int]:
        """Segmented slices with confidence below `threshold`."""
        return [] if self.state is None else self.state.low_confidence_slices(threshold)

    def next_low_confidence_slice(self, after: int, threshold: float = 0.5) -> int | None:
        """The next low-confidence slice after `after` (wrapping around), or None."""
        low = self.low_confidence_slices(threshold)
        if not low:
            return None
        later = [i for i in low if i > after]
        return later[0] if later else low[0]

    def thumbnails(self, index: int, size: int = 96) -> list[SupportThumbnail]:
        """Thumbnails of the supports retrieved for slice `index` of the last result."""
        sr = self.slice_result(index)
        if sr is None or self.bank is None:
            return []
        return support_thumbnails(self.bank, sr.retrieved, size)
