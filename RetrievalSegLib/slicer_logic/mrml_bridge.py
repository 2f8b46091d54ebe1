"""Between 3D Slicer's MRML nodes and RetrievalSegLib's numpy world (the module's logic is slicer_logic.logic).

Everything that touches `slicer` / `vtk` imports them inside the function, so this module imports
(and its pure-Python parts run) without Slicer. Conventions:

* A volume node's IJKToRAS matrix is Slicer's geometry; `Volume` keeps ITK/LPS geometry. The two
  differ only by the sign of the first two world axes (RAS = diag(-1, -1, 1) LPS), so converting is
  exact: spacing, origin and direction round-trip bit for bit.
* Voxels are read and written in node-local coordinates (parent transforms are not applied); a
  volume and a segmentation under different parent transforms are refused, since "the same slice"
  would then mean different voxels. Slice navigation (`slice_center_ras`, `slice_index_from_ras`,
  `slice_normal_ras`) is in world RAS, where Slicer's slice views are: it applies the volume's
  parent transforms (linear or not).
* Segments are matched to bank labels by name (case-insensitive, as Slicer matches them).
* MRML is touched only from the thread that calls these functions (Slicer's main thread); models
  run in the worker process (`worker`), which sees numpy arrays only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .terminology import terminology_entry
from ..data.volume import (
    AXIS_NAMES,
    Volume,
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


def _transform_point(volume_node: Any, point: Sequence[float], to_world: bool) -> np.ndarray:
    """A point between the volume's node-local RAS and world RAS (through its parent transforms)."""
    parent = volume_node.GetParentTransformNode()
    if parent is None:
        return np.asarray(point, dtype=float)[:3]
    import slicer
    import vtk

    transform = vtk.vtkGeneralTransform()
    source, target = (parent, None) if to_world else (None, parent)
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(source, target, transform)
    return np.asarray(transform.TransformPoint(*(float(x) for x in point[:3])), dtype=float)


def slice_index_from_ras(volume_node: Any, axis: int | str, ras: Sequence[float]) -> int:
    """Index of the slice along IJK `axis` nearest to the world RAS point (may lie outside the volume)."""
    ax = _explicit_axis(axis)
    local = _transform_point(volume_node, ras, to_world=False)
    ijk = np.linalg.solve(ijk_to_ras_matrix(volume_node), np.r_[local, 1.0])
    return int(np.floor(ijk[ax] + 0.5))


def slice_center_ras(volume_node: Any, axis: int | str, index: int) -> tuple[float, float, float]:
    """World RAS position of the centre of slice `index` along IJK `axis` (where a slice view jumps)."""
    ax = _explicit_axis(axis)
    dims = volume_node.GetImageData().GetDimensions()
    ijk = np.array([(d - 1) / 2.0 for d in dims] + [1.0])
    ijk[ax] = index
    ras = _transform_point(volume_node, ijk_to_ras_matrix(volume_node) @ ijk, to_world=True)
    return (float(ras[0]), float(ras[1]), float(ras[2]))


def slice_normal_ras(volume_node: Any, axis: int | str) -> np.ndarray:
    """Unit world RAS direction of IJK `axis` at the volume's centre (the normal of its slices)."""
    ax = _explicit_axis(axis)
    m = ijk_to_ras_matrix(volume_node)
    dims = volume_node.GetImageData().GetDimensions()
    center = np.array([(d - 1) / 2.0 for d in dims] + [1.0])
    step = center.copy()
    step[ax] += 1.0
    a = _transform_point(volume_node, m @ center, to_world=True)
    b = _transform_point(volume_node, m @ step, to_world=True)
    return (b - a) / np.linalg.norm(b - a)


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
    from ..bank.support_bank import LabelInfo

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
            entry = terminology_entry(lab.name)  # a new segment only: never overwrite the user's choice
            if entry:
                segmentation.GetSegment(sid).SetTerminology(entry)
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
def annotated_labelmap(segmentation_node: Any, volume_node: Any, labels: Sequence[Any]) -> Volume:
    """The user's drawing in the bank-label segments as one label map; an error when it is empty."""
    labelmap = labelmap_from_segmentation(segmentation_node, volume_node, labels)
    if not labelmap.array.any():
        names = ", ".join(lab.name for lab in labels)
        raise ValueError(
            f"segmentation {segmentation_node.GetName()!r} has nothing drawn in segments named "
            f"like the bank's labels ({names}) on volume {volume_node.GetName()!r}"
        )
    return labelmap


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
