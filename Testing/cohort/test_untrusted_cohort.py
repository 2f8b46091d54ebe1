"""A cohort manifest and the sidecars in OUT are written by scripts and people: they are checked,
never trusted. An output may never replace any input of the manifest (whatever the spelling), a
sidecar that does not parse means "not done" (never "failed forever"), and a manifest cell over
the CSV field limit is a message, not a traceback."""
from __future__ import annotations

import csv
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from RetrievalSegLib.cli.main import main
from RetrievalSegLib.cohort import volume_job as cohort_module
from RetrievalSegLib.cohort.volume_job import CohortVolume, ManifestError, read_manifest, resume_reason
from RetrievalSegLib.data.volume import Volume, write_volume

MODELS = ["--random-weights", "--image-size", "256", "--dinov2-input-size", "56", "--device", "cpu"]


def volume(path: Path, value: int = 7) -> Path:
    write_volume(Volume(np.full((2, 16, 16), value, np.int16)), path)
    return path


def write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cohort(manifest: Path, out: Path, *extra: str) -> int:
    # The bank does not exist: a run that got past the path checks would stop there with exit 1,
    # so exit 2 and the message prove the refusal came first, before anything ran.
    return main(["segment-cohort", str(manifest), "--bank", str(manifest.parent / "no-bank"), "--out", str(out),
                 *MODELS, "--no-progress", *extra])


# ----------------------------------------------------------------------------- 6. outputs vs inputs
def test_an_output_may_not_replace_another_volumes_input(tmp_path, capsys):
    """The attack of the issue: volume a's output is volume b's image; b would be segmented from a's
    label map and b's scan lost."""
    data = tmp_path / "data"
    data.mkdir()
    volume(data / "a.nii.gz"), volume(data / "b_in.nii.gz", 9)
    manifest = write_csv(tmp_path / "m.csv", [("image", "case_id", "output"), ("data/a.nii.gz", "a", "b_in.nii.gz"),
                                              ("data/b_in.nii.gz", "b", "")])
    before = files(data)
    assert cohort(manifest, data) == 2
    err = capsys.readouterr().err
    assert "b_in.nii.gz" in err and "input of case 'b'" in err, err
    assert files(data) == before


def test_spellings_of_the_same_file_are_caught(tmp_path):
    check_outputs = cohort_module.check_outputs
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir(), out.mkdir()
    a, b = volume(data / "a.nii.gz"), volume(data / "b.nii.gz", 9)
    vols = [CohortVolume(str(a), "a", "a.nii.gz"), CohortVolume(str(b), "b", "b.nii.gz")]
    check_outputs(vols, out)  # outputs in a folder of their own: fine

    os.link(b, out / "a.nii.gz")  # a's output is a hard link to b's input
    with pytest.raises(ManifestError, match="input of case 'b'"):
        check_outputs(vols, out)
    (out / "a.nii.gz").unlink()

    (out / "a.nii.gz").symlink_to(b)  # b's image is reached through a link in OUT
    vols_link = [vols[0], CohortVolume(str(out / "a.nii.gz"), "b", "b.nii.gz")]
    with pytest.raises(ManifestError, match="input of case 'b'"):
        check_outputs(vols_link, out)
    (out / "a.nii.gz").unlink()

    with pytest.raises(ManifestError, match="letter case"):  # one file on macOS and Windows
        check_outputs([CohortVolume(str(a), "a", "B.NII.GZ"), vols[1]], data)
    with pytest.raises(ManifestError, match="input of case 'b'"):  # a path with '..' and a link above
        (tmp_path / "data-link").symlink_to(data, target_is_directory=True)
        check_outputs([CohortVolume(str(a), "a", "b.nii.gz"), vols[1]], tmp_path / "data-link" / ".." / "data")
    with pytest.raises(ManifestError, match="input of case 'a'"):  # the sidecar <output>.json too
        check_outputs([CohortVolume(str(data / "x.nii.gz.json"), "a", "y.nii.gz"),
                       CohortVolume(str(b), "b", "x.nii.gz")], data)

    series = tmp_path / "series"  # a DICOM folder: no output may be written inside it
    series.mkdir()
    (series / "1.dcm").write_bytes(b"")
    with pytest.raises(ManifestError, match="inside the input folder of case 's'"):
        check_outputs([CohortVolume(str(series), "s", "s.nii.gz")], series)


def test_every_shard_checks_the_whole_manifest(tmp_path, capsys):
    """A volume of another shard is another task's input, segmented at the same time."""
    data = tmp_path / "data"
    data.mkdir()
    names = [f"c{i}" for i in range(4)]
    for n in names:
        volume(data / f"{n}.nii.gz")
    rows = [("image", "case_id", "output")] + [(f"data/{n}.nii.gz", n, f"{n}-seg.nii.gz") for n in names]
    rows[1] = ("data/c0.nii.gz", "c0", "c1.nii.gz")  # c0 (shard 0/2) writes over c1 (shard 1/2)
    manifest = write_csv(tmp_path / "m.csv", rows)
    before = files(data)
    assert cohort(manifest, data, "--shard", "0/2") == 2
    assert "input of case 'c1'" in capsys.readouterr().err
    assert files(data) == before


def test_a_cache_dir_inside_the_bank_is_refused(tmp_path, capsys):
    """Workers never write into the bank, whichever way its folder is spelled."""
    from RetrievalSegLib.cohort.volume_job import ReadOnlyBank

    volume(tmp_path / "a.nii.gz")
    manifest = write_csv(tmp_path / "m.csv", [("a.nii.gz", "a")])
    bank = tmp_path / "no-bank"  # the folder cohort() names; a refusal comes before it is opened
    bank.mkdir()
    (tmp_path / "link").symlink_to(bank, target_is_directory=True)
    for inside in (bank, bank / "cache", tmp_path / "link" / "memories"):
        capsys.readouterr()
        assert cohort(manifest, tmp_path / "out", "--cache-dir", str(inside)) == 2
        assert "inside the support bank" in capsys.readouterr().err
    assert list(bank.iterdir()) == [] and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="inside the support bank"):
        ReadOnlyBank.__init__(object.__new__(ReadOnlyBank), bank, bank / "cache")


# ----------------------------------------------------------------------------- 7. sidecars
WANT = {"rseg_version": "0.1.0", "sam2": "sam2.1-tiny@256:random-seed0", "dinov2": "dinov2-small:x@56",
        "random_weights": True, "image_size": 256, "precision": "fp32", "k": 2,
        "bank": {"bank_id": "abc", "revision": 4}, "cohort_options": {"k": 2}}
SIDECARS = {
    "no-provenance": {"format": "rseg-prediction", "format_version": 1, "slices": []},
    "provenance-a-list": {"format": "rseg-prediction", "format_version": 1, "slices": [], "provenance": [1, 2]},
    "bank-a-string": {"format": "rseg-prediction", "format_version": 1, "slices": [],
                      "provenance": {**WANT, "bank": "abc"}},
    "format_version-a-list": {"format": "rseg-prediction", "format_version": [1], "slices": []},
    "a-number": 5,
}


@pytest.mark.parametrize("doc", [*SIDECARS, "deeply-nested", "not-UTF-8", "a-folder"])
def test_a_sidecar_that_does_not_parse_means_not_done(tmp_path, doc):
    from RetrievalSegLib.segmentation.provenance import FORMAT

    assert FORMAT == "rseg-prediction"
    vol = CohortVolume("/data/a.nii.gz", "a", "a.nii.gz")
    (tmp_path / "a.nii.gz").write_bytes(b"label map bytes")
    side = tmp_path / "a.nii.gz.json"
    if doc == "deeply-nested":
        side.write_text("[" * 200_000 + "]" * 200_000)
    elif doc == "not-UTF-8":
        side.write_bytes(b"\xff\xfe{")
    elif doc == "a-folder":
        side.mkdir()
    else:
        side.write_text(json.dumps(SIDECARS[doc]))
    reason = resume_reason(tmp_path, vol, WANT)  # never raises: the volume is done again
    assert reason is not None, reason


@pytest.fixture(scope="module")
def one_volume(tmp_path_factory):
    """A real engine (random weights), a small bank and one volume to segment, in this process."""
    from RetrievalSegLib.bank.support_bank import LabelInfo, SupportBank
    from RetrievalSegLib.cohort.volume_job import CohortSettings, ReadOnlyBank
    from RetrievalSegLib.engine.pipeline import RetrievalEngine
    from RetrievalSegLib.data.synthetic import LABELS, make_synthetic_study

    root = tmp_path_factory.mktemp("one-volume")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = RetrievalEngine.load(random_weights=True, image_size=256, device="cpu", dinov2_input_size=56)
    train, test = make_synthetic_study(2, shape=(4, 32, 32), spacing=(1.3, 1.3, 6.0), seed=1)
    bank = SupportBank.create(root / "bank", [LabelInfo(v, n, c) for v, (n, c) in LABELS.items()],
                              engine.embedder.identity)
    bank.add_volume(train.image, train.labels, train.case_id, engine.embedder)
    write_volume(test.image, root / "t.nii.gz")
    settings = CohortSettings(bank=str(bank.path), out_dir=str(root / "out"), bank_id=bank.bank_id,
                              bank_revision=bank.revision,
                              options={"k": 2, "labels": None, "axis": "auto", "slices": None, "extent_stop": 0,
                                       "presence_threshold": 0.0, "window": None, "case_policy": "ignore",
                                       "fill_hole_area": 0, "dinov2_input_size": 56, "precision": "fp32",
                                       "batch_size": 2, "encoder_batch": 2},
                              cache_dir=str(root / "cache"))
    (root / "out").mkdir()
    return engine, ReadOnlyBank(bank.path, root / "cache"), settings, CohortVolume(str(root / "t.nii.gz"), "t", "t.nii.gz")


def test_a_tampered_sidecar_is_redone_not_failed_forever(one_volume):
    from RetrievalSegLib.cohort.volume_job import segment_one

    engine, bank, settings, vol = one_volume
    first = segment_one(vol, engine, bank, settings)
    assert first["status"] == "segmented", first
    assert segment_one(vol, engine, bank, settings)["status"] == "skipped"
    side = Path(settings.out_dir) / "t.nii.gz.json"
    doc = json.loads(side.read_text())
    del doc["provenance"]  # valid JSON, wrong shape: today a KeyError every run
    side.write_text(json.dumps(doc))
    again = segment_one(vol, engine, bank, settings)
    assert again["status"] == "segmented", again
    assert segment_one(vol, engine, bank, settings)["status"] == "skipped"


# ----------------------------------------------------------------------------- 8. CSV field limit
@pytest.mark.parametrize("cell", ["long", "nul"])
def test_a_manifest_cell_over_the_csv_limit_is_a_message(tmp_path, capsys, cell):
    manifest = tmp_path / "m.csv"
    bad = "x" * (csv.field_size_limit() + 10) if cell == "long" else "a\0b.nii.gz"
    manifest.write_text(f"image,case_id\nok.nii.gz,ok\n{bad},x\n")
    with pytest.raises(ManifestError, match=r"m\.csv:3"):
        read_manifest(manifest)
    capsys.readouterr()
    assert cohort(manifest, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "m.csv:3" in err and "Traceback" not in err and len(err) < 2000, err
    assert sys.exc_info() == (None, None, None)
