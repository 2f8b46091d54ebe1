"""Volume <-> SimpleITK conversion, read_volume / write_volume and their geometry round trips.

Tolerances: NRRD and MHA store geometry as decimal text with full double precision, so they
round-trip to ~1e-15. NIfTI stores pixdim and the qform/sform in float32, so spacing, origin
and direction come back within float32 precision (relative ~6e-8): those checks use rtol=1e-6.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from RetrievalSegLib.data.volume import (
    SERIES_UID_KEY,
    Volume,
    read_volume,
    resample_like,
    write_volume,
)
from _dicom import _write_dicom_series


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


OBLIQUE = tuple(_rotation(0.3, -0.2, 0.45).ravel())


def _volume(dtype: type = np.int16) -> Volume:
    rng = np.random.default_rng(0)
    array = rng.integers(-500, 1500, size=(4, 5, 6)).astype(dtype)
    return Volume(array, (0.7, 1.3, 4.1), (-101.3, 55.7, 12.345), OBLIQUE)


def _assert_geometry(a: Volume, b: Volume, rtol: float, atol: float) -> None:
    assert a.array.shape == b.array.shape
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=rtol, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, rtol=rtol, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, rtol=rtol, atol=atol)


def test_sitk_round_trip_is_exact() -> None:
    vol = _volume()
    img = vol.to_sitk()
    assert img.GetSize() == vol.size == (6, 5, 4)
    assert img.GetSpacing() == vol.spacing and img.GetDirection() == vol.direction
    # Voxel [k, j, i] of the array is the voxel at ITK index (i, j, k).
    assert img[5, 1, 3] == vol.array[3, 1, 5]
    back = Volume.from_sitk(img)
    assert back.array.dtype == np.int16 and np.array_equal(back.array, vol.array)
    assert (back.spacing, back.origin, back.direction) == (vol.spacing, vol.origin, vol.direction)


def test_to_sitk_metadata_only_when_asked() -> None:
    vol = _volume()
    vol.metadata["note"] = "hello"
    assert not vol.to_sitk().HasMetaDataKey("note")
    assert vol.to_sitk(include_metadata=True).GetMetaData("note") == "hello"


def test_from_sitk_rejects_2d_4d_and_vector() -> None:
    with pytest.raises(ValueError, match="2D image"):
        Volume.from_sitk(sitk.Image(8, 9, sitk.sitkInt16))
    with pytest.raises(ValueError, match="4D image"):
        Volume.from_sitk(sitk.Image([3, 4, 5, 2], sitk.sitkInt16))
    with pytest.raises(ValueError, match="3 components"):
        Volume.from_sitk(sitk.Image([3, 4, 5], sitk.sitkVectorFloat32, 3))


@pytest.mark.parametrize(
    "suffix, tol",
    [(".nrrd", 1e-12), (".mha", 1e-12), (".nii", 1e-6), (".nii.gz", 1e-6)],
)
def test_file_round_trip_keeps_oblique_geometry(tmp_path: Path, suffix: str, tol: float) -> None:
    vol = _volume()
    path = write_volume(vol, tmp_path / f"vol{suffix}")
    assert path == tmp_path / f"vol{suffix}"
    back = read_volume(path)
    assert back.array.dtype == np.int16 and np.array_equal(back.array, vol.array)
    _assert_geometry(back, vol, rtol=tol, atol=1e-12 if tol < 1e-9 else 1e-7)
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind


def test_nifti_loses_only_float32_precision(tmp_path: Path) -> None:
    vol = _volume()
    back = read_volume(write_volume(vol, tmp_path / "v.nii.gz"))
    f32 = np.float32
    # Every value equals the original to within float32 rounding (plus quaternion arithmetic).
    assert np.max(np.abs(np.subtract(back.origin, vol.origin))) <= 4 * np.spacing(f32(101.3))
    assert np.max(np.abs(np.subtract(back.spacing, vol.spacing))) <= 4 * np.spacing(f32(4.1))
    assert np.max(np.abs(np.subtract(back.direction, vol.direction))) < 1e-6


def test_write_label_types_and_compression(tmp_path: Path) -> None:
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[1, 2, 3] = True
    vol = Volume(mask)
    back = read_volume(write_volume(vol, tmp_path / "m.nrrd"))
    assert back.array.dtype == np.uint8 and back.array[1, 2, 3] == 1 and back.array.sum() == 1
    big = Volume(np.zeros((20, 40, 40), dtype=np.uint8))
    plain = write_volume(big, tmp_path / "plain.mha", compress=False).stat().st_size
    packed = write_volume(big, tmp_path / "packed.mha", compress=True).stat().st_size
    assert packed < plain


def test_write_replaces_existing_file_atomically(tmp_path: Path) -> None:
    target = tmp_path / "v.nrrd"
    write_volume(_volume(), target)
    vol2 = _volume().with_array(np.zeros((4, 5, 6), dtype=np.int16))
    write_volume(vol2, target)
    assert read_volume(target).array.max() == 0
    assert sorted(os.listdir(tmp_path)) == ["v.nrrd"]


def test_write_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unsupported ending '\.png'"):
        write_volume(_volume(), tmp_path / "v.png")
    with pytest.raises(FileNotFoundError, match="missing"):
        write_volume(_volume(), tmp_path / "missing" / "v.nrrd")
    assert os.listdir(tmp_path) == []


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        read_volume(tmp_path / "nope.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="cannot read .*junk.nii.gz"):
        read_volume(junk)
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkInt16), str(flat))
    with pytest.raises(ValueError, match="flat.nrrd.*2D image"):
        read_volume(flat)
    four = tmp_path / "four.nrrd"
    sitk.WriteImage(sitk.Image([3, 4, 5, 2], sitk.sitkInt16), str(four))
    with pytest.raises(ValueError, match="4D image"):
        read_volume(four)
    rgb = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.Image([3, 4, 5], sitk.sitkVectorUInt8, 3), str(rgb))
    with pytest.raises(ValueError, match="components"):
        read_volume(rgb)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="no DICOM series"):
        read_volume(empty)


# ---------------------------------------------------------------------------- DICOM series


def test_dicom_series_folder(tmp_path: Path) -> None:
    rot = (0.8660254037844387, -0.5, 0.0, 0.5, 0.8660254037844387, 0.0, 0.0, 0.0, 1.0)
    rng = np.random.default_rng(1)
    vol = Volume(
        rng.integers(-100, 1000, size=(4, 5, 6)).astype(np.int16),
        (0.7, 0.9, 3.0), (-10.5, 20.25, 3.0), rot,
    )
    uid_a, uid_b = "1.2.826.0.1.3680043.2.1125.1.11", "1.2.826.0.1.3680043.2.1125.1.22"
    _write_dicom_series(tmp_path, vol, uid_a, "a")
    back = read_volume(tmp_path)
    assert np.array_equal(back.array, vol.array)
    # DICOM stores geometry as decimal strings (here 10 significant digits).
    _assert_geometry(back, vol, rtol=1e-8, atol=1e-8)
    assert back.metadata[SERIES_UID_KEY] == uid_a

    flipped = vol.with_array(vol.array[::-1].copy())
    _write_dicom_series(tmp_path, flipped, uid_b, "b")
    with pytest.raises(ValueError, match="2 DICOM series") as err:
        read_volume(tmp_path)
    assert uid_a in str(err.value) and uid_b in str(err.value)
    chosen = read_volume(tmp_path, series_uid=uid_b)
    assert np.array_equal(chosen.array, flipped.array)
    with pytest.raises(ValueError, match="1.2.3.4 is not|'1.2.3.4' is not"):
        read_volume(tmp_path, series_uid="1.2.3.4")


def test_resample_like_puts_a_crop_back_on_the_full_grid() -> None:
    full = _volume(np.uint8)
    full.array[:] = 0
    full.array[1:3, 2:4, 1:5] = np.arange(1, 17, dtype=np.uint8).reshape(2, 2, 4)
    img = full.to_sitk()
    # A crop (as Slicer saves a segmentation: smaller grid, origin moved to the first voxel).
    crop = Volume(
        full.array[1:3, 1:5, 1:6].copy(), full.spacing,
        img.TransformIndexToPhysicalPoint((1, 1, 1)), full.direction,
    )
    back = resample_like(crop, full)
    assert back.same_geometry(full, tol=0.0) and back.array.dtype == np.uint8
    assert np.array_equal(back.array, full.array)
    smooth = resample_like(full.with_array(full.array.astype(np.float32)), full, "linear")
    np.testing.assert_allclose(smooth.array, full.array, atol=1e-4)
    with pytest.raises(ValueError, match="'cubic'"):
        resample_like(crop, full, "cubic")
