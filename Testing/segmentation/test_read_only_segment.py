"""Segmenting only reads the support bank (issue 32, item 1).

The first use of a new SAM 2 setting (another image size, another backbone) used to add a row to
the bank's `models` table and raise its revision: a cohort afterwards redid every volume. A SAM 2
identity is now a key of the per-user memory cache (`<RSEG_CACHE_DIR>/memories/<bank id>/<model>/`),
never a row in the bank: every bank file but SQLite's transient `-wal`/`-shm` stays byte for byte.
Random weights, volumes of 4 slices of 32 x 32, k = 1.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from RetrievalSegLib.bank.support_bank import SupportBank
from RetrievalSegLib.cli.main import main
from RetrievalSegLib.data.synthetic import make_synthetic_study
from RetrievalSegLib.data.volume import write_volume

FAST = ["--random-weights", "--image-size", "256", "--dinov2-input-size", "56", "--device", "cpu"]
SEG = ["--k", "1", "--extent-stop", "0", "--slices", "1:3", "--no-progress"]
LABELS = "1:RV,2:Myo,3:LV"


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder`, byte for byte, but SQLite's transient -wal/-shm files."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def revision(bank: Path) -> tuple[str, int]:
    b = SupportBank.open(bank)
    try:
        return b.bank_id, int(b.revision)
    finally:
        b.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A bank of two synthetic cases and a third case as test image (images/ + labels/ layout)."""
    root = tmp_path_factory.mktemp("read-only")
    cases = make_synthetic_study(3, shape=(4, 32, 32), spacing=(1.3, 1.3, 6.0), seed=5)
    bank = root / "bank"
    assert main(["bank", "create", str(bank), "--labels", LABELS, *FAST]) == 0
    for c in cases[:2]:
        write_volume(c.image, root / f"{c.case_id}_img.nii.gz")
        write_volume(c.labels, root / f"{c.case_id}_lab.nii.gz")
        assert main(["bank", "add", str(bank), str(root / f"{c.case_id}_img.nii.gz"),
                     str(root / f"{c.case_id}_lab.nii.gz"), "--case", c.case_id, *FAST]) == 0
    test = root / "test"
    for sub in ("images", "labels"):
        (test / sub).mkdir(parents=True)
    write_volume(cases[2].image, test / "images" / "case9.nii.gz")
    write_volume(cases[2].labels, test / "labels" / "case9.nii.gz")
    return {"bank": bank, "test": test, "image": test / "images" / "case9.nii.gz"}


@pytest.fixture
def bank(source, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the bank, and a per-user cache of this test's own."""
    monkeypatch.setenv("RSEG_CACHE_DIR", str(tmp_path / "user-cache"))
    copy = tmp_path / "bank"
    shutil.copytree(source["bank"], copy)
    return copy


def segment(image: Path, bank: Path, out: Path, *extra: str) -> None:
    assert main(["segment", str(image), "--bank", str(bank), "--out", str(out), *FAST, *SEG, *extra]) == 0


def test_segmenting_at_new_settings_leaves_every_bank_file_byte_identical(source, bank, tmp_path):
    before, (bank_id, rev) = tree_digest(bank), revision(bank)
    runs = {"first use": [], "a new image size": ["--image-size", "288"], "a new backbone": ["--sam2", "medsam2"]}
    for n, (what, extra) in enumerate(runs.items()):
        segment(source["image"], bank, tmp_path / f"seg{n}.nii.gz", *extra)
        assert tree_digest(bank) == before, f"segmenting with {what} changed the bank"
        assert revision(bank) == (bank_id, rev), what
    # evaluate's segmentation of test cases and suggest read the bank the same way
    assert main(["evaluate", "--bank", str(bank), "--test", str(source["test"]), "--labels", LABELS, "--k", "1",
                 "--out", str(tmp_path / "eval"), "--no-progress", *FAST]) == 0
    assert main(["suggest", str(source["image"]), "--bank", str(bank), "--no-progress", *FAST]) == 0
    assert tree_digest(bank) == before and revision(bank) == (bank_id, rev)
    bank_obj = SupportBank.open(bank)
    assert bank_obj.sam2_identities == ()  # no SAM 2 row was ever written
    bank_obj.close()
    # The memories are in the per-user cache: one folder per bank and SAM 2 identity.
    folders = sorted(p.name for p in (tmp_path / "user-cache" / "memories" / bank_id).iterdir())
    assert len(folders) == 3 and [f[:14] for f in folders] == ["medsam2_256_ra", "sam2.1-tiny_25", "sam2.1-tiny_28"]


def test_a_cohort_after_a_segmentation_at_a_new_size_redoes_nothing(source, bank, tmp_path):
    """segment-cohort's resume rule compares the bank revision its sidecars record with the bank's."""
    import argparse

    from RetrievalSegLib.cli.main import build_parser
    from RetrievalSegLib.cli.cohort import cohort_settings
    from RetrievalSegLib.engine.build import make_engine
    from RetrievalSegLib.cohort.volume_job import ReadOnlyBank, read_manifest, segment_one

    manifest = tmp_path / "cohort.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("image", "case_id"), (str(source["image"]), "case9")])
    argv = ["segment-cohort", str(manifest), "--bank", str(bank), "--out", str(tmp_path / "out"), *FAST,
            "--k", "1", "--extent-stop", "0"]
    (vol,) = read_manifest(manifest)
    engine = None

    def cohort() -> str:
        nonlocal engine
        args = build_parser().parse_args(argv)
        opened = SupportBank.open(bank)
        settings, model_args = cohort_settings(args, opened, None)
        opened.close()
        if engine is None:
            engine = make_engine(argparse.Namespace(**model_args))
        (tmp_path / "out").mkdir(exist_ok=True)
        view = ReadOnlyBank(bank, None, expect=(settings.bank_id, settings.bank_revision))
        return segment_one(vol, engine, view, settings)["status"]

    assert cohort() == "segmented"
    segment(source["image"], bank, tmp_path / "one.nii.gz", "--image-size", "288", "--slices", "1:2")
    assert cohort() == "skipped"


def test_a_bank_with_sam2_rows_and_memories_of_an_older_version_is_read_as_it_is(source, bank, tmp_path):
    """Banks of older versions hold `sam2` rows in `models` and caches in `memories/`: they still
    segment, nothing is added to them, and `rseg bank cache --clear` removes the old files."""
    bank_id, _ = revision(bank)
    with contextlib.closing(sqlite3.connect(bank / "bank.db")) as con, con:
        con.execute("INSERT INTO models VALUES ('sam2', 'sam2.1-tiny@256:random-seed0')")
    old_cache = bank / "memories" / "sam2.1-tiny_256_random-seed0-0123abcd"
    old_cache.mkdir(parents=True)
    (old_cache / "e-0123456789abcdef.safetensors").write_bytes(b"an older version's memory")
    before, rev = tree_digest(bank), revision(bank)
    assert SupportBank.open(bank).sam2_identities == ("sam2.1-tiny@256:random-seed0",)
    segment(source["image"], bank, tmp_path / "seg.nii.gz")
    assert tree_digest(bank) == before and revision(bank) == rev
    assert main(["bank", "cache", str(bank), "--clear"]) == 0
    assert not list(old_cache.iterdir())
    assert not list((tmp_path / "user-cache" / "memories" / bank_id).rglob("*.safetensors"))


def test_one_per_user_cache_per_bank_and_model_and_older_revision_copies_are_removed(source, bank, tmp_path):
    """The README's promise: copies per revision (what older versions kept) do not pile up."""
    from RetrievalSegLib.cohort.volume_job import cohort_memory_dir

    bank_id, rev = revision(bank)
    root = tmp_path / "user-cache" / "memories"
    stale = [root / f"{bank_id}-r{r}" / "sam2.1-tiny_256-00000000" for r in (rev, rev + 3)]
    other = root / "another-bank-r1" / "m"
    for d in (*stale, other):
        d.mkdir(parents=True)
        (d / "x.safetensors").write_bytes(b"old")
    segment(source["image"], bank, tmp_path / "seg.nii.gz")
    assert not any(d.parent.exists() for d in stale) and other.exists()
    (folder,) = (root / bank_id).iterdir()
    assert list(folder.glob("*.safetensors"))  # the memories of the supports retrieved
    # segment-cohort without --cache-dir reads and writes the same folder
    assert cohort_memory_dir(bank_id, json.loads((folder / "identity.json").read_text())["identity"], None) == folder


def test_the_sidecar_records_the_revision_retrieval_used_when_a_writer_commits_meanwhile(source, bank):
    """A correction added while a volume is segmented (the Slicer panel beside a cohort) raises the
    revision; the prediction was made from the revision before it, and its provenance says so."""
    import warnings

    from RetrievalSegLib.engine.pipeline import RetrievalEngine
    from RetrievalSegLib.segmentation.provenance import segmentation_provenance
    from RetrievalSegLib.segmentation.segment import segment_volume
    from RetrievalSegLib.data.volume import read_volume

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, 256 px
        engine = RetrievalEngine.load(random_weights=True, image_size=256, device="cpu", dinov2_input_size=56)
    reader, writer = SupportBank.open(bank), SupportBank.open(bank)
    before = reader.revision
    image = read_volume(source["image"])

    def progress(done: int, total: int) -> None:
        if done == 1:  # after retrieval, while slices are being segmented
            writer.add_slice(image.array[0], {1: image.array[0] > image.array[0].mean()}, "late", "k", 0,
                             (1.3, 1.3), engine.embedder)

    seg = segment_volume(image, reader, engine, k=1, slice_range=(0, 2), progress=progress)
    assert reader.revision == before + 1  # the writer committed during the run
    assert segmentation_provenance(seg, engine, reader, k=1)["bank"]["revision"] == before
