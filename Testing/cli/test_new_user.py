"""What a new user met (issue "What a new user met", items 5-14): usage errors before any model
loads, every missing model in one message, quiet --no-progress, a pipe closed early, and the
outputs other tools give (statistics, largest component, probabilities, official weights)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from RetrievalSegLib.cli import main as cli_main
from RetrievalSegLib.cli.main import main
from RetrievalSegLib.data.synthetic import make_synthetic_study
from RetrievalSegLib.data.volume import write_volume

FAST = ["--random-weights", "--image-size", "256", "--dinov2-input-size", "56", "--device", "cpu"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two training cases in a bank of 3 labels (one annotated slice each: 2 entries), one test image."""
    root = tmp_path_factory.mktemp("newuser")
    cases = make_synthetic_study(3, shape=(5, 40, 36), spacing=(1.3, 1.3, 6.0))
    paths = []
    for c in cases:
        img, lab = root / f"{c.case_id}.nii.gz", root / f"{c.case_id}_labels.nii.gz"
        write_volume(c.image, img)
        write_volume(c.labels, lab)
        paths.append((img, lab, c.case_id))
    bank = root / "bank"
    assert main(["bank", "create", str(bank), "--labels", "1:RV,2:Myo,3:LV", *FAST]) == 0
    for img, lab, case in paths[:2]:
        assert main(["bank", "add", str(bank), str(img), str(lab), "--case", case, *FAST]) == 0
    return bank, paths[2][0], cases


def _no_models(monkeypatch):
    """make_engine stands in for loading the models: any call is a failure of the test."""

    def refuse(args):
        raise AssertionError("models were loaded before the usage error was found")

    monkeypatch.setattr(cli_main, "make_engine", refuse)


# ----------------------------------------------------------------------------- item 6
@pytest.mark.parametrize("extra, words", [
    (["--k", "50"], ["--k 50", "usable entries"]),
    (["--labels", "1,7"], ["--labels 7", "1:RV"]),
    (["--case-policy", "exclude"], ["--case-policy exclude", "--case"]),
])
def test_usage_errors_exit_2_before_the_models_load(study, tmp_path, capsys, monkeypatch, extra, words):
    bank, image, _ = study
    _no_models(monkeypatch)
    capsys.readouterr()
    rc = main(["segment", str(image), "--bank", str(bank), "--out", str(tmp_path / "s.nii.gz"), *extra, *FAST])
    err = capsys.readouterr().err
    assert rc == 2, err
    for w in words:
        assert w in err
    assert not (tmp_path / "s.nii.gz").exists()


def test_k_zero_is_a_usage_error(study, tmp_path, capsys, monkeypatch):
    bank, image, _ = study
    _no_models(monkeypatch)
    assert main(["segment", str(image), "--bank", str(bank), "--out", str(tmp_path / "s.nii.gz"), "--k", "0",
                 *FAST]) == 2


# ----------------------------------------------------------------------------- item 7
def test_every_missing_model_in_one_message(study, tmp_path, capsys, monkeypatch):
    bank, image, _ = study
    monkeypatch.setenv("RSEG_WEIGHTS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    for var in ("RSEG_SAM2_CHECKPOINT", "RSEG_DINOV2_PATH"):
        monkeypatch.delenv(var, raising=False)
    capsys.readouterr()
    rc = main(["segment", str(image), "--bank", str(bank), "--out", str(tmp_path / "s.nii.gz"), "--k", "1",
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "DINOv2 small weights not found" in err and "SAM 2.1" in err and "checkpoint not found" in err
    assert "rseg weights download --sam2 sam2.1-tiny --dinov2 small" in err


# ----------------------------------------------------------------------------- item 8
def test_no_progress_silences_transformers_loading_bar(tmp_path, capsys, monkeypatch):
    import argparse

    import torch
    from transformers import Dinov2Model

    from RetrievalSegLib.engine import build
    from RetrievalSegLib.models.loaders import dinov2_config

    torch.manual_seed(0)
    folder = tmp_path / "dinov2-small"
    Dinov2Model(dinov2_config("small")).save_pretrained(folder)
    seen = {}
    for quiet in (False, True):  # the bar is there without the switch: the test can fail
        monkeypatch.setattr(build, "_loaded", {})
        args = argparse.Namespace(dinov2="small", dinov2_path=folder, device="cpu", random_weights=False, seed=0,
                                  dinov2_input_size=56, no_progress=quiet)
        capsys.readouterr()
        build.make_embedder(args)
        seen[quiet] = capsys.readouterr().err
    assert "Loading weights" in seen[False]
    assert "Loading weights" not in seen[True] and seen[True].strip() == ""
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # restored for whoever loads next


def test_bank_list_into_a_closed_pipe_says_nothing(study):
    import os
    import subprocess
    import sys

    bank, _, _ = study
    env = dict(os.environ, RSEG_OFFLINE="1", HF_HUB_OFFLINE="1")
    p = subprocess.Popen([sys.executable, "-m", "RetrievalSegLib.cli", "bank", "list", str(bank)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # as `head` does, before rseg has written anything
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert "Broken pipe" not in err and "Traceback" not in err and "BrokenPipeError" not in err


def test_verify_after_repair_suggests_nothing_that_cannot_help_and_names_bank_db(study, tmp_path, capsys):
    import shutil

    bank0, _, _ = study
    bank = tmp_path / "bank"
    shutil.copytree(bank0, bank)
    entries = sorted((bank / "entries").glob("*.npz"))
    shutil.copy(entries[0], bank / "entries" / "orphan.npz")  # as an interrupted add leaves it
    entries[1].unlink()  # a lost entry file: repair marks it damaged, only a backup brings it back
    capsys.readouterr()
    assert main(["bank", "verify", str(bank)]) == 1
    before = capsys.readouterr().out
    assert "--repair` to fix what can be fixed" in before  # repair can help: it is said
    assert "not listed in bank.db" in before and "bank.json" not in before
    assert main(["bank", "verify", str(bank), "--repair", *FAST]) == 1
    capsys.readouterr()
    assert main(["bank", "verify", str(bank)]) == 1
    after = capsys.readouterr().out
    assert "damaged" in after and "rseg bank remove" in after
    assert "--repair" not in after  # repair has done what it can: no suggestion that cannot help


# ----------------------------------------------------------------------------- item 5
def test_segment_says_each_phase_from_the_first_second(study, tmp_path, capsys):
    bank, image, _ = study
    capsys.readouterr()
    args = ["segment", str(image), "--bank", str(bank), "--k", "2", "--extent-stop", "0", "--slices", "1:3", *FAST]
    assert main([*args, "--out", str(tmp_path / "a.nii.gz")]) == 0
    err = capsys.readouterr().err
    steps = ["rseg: loading models (DINOv2 small, SAM 2 sam2.1-tiny, random weights)",
             "rseg: embedding 2 slices with DINOv2",
             "rseg: computing 2 SAM 2 support memories",
             "rseg: estimate: the first support memory took",
             "support memories: 100%",
             "segmenting: 100%"]
    at = [err.find(s) for s in steps]
    assert -1 not in at, (steps[at.index(-1)], err)
    assert at == sorted(at), err  # in this order
    assert "about" in err.split("the first support memory took")[1].splitlines()[0]
    # The memories are cached now: a second run has none to compute and says so by silence.
    assert main([*args, "--out", str(tmp_path / "b.nii.gz")]) == 0
    err = capsys.readouterr().err
    assert "rseg: embedding 2 slices" in err and "support memories" not in err
    # --no-progress: nothing at all.
    assert main([*args, "--out", str(tmp_path / "c.nii.gz"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "rseg: loading" not in err and "support memories" not in err and "rseg: embedding" not in err


# ----------------------------------------------------------------------------- items 11 and 14
def test_statistics_and_keep_largest_in_summary_json_and_sidecar(study, tmp_path, capsys):
    from RetrievalSegLib.data.volume import read_volume
    from RetrievalSegLib.segmentation.postprocess import keep_largest_component
    from RetrievalSegLib.segmentation.provenance import read_sidecar

    bank, image, _ = study
    out = tmp_path / "s.nii.gz"
    capsys.readouterr()
    assert main(["segment", str(image), "--bank", str(bank), "--out", str(out), "--k", "2", "--extent-stop", "0",
                 "--statistics", "--keep-largest", "all", "--json", *FAST]) == 0
    summary = json.loads(capsys.readouterr().out)
    written = read_volume(out)
    voxel_ml = float(np.prod(written.spacing)) / 1000.0
    assert set(summary["statistics"]) == {"RV", "Myo", "LV"}
    for name, st in summary["statistics"].items():
        n = int((written.array == st["value"]).sum())
        assert st["voxels"] == n == summary["labels"][name]
        assert st["volume_ml"] == pytest.approx(n * voxel_ml)
    assert summary["keep_largest"]["labels"] == [1, 2, 3]
    _, again = keep_largest_component(written, [1, 2, 3])
    assert again == {1: 0, 2: 0, 3: 0}  # what was written has one component per label
    prov = read_sidecar(out)["provenance"]
    assert prov["statistics"] == summary["statistics"] and prov["keep_largest"] == summary["keep_largest"]
    # Item 9: random weights are never the published ones, in the summary and the sidecar.
    assert summary["weights_official"] is False and prov["weights_official"] is False


def test_keep_largest_of_a_label_not_segmented_is_a_usage_error(study, tmp_path, capsys, monkeypatch):
    bank, image, _ = study
    _no_models(monkeypatch)
    assert main(["segment", str(image), "--bank", str(bank), "--out", str(tmp_path / "s.nii.gz"), "--labels", "1",
                 "--keep-largest", "2", *FAST]) == 2
    assert "--keep-largest 2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- item 13
def test_save_probabilities_writes_one_float_map_per_label_whose_argmax_is_the_label_map(study, tmp_path, capsys):
    from RetrievalSegLib.data.volume import read_volume

    bank, image, _ = study
    out = tmp_path / "seg.nii.gz"
    capsys.readouterr()
    assert main(["segment", str(image), "--bank", str(bank), "--out", str(out), "--k", "2", "--extent-stop", "0",
                 "--save-probabilities", "--json", *FAST]) == 0
    summary = json.loads(capsys.readouterr().out)
    names = [tmp_path / f"seg.prob-{v}-{n}.nii.gz" for v, n in ((1, "RV"), (2, "Myo"), (3, "LV"))]
    assert summary["probabilities"] == [str(p) for p in names]
    labelmap = read_volume(out)
    maps = [read_volume(p) for p in names]
    for m in maps:
        assert m.array.dtype == np.float32 and m.same_geometry(read_volume(image), tol=1e-4)
        assert 0.0 <= float(m.array.min()) and float(m.array.max()) <= 1.0
    prob = np.stack([m.array for m in maps])
    assert prob.max() > 0.5  # not vacuous: some foreground to compare
    rebuilt = np.where(prob.max(axis=0) > 0.5, np.array([1, 2, 3])[prob.argmax(axis=0)], 0)
    np.testing.assert_array_equal(rebuilt, labelmap.array)


# ----------------------------------------------------------------------------- item 10
def test_sample_data_writes_a_study_the_printed_commands_run_on(tmp_path, capsys):
    import shlex

    from RetrievalSegLib.data.volume import read_volume

    out = tmp_path / "sample"
    assert main(["sample-data", str(out), "--cases", "1"]) == 0
    text = capsys.readouterr().out
    for split in ("train", "test"):
        images = sorted((out / split / "images").glob("*.nii.gz"))
        assert len(images) == 1
        img, lab = read_volume(images[0]), read_volume(out / split / "labels" / images[0].name)
        assert img.same_geometry(lab) and set(np.unique(lab.array)) == {0, 1, 2, 3}
    commands = [shlex.split(line.strip())[1:] for line in text.splitlines() if line.strip().startswith("rseg bank")]
    assert [c[:2] for c in commands] == [["bank", "create"], ["bank", "add"]]
    for c in commands:  # the printed commands work as printed (random weights here: no download)
        assert main([*c, *FAST]) == 0
    assert main(["sample-data", str(out)]) == 2  # never written over
    assert "not an empty folder" in capsys.readouterr().err


def test_the_readme_library_example_runs_as_written(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    from RetrievalSegLib.data.volume import read_volume

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"<!-- library example[^>]*-->\n```python\n(.*?)```", readme, re.S).group(1)
    real = 'RetrievalEngine.load("sam2.1-tiny", "small", image_size=512)'
    assert real in code
    code = code.replace(real, 'RetrievalEngine.load("sam2.1-tiny", "small", image_size=256, random_weights=True, '
                              'device="cpu", dinov2_input_size=56)')  # no weights here: random ones
    monkeypatch.chdir(tmp_path)
    assert main(["sample-data", "try"]) == 0  # as the README says
    exec(compile(code, "README.md library example", "exec"), {})
    assert read_volume(tmp_path / "try/seg.nii.gz").same_geometry(read_volume(tmp_path / "try/test/images/synth000_002.nii.gz"))


def test_cohort_summary_has_statistics_per_volume(study, tmp_path, capsys):
    from RetrievalSegLib.data.volume import read_volume

    bank, image, _ = study
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"image,case_id\n{image},test1\n")
    out = tmp_path / "segs"
    capsys.readouterr()
    assert main(["segment-cohort", str(manifest), "--bank", str(bank), "--out", str(out), "--k", "2",
                 "--workers", "1", "--json", "--no-progress", *FAST]) == 0
    summary = json.loads(capsys.readouterr().out)
    (r,) = summary["results"]
    written = read_volume(out / "test1.nii.gz")
    for name, st in r["statistics"].items():
        n = int((written.array == st["value"]).sum())
        assert st["voxels"] == n and st["volume_ml"] == pytest.approx(n * float(np.prod(written.spacing)) / 1000.0)
    assert set(r["statistics"]) == {"RV", "Myo", "LV"}
    assert json.loads((out / "cohort-summary.json").read_text())["results"][0]["statistics"] == r["statistics"]


def test_cohort_usage_errors_exit_2_before_the_models_load(study, tmp_path, capsys, monkeypatch):
    from RetrievalSegLib.cohort import run as cohort_run

    bank, image, _ = study

    def refuse(*a, **kw):
        raise AssertionError("volumes were run before the usage error was found")

    monkeypatch.setattr(cohort_run, "run_local", refuse)
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"image,case_id\n{image},test1\n")
    for extra, words in ((["--k", "50"], "--k 50"), (["--labels", "9"], "--labels 9")):
        capsys.readouterr()
        assert main(["segment-cohort", str(manifest), "--bank", str(bank), "--out", str(tmp_path / "o"),
                     "--workers", "1", *extra, *FAST]) == 2
        assert words in capsys.readouterr().err
