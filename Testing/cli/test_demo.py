"""`make demo`: refuses to run without real weights, and runs end to end on checkpoint files."""
from __future__ import annotations

import warnings

import pytest
import torch

from RetrievalSegLib.cli import demo
from RetrievalSegLib.models.loaders import load_dinov2, load_sam2
from RetrievalSegLib.data.segnrrd import read_seg_nrrd
from RetrievalSegLib.data.volume import read_volume


def test_demo_without_weights_says_how_to_get_them_and_exits_3(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RSEG_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("RSEG_OFFLINE", "1")
    assert demo.main(["--out", str(tmp_path / "out"), "--device", "cpu"]) == 3
    err = capsys.readouterr().err
    assert "sam2.1_hiera_tiny.pt" in err and "rseg weights download --sam2 tiny --dinov2 small" in err
    assert "RSEG_WEIGHTS_MIRROR" in err
    assert not (tmp_path / "out").exists()  # nothing presented as a result


def test_demo_runs_on_checkpoint_files_in_the_weights_folder(tmp_path, monkeypatch, capsys):
    # The test writes weight files in the official layout (random values: the loading path is the
    # real one, the Dice values are not meaningful).
    weights = tmp_path / "weights"
    weights.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sam = load_sam2("tiny", random_weights=True, device="cpu", image_size=256)
        dino = load_dinov2("small", random_weights=True, device="cpu")
    torch.save({"model": sam.model.state_dict()}, weights / "sam2.1_hiera_tiny.pt")
    dino.model.save_pretrained(weights / "dinov2-small")
    monkeypatch.setenv("RSEG_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("RSEG_OFFLINE", "1")
    out = tmp_path / "out"
    rc = demo.run(out, device="cpu", image_size=256, shape=(6, 40, 40), annotated=2, k=2)
    assert rc == 0
    captured = capsys.readouterr()
    text = captured.out
    # Each phase is said as it starts (issue "What a new user met", item 5): nothing silent.
    assert "demo: loading models" in text
    assert "rseg: computing 2 SAM 2 support memories" in captured.err
    assert "rseg: estimate: the first support memory took" in captured.err
    for name in ("RV", "Myo", "LV", "Dice"):
        assert name in text
    pred = read_volume(next(out.glob("*_pred.nii.gz")))
    image = read_volume(next(out.glob("*001_image.nii.gz")))
    assert pred.same_geometry(image, tol=1e-4)
    # The table's Dice values are those of the files it wrote, recomputed here independently.
    truth = read_volume(next(out.glob("*001_labels.nii.gz"))).array
    table = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("RV", "Myo", "LV"):
            table[parts[0]] = float(parts[1])
    assert set(table) == {"RV", "Myo", "LV"}
    for value, name in ((1, "RV"), (2, "Myo"), (3, "LV")):
        p, t = pred.array == value, truth == value
        denom = p.sum() + t.sum()
        dice = 1.0 if denom == 0 else 2.0 * (p & t).sum() / denom
        assert table[name] == pytest.approx(dice, abs=5e-4), name
    _, segments = read_seg_nrrd(next(out.glob("*_pred.seg.nrrd")))
    assert [s.name for s in segments] == ["RV", "Myo", "LV"]
