"""A volume file comes from a scanner export or a download: its header is checked against its size
before anything is allocated, truncated files are refused (never zero-filled), a voxel cap stops
absurd sizes with a message naming the setting, and a FIFO or device is refused before it is opened
(opening a FIFO blocks forever)."""
from __future__ import annotations

import gzip
import os
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from RetrievalSegLib.data import volume_checks
from RetrievalSegLib.data.volume import Volume, read_volume, write_volume

ARRAY = (np.arange(4 * 16 * 16) % 200).astype(np.int16).reshape(4, 16, 16)  # [k, j, i]


def nifti1(arr: np.ndarray, endian: str = "<", vox_offset: int = 352, extension: bytes = b"",
           magic: bytes = b"n+1\0") -> bytes:
    """A NIfTI-1 file written field by field (nibabel is not a dependency), any byte order."""
    k, j, i = arr.shape
    codes = {np.dtype(np.int16): (4, 16), np.dtype(np.uint8): (2, 8), np.dtype(np.float32): (16, 32)}
    datatype, bitpix = codes[arr.dtype]
    head = struct.pack(endian + "i10s18sihcc8h3fhhhh8ffffhccffffii80s24shh6f12f16s4s",
                       348, b"", b"", 0, 0, b"r", b"\0", 3, i, j, k, 1, 1, 1, 1, 0.0, 0.0, 0.0, 0, datatype,
                       bitpix, 0, 1.0, 1.0, 1.0, 2.5, 1.0, 1.0, 1.0, 1.0, float(vox_offset), 1.0, 0.0, 0, b"\0",
                       b"\0", 0.0, 0.0, 0.0, 0.0, 0, 0, b"", b"", 0, 0, *([0.0] * 18), b"", magic)
    assert len(head) == 348
    ext = (b"\1\0\0\0" + extension) if extension else b"\0\0\0\0"
    pad = b"\0" * (vox_offset - 348 - len(ext))
    return head + ext + pad + arr.astype(arr.dtype.newbyteorder(endian)).tobytes()


def nifti2_header(dims: tuple[int, ...], bitpix: int = 16, vox_offset: int = 544) -> bytes:
    """A NIfTI-2 header (540 bytes + 4 extension bytes); this build of ITK does not read NIfTI-2,
    Slicer's may: the size check must understand it either way."""
    dim = [len(dims), *dims] + [1] * (7 - len(dims))
    head = struct.pack("<i8shh8q3d8dq6dqq80s24sii6d12diii16sc15s", 540, b"n+2\0\r\n\x1a\n", 4, bitpix, *dim,
                       0, 0, 0, *([1.0] * 8), vox_offset, 1, 0, 0, 0, 0, 0, 0, 0, b"", b"", 0, 0,
                       *([0.0] * 6), *([0.0] * 12), 0, 0, 0, b"", b"\0", b"")
    assert len(head) == 540
    return head + b"\0" * 4


# ----------------------------------------------------------------------------- what must still read
@pytest.mark.parametrize("kind", ["sitk-.nii", "sitk-.nii.gz", "big-endian", "extension", "gzip-two-members",
                                  ".nrrd", ".mha", "detached-.mhd"])
def test_good_files_still_read(tmp_path, kind):
    if kind.startswith("sitk"):
        path = write_volume(Volume(ARRAY), tmp_path / f"v{kind[5:]}")
    elif kind in (".nrrd", ".mha"):
        path = write_volume(Volume(ARRAY), tmp_path / f"v{kind}", compress=True)
    elif kind == "detached-.mhd":
        import SimpleITK as sitk

        path = tmp_path / "v.mhd"
        sitk.WriteImage(Volume(ARRAY).to_sitk(), str(path))
        assert (tmp_path / "v.raw").is_file() or (tmp_path / "v.zraw").is_file()
    else:
        path = tmp_path / "v.nii"
        data = {"big-endian": lambda: nifti1(ARRAY, ">"),
                "extension": lambda: nifti1(ARRAY, vox_offset=368, extension=b"\x10\0\0\0\0\0\0\0" + b"x" * 8),
                "gzip-two-members": lambda: nifti1(ARRAY)}[kind]()
        if kind == "gzip-two-members":  # a concatenation of gzip streams is one .gz file
            path = tmp_path / "v.nii.gz"
            path.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
        else:
            path.write_bytes(data)
    np.testing.assert_array_equal(read_volume(path).array, ARRAY)


# ----------------------------------------------------------------------------- NIfTI sizes
def test_a_tiny_nifti_claiming_a_huge_volume_is_refused_before_allocating(tmp_path):
    """The attack of the issue: 352 bytes whose header claims 512^3 voxels (the issue's 1024^3 at 8 bits
    loaded as 1 GB of zeros; 512^3 keeps today's code from hurting the test machine)."""
    path = tmp_path / "claim.nii"
    head = bytearray(nifti1(np.zeros((1, 1, 1), np.uint8))[:352])
    struct.pack_into("<8h", head, 40, 3, 512, 512, 512, 1, 1, 1, 1)
    path.write_bytes(bytes(head))
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as err:
        read_volume(path)
    msg = str(err.value)
    assert str(path) in msg and "134,217,728" in msg and "352 bytes" in msg and "truncated" in msg, msg
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_truncated_nifti_is_refused_not_zero_filled(tmp_path, suffix):
    whole = nifti1(ARRAY)
    half = whole[: 352 + ARRAY.nbytes // 2]
    path = tmp_path / f"half{suffix}"
    path.write_bytes(gzip.compress(half) if suffix == ".nii.gz" else half)
    with pytest.raises(ValueError, match=r"truncated.*1,024 bytes of voxel data are missing"):
        read_volume(path)


def test_a_cut_gzip_stream_is_refused(tmp_path):
    packed = gzip.compress(nifti1(ARRAY))
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match="compressed stream"):
        read_volume(path)


def test_the_gz_check_streams_and_stops_at_what_the_header_needs(tmp_path, monkeypatch):
    """Counting the bytes of a .nii.gz never holds the volume in memory and reads no more than needed."""
    data = nifti1(np.zeros((64, 64, 64), np.float32))
    path = tmp_path / "big.nii.gz"
    path.write_bytes(gzip.compress(data + b"\0" * 10_000_000))  # 10 MB of trailing bytes: never read
    reads: list[int] = []
    real = gzip.GzipFile.read

    def counting(self, size=-1):
        assert 0 < size <= 1 << 20, size  # bounded chunks, never "read it all"
        out = real(self, size)
        reads.append(len(out))
        return out

    monkeypatch.setattr(gzip.GzipFile, "read", counting)
    volume_checks.check_nifti_size(path)
    assert sum(reads) <= len(data) + (1 << 20)


def test_nifti2_headers_are_understood(tmp_path):
    path = tmp_path / "v2.nii"
    path.write_bytes(nifti2_header((16, 16, 4)) + ARRAY.tobytes())
    volume_checks.check_nifti_size(path)  # complete: fine
    path.write_bytes(nifti2_header((16, 16, 4)) + ARRAY.tobytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        volume_checks.check_nifti_size(path)
    path.write_bytes(nifti2_header((4096, 4096, 4096)))
    with pytest.raises(ValueError, match="RSEG_MAX_VOXELS"):
        volume_checks.check_nifti_size(path)


def test_a_tiny_compressed_nrrd_claiming_a_huge_volume_is_refused(tmp_path):
    """NRRD and MHA readers notice truncation themselves, but only after allocating what the header
    claims: a compressed stream cannot expand more than ~1032 times, so a tiny file is refused first."""
    path = tmp_path / "claim.nrrd"
    path.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 512 512 512\nencoding: gzip\n\n"
                     + gzip.compress(b"\0" * 1000))
    with pytest.raises(ValueError, match="cannot hold"):
        read_volume(path)


# ----------------------------------------------------------------------------- voxel cap
@pytest.mark.parametrize("fmt", [".nii.gz", ".nrrd", ".mha", "dicom"])
def test_the_voxel_cap_names_its_setting(tmp_path, monkeypatch, fmt):
    if fmt == "dicom":
        from _dicom import _write_dicom_series

        path = tmp_path / "series"
        path.mkdir()
        _write_dicom_series(path, Volume(ARRAY), "1.2.826.0.1.3680043.2.1125.7", "s")
    else:
        path = write_volume(Volume(ARRAY), tmp_path / f"v{fmt}")
    assert read_volume(path).array.shape == ARRAY.shape  # the default cap is generous
    monkeypatch.setenv("RSEG_MAX_VOXELS", "1000")
    with pytest.raises(ValueError) as err:
        read_volume(path)
    assert "1,024 voxels" in str(err.value) and "RSEG_MAX_VOXELS" in str(err.value), err.value
    monkeypatch.setenv("RSEG_MAX_VOXELS", "1024")
    assert read_volume(path).array.shape == ARRAY.shape
    assert read_volume(path, max_voxels=2000).array.shape == ARRAY.shape
    with pytest.raises(ValueError, match="max_voxels"):
        read_volume(path, max_voxels=10)
    monkeypatch.setenv("RSEG_MAX_VOXELS", "lots")
    with pytest.raises(ValueError, match="RSEG_MAX_VOXELS must be"):
        read_volume(path)


# ----------------------------------------------------------------------------- FIFOs and devices
def read_in_thread(path: Path, unblock: Path) -> BaseException | None:
    """read_volume(path) in a thread; if it blocks (a FIFO opened for reading), feed the FIFO EOF
    until it returns, and fail: the input must be refused without being opened."""
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            read_volume(path)
            result.append(None)
        except BaseException as e:  # noqa: BLE001
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    blocked = t.is_alive()
    deadline = time.monotonic() + 60
    while t.is_alive() and time.monotonic() < deadline:
        try:
            fd = os.open(unblock, os.O_WRONLY | os.O_NONBLOCK)  # a reader waits: give it EOF
            os.close(fd)
        except OSError:
            pass
        t.join(0.1)
    assert not blocked, f"read_volume({path}) opened a FIFO and blocked"
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_before_it_is_opened(tmp_path):
    fifo = tmp_path / "scan.nii.gz"
    os.mkfifo(fifo)
    err = read_in_thread(fifo, fifo)
    assert isinstance(err, ValueError) and "not a regular file" in str(err) and "FIFO" in str(err), err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("where", ["dicom-folder", "mhd-data-file", "nrrd-data-file", "nifti-.img"])
def test_a_fifo_named_by_a_header_or_in_a_series_is_refused(tmp_path, where):
    if where == "dicom-folder":
        folder = tmp_path / "series"
        folder.mkdir()
        fifo = folder / "0001.dcm"
        path = folder
    elif where == "mhd-data-file":
        fifo = tmp_path / "data.raw"
        path = tmp_path / "v.mhd"
        path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 16 16 4\nElementType = MET_SHORT\n"
                        "ElementDataFile = data.raw\n")
    elif where == "nrrd-data-file":
        fifo = tmp_path / "data.raw"
        path = tmp_path / "v.nhdr"
        path.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 16 16 4\nencoding: raw\n"
                        "endian: little\ndata file: data.raw\n")
    else:
        fifo = tmp_path / "v.img"
        path = tmp_path / "v.hdr"
        path.write_bytes(nifti1(ARRAY, vox_offset=352, magic=b"ni1\0")[:348])
    os.mkfifo(fifo)
    err = read_in_thread(path, fifo)
    assert isinstance(err, ValueError) and "not a regular file" in str(err) and str(fifo) in str(err), err


def test_a_device_is_refused(tmp_path):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    (tmp_path / "zero.nii").symlink_to("/dev/zero")  # a link is followed: the user named it
    for path in (Path("/dev/zero"), tmp_path / "zero.nii"):
        with pytest.raises(ValueError, match="not a regular file"):
            read_volume(path)


def test_a_seg_nrrd_gets_the_cap_and_the_fifo_refusal(tmp_path, monkeypatch):
    from RetrievalSegLib.data.segnrrd import SegmentInfo, read_seg_nrrd, write_seg_nrrd

    path = write_seg_nrrd(Volume((ARRAY % 2).astype(np.uint8)), [SegmentInfo(1, "x", (1.0, 0.0, 0.0))],
                          tmp_path / "s.seg.nrrd")
    assert read_seg_nrrd(path)[0].array.shape == ARRAY.shape
    monkeypatch.setenv("RSEG_MAX_VOXELS", "1000")
    with pytest.raises(ValueError, match="RSEG_MAX_VOXELS"):
        read_seg_nrrd(path)
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "f.seg.nrrd"
        os.mkfifo(fifo)
        with pytest.raises(ValueError, match="not a regular file"):
            read_seg_nrrd(fifo)
