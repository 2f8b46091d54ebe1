"""`rseg segment --format dcm-seg` (issue "What a new user met", item 12): a DICOM series in, a DICOM SEG out
(read back with highdicom and pydicom) whose frames reference the source images and equal the label map
written as NIfTI in the same run; refused (exit 2) before any model loads when IMAGE is not a DICOM series."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest

from RetrievalSegLib.cli import main as cli_main
from RetrievalSegLib.cli.main import main
from RetrievalSegLib.data.synthetic import make_synthetic_study
from RetrievalSegLib.data.volume import read_volume, write_volume
from _dicom import _write_dicom_series

FAST = ["--random-weights", "--image-size", "256", "--dinov2-input-size", "56", "--device", "cpu"]
SERIES = "1.2.826.0.1.3680043.2.1125.1.77"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A bank of 2 labels from two synthetic cases; the third case's image as a DICOM series."""
    root = tmp_path_factory.mktemp("dcmseg")
    cases = make_synthetic_study(3, shape=(4, 32, 28), spacing=(1.3, 1.3, 6.0))
    bank = root / "bank"
    assert main(["bank", "create", str(bank), "--labels", "1:RV,2:LV", *FAST]) == 0
    for c in cases[:2]:
        img, lab = root / f"{c.case_id}.nii.gz", root / f"{c.case_id}_labels.nii.gz"
        write_volume(c.image, img)
        write_volume(c.labels.with_array(np.where(c.labels.array == 3, 2, np.where(c.labels.array == 1, 1, 0))
                                         .astype(np.uint8)), lab)
        assert main(["bank", "add", str(bank), str(img), str(lab), "--case", c.case_id, *FAST]) == 0
    series = root / "series"
    series.mkdir()
    image = cases[2].image
    _write_dicom_series(series, image.with_array(np.round(image.array * 100).astype(np.int16)), SERIES, "s")
    return bank, series, root / "t.nii.gz"


def test_dicom_seg_frames_reference_their_source_and_equal_the_label_map(study, tmp_path):
    import highdicom as hd

    bank, series, _ = study
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(series), "--bank", str(bank), "--out", str(out), "--format", "dcm-seg",
                 "--k", "2", "--extent-stop", "0", "--no-progress", *FAST]) == 0
    labelmap = read_volume(out).array
    assert set(np.unique(labelmap)) - {0}, "random weights gave an empty label map: the comparison would be weak"
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert seg.SegmentationType == "BINARY"
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "RV"), (2, "LV")]
    assert all(len(s.RecommendedDisplayCIELabValue) == 3 for s in seg.SegmentSequence)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    frames = ds.pixel_array.reshape(-1, *labelmap.shape[1:])
    k = labelmap.shape[0]
    assert len(frames) == 2 * k  # every slice of every segment, empty frames kept
    positions = {}  # SOP instance UID -> the source slice's ImagePositionPatient
    for f in series.iterdir():
        src = pydicom.dcmread(f)
        positions[src.SOPInstanceUID] = [float(x) for x in src.ImagePositionPatient]
    orientation = [float(x) for x in src.ImageOrientationPatient]
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert np.allclose([float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient], orientation)
    back = np.zeros_like(labelmap)
    seen = set()
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert uid.startswith(SERIES + ".")
        z = int(uid.rsplit(".", 1)[1]) - 1  # _write_dicom_series: slice k is <series>.<k + 1>
        seen.add((segment, z))
        assert np.allclose([float(x) for x in group.PlanePositionSequence[0].ImagePositionPatient], positions[uid])
        back[z][frame.astype(bool)] = {1: 1, 2: 2}[segment]
    assert seen == {(s, z) for s in (1, 2) for z in range(k)}
    assert np.array_equal(back, labelmap)


def test_out_dcm_writes_the_dicom_seg_alone(study, tmp_path):
    import highdicom as hd

    bank, series, _ = study
    out = tmp_path / "seg.dcm"
    assert main(["segment", str(series), "--bank", str(bank), "--out", str(out), "--k", "2",
                 "--no-progress", *FAST]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm", "seg.dcm.json"]  # no label map file
    seg = hd.seg.segread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["RV", "LV"]
    assert int(seg.NumberOfFrames) == 2 * 4


@pytest.mark.parametrize("image_kind, out_name, extra, words", [
    ("file", "s.nii.gz", ["--format", "dcm-seg"], "DICOM series folder"),
    ("file", "s.dcm", [], "DICOM series folder"),
    ("series", "s.dcm", ["--report"], "--report reads a label map"),
])
def test_dcm_seg_usage_errors_before_any_model_loads(study, tmp_path, capsys, monkeypatch, image_kind, out_name,
                                                      extra, words):
    bank, series, _ = study
    image = series
    if image_kind == "file":
        image = tmp_path / "i.nii.gz"
        write_volume(read_volume(series), image)

    def refuse(args):
        raise AssertionError("models were loaded before the usage error was found")

    monkeypatch.setattr(cli_main, "make_engine", refuse)
    capsys.readouterr()
    rc = main(["segment", str(image), "--bank", str(bank), "--out", str(tmp_path / out_name), *extra, *FAST])
    assert rc == 2
    assert words in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("s.")]
