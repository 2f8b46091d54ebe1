"""Checks on a volume file before SimpleITK reads it: it may come from anywhere.

* **Regular files only.** The input and every file its header names (a NIfTI pair's `.img`, an
  MHD's `ElementDataFile`, a detached NRRD's `data file`, every entry of a DICOM folder) must be a
  regular file: opening a FIFO for reading blocks until someone writes, and a device never ends.
  Checked with `stat` before anything is opened. (GDCM's folder scan happens to skip special files;
  a DICOM folder holding one is refused by name rather than relying on that.)
* **A voxel cap.** At most `RSEG_MAX_VOXELS` voxels per volume (default 2^31), from the header alone
  (SimpleITK's `ReadImageInformation`; for DICOM the first file's size times the number of files).
* **The data the header promises must be there.** SimpleITK's NIfTI reader zero-fills a truncated
  file without a word (a 352-byte file whose header claims 1024^3 voxels loads as 1 GB of zeros), so
  a NIfTI header's dims x bitpix is checked against the file's size, or, for `.nii.gz`, against the
  decompressed stream, counted in bounded chunks and stopped as soon as enough bytes were seen. NRRD
  and MetaImage readers notice truncation themselves, but only after allocating what the header
  claims, so for them a cheap bound: deflate (gzip, zlib) never expands data more than ~1032 times,
  so data files of n bytes cannot hold more than 1032 n bytes of voxels. DICOM files are read by
  GDCM, which checks each file; they get the cap but no size bound (JPEG and RLE codecs can
  compress a flat image further than deflate).
"""
from __future__ import annotations

import gzip
import math
import os
import re
import stat
import struct
import zlib
from pathlib import Path

ENV_MAX_VOXELS = "RSEG_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 2**31  # a 2048 x 2048 x 512 volume; a 512 x 512 x 1000 CT is a quarter of it
#: zlib's documented worst case is about 1032:1 (a long run of one byte); every deflate stream obeys it.
DEFLATE_MAX_RATIO = 1032
_CHUNK = 1 << 20
_KINDS = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "folder"))


def max_voxels(value: int | None = None) -> tuple[int, str]:
    """(cap, where it came from): `value`, else $RSEG_MAX_VOXELS, else the default."""
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"max_voxels must be a positive integer, got {value!r}")
        return value, f"max_voxels={value}"
    env = os.environ.get(ENV_MAX_VOXELS)
    if env:
        try:
            cap = int(env.replace("_", "").replace(",", ""))
        except ValueError:
            cap = 0
        if cap < 1:
            raise ValueError(f"{ENV_MAX_VOXELS} must be a positive number of voxels (e.g. 4294967296), got {env!r}")
        return cap, f"{ENV_MAX_VOXELS}={env}"
    return DEFAULT_MAX_VOXELS, f"the default; raise it with {ENV_MAX_VOXELS}=N"


def check_voxel_count(path: Path, size: tuple[int, ...], cap: int | None = None) -> None:
    """ValueError naming the setting when `size` holds more voxels than the cap."""
    limit, source = max_voxels(cap)
    n = math.prod(int(s) for s in size)
    if n > limit:
        raise ValueError(
            f"{path} has {' x '.join(str(int(s)) for s in size)} = {n:,} voxels, more than the cap of "
            f"{limit:,} voxels per volume ({source}). If the header is right and the machine has the memory, "
            f"raise the cap (e.g. {ENV_MAX_VOXELS}={n}); otherwise the file is damaged or not what it seems"
        )


def check_regular(path: Path, what: str = "image file") -> os.stat_result:
    """The file's stat (links followed: the user named it); ValueError unless it is a regular file."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "special file")
        raise ValueError(
            f"{path} is not a regular file (it is a {kind}); RetrievalSeg reads {what}s only from regular "
            "files (and DICOM series from folders of them): a FIFO or a device would block or never end"
        )
    return st


def check_dicom_folder(folder: Path) -> None:
    """Every entry of a DICOM folder must be a regular file or a folder (sub-folders are not read)."""
    with os.scandir(folder) as it:
        for entry in it:
            try:
                st = os.stat(entry.path)
            except OSError:
                continue  # a dangling link: GDCM cannot open it either
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                check_regular(Path(entry.path), "DICOM file")


# ----------------------------------------------------------------------------- files named by headers
def _header_text(path: Path, limit: int = 1 << 16) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("latin-1")


def _listed_files(spec: str, rest: list[str], folder: Path) -> list[Path]:
    """Files of a MetaImage `ElementDataFile` or NRRD `data file` value: a name, LIST, or a pattern."""
    words = spec.split()
    if not words or words[0] == "LOCAL":
        return []
    if words[0] == "LIST":
        return [folder / line.strip() for line in rest if line.strip()]
    if "%" in words[0] and len(words) >= 4:  # printf pattern: FORMAT MIN MAX STEP [SUBDIM]
        try:
            lo, hi, step = int(words[1]), int(words[2]), int(words[3])
        except ValueError:
            return [folder / spec.strip()]
        if step == 0 or abs(hi - lo) // abs(step) > 100_000:
            raise ValueError(f"data file pattern {spec!r} names too many files")
        return [folder / (words[0] % n) for n in range(lo, hi + (1 if step > 0 else -1), step)]
    return [folder / spec.strip()]


def data_files(path: Path) -> list[Path]:
    """The files holding `path`'s voxels (the file itself for single-file formats)."""
    name = path.name.lower()
    if name.endswith((".mha", ".mhd")):
        lines = _header_text(path).splitlines()
        for n, line in enumerate(lines):
            m = re.match(r"\s*ElementDataFile\s*=\s*(.*)$", line)
            if m:
                return _listed_files(m.group(1), lines[n + 1 :], path.parent) or [path]
        return [path]
    if name.endswith((".nrrd", ".nhdr")):
        text = _header_text(path)
        blank = re.search(r"\r?\n\r?\n", text)  # the header ends at the first blank line
        head, rest = (text[: blank.start()], text[blank.end() :]) if blank else (text, "")
        lines = head.splitlines()
        for n, line in enumerate(lines):
            m = re.match(r"\s*data ?file\s*:\s*(.*)$", line, re.IGNORECASE)
            if m:
                tail = lines[n + 1 :] + rest.splitlines()
                return _listed_files(m.group(1), tail, path.parent) or [path]
        return [path]
    for hdr, img in ((".hdr", ".img"), (".hdr.gz", ".img.gz"), (".img", ".hdr"), (".img.gz", ".hdr.gz")):
        if name.endswith(hdr):
            other = path.with_name(path.name[: -len(hdr)] + img)
            return [path, other] if other.exists() else [path]
    return [path]


# ----------------------------------------------------------------------------- NIfTI
def _nifti_header(head: bytes) -> tuple[int, str, tuple[int, ...], int, int, bool] | None:
    """(version, byte order, dims, bitpix, vox_offset, single file) of a NIfTI-1/2 header, or None."""
    for order in "<>":
        if len(head) >= 4 and struct.unpack(order + "i", head[:4])[0] == 348 and len(head) >= 348:
            dim = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            vox = struct.unpack(order + "f", head[108:112])[0]
            single = head[344:348] == b"n+1\0"
            version, minimum = 1, 352 if single else 0
            break
        if len(head) >= 4 and struct.unpack(order + "i", head[:4])[0] == 540 and len(head) >= 540:
            dim = struct.unpack(order + "8q", head[16:80])
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            vox = struct.unpack(order + "q", head[168:176])[0]
            single = head[4:8] == b"n+2\0"
            version, minimum = 2, 544 if single else 0
            break
    else:
        return None
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise ValueError(f"its NIfTI-{version} header says it has {ndim} dimensions (dim[0] must be 1..7)")
    if bitpix <= 0:
        raise ValueError(f"its NIfTI-{version} header says {bitpix} bits per voxel")
    if not math.isfinite(vox) or vox < 0:
        raise ValueError(f"its NIfTI-{version} header has vox_offset {vox}")
    dims = tuple(d if d > 0 else 1 for d in dim[1 : ndim + 1])  # as the NIfTI library reads dims <= 0
    return version, order, dims, int(bitpix), max(int(vox), minimum), single


def _stream_size(path: Path, needed: int) -> int:
    """Bytes in `path` (decompressed if it is gzip), counted up to `needed` in bounded chunks."""
    with open(path, "rb") as raw:
        if raw.read(2) != b"\x1f\x8b":  # not gzip: SimpleITK's znzlib reads it as it is
            return os.fstat(raw.fileno()).st_size
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while total < needed:
                block = f.read(min(_CHUNK, needed - total))
                if not block:
                    break
                total += len(block)
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(
            f"{path}: its compressed stream is damaged or cut short after {total:,} bytes ({e}); re-export or "
            "re-download the file"
        ) from None
    return total


def check_nifti_size(path: Path, cap: int | None = None) -> None:
    """ValueError unless a NIfTI file holds the voxel data its header describes (and the cap allows)."""
    path = Path(path)
    files = data_files(path)
    head_file = next((f for f in files if f.name.lower().endswith((".nii", ".nii.gz", ".hdr", ".hdr.gz"))), None)
    if head_file is None:
        return
    with open(head_file, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    try:
        if gz:
            with gzip.open(head_file, "rb") as f:
                head = f.read(544)
        else:
            with open(head_file, "rb") as f:
                head = f.read(544)
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{head_file}: its compressed stream is damaged ({e}); re-export or re-download it") from None
    try:
        parsed = _nifti_header(head)
    except ValueError as e:
        raise ValueError(f"{head_file} cannot be read as NIfTI: {e}") from None
    if parsed is None:
        return  # not a NIfTI header: SimpleITK says what it is not
    version, _, dims, bitpix, offset, single = parsed
    check_voxel_count(path, dims, cap)
    data_file = head_file if single else next((f for f in files if f != head_file), None)
    if data_file is None:
        return  # a header without its .img: SimpleITK reports the missing file
    check_regular(data_file)
    nbytes = (math.prod(dims) * bitpix + 7) // 8
    needed = offset + nbytes
    have = _stream_size(data_file, needed)
    if have < needed:
        where = "its decompressed stream holds" if gz or data_file.name.lower().endswith(".gz") else "the file has"
        missing = needed - max(have, offset)
        raise ValueError(
            f"{data_file} is truncated or its header is wrong: the NIfTI-{version} header describes "
            f"{' x '.join(map(str, dims))} voxels of {bitpix} bits, {nbytes:,} bytes of voxel data from byte "
            f"{offset}, but {where} {have:,} bytes; {missing:,} bytes of voxel data are missing. SimpleITK would "
            "fill them with zeros, so it is refused: re-export or re-download the file"
        )


# ----------------------------------------------------------------------------- every format
def check_image_file(path: Path, reader_info: tuple[tuple[int, ...], int, int] | None, cap: int | None = None) -> None:
    """Sizes of a single image file (not DICOM) against its header: `reader_info` is SimpleITK's
    (size, components, bits per component) from ReadImageInformation."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz", ".hdr", ".hdr.gz", ".img", ".img.gz")):
        check_nifti_size(path, cap)
    if reader_info is None:
        return
    size, components, bits = reader_info
    check_voxel_count(path, size, cap)
    needed = math.prod(size) * max(components, 1) * bits // 8
    have = sum(os.stat(f).st_size for f in data_files(path) if f.exists())
    if have * DEFLATE_MAX_RATIO < needed:
        raise ValueError(
            f"{path} cannot hold the volume its header describes ({' x '.join(map(str, size))} voxels, {needed:,} "
            f"bytes): its data is {have:,} bytes, and even compressed data expands at most {DEFLATE_MAX_RATIO} "
            "times. The file is truncated or its header is wrong: re-export or re-download it"
        )
