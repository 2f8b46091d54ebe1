"""DICOM SEG output: the label map of a DICOM series as a DICOM Segmentation (`rseg segment --format dcm-seg`).

One BINARY segment per label (segment number = position in `labels`, from 1), named and coloured as in the
bank (RGB -> CIELab by highdicom), one frame per source slice and segment (empty frames kept), each frame
referencing the source image it was segmented on. Frame k of a segment is slice k of the label map: the
source files are taken in the order SimpleITK's series reader stacked them (`read_volume`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..bank.format import LabelInfo
from ..data.volume import SERIES_UID_KEY, Volume

#: What `--format dcm-seg` writes beside `--out`: the label map's name with this ending.
DICOM_SEG_SUFFIX = ".dcm"


def dicom_seg_path(out: Path) -> Path:
    """`seg.nii.gz` -> `seg.dcm` (the label-map endings rseg writes, longest first)."""
    for s in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha"):
        if out.name.endswith(s):
            return out.with_name(out.name[: -len(s)] + DICOM_SEG_SUFFIX)
    return out.with_name(out.name + DICOM_SEG_SUFFIX)


def source_files(folder: Path, series_uid: str) -> list[str]:
    """The files of one series in `folder`, in the order `read_volume` stacked them (slice k = file k)."""
    import SimpleITK as sitk

    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))


def write_dicom_seg(labelmap: Volume, labels: Sequence[LabelInfo], folder: Path, out: Path,
                    software_version: str = "") -> Path:
    """Write `labelmap` (read from the DICOM series in `folder`) as a DICOM SEG at `out`, atomically."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    series_uid = labelmap.metadata.get(SERIES_UID_KEY)
    if not series_uid:
        raise ValueError("a DICOM SEG needs a label map of a DICOM series (its series UID is unknown)")
    files = source_files(folder, series_uid)
    sources = [pydicom.dcmread(f) for f in files]
    k, rows, cols = labelmap.array.shape
    if len(sources) != k or any((int(ds.Rows), int(ds.Columns)) != (rows, cols) for ds in sources):
        raise ValueError(f"the label map ({k} x {rows} x {cols}) does not match the {len(sources)} files of "
                         f"DICOM series {series_uid} in {str(folder)!r}")
    if not labels:
        raise ValueError("a DICOM SEG needs at least one label")
    masks = np.stack([labelmap.array == lab.value for lab in labels], axis=-1)  # [frame, row, col, segment]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="RetrievalSeg", version=software_version or "unknown",
        family=codes.cid7162.ArtificialIntelligence,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=lab.name,
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*(int(round(255 * c)) for c in lab.color)),
        )
        for n, lab in enumerate(labels, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="RetrievalSeg",
        manufacturer_model_name="rseg segment", software_versions=software_version or "unknown",
        device_serial_number="none", omit_empty_frames=False,
        content_description="RetrievalSeg automatic segmentation",
    )
    return _save_atomic(seg, out)


def _save_atomic(ds, out: Path) -> Path:
    """Write to a temporary name beside `out`, then rename; never through a link."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_symlink():
        raise ValueError(f"refusing to write through the link {str(out)!r}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
