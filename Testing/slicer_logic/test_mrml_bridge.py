"""The MRML bridge with real Slicer MRML classes (slicer-core, headless, no Qt).

What is checked, as a user of the Slicer module would see it:
* a volume node's voxels and geometry (oblique directions, anisotropic spacing) become a Volume
  and back without a single bit changing, and the node's IJKToRAS is the ITK geometry in RAS;
* a segmentation run (real SAM 2 / DINOv2 architectures, random weights) becomes segments named
  and coloured from the bank, with exactly the engine's voxels and the volume's reference geometry;
* updating a segmentation rewrites only the segmented slices, in place, without duplicates;
* a slice the user corrected is detected as edited, goes into the bank as a correction and is
  then retrieved first for that slice of the same case; "re-segment remaining" leaves it alone;
* the segmentation saves to .seg.nrrd with Slicer's storage node and reads back equal;
* runs in the worker process report progress with a time estimate and can be cancelled without
  writing; the whole loop (segment -> edit -> add edited slices -> re-segment) goes through it;
* the Slicer module's panel (RetrievalSeg.py, with stand-ins of Qt, CTK and the application that
  refuse what Slicer 5.10 lacks, MRML real) drives the whole loop: segment, list and add edited
  slices, re-segment, review, undo.
Setup notes (converter rules, colour logic) are those of test_segnrrd.py.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from RetrievalSegLib.slicer_logic import logic as ml
from RetrievalSegLib.slicer_logic import mrml_bridge as mb
from RetrievalSegLib.data.segnrrd import image_to_ras_matrix, read_seg_nrrd
from RetrievalSegLib.data.synthetic import LABELS, make_synthetic_study, rotation_matrix
from RetrievalSegLib.data.volume import Volume, slice_view

import slicer  # noqa: E402  (slicer-core: a missing install must fail, not skip)
from _slicer_fakes import _module_with_fake_gui

SHAPE = (8, 48, 48)  # (k, j, i)
SPACING = (1.2, 1.0, 5.0)  # anisotropic, k through-plane
K = 2
#: What the worker loads: the same seeded random weights as the `engine` fixture.
SETTINGS = ml.EngineSettings(device="cpu", image_size=256, random_weights=True)


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def scene(slicer_scene):  # type: ignore[no-untyped-def]
    return slicer_scene[1]  # conftest: headless scene with the converter rules registered


@pytest.fixture(scope="module")
def cases():  # type: ignore[no-untyped-def]
    return make_synthetic_study(n_cases=2, shape=SHAPE, spacing=SPACING, seed=3)


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    from RetrievalSegLib.engine.pipeline import RetrievalEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the RANDOM weights warning is expected here
        return RetrievalEngine.load("tiny", "small", random_weights=True, image_size=256, device="cpu")


@pytest.fixture(scope="module")
def client(worker_client):  # type: ignore[no-untyped-def]
    return worker_client  # conftest: one worker for the session


@pytest.fixture(scope="module")
def bank_labels():  # type: ignore[no-untyped-def]
    from RetrievalSegLib.bank.support_bank import LabelInfo

    return [LabelInfo(v, name, rgb) for v, (name, rgb) in sorted(LABELS.items())]


@pytest.fixture()
def bank(tmp_path: Path, cases, engine, bank_labels):  # type: ignore[no-untyped-def]
    from RetrievalSegLib.bank.support_bank import SupportBank

    b = SupportBank.create(tmp_path / "bank", bank_labels, engine.embedder.identity)
    b.add_volume(cases[0].image, cases[0].labels, cases[0].case_id, engine.embedder)
    return b


def _ijk_to_ras(node) -> np.ndarray:  # type: ignore[no-untyped-def]
    return mb.ijk_to_ras_matrix(node)


# ------------------------------------------------------------------------------- volumes
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_volume_round_trip_is_exact(scene, dtype) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    vol = Volume(
        (rng.normal(0, 500, (5, 7, 9))).astype(dtype),
        spacing=(0.7, 0.93, 3.3),
        origin=(12.5, -7.25, 30.125),
        direction=rotation_matrix(20.0, -35.0, 30.0),
    )
    node = mb.volume_to_node(vol, scene, "oblique")
    assert node.IsA("vtkMRMLScalarVolumeNode") and node.GetDisplayNode() is not None
    # Slicer sees the ITK geometry, in RAS.
    np.testing.assert_array_equal(_ijk_to_ras(node), image_to_ras_matrix(vol))
    back = mb.volume_from_node(node)
    assert back.array.dtype == vol.array.dtype and np.array_equal(back.array, vol.array)
    assert back.spacing == vol.spacing and back.origin == vol.origin and back.direction == vol.direction
    back.array[0, 0, 0] += 1  # a copy: editing it does not touch the node
    assert np.array_equal(mb.volume_from_node(node).array, vol.array)


def test_volume_from_a_node_made_the_slicer_way(scene) -> None:  # type: ignore[no-untyped-def]
    """A node whose IJKToRAS matrix was set directly (as readers do) gives ITK geometry."""
    import vtk

    rot = np.asarray(rotation_matrix(10.0, 25.0, -40.0)).reshape(3, 3)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = rot * np.array([0.8, 0.6, 2.5])
    ijk_to_ras[:3, 3] = (-100.0, 40.5, 7.0)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, ijk_to_ras[r, c])
    image = vtk.vtkImageData()
    image.SetDimensions(4, 3, 2)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "direct")
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(m)
    vol = mb.volume_from_node(node)
    assert vol.array.shape == (2, 3, 4)
    np.testing.assert_allclose(vol.spacing, (0.8, 0.6, 2.5), rtol=1e-14)
    np.testing.assert_allclose(image_to_ras_matrix(vol), ijk_to_ras, atol=1e-12)
    np.testing.assert_allclose(mb.volume_ijk_to_ras(vol), ijk_to_ras, atol=1e-12)


def test_slice_navigation(scene, cases) -> None:  # type: ignore[no-untyped-def]
    node = mb.volume_to_node(cases[1].image, scene, "nav")
    for axis in (0, 1, 2):
        for index in (0, 3):
            ras = mb.slice_center_ras(node, axis, index)
            assert mb.slice_index_from_ras(node, axis, ras) == index
    with pytest.raises(ValueError, match="explicit slice axis"):
        mb.slice_center_ras(node, "auto", 0)


def test_slice_navigation_is_in_world_ras_under_parent_transforms(scene, cases) -> None:  # type: ignore[no-untyped-def]
    """An oblique volume under two nested linear transforms: slice views work in world RAS."""
    import vtk

    oblique = Volume(cases[1].image.array, (0.8, 0.9, 4.0), (10.0, -20.0, 5.0), rotation_matrix(15.0, -25.0, 40.0))
    node = mb.volume_to_node(oblique, scene, "transformed")
    outer, inner = (scene.AddNewNodeByClass("vtkMRMLLinearTransformNode") for _ in range(2))
    matrices = []
    for transform, (angles, shift) in zip((outer, inner), (((30.0, 0.0, -10.0), (5.0, -7.0, 12.0)),
                                                           ((0.0, 45.0, 20.0), (-30.0, 4.0, 9.0)))):
        m = np.eye(4)
        m[:3, :3] = np.asarray(rotation_matrix(*angles)).reshape(3, 3)
        m[:3, 3] = shift
        vm = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                vm.SetElement(r, c, m[r, c])
        transform.SetMatrixTransformToParent(vm)
        matrices.append(m)
    inner.SetAndObserveTransformNodeID(outer.GetID())
    node.SetAndObserveTransformNodeID(inner.GetID())
    to_world = matrices[0] @ matrices[1]  # local -> inner's parent (outer) -> world
    ijk_to_world = to_world @ mb.ijk_to_ras_matrix(node)
    dims = node.GetImageData().GetDimensions()
    for axis in (0, 1, 2):
        for index in (0, 3):
            ijk = np.array([(d - 1) / 2.0 for d in dims] + [1.0])
            ijk[axis] = index
            center = mb.slice_center_ras(node, axis, index)
            np.testing.assert_allclose(center, (ijk_to_world @ ijk)[:3], atol=1e-9)
            assert mb.slice_index_from_ras(node, axis, center) == index
            # A point of the slice seen in a view (world) maps back to it; its node-local twin does not.
            local = (mb.ijk_to_ras_matrix(node) @ ijk)[:3]
            assert mb.slice_index_from_ras(node, axis, (ijk_to_world @ ijk)[:3]) == index
            assert not np.allclose(local, center)
        normal = mb.slice_normal_ras(node, axis)
        expected = ijk_to_world[:3, axis] / np.linalg.norm(ijk_to_world[:3, axis])
        np.testing.assert_allclose(normal, expected, atol=1e-9)


# ------------------------------------------------------------------------------- segments
def test_labelmap_to_segmentation_writes_exact_segments_and_updates_in_place(
    scene, cases, bank_labels
) -> None:  # type: ignore[no-untyped-def]
    import vtk

    case = cases[0]
    volume_node = mb.volume_to_node(case.image, scene, "truth")
    node = mb.labelmap_to_segmentation((case.labels, bank_labels), scene, volume_node)
    assert node.GetName() == "truth RetrievalSeg"
    seg = node.GetSegmentation()
    assert [seg.GetNthSegment(n).GetName() for n in range(seg.GetNumberOfSegments())] == ["RV", "Myo", "LV"]
    for lab in bank_labels:
        s = seg.GetSegment(seg.GetSegmentIdBySegmentName(lab.name))
        np.testing.assert_allclose(s.GetColor(), lab.color, atol=1e-12)
        tag = vtk.reference("")
        assert s.GetTag(mb.LABEL_VALUE_TAG, tag) and str(tag) == str(lab.value)
    # Standard terminology where the label is a structure of Slicer's General Anatomy list (LV, RV).
    lv = seg.GetSegment(seg.GetSegmentIdBySegmentName("LV"))
    assert lv.GetTerminology() == ("Segmentation category and type - 3D Slicer General Anatomy list"
                                   "~SCT^123037004^Anatomical Structure~SCT^87878005^Left Ventricle~^^~~^^~^^")
    tag = vtk.reference("")
    assert lv.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag) and str(tag) == lv.GetTerminology()
    assert "53085002^Right Ventricle" in seg.GetSegment(seg.GetSegmentIdBySegmentName("RV")).GetTerminology()
    assert mb.terminology_entry("Myo") is None  # not in the list: no guess
    assert "87878005" not in seg.GetSegment(seg.GetSegmentIdBySegmentName("Myo")).GetTerminology()
    assert seg.GetNumberOfLayers() == 1  # one shared labelmap, like the Segment Editor makes
    got = mb.labelmap_from_segmentation(node, volume_node, bank_labels)
    assert np.array_equal(got.array, case.labels.array) and got.same_geometry(case.image, tol=1e-12)

    # The reference geometry is exactly the volume's grid.
    matrix, extent = vtk.vtkMatrix4x4(), [0] * 6
    geometry = seg.GetConversionParameter("Reference image geometry")
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, matrix, extent)
    assert extent == [0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1]
    got_m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    np.testing.assert_allclose(got_m, image_to_ras_matrix(case.image), atol=1e-12)

    # A user recolours LV and adds a segment of their own; then slices 2 and 3 are rewritten.
    lv_id = seg.GetSegmentIdBySegmentName("LV")
    seg.GetSegment(lv_id).SetColor(0.0, 1.0, 0.0)
    own = seg.AddEmptySegment("", "Notes", [1.0, 1.0, 0.0])
    notes = np.zeros(SHAPE, dtype=bool)
    notes[:, 0:3, 0:3] = True
    mb._write_mask(node, own, volume_node, notes)
    update = np.zeros(SHAPE, dtype=np.uint8)
    update[:, 10:20, 10:20] = 3  # LV everywhere in the update, but only slices 2, 3 are owned
    mb.labelmap_to_segmentation((case.labels.with_array(update), bank_labels), scene, volume_node, node, axis=2, slices=[2, 3])
    assert seg.GetNumberOfSegments() == 4  # nothing duplicated
    assert seg.GetSegmentIdBySegmentName("LV") == lv_id
    np.testing.assert_allclose(seg.GetSegment(lv_id).GetColor(), (0.0, 1.0, 0.0))
    expected = case.labels.array.copy()
    expected[2:4] = update[2:4]
    got = mb.labelmap_from_segmentation(node, volume_node, bank_labels)
    assert np.array_equal(got.array, expected)
    assert np.array_equal(mb._read_masks(node, volume_node, {9: own})[9], notes)  # untouched

    # One slice read back, along each axis, in slice_view order.
    for axis, index in ((2, 3), (1, 20), (0, 24)):
        masks = mb.segment_slice_masks(node, volume_node, axis, index, bank_labels)
        for lab in bank_labels:
            assert np.array_equal(masks[lab.value], slice_view(expected, axis, index) == lab.value)


def test_segmentation_errors(scene, cases, bank_labels) -> None:  # type: ignore[no-untyped-def]
    case = cases[0]
    volume_node = mb.volume_to_node(case.image, scene, "errors")
    shifted = Volume(case.labels.array, case.labels.spacing, (0.0, 0.0, 0.0), case.labels.direction)
    with pytest.raises(ValueError, match="not on the grid of volume 'errors'"):
        mb.labelmap_to_segmentation((shifted, bank_labels), scene, volume_node)
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other names")
    other.GetSegmentation().AddEmptySegment("", "Liver", [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="no segment named like the bank's labels"):
        mb.segment_slice_masks(other, volume_node, 2, 0, bank_labels)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    other.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(ValueError, match="different parent transforms"):
        mb.segment_masks(other, volume_node, bank_labels)


def test_new_segmentation_goes_into_the_volume_study(scene, cases, bank_labels) -> None:  # type: ignore[no-untyped-def]
    case = cases[0]
    volume_node = mb.volume_to_node(case.image, scene, "in study")
    sh = scene.GetSubjectHierarchyNode()
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "Study 1")
    sh.CreateItem(study, volume_node)
    sh.SetItemUID(study, "DICOM", "1.2.3.4")
    node = mb.labelmap_to_segmentation((case.labels, bank_labels), scene, volume_node)
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    assert mb.case_id_for_volume(volume_node) == "1.2.3.4"


# ------------------------------------------------------------------------------- the loop
def test_segment_correct_add_resegment_through_the_worker(scene, cases, engine, bank, bank_labels, client) -> None:  # type: ignore[no-untyped-def]
    from RetrievalSegLib.segmentation.segment import segment_volume

    query = cases[1]
    volume_node = mb.volume_to_node(query.image, scene, "query")
    logic = ml.RetrievalSegLogic(bank=bank, settings=SETTINGS, client=client)
    node = logic.run(scene, volume_node, k=K, case_id=query.case_id)

    # Segments from the bank labels, exactly the engine's voxels, on the volume's grid.
    seg = node.GetSegmentation()
    assert [seg.GetNthSegment(n).GetName() for n in range(seg.GetNumberOfSegments())] == ["RV", "Myo", "LV"]
    for lab in bank_labels:
        np.testing.assert_allclose(seg.GetSegment(seg.GetSegmentIdBySegmentName(lab.name)).GetColor(), lab.color)
    state = logic.state
    assert state is not None and state.axis == 2 and sorted(state.slices) == list(range(SHAPE[0]))
    got = mb.labelmap_from_segmentation(node, volume_node, bank_labels)
    assert np.array_equal(got.array, state.labelmap.array) and got.array.any()
    direct = segment_volume(query.image, bank, engine, k=K, slice_range=(4, 8))  # same encoder batch
    assert np.array_equal(direct.labelmap.array[4:8], got.array[4:8])
    assert logic.edited_slices(volume_node, node) == []

    # The user corrects slice 4 (draws the true masks) in the Segment Editor.
    fixed = 4
    update = np.zeros(SHAPE, dtype=np.uint8)
    update[fixed] = query.labels.array[fixed]
    mb.labelmap_to_segmentation((query.labels.with_array(update), bank_labels), scene, volume_node, node, axis=2, slices=[fixed])
    assert logic.edited_slices(volume_node, node) == [fixed]
    assert logic.edits_not_in_bank(volume_node, node) == [fixed]
    assert logic.remaining_slices(volume_node, node) == [i for i in range(SHAPE[0]) if i != fixed]

    before = len(bank)
    (entry,) = logic.add_edited_slices_to_bank(volume_node, node)
    assert len(bank) == before + 1 and entry.origin == "correction"
    assert (entry.case_id, entry.axis, entry.index) == (query.case_id, 2, fixed)
    data = bank.load_entry(entry.id)
    for lab in bank_labels:
        assert np.array_equal(data.masks[lab.value], query.labels.array[fixed] == lab.value)
    assert np.array_equal(data.intensities, query.image.array[fixed])
    assert logic.edits_not_in_bank(volume_node, node) == []  # already in the bank
    assert logic.edited_slices(volume_node, node) == [fixed]  # still protected from re-segmenting

    # That slice of that case now retrieves the correction first.
    again = segment_volume(query.image, bank, engine, k=K, slice_range=(fixed, fixed + 1), case_id=query.case_id, case_policy="prefer")
    top_id, top_score = again.slices[fixed].retrieved[0]
    assert top_id == entry.id and top_score == pytest.approx(1.0, abs=1e-4)

    # Re-segment remaining: every other slice is redone with the correction preferred, slice 4 is kept.
    before_resegment = mb.labelmap_from_segmentation(node, volume_node, bank_labels).array
    logic.resegment_remaining(scene, volume_node, node, k=K, case_id=query.case_id)
    got = mb.labelmap_from_segmentation(node, volume_node, bank_labels)
    assert np.array_equal(got.array[fixed], query.labels.array[fixed])
    for i in range(SHAPE[0]):
        if i != fixed:
            assert logic.state.slices[i].retrieved[0][0] == entry.id
            assert np.array_equal(got.array[i], logic.state.labelmap.array[i])
    assert logic.edited_slices(volume_node, node) == [fixed]
    assert seg.GetNumberOfSegments() == 3
    assert not np.array_equal(got.array, before_resegment)  # random weights, new supports

    # Why this mask: thumbnails of the supports with their scores, and the review order.
    thumbs = logic.thumbnails(2, size=64)
    assert [t.entry_id for t in thumbs] == [e for e, _ in logic.state.slices[2].retrieved]
    for t in thumbs:
        assert t.rgb.dtype == np.uint8 and t.rgb.ndim == 3 and max(t.rgb.shape[:2]) == 64
    conf = logic.state.confidence
    assert np.isfinite(conf).all() and ((conf >= 0) & (conf <= 1)).all()
    low = logic.low_confidence_slices(threshold=2.0)
    assert low == list(range(SHAPE[0]))
    assert logic.next_low_confidence_slice(SHAPE[0] - 1, threshold=2.0) == 0
    assert logic.next_low_confidence_slice(0, threshold=-1.0) is None

    # Undo puts the segments (and the review state) back as they were before re-segmenting.
    assert logic.can_undo
    assert logic.undo_last_result(scene) is node and not logic.can_undo
    assert np.array_equal(mb.labelmap_from_segmentation(node, volume_node, bank_labels).array, before_resegment)
    assert all(logic.state.slices[i].retrieved[0][0] != entry.id for i in logic.state.slices)
    assert logic.edited_slices(volume_node, node) == [fixed]


def test_resegment_with_propagation_walks_out_from_the_correction(scene, cases, bank, bank_labels, client) -> None:  # type: ignore[no-untyped-def]
    """Correct one slice, re-propagate: with propagation, *Re-segment remaining slices* walks out
    from the slice the user corrected and added to the bank (a conditioning frame of every slice
    of both walks) and leaves that slice as the user drew it (`propagation.widened_runs`)."""
    query = cases[1]
    volume_node = mb.volume_to_node(query.image, scene, "re-propagate")
    logic = ml.RetrievalSegLogic(bank=bank, settings=SETTINGS, client=client)
    logic.propagate = 2
    node = logic.run(scene, volume_node, k=K, case_id=query.case_id)
    assert sorted(logic.state.slices) == list(range(SHAPE[0]))
    assert all(sr.annotated_slice is None for sr in logic.state.slices.values())  # nothing annotated yet

    fixed = 4
    update = np.zeros(SHAPE, dtype=np.uint8)
    update[fixed] = query.labels.array[fixed]
    mb.labelmap_to_segmentation((query.labels.with_array(update), bank_labels), scene, volume_node, node, axis=2, slices=[fixed])
    logic.add_edited_slices_to_bank(volume_node, node)
    logic.resegment_remaining(scene, volume_node, node, k=K, case_id=query.case_id)  # runs 0..3 and 5..7

    got = mb.labelmap_from_segmentation(node, volume_node, bank_labels)
    assert np.array_equal(got.array[fixed], query.labels.array[fixed])
    assert logic.edited_slices(volume_node, node) == [fixed]  # the corrected slice was not rewritten
    for i in range(SHAPE[0]):
        if i == fixed:
            continue
        sr = logic.state.slices[i]
        walk = list(range(fixed + 1, i)) if i > fixed else list(range(fixed - 1, i, -1))  # after the correction
        assert (sr.annotated_slice, sr.neighbours) == (fixed, walk[-2:]), i  # N = 2: the last 2, oldest first
        assert np.array_equal(got.array[i], logic.state.labelmap.array[i])


def test_add_single_slice_and_first_annotations(scene, cases, bank, bank_labels, client) -> None:  # type: ignore[no-untyped-def]
    query = cases[1]
    volume_node = mb.volume_to_node(query.image, scene, "annotated")
    drawn = np.zeros(SHAPE, dtype=np.uint8)
    drawn[2] = query.labels.array[2]
    drawn[5] = query.labels.array[5]
    node = mb.labelmap_to_segmentation((query.labels.with_array(drawn), bank_labels), scene, volume_node)
    logic = ml.RetrievalSegLogic(bank=bank, settings=SETTINGS, client=client)
    entries = logic.add_annotated_slices_to_bank(volume_node, node, case_id="annotated-case")
    assert [(e.index, e.origin) for e in entries] == [(2, "initial"), (5, "initial")]
    # Adding slice 5 again as a correction retires the older entry of that slice.
    entry = logic.add_slice_to_bank(volume_node, node, "k", 5, case_id="annotated-case")
    active = {(e.case_id, e.index): e.id for e in bank.entries() if e.case_id == "annotated-case"}
    assert active == {("annotated-case", 2): entries[0].id, ("annotated-case", 5): entry.id}


def test_seg_nrrd_round_trip_with_slicer_storage(tmp_path: Path, scene, cases, bank_labels) -> None:  # type: ignore[no-untyped-def]
    case = cases[1]
    volume_node = mb.volume_to_node(case.image, scene, "saved")
    node = mb.labelmap_to_segmentation((case.labels, bank_labels), scene, volume_node)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "result.seg.nrrd"))
    assert storage.WriteData(node) == 1

    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(tmp_path / "result.seg.nrrd"))
    assert reader.ReadData(loaded) == 1
    seg = loaded.GetSegmentation()
    assert [seg.GetNthSegment(n).GetName() for n in range(seg.GetNumberOfSegments())] == ["RV", "Myo", "LV"]
    for lab in bank_labels:
        np.testing.assert_allclose(seg.GetSegment(seg.GetSegmentIdBySegmentName(lab.name)).GetColor(), lab.color, atol=1e-6)
    back = mb.labelmap_from_segmentation(loaded, volume_node, bank_labels)
    assert np.array_equal(back.array, case.labels.array)
    # The library's own reader sees the same voxels (Slicer may crop the file to the segments).
    from RetrievalSegLib.data.volume import resample_like

    file_map, segments = read_seg_nrrd(tmp_path / "result.seg.nrrd")
    names = {s.label_value: s.name for s in segments}
    on_grid = resample_like(file_map, case.image)
    relabelled = np.zeros_like(case.labels.array)
    for value, name in names.items():
        relabelled[on_grid.array == value] = next(lab.value for lab in bank_labels if lab.name == name)
    assert np.array_equal(relabelled, case.labels.array)


# ------------------------------------------------------------------------------- background
@pytest.mark.filterwarnings("ignore:RetrievalSeg is running with RANDOM weights")
def test_cancelled_segmentation_writes_nothing(scene, cases, bank, client) -> None:  # type: ignore[no-untyped-def]
    query = cases[1]
    volume_node = mb.volume_to_node(query.image, scene, "cancelled")
    logic = ml.RetrievalSegLogic(bank=bank, settings=SETTINGS, client=client)
    slices_seen, statuses = [], []

    job = logic.start_segmentation(volume_node, k=K)
    assert logic.busy
    with pytest.raises(RuntimeError, match="still running"):
        logic.start_segmentation(volume_node, k=K)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        events = logic.poll()
        slices_seen += [e.done for e in events if e.kind == "progress"]
        statuses += [e.message for e in events if e.kind == "status"]
        if any(e.done >= 1 for e in events if e.kind == "progress"):
            logic.cancel()
        if any(e.terminal for e in events):
            break
        time.sleep(0.02)
    assert job.outcome == "cancelled" and not logic.has_result and not logic.busy
    assert f"Segmenting {SHAPE[0]} slices..." in statuses  # (then the first batch's time estimate)
    assert 1 <= max(slices_seen) < SHAPE[0]
    assert scene.GetFirstNodeByName("cancelled RetrievalSeg") is None
    with pytest.raises(RuntimeError, match="no finished segmentation"):
        logic.apply_result(scene, volume_node)


# ------------------------------------------------------------------------------- the panel
# Qt, CTK, the application and the module base classes are stand-ins that refuse every name Slicer
# 5.10 lacks (Testing/_slicer_fakes.py, from Testing/data/slicer_api_5.10.jsonl); MRML is real.
def test_slicer_module_panel_drives_the_loop_through_the_worker(monkeypatch, scene, cases, bank, client) -> None:  # type: ignore[no-untyped-def]
    """RetrievalSeg.py's Widget with real MRML and mocked Qt: segment, correct, add, re-segment, review."""
    import importlib

    from _slicer_fakes import fake_slicer_gui

    gui = fake_slicer_gui(monkeypatch, scene)
    ui, red, errors = gui.ui, gui.red, gui.errors
    module = importlib.import_module("RetrievalSeg")
    monkeypatch.setattr(module.RetrievalSegLogic, "engineSettings", staticmethod(lambda node, folder=None: SETTINGS))
    monkeypatch.setattr(module.RetrievalSegLogic, "workerClient", staticmethod(lambda: client))  # warm worker

    widget = module.RetrievalSegWidget()
    widget.setup()
    assert widget.logic.core.client is client
    ui.bankPathLineEdit.currentPath = str(bank.path)
    ui.weightsPathLineEdit.currentPath = ""
    widget.onOpenBank()
    assert "Labels: RV, Myo, LV" in ui.bankInfoLabel.text
    query = cases[1]
    short = Volume(query.image.array[:5], query.image.spacing, query.image.origin, query.image.direction)
    volume_node = mb.volume_to_node(short, scene, "panel")
    params = widget._parameterNode
    params.inputVolume, params.k = volume_node, K
    widget._checkCanApply()
    assert ui.applyButton.text == "Segment" and ui.applyButton.enabled

    def pump() -> None:
        """What the QTimer does in Slicer: poll every so often until the job's last event is read."""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            widget._onPollTimer()
            job = widget.logic.core.job
            if job.outcome and not widget._jobRunning() and not widget.logic.core.has_result:
                assert job.outcome == "finished" and errors == [], errors
                return
            time.sleep(0.05)
        raise TimeoutError("the worker job did not end")

    widget.onApplyButton()
    assert ui.applyButton.text == "Cancel"
    pump()
    assert ui.statusLabel.text.startswith("Done in") and ui.applyButton.text == "Segment"
    node = params.outputSegmentation
    assert node is not None and node.GetName() == "panel RetrievalSeg"

    # The user corrects slice 2 in the Segment Editor; the panel lists it, adds it, re-segments the rest.
    update = np.zeros(short.array.shape, dtype=np.uint8)
    update[2] = query.labels.array[2]
    mb.labelmap_to_segmentation((short.with_array(update), bank.labels), scene, volume_node, node, axis=2, slices=[2])
    widget._updateReviewInfo()
    assert ui.editedSlicesLabel.text == "Edited slices: 2 (1 not in the bank yet)."
    widget.onAddEditedSlices()
    assert ui.applyButton.text == "Cancel"  # any worker job can be cancelled
    pump()
    assert ui.statusLabel.text == "Added 1 slice(s) to the bank."
    assert ui.editedSlicesLabel.text == "Edited slices: 2 (0 not in the bank yet)."
    # The Segment Editor's GUI exists and edits this segmentation: it gets an undo point just
    # before the result is written (so Ctrl+Z there undoes the write).
    from _slicer_fakes import Fake

    undo_points = []
    editor = Fake("qMRMLSegmentEditorWidget", segmentationNode=lambda: node, saveStateForUndo=lambda: undo_points.append(
        mb.labelmap_from_segmentation(node, volume_node, bank.labels).array.copy()))
    gui.modules.SegmentEditorWidget = Fake("SegmentEditor.SegmentEditorWidget", editor=editor)
    before_write = mb.labelmap_from_segmentation(node, volume_node, bank.labels).array.copy()
    widget.onResegmentRemaining()
    assert errors == []
    # The user picks another segmentation while the job runs: the result goes where the job started.
    elsewhere = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "picked meanwhile")
    params.outputSegmentation = elsewhere
    pump()
    assert errors == []
    assert elsewhere.GetSegmentation().GetNumberOfSegments() == 0 and params.outputSegmentation is node
    assert len(undo_points) == 1 and np.array_equal(undo_points[0], before_write)
    assert widget.logic.core.state.slices[3].retrieved[0][0].startswith(mb.case_id_for_volume(volume_node))

    # Review: the Red view shows slice 3 along the volume's k axis.
    import vtk

    m = mb.ijk_to_ras_matrix(volume_node)
    center = mb.slice_center_ras(volume_node, 2, 3)
    slice_to_ras = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            slice_to_ras.SetElement(r, c, m[r, c] / np.linalg.norm(m[:3, c]))
        slice_to_ras.SetElement(r, 3, center[r])
    red.GetSliceToRAS().DeepCopy(slice_to_ras)
    assert widget._currentSliceIndex() == 3
    widget.onWhyThisMask()
    assert ui.currentSliceLabel.text.startswith("Slice 3: confidence") and len(widget._thumbnailWidgets) == K
    params.confidenceThreshold = 1.0
    widget.onNextLowConfidenceSlice()
    assert ui.currentSliceLabel.text.startswith("Slice 4: confidence")
    widget.onAddCurrentSlice()
    assert ui.statusLabel.text == "Adding slice 3 to the bank..."
    pump()
    assert ui.statusLabel.text == "Added 1 slice(s) to the bank."
    widget.onUndo()
    assert ui.statusLabel.text == "The last result was undone."
    widget.onVerifyBank()  # read-only check, in the worker
    pump()
    assert ui.statusLabel.text.startswith(f"support bank {bank.path}") and ui.statusLabel.text.endswith("OK")
    widget.cleanup()
    assert errors == []


def test_slicer_module_panel_suggests_slices_jumps_and_refreshes(monkeypatch, scene, cases, bank, client) -> None:  # type: ignore[no-untyped-def]
    """Suggest slices to annotate: the list with reasons, a click jumps the views, adding a slice refreshes it."""
    import importlib

    from _slicer_fakes import fake_slicer_gui

    gui = fake_slicer_gui(monkeypatch, scene)
    ui, errors = gui.ui, gui.errors
    module = importlib.import_module("RetrievalSeg")
    monkeypatch.setattr(module.RetrievalSegLogic, "engineSettings", staticmethod(lambda node, folder=None: SETTINGS))
    monkeypatch.setattr(module.RetrievalSegLogic, "workerClient", staticmethod(lambda: client))
    widget = module.RetrievalSegWidget()
    widget.setup()
    ui.bankPathLineEdit.currentPath = str(bank.path)
    ui.weightsPathLineEdit.currentPath = ""
    widget.onOpenBank()
    volume_node = mb.volume_to_node(cases[1].image, scene, "suggest")
    params = widget._parameterNode
    params.inputVolume, params.suggestCount = volume_node, 2
    widget._checkCanApply()
    assert ui.suggestSlicesButton.enabled

    def pump() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            widget._onPollTimer()
            job = widget.logic.core.job
            if job.outcome and not widget._jobRunning():
                assert job.outcome == "finished" and errors == [], errors
                return
            time.sleep(0.05)
        raise TimeoutError("the worker job did not end")

    widget.onSuggestSlices()
    assert widget.logic.core.job.kind == "suggest" and not ui.suggestSlicesButton.enabled
    pump()
    first = widget.logic.core.suggestions
    assert len(first.picks) == 2 and first.bank_entries == len(bank)
    texts = [args[0] for _, args in gui.qt.QListWidgetItem.instances]
    assert texts == [p.summary() for p in first.picks] and texts[0].startswith(f"1. slice {first.picks[0].index}, distance to bank")
    assert len(ui.suggestionsListWidget.calls_to("addItem")) == 2
    assert ui.suggestionsLabel.text.startswith("Coverage: ") and ui.statusLabel.text.startswith("Suggested 2 slice(s)")

    # A click shows the slice: the views jump to its centre.
    widget.onSuggestionSelected(1)
    pick = first.picks[1]
    jumps = gui.markups_logic.calls_to("JumpSlicesToLocation")
    assert jumps[-1][0][:3] == pytest.approx(mb.slice_center_ras(volume_node, first.axis, pick.index))
    assert ui.currentSliceLabel.text.startswith(f"Slice {pick.index}: ")

    # The user annotates the first suggestion and adds it: the list refreshes without it.
    segmentation = mb.labelmap_to_segmentation((cases[1].labels, bank.labels), scene, volume_node)
    params.outputSegmentation = segmentation
    widget.logic.core.start_add_slices(volume_node, segmentation, first.axis, [first.picks[0].index], widget._caseId())
    widget._onJobStarted("adding")
    add_job, deadline = widget.logic.core.job, time.monotonic() + 180
    while add_job.running and time.monotonic() < deadline:
        widget._onPollTimer()
        time.sleep(0.05)
    assert add_job.outcome == "finished" and widget.logic.core.job.kind == "suggest"  # the refresh started by itself
    pump()
    second = widget.logic.core.suggestions
    assert second is not first and second.bank_entries == first.bank_entries + 1
    assert first.picks[0].index in second.in_bank and first.picks[0].index not in [p.index for p in second.picks]
    widget.cleanup()
    assert errors == []


def test_slicer_module_installs_ask_once_check_torch_and_keep_the_environment(monkeypatch, scene, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """PyTorch is asked for once; an old torch is refused with what to do; SAM2_BUILD_CUDA is set
    for sam2's pip call only."""
    import importlib.metadata
    import importlib.util
    import os
    import sys
    import types

    module, ui, errors = _module_with_fake_gui(monkeypatch, scene, temporary_path=str(tmp_path))
    real_version, real_find_spec = importlib.metadata.version, importlib.util.find_spec
    installed = {"torch": None, "sam2": None}  # not installed yet

    def version(name):  # type: ignore[no-untyped-def]
        if name == "torch":
            if installed["torch"] is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return installed["torch"]
        return real_version(name)

    def find_spec(name, *args):  # type: ignore[no-untyped-def]
        if name in installed and installed[name] is None:
            return None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    asked, torch_calls, pip_env = [], [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: asked.append(a) or True)

    class PyTorchUtilsLogic:
        def torchInstalled(self) -> bool:
            return installed["torch"] is not None

        def installTorch(self, askConfirmation, torchVersionRequirement):  # type: ignore[no-untyped-def]
            torch_calls.append((askConfirmation, torchVersionRequirement))
            installed["torch"] = "2.6.0+cpu"
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))

    def pip_install(args):  # type: ignore[no-untyped-def]
        pip_env.append((list(args), os.environ.get("SAM2_BUILD_CUDA")))
        if "-r" in args and module.SAM2_REQUIREMENT in Path(args[args.index("-r") + 1]).read_text():
            installed["sam2"] = "1.1.0"

    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    monkeypatch.delenv("SAM2_BUILD_CUDA", raising=False)

    assert module.RetrievalSegLogic().installDependencies(askConfirmation=True)
    assert len(asked) == 1 and "torch" in asked[0][0]  # one question for everything
    assert torch_calls == [(False, module.TORCH_REQUIREMENT)]  # PyTorch Utils does not ask again
    sam2_calls = [env for args, env in pip_env if "--require-hashes" in args]  # sam2, pinned by its SHA-256
    sam2_file = (tmp_path / "RetrievalSeg-sam2-requirements.txt").read_text()
    assert sam2_file.strip() == f"{module.SAM2_REQUIREMENT} --hash=sha256:{module.SAM2_SHA256}"
    assert sam2_calls == ["0"] and "SAM2_BUILD_CUDA" not in os.environ

    installed["torch"] = "2.1.2+cu118"
    problem = module.RetrievalSegLogic.torchVersionProblem()
    assert problem is not None and "2.5.1" in problem and "2.1.2+cu118" in problem and "PyTorch Utils" in problem
    with pytest.raises(RuntimeError, match="needs PyTorch 2.5.1 or newer"):
        module.RetrievalSegLogic().checkTorchVersion()
    installed["torch"] = "2.10.0"  # compared as numbers, not text
    assert module.RetrievalSegLogic.torchVersionProblem() is None


def test_slicer_module_self_test_skips_cleanly_without_packages(monkeypatch, scene) -> None:  # type: ignore[no-untyped-def]
    """Reload and Test calls runTest directly: missing packages must not raise."""
    module, ui, errors = _module_with_fake_gui(monkeypatch, scene)
    monkeypatch.setattr(module.RetrievalSegLogic, "missingPackages", staticmethod(lambda: ["sam2"]))
    shown = []
    test = module.RetrievalSegTest()
    test.delayDisplay = shown.append  # type: ignore[attr-defined]
    test.runTest()
    assert len(shown) == 1 and "skipped" in shown[0] and "sam2" in shown[0]
