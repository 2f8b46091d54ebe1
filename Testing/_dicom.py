"""A small DICOM series written with SimpleITK: shared by the volume reading tests."""
from __future__ import annotations

import locale
from pathlib import Path

import SimpleITK as sitk

from RetrievalSegLib.data.volume import Volume


def _write_dicom_series(folder: Path, vol: Volume, series_uid: str, prefix: str) -> None:
    """One file per slice, with the tags GDCM needs to rebuild geometry (as SimpleITK's example).

    GDCM's writer switches the process locale to "C" and leaves it so (seen with SimpleITK 2.5:
    LC_CTYPE C.UTF-8 -> C), which makes every later open() without an encoding ASCII-only (torch's
    inductor then fails to read its templates); the locale is restored after writing.
    """
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_series(folder, vol, series_uid, prefix)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_series(folder: Path, vol: Volume, series_uid: str, prefix: str) -> None:
    img = vol.to_sitk()
    d = vol.direction
    orientation = (d[0], d[3], d[6], d[1], d[4], d[7])  # row and column direction cosines
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        position = img.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": "MR",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0052": f"{series_uid}.0",  # frame of reference (a DICOM SEG needs it)
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0037": "\\".join(f"{x:.10g}" for x in orientation),
            "0020|0032": "\\".join(f"{x:.10g}" for x in position),
            "0018|0050": f"{vol.spacing[2]:.10g}",
        }.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(s)
