"""3D images with their geometry, and the slicing conventions used everywhere in RetrievalSeg.

Conventions
-----------
* `Volume.array` is indexed like SimpleITK's GetArrayFromImage: array[k, j, i].
* Geometry (spacing, origin, direction) is in ITK/LPS order, exactly as SimpleITK reports it.
* A slice axis is an IJK index axis: 0 = i, 1 = j, 2 = k (the usual through-plane axis).
  `slice_view(array, axis, index)` returns the 2D slice with the remaining axes in array order.

Files
-----
* `read_volume(path)` reads what SimpleITK reads (NIfTI, NRRD, MHA/MHD, ...) or a folder with
  one DICOM series (`series_uid=` picks one of several); 2D, 4D and vector images are refused.
* `write_volume(vol, path)` writes .nii/.nii.gz/.nrrd/.mha atomically (temporary name in the
  same folder, then os.replace). NRRD and MHA keep geometry to full double precision; NIfTI
  stores it in float32 (qform/sform, pixdim), so it comes back within ~1e-7 relative.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # SimpleITK is imported lazily so that importing this module stays cheap
    import SimpleITK as sitk

AXIS_NAMES = ("i", "j", "k")


@dataclass
class Volume:
    """A 3D image array with exact geometry (ITK order)."""

    array: np.ndarray  # [k, j, i]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"a Volume needs a 3D array, got shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = tuple(float(d) for d in self.direction)
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("spacing and origin need 3 values and direction 9")

    @property
    def size(self) -> tuple[int, int, int]:
        """Size in ITK (i, j, k) order."""
        k, j, i = self.array.shape
        return (i, j, k)

    def with_array(self, array: np.ndarray) -> "Volume":
        """A volume with the same geometry and a new array of the same shape."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction, dict(self.metadata))

    def same_geometry(self, other: "Volume", tol: float = 1e-5) -> bool:
        """True when size, spacing, origin and direction agree within `tol`."""
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    @classmethod
    def from_sitk(cls, img: "sitk.Image") -> "Volume":
        """A Volume from a 3D scalar SimpleITK image, geometry and string metadata copied."""
        import SimpleITK as sitk

        dim = img.GetDimension()
        if dim != 3:
            raise ValueError(
                f"RetrievalSeg needs a 3D image, got a {dim}D image of size {tuple(img.GetSize())}"
            )
        ncomp = img.GetNumberOfComponentsPerPixel()
        if ncomp != 1:
            raise ValueError(
                f"RetrievalSeg needs a scalar image, got {ncomp} components per voxel "
                f"({img.GetPixelIDTypeAsString()}); extract one channel first"
            )
        metadata: dict[str, str] = {}
        for key in img.GetMetaDataKeys():
            try:
                value = img.GetMetaData(key)
            except (RuntimeError, UnicodeDecodeError):  # binary values: not worth keeping
                continue
            if not value.startswith("[UNKNOWN_PRINT_CHARACTERISTICS]"):  # non-string ITK entries
                metadata[key] = value
        array = sitk.GetArrayFromImage(img)
        return cls(array, img.GetSpacing(), img.GetOrigin(), img.GetDirection(), metadata)

    def to_sitk(self, include_metadata: bool = False) -> "sitk.Image":
        """A SimpleITK image with this array and exact geometry (bool -> uint8, float16 -> 32)."""
        import SimpleITK as sitk

        array = self.array
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        elif array.dtype == np.float16:
            array = array.astype(np.float32)
        img = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        if include_metadata:
            for key, value in self.metadata.items():
                img.SetMetaData(str(key), str(value))
        return img


def parse_axis(axis: int | str | None) -> int | None:
    """Accept 0/1/2, 'i'/'j'/'k', or None/'auto' (through-plane axis chosen later)."""
    if axis is None or (isinstance(axis, str) and axis.lower() == "auto"):
        return None
    if isinstance(axis, str):
        if axis.lower() in AXIS_NAMES:
            return AXIS_NAMES.index(axis.lower())
        if axis.isdigit():
            axis = int(axis)
        else:
            raise ValueError(f"slice axis must be auto, i, j, k, 0, 1 or 2, got {axis!r}")
    if axis not in (0, 1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2 (i, j, k), got {axis!r}")
    return int(axis)


def through_plane_axis(spacing: tuple[float, float, float]) -> int:
    """The IJK axis with the largest spacing (ties: the highest axis, usually k)."""
    s = np.asarray(spacing, dtype=float)
    return int(np.flatnonzero(s == s.max())[-1])


def array_axis(axis: int) -> int:
    """numpy axis of `array[k, j, i]` for IJK slice axis `axis`."""
    return 2 - axis


def num_slices(array: np.ndarray, axis: int) -> int:
    """How many slices `array` has along IJK axis `axis`."""
    return array.shape[array_axis(axis)]


def slice_view(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D slice `index` along IJK axis `axis` (a view, not a copy)."""
    n = num_slices(array, axis)
    if not 0 <= index < n:
        raise IndexError(f"slice {index} is outside 0..{n - 1} along axis {AXIS_NAMES[axis]}")
    sl: list[slice | int] = [slice(None)] * 3
    sl[array_axis(axis)] = index
    return array[tuple(sl)]


def in_plane_spacing(spacing: tuple[float, float, float], axis: int) -> tuple[float, float]:
    """Spacing of a 2D slice along (rows, columns) of `slice_view`'s result."""
    remaining = [a for a in (2, 1, 0) if a != axis]  # IJK axes in array order
    return (float(spacing[remaining[0]]), float(spacing[remaining[1]]))



# --------------------------------------------------------------------------------------------
# Reading and writing files
# --------------------------------------------------------------------------------------------

#: File endings `write_volume` accepts: single-file formats, so that a write can be atomic.
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

#: `Volume.metadata` key where `read_volume` records which DICOM series it read.
SERIES_UID_KEY = "dicom_series_uid"


def _suffix(path: Path) -> str:
    """The lower-case file ending that decides the format (".nii.gz" counts as one)."""
    name = path.name.lower()
    for suffix in WRITE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _pixel_bits(pixel_id: int) -> int:
    """Bits per component of a SimpleITK pixel type ("16-bit signed integer", "vector of 32-bit float")."""
    import re

    import SimpleITK as sitk

    name = sitk.GetPixelIDValueAsString(pixel_id)
    m = re.search(r"(\d+)-bit", name)
    return (int(m.group(1)) if m else 8) * (2 if "complex" in name else 1)


def read_volume(path: str | os.PathLike[str], series_uid: str | None = None, max_voxels: int | None = None) -> Volume:
    """Read a 3D scalar image file (NIfTI, NRRD, MHA/MHD, ...) or a folder with a DICOM series.

    The file is checked first (`data.volume_checks`): regular files only (a FIFO would block), at most
    `max_voxels` voxels (default $RSEG_MAX_VOXELS, else 2^31), and the voxel data the header
    promises must be in the file (a truncated NIfTI is refused, never zero-filled).
    """
    import SimpleITK as sitk

    from .volume_checks import check_dicom_folder, check_image_file, check_regular, data_files
    from .volume_checks import max_voxels as voxel_cap

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {str(p)!r}")
    voxel_cap(max_voxels)  # a bad setting is reported before any file is opened
    if p.is_dir():
        check_dicom_folder(p)
        return _read_dicom_folder(p, series_uid, max_voxels)
    if series_uid is not None:
        raise ValueError(f"series_uid={series_uid!r} applies to DICOM folders only, not {str(p)!r}")
    check_regular(p)
    for f in data_files(p):
        if f.exists():
            check_regular(f, "image data file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()  # the header only: nothing is allocated yet
        info = (tuple(reader.GetSize()), int(reader.GetNumberOfComponents()), _pixel_bits(reader.GetPixelID()))
        check_image_file(p, info, max_voxels)
        img = reader.Execute()
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise ValueError(
            f"cannot read {str(p)!r} as an image: {reason}. RetrievalSeg reads what SimpleITK "
            "reads: NIfTI (.nii, .nii.gz), NRRD, MetaImage (.mha, .mhd) or a folder with one "
            "DICOM series"
        ) from exc
    try:
        return Volume.from_sitk(img)
    except ValueError as exc:
        hint = ""
        if p.name.lower().endswith(".seg.nrrd"):
            hint = " (a Slicer segmentation: read it with segnrrd.read_seg_nrrd)"
        raise ValueError(f"{str(p)!r}: {exc}{hint}") from exc


def _read_dicom_folder(folder: Path, series_uid: str | None, max_voxels: int | None = None) -> Volume:
    """Read one DICOM series from `folder` (the only one, or the one named by `series_uid`)."""
    import SimpleITK as sitk

    from .volume_checks import check_voxel_count

    uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not uids:
        raise ValueError(
            f"no DICOM series found in folder {str(folder)!r}; pass a file or a folder of DICOM "
            "files (subfolders are not searched)"
        )
    if series_uid is None:
        if len(uids) > 1:
            listing = ", ".join(sorted(uids))
            raise ValueError(
                f"folder {str(folder)!r} holds {len(uids)} DICOM series; choose one with "
                f"series_uid=...: {listing}"
            )
        series_uid = uids[0]
    elif series_uid not in uids:
        raise ValueError(
            f"DICOM series {series_uid!r} is not in folder {str(folder)!r}; it holds: "
            + ", ".join(sorted(uids))
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        first = sitk.ImageFileReader()
        first.SetFileName(files[0])
        first.ReadImageInformation()  # rows x columns (x frames) of one file, times the files
        size = tuple(first.GetSize()) + (1,)
        check_voxel_count(folder, (size[0], size[1], size[2] * len(files)), max_voxels)
        img = reader.Execute()
    except RuntimeError as exc:
        raise ValueError(
            f"cannot read DICOM series {series_uid!r} in {str(folder)!r}: {exc}"
        ) from exc
    try:
        vol = Volume.from_sitk(img)
    except ValueError as exc:
        raise ValueError(f"DICOM series {series_uid!r} in {str(folder)!r}: {exc}") from exc
    vol.metadata[SERIES_UID_KEY] = series_uid
    return vol


def write_image_atomic(
    img: "sitk.Image", path: str | os.PathLike[str], compress: bool = True
) -> Path:
    """Write a SimpleITK image to a temporary name beside `path`, check it, then rename it into place.

    SimpleITK's writers do not report a full disk (or a quota or file size limit): they leave a
    short file and return. So the temporary file is read back and compared with `img` before it
    replaces anything; on failure an OSError names `path` and the cause, the previous file is
    untouched and the temporary file removed.
    """
    import SimpleITK as sitk

    from .fileio import fsync_dir

    p = Path(path)
    if not p.parent.is_dir():
        raise FileNotFoundError(f"folder {str(p.parent)!r} does not exist; create it first")
    suffix = _suffix(p)
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(
            f"cannot write {str(p)!r}: unsupported ending {suffix!r}; use one of "
            + ", ".join(WRITE_SUFFIXES)
        )
    tmp = p.parent / f".{p.name[: -len(suffix)]}.{uuid.uuid4().hex[:12]}.tmp{suffix}"
    try:
        try:
            sitk.WriteImage(img, str(tmp), useCompression=compress)
        except RuntimeError as exc:
            raise OSError(f"cannot write {str(p)!r}: {str(exc).strip()}") from exc
        _check_written(img, tmp, p)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(p.parent)
    return p


def _check_written(img: "sitk.Image", tmp: Path, final: Path) -> None:
    """Raise OSError unless the file at `tmp` reads back as exactly `img`'s pixels."""
    import SimpleITK as sitk

    try:
        size = os.stat(tmp).st_size
    except OSError:
        size = 0
    problem = None
    if size == 0:
        problem = "the file written is empty"
    else:
        try:
            back = sitk.ReadImage(str(tmp))
            same = back.GetSize() == img.GetSize() and np.array_equal(
                sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(img)
            )
            if not same:
                problem = f"the file written ({size} bytes) does not read back as the image"
        except RuntimeError:
            problem = f"the file written is incomplete ({size} bytes, unreadable)"
    if problem is None:
        return
    try:
        vfs = os.statvfs(final.parent)
        free = f"; {vfs.f_bavail * vfs.f_frsize / 1e6:.1f} MB free there"
    except (OSError, AttributeError):
        free = ""
    raise OSError(
        f"cannot write {str(final)!r}: {problem}: the disk is probably full, or a quota or file "
        f"size limit was reached{free}. Nothing was replaced: the previous file, if any, is unchanged"
    )


def write_volume(vol: Volume, path: str | os.PathLike[str], compress: bool = True) -> Path:
    """Write `vol` as NIfTI, NRRD or MHA (chosen by the file ending), atomically."""
    return write_image_atomic(vol.to_sitk(), path, compress=compress)


def resample_like(vol: Volume, reference: Volume, interpolation: str = "nearest") -> Volume:
    """`vol` on `reference`'s grid ("nearest" for labels, "linear" for images; 0 outside)."""
    import SimpleITK as sitk

    methods = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear}
    if interpolation not in methods:
        raise ValueError(f"interpolation must be 'nearest' or 'linear', got {interpolation!r}")
    src = vol.to_sitk()
    grid = sitk.Image(list(reference.size), sitk.sitkUInt8)
    grid.SetSpacing(reference.spacing)
    grid.SetOrigin(reference.origin)
    grid.SetDirection(reference.direction)
    out = sitk.Resample(
        src, grid, sitk.Transform(), methods[interpolation], 0.0, src.GetPixelID()
    )
    array = sitk.GetArrayFromImage(out)
    if vol.array.dtype == np.bool_:
        array = array.astype(bool)
    return Volume(array, reference.spacing, reference.origin, reference.direction)
