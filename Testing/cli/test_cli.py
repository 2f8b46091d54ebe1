"""`rseg` end to end on a synthetic study with --random-weights (tests only)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from RetrievalSegLib.cli.main import main
from RetrievalSegLib.data.segnrrd import read_seg_nrrd
from RetrievalSegLib.data.synthetic import make_synthetic_study
from RetrievalSegLib.data.volume import read_volume, write_volume

from _segnrrd_helpers import _labelmap_points, _ras_points, _slicer_read

FAST = ["--random-weights", "--image-size", "256", "--dinov2-input-size", "56", "--device", "cpu"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    cases = make_synthetic_study(3, shape=(5, 40, 36), spacing=(1.3, 1.3, 6.0))
    for c, split in zip(cases, ["train", "train", "test"]):
        for sub in ("images", "labels"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        write_volume(c.image, root / split / "images" / f"{c.case_id}.nii.gz")
        write_volume(c.labels, root / split / "labels" / f"{c.case_id}.nii.gz")
    return root, cases


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "RetrievalSegLib.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("weights", "bank", "segment", "evaluate", "Exit codes"):
        assert cmd in out.stdout
    seg_help = subprocess.run([sys.executable, "-m", "RetrievalSegLib.cli", "segment", "--help"],
                              capture_output=True, text=True)
    assert "--random-weights" in seg_help.stdout and "--case-policy" in seg_help.stdout


def test_bank_create_add_segment_evaluate(study, tmp_path, capsys, slicer_scene):
    root, cases = study
    bank = tmp_path / "bank"
    assert main(["bank", "create", str(bank), "--labels", "1:RV,2:Myo,3:LV", *FAST]) == 0
    for c in cases[:2]:
        rc = main(["bank", "add", str(bank), str(root / "train/images" / f"{c.case_id}.nii.gz"),
                   str(root / "train/labels" / f"{c.case_id}.nii.gz"), "--case", c.case_id, *FAST])
        assert rc == 0
    capsys.readouterr()
    assert main(["bank", "list", str(bank), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed["entries"] if isinstance(listed, dict) else listed) > 0

    test_img = root / "test/images" / f"{cases[2].case_id}.nii.gz"
    out = tmp_path / "out" / "seg.nii.gz"
    segnrrd = tmp_path / "out" / "seg.seg.nrrd"
    rc = main(["segment", str(test_img), "--bank", str(bank), "--out", str(out), "--seg-nrrd", str(segnrrd),
               "--k", "2", "--json", "--batch-size", "2", *FAST])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["slices_segmented"] == 5 and summary["random_weights"] is True
    assert summary["precision"] == "fp32" and summary["batch_size"] == 2  # provenance (CPU: auto = fp32)
    # Provenance and per-slice diagnostics beside each output (NIfTI keeps no custom metadata).
    from RetrievalSegLib.segmentation.provenance import read_sidecar, sidecar_path

    assert summary["sidecars"] == [str(sidecar_path(out)), str(sidecar_path(segnrrd))]
    doc = read_sidecar(out)
    prov = doc["provenance"]
    assert prov["random_weights"] is True and prov["k"] == 2 and prov["precision"] == "fp32"
    assert prov["bank"]["revision"] >= 1 and prov["sam2"].startswith("sam2.1-tiny@256")
    assert [s["index"] for s in doc["slices"]] == list(range(5))
    assert all(s["status"] == "segmented" and len(s["retrieved"]) == 2 for s in doc["slices"])
    assert "NaN" not in sidecar_path(out).read_text()
    image = read_volume(test_img)
    labelmap = read_volume(out)
    assert labelmap.same_geometry(image, tol=1e-4)
    seg_vol, segments = read_seg_nrrd(segnrrd)
    assert [s.name for s in segments] == ["RV", "Myo", "LV"]
    np.testing.assert_array_equal(seg_vol.array, labelmap.array)
    # Slicer's own reader (slicer-core) loads it with the right names, colours and voxels.
    slicer, scene = slicer_scene
    node = _slicer_read(slicer, scene, segnrrd)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    for info in segments:
        s = segmentation.GetSegment(info.id)
        assert s.GetName() == info.name
        np.testing.assert_allclose(s.GetColor(), info.color, atol=1e-6)
        want = _ras_points(seg_vol, info.label_value)
        if len(want):
            got = _labelmap_points(s.GetRepresentation("Binary labelmap"), info.label_value)
            np.testing.assert_allclose(got, want, atol=1e-6)

    rc = main(["evaluate", "--test", str(root / "test"), "--bank", str(bank), "--labels", "1:RV,2:Myo,3:LV",
               "--k", "2", "--out", str(tmp_path / "eval"), "--json", "--fill-hole-area", "8",
               "--save-predictions", *FAST])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["summary"]) == {"RV", "Myo", "LV"}
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["precision"] == "fp32"
    rows = list(csv.DictReader(open(tmp_path / "eval" / "metrics.csv")))
    assert len(rows) == 3 and {r["name"] for r in rows} == {"RV", "Myo", "LV"}
    # Values, not only keys: Dice recomputed here from the saved prediction and the ground truth,
    # and the summary's mean is the mean of the rows (one test case).
    pred = read_volume(tmp_path / "eval" / "predictions" / f"{cases[2].case_id}.nii.gz").array
    truth = read_volume(root / "test/labels" / f"{cases[2].case_id}.nii.gz").array
    for r in rows:
        v = int(r["label"])
        p, t = pred == v, truth == v
        want = 1.0 if p.sum() + t.sum() == 0 else 2.0 * (p & t).sum() / (p.sum() + t.sum())
        assert float(r["dice"]) == pytest.approx(want, abs=1e-6), r["name"]
        assert int(r["pred_voxels"]) == int(p.sum()) and int(r["truth_voxels"]) == int(t.sum())
        summary_dice = result["summary"][r["name"]]["dice_mean"]
        assert summary_dice == pytest.approx(float(r["dice"]), abs=1e-6)
    assert any(float(r["dice"]) > 0 for r in rows)  # not vacuous: some overlap to compare


def test_evaluate_builds_a_capped_bank_from_training_cases(study, tmp_path, capsys):
    root, _ = study
    rc = main(["evaluate", "--train", str(root / "train"), "--test", str(root / "test"),
               "--labels", "1:RV,2:Myo,3:LV", "--pool", "1", "--k", "1", "--out", str(tmp_path / "ev"),
               "--no-progress", *FAST])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Dice mean" in text and "RV" in text
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert result["bank_entries"] == 1  # 2 annotated training slices, capped at 1


def test_segment_errors_have_exit_codes(study, tmp_path, capsys, monkeypatch):
    root, cases = study
    img = str(root / "test/images" / f"{cases[2].case_id}.nii.gz")
    assert main(["segment", img, "--bank", str(tmp_path / "nobank"), "--out", str(tmp_path / "x.nii.gz"), *FAST]) == 1
    assert "bank" in capsys.readouterr().err.lower()
    assert main(["segment", img, "--bank", "b", "--out", str(tmp_path / "x.png"), *FAST]) == 2
    assert main(["segment"]) == 2
    # Real weights requested but absent: exit 3 with the download command.
    bank = tmp_path / "bank"
    assert main(["bank", "create", str(bank), "--labels", "1:RV,2:Myo,3:LV", *FAST]) == 0
    train = root / "train"
    assert main(["bank", "add", str(bank), str(train / "images" / f"{cases[0].case_id}.nii.gz"),
                 str(train / "labels" / f"{cases[0].case_id}.nii.gz"), "--case", cases[0].case_id, *FAST]) == 0
    monkeypatch.setenv("RSEG_WEIGHTS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    capsys.readouterr()
    assert main(["segment", img, "--bank", str(bank), "--out", str(tmp_path / "x.nii.gz"), "--k", "1",
                 "--device", "cpu"]) == 3
    assert "rseg weights download" in capsys.readouterr().err
