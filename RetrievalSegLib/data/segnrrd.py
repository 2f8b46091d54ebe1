"""Read and write 3D Slicer segmentation files (`.seg.nrrd`) without Slicer, through `slicerio`.

`slicerio` (maintained by Slicer's core developers, on top of `pynrrd`) reads and writes the format
of Slicer's vtkMRMLSegmentationStorageNode: a 3D NRRD in LPS space holding a labelmap layer (a 4D
NRRD whose first axis lists the layers when segments overlap), plus `Segment{N}_ID`, `_Name`,
`_Color`, `_LabelValue`, `_Layer`, `_Extent`, `_Tags` (the terminology is the `TerminologyEntry`
tag) and `Segmentation_*` fields. This module turns that into RetrievalSeg's terms: one `Volume`
label map with its exact geometry and a list of `SegmentInfo`.

What this module adds to slicerio:

* Writing: one layer on the label map's own grid, a "Reference image geometry" conversion
  parameter equal to that grid (so Slicer keeps editing on exactly these voxels), tight segment
  extents, validation with errors that say what is wrong, and an atomic, checked write
  (`fileio.atomic_write_bytes`: temp file beside the target, fsync, size check, rename; a link at
  the target is replaced, never written through; a full disk leaves the previous file).
* Reading: several layers and overlapping segments become one label map (segments keep their
  label values when those are unique, else are renumbered 1..N in file order; overlaps raise
  unless `overlap="last"`); a plain label-map NRRD gives one segment per value, named
  "Segment_<value>" as Slicer imports it; damaged or foreign files raise ValueError naming the
  file. Files cropped by Slicer to their segments keep the right geometry (the origin is shifted);
  resample with `volume.resample_like` when the source image's grid is needed.
* Text: pynrrd writes header fields as ASCII and reads them dropping other bytes, while Slicer
  writes UTF-8. Segment names, IDs and tags outside ASCII are therefore carried through in UTF-8
  here (written in place of ASCII placeholders, read back from the raw header), so "Läsion" stays
  "Läsion" both ways.
"""
from __future__ import annotations

import io
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .volume import Volume

BINARY_LABELMAP = "Binary labelmap"
TERMINOLOGY_TAG = "TerminologyEntry"
DEFAULT_COLOR = (0.5, 0.5, 0.5)
_EMPTY_EXTENT = [0, -1, 0, -1, 0, -1]
_REFERENCE_GEOMETRY = "Reference image geometry"
_REFERENCE_GEOMETRY_DESCRIPTION = (
    "Image geometry description string determining the geometry of the labelmap that is "
    "created in course of conversion. Can be copied from a volume, using the button."
)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_COMPRESSION_LEVEL = 6  # zlib's default; 9 costs much more time for little on label maps


@dataclass
class SegmentInfo:
    """One segment: its voxel value in the label map, name, colour (RGB 0..1), terminology."""

    label_value: int
    name: str
    color: tuple[float, float, float] = DEFAULT_COLOR
    terminology: str | None = None  # Slicer's serialized terminology entry ("...~SCT^...^...")
    segment_id: str | None = None  # default: "Segment_<label_value>"

    def __post_init__(self) -> None:
        self.label_value = int(self.label_value)
        self.color = tuple(float(c) for c in self.color)  # type: ignore[assignment]

    @property
    def id(self) -> str:
        """The segment ID written to the file."""
        return self.segment_id or f"Segment_{self.label_value}"


def segments_from_labels(
    labels: dict[int, tuple[str, tuple[float, float, float]]],
) -> list[SegmentInfo]:
    """SegmentInfo list from a {value: (name, rgb)} table such as `synthetic.LABELS`."""
    return [SegmentInfo(int(v), name, tuple(rgb)) for v, (name, rgb) in sorted(labels.items())]


# ----------------------------------------------------------------------------- geometry
def ijk_to_lps_matrix(vol: Volume) -> np.ndarray:
    """4x4 IJK -> LPS matrix of a volume (ITK's direction x spacing, and the origin)."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(vol.direction, dtype=float).reshape(3, 3) @ np.diag(vol.spacing)
    m[:3, 3] = vol.origin
    return m


def image_to_ras_matrix(vol: Volume) -> np.ndarray:
    """4x4 IJK -> RAS matrix of a volume (Slicer's IJKToRAS)."""
    return _LPS_TO_RAS @ ijk_to_lps_matrix(vol)


def _num(x: float) -> str:
    """Shortest text that reads back to the same double (like Slicer's vtkNumberToString)."""
    text = repr(float(x) + 0.0)  # + 0.0 turns -0.0 into 0.0
    return text[:-2] if text.endswith(".0") else text


def reference_geometry_string(vol: Volume) -> str:
    """Slicer's serialized image geometry (IJK->RAS matrix + extent) of a volume's grid."""
    i, j, k = vol.size
    numbers = [_num(x) for x in image_to_ras_matrix(vol).ravel()]
    numbers += [str(e) for e in (0, i - 1, 0, j - 1, 0, k - 1)]
    return "".join(f"{n};" for n in numbers)


def _geometry_from_matrix(m: np.ndarray, where: str) -> dict[str, tuple[float, ...]]:
    """Volume geometry (spacing, origin, row-major direction) from a 4x4 IJK -> LPS matrix."""
    m = np.asarray(m, dtype=float)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError(f"{where}: its voxel-to-world geometry is not a finite 4x4 matrix")
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if not np.all(spacing > 0):
        raise ValueError(f"{where}: a voxel axis has zero length in 'space directions'")
    direction = m[:3, :3] / spacing
    return dict(
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in m[:3, 3]),
        direction=tuple(float(d) for d in direction.ravel()),
    )


# ----------------------------------------------------------------------------- writing
def _check_text(what: str, value: str, forbidden: str = "\n\r") -> None:
    bad = [c for c in forbidden if c in value]
    if bad:
        raise ValueError(f"{what} {value!r} may not contain {''.join(bad)!r}")


def _terminology_dict(info: SegmentInfo) -> dict[str, Any]:
    """slicerio's terminology dict for a segment, checked to serialise back to the same text."""
    from slicerio.segmentation import terminology_entry_from_string, terminology_entry_to_string

    text = info.terminology or ""
    _check_text(f"segment {info.name!r} terminology", text, "|\n\r")
    try:
        entry = terminology_entry_from_string(text)
        same = terminology_entry_to_string(entry) == text
    except (IndexError, KeyError, ValueError):
        same = False
    if not same:
        raise ValueError(
            f"segment {info.name!r}: terminology {text!r} is not a Slicer terminology entry "
            "(7 fields separated by '~': context~category~type~type modifier~anatomic context"
            "~anatomic region~region modifier, codes as SCHEME^VALUE^MEANING)"
        )
    return entry


def _validate_segments(labelmap: Volume, segments: list[SegmentInfo]) -> None:
    if not segments:
        raise ValueError("at least one segment is needed to write a .seg.nrrd")
    values = [s.label_value for s in segments]
    ids = [s.id for s in segments]
    for s in segments:
        if s.label_value <= 0:
            raise ValueError(f"segment {s.name!r}: label value must be >= 1, got {s.label_value}")
        if not s.name:
            raise ValueError(f"segment with label value {s.label_value} has an empty name")
        _check_text("segment name", s.name)
        _check_text("segment ID", s.id)
        if len(s.color) != 3 or not all(0.0 <= c <= 1.0 for c in s.color):
            raise ValueError(f"segment {s.name!r}: colour must be 3 values in 0..1, got {s.color}")
        if s.terminology is not None:
            _terminology_dict(s)
    for what, items in (("label values", values), ("segment IDs", ids)):
        repeated = sorted({v for v in items if items.count(v) > 1}, key=str)
        if repeated:
            raise ValueError(f"{what} must be unique, repeated: {repeated}")
    array = labelmap.array
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ValueError(f"a label map needs an integer array, got dtype {array.dtype}")
    present = _values_present(array) - {0}
    unknown = sorted(present - set(values))
    if unknown:
        raise ValueError(
            f"label values {unknown} occur in the label map but no segment describes them; "
            "add a SegmentInfo for each or set those voxels to 0"
        )


def _values_present(array: np.ndarray) -> set[int]:
    """The distinct values of an integer array (a histogram for 8/16-bit ones: no sort)."""
    if array.dtype == np.bool_ or (array.dtype.kind == "u" and array.dtype.itemsize <= 2):
        counts = np.zeros(1 << (8 * array.dtype.itemsize), dtype=np.int64)
        step = max(1, (1 << 22) // max(1, array[0].size))  # ~4M voxels at a time: bounded memory
        for start in range(0, array.shape[0], step):
            chunk = array[start : start + step].ravel()
            counts[: 1 + int(chunk.max(initial=0))] += np.bincount(chunk)
        return {int(v) for v in np.flatnonzero(counts)}
    return {int(v) for v in np.unique(array)}


def _extent(mask_ijk: np.ndarray) -> list[int]:
    """Slicer extent [i0, i1, j0, j1, k0, k1] of an [i, j, k] mask ([0, -1, ...] when empty)."""
    out: list[int] = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask_ijk.any(axis=others))
        if hit.size == 0:
            return list(_EMPTY_EXTENT)
        out += [int(hit[0]), int(hit[-1])]
    return out


def _smallest_unsigned(max_value: int) -> type[np.unsignedinteger]:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return dtype
    raise ValueError(f"label value {max_value} is too large for a segmentation (max 2**32-1)")


class _Utf8Text:
    """ASCII stand-ins for non-ASCII header text (pynrrd encodes its header as ASCII)."""

    def __init__(self) -> None:
        self._tag = uuid.uuid4().hex
        self.originals: dict[bytes, bytes] = {}

    def __call__(self, text: str) -> str:
        if text.isascii():
            return text
        token = f"@rseg-utf8-{self._tag}-{len(self.originals)}@"
        self.originals[token.encode("ascii")] = text.encode("utf-8")
        return token

    def restore(self, data: bytes) -> bytes:
        if not self.originals:
            return data
        end = data.index(b"\n\n") + 2  # the header ends at the first blank line
        header = data[:end]
        for token, original in self.originals.items():
            header = header.replace(token, original)
        return header + data[end:]


def write_seg_nrrd(
    labelmap: Volume,
    segments: list[SegmentInfo],
    path: str | os.PathLike[str],
    compress: bool = True,
) -> Path:
    """Write a label map and its segments as a Slicer `.seg.nrrd` (one layer, atomic write)."""
    import slicerio

    from .fileio import atomic_write_bytes

    p = Path(path)
    if not p.name.lower().endswith(".seg.nrrd"):
        raise ValueError(
            f"{str(p)!r}: a Slicer segmentation file name must end with .seg.nrrd "
            "(Slicer loads other .nrrd files as volumes)"
        )
    if not p.parent.is_dir():
        raise FileNotFoundError(f"folder {str(p.parent)!r} does not exist; create it first")
    _validate_segments(labelmap, segments)
    dtype = _smallest_unsigned(max(s.label_value for s in segments))
    voxels = labelmap.array.astype(dtype, copy=False).transpose(2, 1, 0)  # [k, j, i] -> [i, j, k]
    text = _Utf8Text()
    out_segments = []
    for s in segments:
        segment: dict[str, Any] = {
            "id": text(s.id),
            "name": text(s.name),
            "color": [_num(c) for c in s.color],
            "colorAutoGenerated": False,
            "nameAutoGenerated": False,
            "labelValue": s.label_value,
            "layer": 0,
            "extent": _extent(voxels == s.label_value),
        }
        if s.terminology:
            entry = _terminology_dict(s)
            segment["terminology"] = {
                k: ([text(c) for c in v] if isinstance(v, list) else text(v)) for k, v in entry.items()
            }
        out_segments.append(segment)
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": ijk_to_lps_matrix(labelmap),
        "encoding": "gzip" if compress else "raw",
        "containedRepresentationNames": [BINARY_LABELMAP],
        "masterRepresentation": BINARY_LABELMAP,
        "referenceImageExtentOffset": [0, 0, 0],
        "conversionParameters": [
            {
                "name": _REFERENCE_GEOMETRY,
                "value": reference_geometry_string(labelmap),
                # Slicer reads a conversion parameter only when "&" follows it; slicerio puts
                # "&" between parameters only, so the last one carries its own.
                "description": _REFERENCE_GEOMETRY_DESCRIPTION + "&",
            }
        ],
        "segments": out_segments,
    }
    buffer = io.BytesIO()
    slicerio.write_segmentation(buffer, segmentation, compression_level=_COMPRESSION_LEVEL)
    try:
        atomic_write_bytes(p, text.restore(buffer.getvalue()))
    except OSError as e:  # one message style for every label-map writer (volume.write_image_atomic)
        cause = (e.__cause__.strerror if isinstance(e.__cause__, OSError) else None) or os.strerror(e.errno or 0)
        raise OSError(f"cannot write {str(p)!r}: {cause}; the previous file, if any, is unchanged") from e
    return p


# ----------------------------------------------------------------------------- reading
_SEGMENT_FIELD = re.compile(rb"^Segment([0-9]+)_([A-Za-z]+):=(.*)$")


def _raw_segment_text(p: Path) -> list[dict[str, str]]:
    """Per segment (in slicerio's order: by N), its ID/Name/Tags fields that are not ASCII, in UTF-8.

    pynrrd decodes the header as ASCII and drops other bytes; Slicer writes UTF-8.
    """
    fields: dict[int, dict[str, str]] = {}
    with open(p, "rb") as f:
        for line in f:
            line = line.rstrip(b"\r\n")
            if not line:
                break  # end of the header
            m = _SEGMENT_FIELD.match(line)
            if m:
                text = fields.setdefault(int(m.group(1)), {})
                if m.group(2) in (b"ID", b"Name", b"Tags") and not m.group(3).isascii():
                    text[m.group(2).decode()] = m.group(3).decode("utf-8", errors="replace")
    return [fields[n] for n in sorted(fields)]


def _read(p: Path) -> dict[str, Any]:
    """slicerio's segmentation dict of a NRRD file; ValueError naming the file if it is not one."""
    import nrrd
    import slicerio

    from .volume_checks import check_regular, check_voxel_count, data_files

    where = str(p)
    check_regular(p, "segmentation file")  # a FIFO would block the header read
    if p.stat().st_size == 0:
        raise ValueError(f"{where!r} is empty (0 bytes): not a segmentation; was its writing interrupted?")
    try:
        header = nrrd.read_header(where)
        for f in data_files(p):  # a detached "data file:" may name a FIFO too
            if f.exists():
                check_regular(f, "segmentation data file")
        check_voxel_count(p, tuple(int(s) for s in header.get("sizes", ())))
        if "space directions" not in header:
            raise ValueError(
                f"{where!r} has no 'space directions': its voxel geometry is unknown. Save it "
                "from Slicer (or write it with space directions and space origin) and read it again"
            )
        return slicerio.read_segmentation(where)
    except MemoryError:
        raise
    except Exception as exc:  # pynrrd, slicerio and zlib raise many kinds for damaged data
        if str(exc).startswith(repr(where)):
            raise
        raise ValueError(f"cannot read {where!r} as a NRRD segmentation: {type(exc).__name__}: {exc}") from exc


def read_seg_nrrd(
    path: str | os.PathLike[str], overlap: str = "error"
) -> tuple[Volume, list[SegmentInfo]]:
    """Read a `.seg.nrrd` into one label map on the file's grid and its segments."""
    from slicerio.segmentation import terminology_entry_to_string

    if overlap not in ("error", "last"):
        raise ValueError(f"overlap must be 'error' or 'last', got {overlap!r}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such segmentation file: {str(p)!r}")
    seg = _read(p)
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim not in (3, 4):
        raise ValueError(
            f"{str(p)!r} is a {voxels.ndim}D image; a segmentation is 3D, or 4D with its "
            "layers on the first axis"
        )
    layers = voxels[None] if voxels.ndim == 3 else voxels  # [layer, i, j, k]
    layers = layers.transpose(0, 3, 2, 1)  # [layer, k, j, i], as Volume.array
    if np.issubdtype(layers.dtype, np.floating):
        layers = np.trunc(layers).astype(np.int64)  # as Slicer does (truncation)
    geometry = _geometry_from_matrix(seg["ijkToLPS"], repr(str(p)))

    found = seg.get("segments") or []
    if not found:  # plain label map: one segment per value, as Slicer imports it
        values = sorted({int(v) for v in np.unique(layers[0])} - {0})
        if values and values[0] < 0:
            raise ValueError(f"{str(p)!r}: label values must be >= 0, found {values[0]}")
        segs = [SegmentInfo(v, f"Segment_{v}", DEFAULT_COLOR) for v in values]
        plain = layers[0].astype(_smallest_unsigned(max(values, default=0)))
        return Volume(plain, **geometry), segs

    raw = _raw_segment_text(p)
    if len(raw) != len(found):
        raise ValueError(f"{str(p)!r}: its header lists {len(raw)} segments but slicerio read {len(found)}")
    infos: list[tuple[SegmentInfo, int, int]] = []  # (info, layer, value in layer)
    for n, s in enumerate(found):
        text = raw[n]
        layer = int(s.get("layer", 0))
        value = int(s.get("labelValue", 1))
        if not 0 <= layer < layers.shape[0]:
            raise ValueError(
                f"{str(p)!r}: segment {n} is in layer {layer} but the file has "
                f"{layers.shape[0]} layer(s)"
            )
        seg_id = text.get("ID") or s.get("id") or f"Segment_{n}"
        terminology = _terminology_text(text["Tags"]) if "Tags" in text else (
            terminology_entry_to_string(s["terminology"]) if "terminology" in s else None
        )
        info = SegmentInfo(
            label_value=value,
            name=text.get("Name") or s.get("name") or seg_id,
            color=_color(s.get("color")),
            terminology=terminology or None,
            segment_id=seg_id,
        )
        infos.append((info, layer, value))

    values = [v for _, _, v in infos]
    renumber = len(set(values)) != len(values) or min(values) <= 0
    out_values = list(range(1, len(infos) + 1)) if renumber else values
    out = np.zeros(layers.shape[1:], dtype=_smallest_unsigned(max(out_values)))
    written = np.zeros(layers.shape[1:], dtype=bool)
    segments: list[SegmentInfo] = []
    for (info, layer, value), new_value in zip(infos, out_values):
        mask = layers[layer] == value
        clash = mask & written
        if clash.any() and overlap == "error":
            raise ValueError(
                f"{str(p)!r}: segment {info.name!r} overlaps earlier segments in "
                f"{int(clash.sum())} voxels; one label map cannot hold overlapping segments "
                "(pass overlap='last' to let later segments win)"
            )
        out[mask] = new_value
        written |= mask
        info.label_value = new_value
        segments.append(info)
    return Volume(out, **geometry), segments


def _terminology_text(tags: str) -> str | None:
    for item in tags.split("|"):
        key, _, value = item.strip().partition(":")
        if key == TERMINOLOGY_TAG:
            return value
    return None


def _color(value: Any) -> tuple[float, float, float]:
    try:
        rgb = [float(c) for c in (value or [])][:3]
    except (TypeError, ValueError):
        return DEFAULT_COLOR
    rgb += list(DEFAULT_COLOR[len(rgb):])
    return (rgb[0], rgb[1], rgb[2])
