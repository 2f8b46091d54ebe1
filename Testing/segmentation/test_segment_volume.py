"""Whole-volume segmentation: geometry, axis choice, slice ranges, progress, cancel, errors."""
from __future__ import annotations


import numpy as np
import pytest
import SimpleITK as sitk

from RetrievalSegLib.engine.pipeline import RetrievalEngine
from _small_world import bank_of_first_case, small_engine, small_study
from RetrievalSegLib.segmentation.segment import segment_volume
from RetrievalSegLib.data.volume import Volume, read_volume, write_volume


@pytest.fixture(scope="module")
def engine() -> RetrievalEngine:
    return small_engine()


@pytest.fixture(scope="module")
def study():
    return small_study()


@pytest.fixture(scope="module")
def bank(tmp_path_factory, engine, study):
    return bank_of_first_case(tmp_path_factory.mktemp("bank") / "bank", engine, study)


def test_label_map_has_the_input_geometry_and_bank_labels(bank, engine, study):
    image = study[1].image
    seg = segment_volume(image, bank, engine, k=2, keep_label_masks=True)
    assert seg.labelmap.same_geometry(image, tol=0)
    # The label map is what SAM 2 predicted: foreground exactly where some label's logit is
    # positive (and there is some: an all-zero label map must fail this test).
    assert seg.label_masks.any()
    np.testing.assert_array_equal(seg.labelmap.array > 0, seg.label_masks.any(axis=0))
    assert seg.labelmap.array.dtype == np.uint8
    assert set(np.unique(seg.labelmap.array)) <= {0, 1, 2, 3}
    assert [lab.name for lab in seg.labels] == ["RV", "Myo", "LV"]
    assert seg.axis == 2 and len(seg.slices) == 6  # k has the largest spacing
    assert np.isfinite(seg.confidence).all() and ((seg.confidence >= 0) & (seg.confidence <= 1)).all()
    assert all(len(s.retrieved) == 2 for s in seg.slices.values())


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", "dicom"])
def test_geometry_survives_file_round_trip_through_segmentation(tmp_path, bank, engine, study, suffix):
    image = study[1].image
    if suffix == "dicom":
        folder = tmp_path / "series"
        folder.mkdir()
        img = image.to_sitk()
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        uid = "1.2.826.0.1.3680043.2.1125." + "1.42"
        for z in range(img.GetDepth()):
            sl = img[:, :, z]
            sl.SetMetaData("0020|000e", uid)
            sl.SetMetaData("0020|0013", str(z + 1))
            sl.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, z)))))
            sl.SetMetaData("0020|0037", "\\".join(map(str, image.direction[0::3] + image.direction[1::3])))
            sl.SetMetaData("0008|0060", "MR")
            writer.SetFileName(str(folder / f"{z:03d}.dcm"))
            writer.Execute(sl)
        path = folder
    else:
        path = write_volume(image, tmp_path / f"image{suffix}")
    loaded = read_volume(path)
    seg = segment_volume(loaded, bank, engine, k=1, slice_range=(2, 4))
    out = write_volume(seg.labelmap, tmp_path / "seg.nrrd")
    back = read_volume(out)
    assert back.same_geometry(loaded, tol=1e-6)
    tol = 1e-4 if suffix != ".nrrd" else 1e-9  # NIfTI and DICOM store geometry with fewer digits
    np.testing.assert_allclose(back.spacing, image.spacing, atol=tol)
    np.testing.assert_allclose(back.origin, image.origin, atol=tol)
    np.testing.assert_allclose(back.direction, image.direction, atol=tol)


def test_explicit_axis_and_slice_range(bank, engine, study):
    image = study[1].image
    seg = segment_volume(image, bank, engine, k=1, axis="k", slice_range=(1, 3))
    assert sorted(seg.slices) == [1, 2]
    assert not seg.labelmap.array[[0, 3, 4, 5]].any()  # outside the range stays background
    assert np.isnan(seg.confidence[[0, 3, 4, 5]]).all()
    with pytest.raises(ValueError, match="slice range"):
        segment_volume(image, bank, engine, k=1, slice_range=(4, 99))
    with pytest.raises(ValueError, match="slice axis"):
        segment_volume(image, bank, engine, k=1, axis="z")


def test_axis_auto_follows_the_largest_spacing(bank, engine, study):
    image = study[1].image
    arr = np.ascontiguousarray(np.transpose(image.array, (2, 1, 0)))  # k <-> i
    swapped = Volume(arr, image.spacing[::-1], image.origin, image.direction)
    seg = segment_volume(swapped, bank, engine, k=1, slice_range=(0, 2))
    assert seg.axis == 0  # i now has the 5 mm spacing


def test_progress_and_cooperative_cancel(bank, engine, study):
    seen = []
    state = {"n": 0}

    def progress(done, total):
        seen.append((done, total))
        state["n"] = done

    seg = segment_volume(study[1].image, bank, engine, k=1, encoder_batch=2, progress=progress,
                         cancel=lambda: state["n"] >= 3)
    assert seg.cancelled
    assert len(seg.slices) == 3
    assert seen[0] == (0, 6) and seen[-1] == (3, 6)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    done = np.zeros(6, bool)
    done[list(seg.slices)] = True
    assert not seg.labelmap.array[~done].any()


def test_labels_subset_and_errors(bank, engine, study):
    seg = segment_volume(study[1].image, bank, engine, k=1, labels=[3], slice_range=(0, 2))
    assert set(np.unique(seg.labelmap.array)) <= {0, 3}
    with pytest.raises(ValueError, match=r"labels \[7\] are not in the bank"):
        segment_volume(study[1].image, bank, engine, labels=[7])
    with pytest.raises(ValueError, match="k=99 supports requested"):
        segment_volume(study[1].image, bank, engine, k=99)
    with pytest.raises(ValueError, match="needs the case_id"):
        segment_volume(study[1].image, bank, engine, case_policy="exclude")
    bad = study[1].image.with_array(study[1].image.array.astype(np.float32))
    bad.array[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        segment_volume(bad, bank, engine)


def test_case_policies_prefer_and_exclude_the_own_case(bank, engine, study):
    case0 = study[0]
    seg = segment_volume(case0.image, bank, engine, k=1, case_id=case0.case_id, case_policy="prefer",
                         slice_range=(0, 6))
    own = {e.id for e in bank.entries() if e.case_id == case0.case_id}
    assert all(s.retrieved[0][0] in own for s in seg.slices.values())
    with pytest.raises(ValueError, match="excluded"):
        segment_volume(case0.image, bank, engine, k=1, case_id=case0.case_id, case_policy="exclude")


def test_batched_segment_volume_equals_the_per_slice_path(bank, engine, study):
    """6 slices in batches of 4 (4 + 2), each slice with its own retrieved supports."""
    image = study[1].image
    ref = segment_volume(image, bank, engine, k=2, batch_size=1, keep_label_masks=True)
    got = segment_volume(image, bank, engine, k=2, batch_size=4, keep_label_masks=True)
    assert ref.batch_size == 1 and got.batch_size == 4 and got.precision == ref.precision == "fp32"
    assert len({tuple(e for e, _ in s.retrieved) for s in ref.slices.values()}) > 1  # supports differ
    assert sorted(got.slices) == sorted(ref.slices)
    for i, s in ref.slices.items():
        assert got.slices[i].retrieved == s.retrieved
        for lab in s.iou:
            assert abs(got.slices[i].iou[lab] - s.iou[lab]) <= 1e-4
            assert abs(got.slices[i].object_score[lab] - s.object_score[lab]) <= 1e-4
    np.testing.assert_allclose(got.confidence, ref.confidence, atol=1e-4)
    # each label's mask is identical; the fused label map may differ only where random-weight labels
    # are tied to float noise (the batch reorders float sums): observed 1 pixel of 8640 with k=2
    # under the default support order (the project's rule: compare per-label masks, not argmax maps)
    np.testing.assert_array_equal(got.label_masks, ref.label_masks)
    assert (got.labelmap.array != ref.labelmap.array).mean() <= 1e-3
    assert ref.labelmap.array.any()


def test_batched_cancel_discards_slices_computed_past_the_stop(bank, engine, study):
    state = {"n": 0}

    def progress(done, total):
        state["n"] = done

    seg = segment_volume(study[1].image, bank, engine, k=1, batch_size=4, progress=progress,
                         cancel=lambda: state["n"] >= 3)
    assert seg.cancelled and sorted(seg.slices) == [0, 1, 2]
    assert not seg.labelmap.array[3:].any() and np.isnan(seg.confidence[3:]).all()


def test_precision_and_batch_size_arguments_are_checked(bank, engine, study):
    with pytest.raises(ValueError, match="precision must be one of"):
        segment_volume(study[1].image, bank, engine, k=1, precision="half")
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        segment_volume(study[1].image, bank, engine, k=1, batch_size=0)
    seg = segment_volume(study[1].image, bank, engine, k=1, slice_range=(0, 1))
    assert seg.precision == "fp32" and seg.batch_size >= 1  # auto on CPU


def test_support_order_reaches_the_engine_and_is_recorded(bank, engine, study):
    """nearest (default) vs farthest: the same supports retrieved, another pseudo-video, recorded."""
    from RetrievalSegLib.segmentation.provenance import segmentation_provenance

    image = study[1].image
    near = segment_volume(image, bank, engine, k=2, slice_range=(2, 4))
    far = segment_volume(image, bank, engine, k=2, slice_range=(2, 4), support_order="farthest")
    assert near.support_order == "nearest" and far.support_order == "farthest"
    assert segmentation_provenance(near, engine, bank, k=2)["support_order"] == "nearest"
    assert segmentation_provenance(far, engine, bank, k=2)["support_order"] == "farthest"
    for i, s in near.slices.items():
        assert far.slices[i].retrieved == s.retrieved
    assert any(far.slices[i].object_score != s.object_score for i, s in near.slices.items())
    with pytest.raises(ValueError, match="support_order must be one of"):
        segment_volume(image, bank, engine, k=1, support_order="best-first")
