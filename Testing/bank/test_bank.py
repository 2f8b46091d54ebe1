"""The support bank behaves like a small database: nothing committed is lost, nothing is dropped
silently, concurrent writers all land, foreign or tampered data is refused with an actionable error.

Small data on purpose (8 x 28 x 32 volumes, DINOv2-small with random weights at 56 px, or a
hash-based stand-in embedder where the model is beside the point, e.g. in child processes).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import select
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from RetrievalSegLib.bank.support_bank import (
    BankCorruptError,
    BankError,
    BankLockTimeout,
    BankModelMismatchError,
    BankNotFoundError,
    BankSchemaError,
    LabelInfo,
    SupportBank,
)
from RetrievalSegLib.data.volume import Volume, slice_view
from _bank_helpers import CONCURRENT_CHILD, HASH_EMBEDDER_SRC, LABELS, HashEmbedder, child_env, make_case, new_bank

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dinov2_embedder():
    """The real DINOv2-small architecture, random weights, tiny input: fast and realistic."""
    from RetrievalSegLib.models.loaders import load_dinov2
    from RetrievalSegLib.engine.retrieval import SliceEmbedder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_dinov2("small", random_weights=True, seed=0, device="cpu")
    return SliceEmbedder(model, batch_size=16, input_size=56)


# ----------------------------------------------------------------------------- round trip
def test_round_trip_keeps_slices_masks_intensities_and_spacing(tmp_path, dinov2_embedder):
    from RetrievalSegLib.engine.preprocess import robust_window, to_uint8

    image, labels = make_case(0)
    bank = new_bank(tmp_path, dinov2_embedder)
    added = bank.add_volume(image, labels, "p01", dinov2_embedder)

    # Only the annotated slices, along the through-plane axis k (largest spacing).
    assert [(e.axis, e.index) for e in added] == [(2, 2), (2, 3), (2, 5)]
    reopened = SupportBank.open(tmp_path / "bank")
    assert reopened.labels == tuple(LABELS)
    assert reopened.entries() == added
    window = robust_window(image.array)
    expected_rows = []
    for e in reopened.entries():
        data = reopened.load_entry(e.id)
        original = slice_view(image.array, 2, e.index)
        assert data.intensities.dtype == np.int16
        np.testing.assert_array_equal(data.intensities, original)
        np.testing.assert_array_equal(data.image, to_uint8(original, window))
        for v in (1, 2):
            np.testing.assert_array_equal(data.masks[v], slice_view(labels.array, 2, e.index) == v)
        assert e.spacing == (0.9, 0.8)  # (rows = j, columns = i) of the slice
        assert e.shape == (28, 32) and e.labels_present == (1, 2)
        assert e.case_id == "p01" and e.origin == "initial" and not e.retired
        expected_rows.append(dinov2_embedder.embed([data.image])[0])
    np.testing.assert_allclose(reopened.embeddings(), np.stack(expected_rows), atol=1e-5)
    assert reopened.verify(dinov2_embedder).ok


def test_entry_files_hold_plain_arrays_that_load_without_pickle(tmp_path):
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    (e,) = bank.add_volume(*make_case(1), "p01", emb, slices=[3])
    with np.load(tmp_path / "bank" / "entries" / f"{e.id}.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["image", "intensities", "mask_1", "mask_2"]
        assert z["image"].dtype == np.uint8 and z["mask_1"].dtype == bool
    meta = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert meta["schema_version"] == 2 and meta["index"] == "bank.db"  # the index lives in SQLite
    reopened = SupportBank.open(tmp_path / "bank")
    assert reopened.dinov2_identity == emb.identity and reopened.entries() == [e]
    assert reopened.labels[1] == LabelInfo(2, "Myo", (0.0, 1.0, 0.0))


def test_negatives_and_explicit_slices_and_explicit_window(tmp_path):
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    image, labels = make_case(2, annotated=(3,))
    added = bank.add_volume(image, labels, "p02", emb, negatives=2, window=(0.0, 500.0))
    assert [e.index for e in added] == [1, 3, 6]  # annotated 3 + two evenly spaced empty slices
    assert [e.labels_present for e in added] == [(), (1, 2), ()]
    assert all(e.window == (0.0, 500.0) for e in added)
    only = bank.add_volume(image, labels, "p03", emb, slices=[0, 3])
    assert [e.index for e in only] == [0, 3]
    with pytest.raises(ValueError, match="outside 0..7"):
        bank.add_volume(image, labels, "p03", emb, slices=[8])


def test_unknown_label_values_and_mismatched_geometry_are_refused(tmp_path):
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    image, labels = make_case(3)
    bad = labels.with_array(np.where(labels.array == 2, 7, labels.array).astype(np.uint8))
    with pytest.raises(ValueError, match=r"values \[7\].*1=RV, 2=Myo"):
        bank.add_volume(image, bad, "p01", emb)
    shifted = Volume(labels.array, labels.spacing, (0.0, 0.0, 0.0), labels.direction)
    with pytest.raises(ValueError, match="do not share a geometry"):
        bank.add_volume(image, shifted, "p01", emb)
    assert len(bank) == 0 and not list((tmp_path / "bank" / "entries").iterdir())


# ----------------------------------------------------------------------------- open / create errors
def test_open_and_create_errors_say_what_to_do(tmp_path):
    with pytest.raises(BankNotFoundError, match="does not exist"):
        SupportBank.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankNotFoundError, match="no bank.json"):
        SupportBank.open(tmp_path / "empty")
    bank = new_bank(tmp_path, HashEmbedder())
    with pytest.raises(FileExistsError, match="not empty"):
        SupportBank.create(bank.path, LABELS, "x")
    meta = json.loads((bank.path / "bank.json").read_text())
    meta["schema_version"] = 99
    (bank.path / "bank.json").write_text(json.dumps(meta))
    with pytest.raises(BankSchemaError, match="schema version 99.*update RetrievalSeg"):
        SupportBank.open(bank.path)
    (bank.path / "bank.json").write_text('{"schema_version": 1, "labels": [')
    with pytest.raises(BankCorruptError, match="bank.json is not valid JSON"):
        SupportBank.open(bank.path)


def test_two_processes_adding_at_once_both_land(tmp_path):
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    script = tmp_path / "child.py"
    script.write_text(CONCURRENT_CHILD)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(bank.path), case, "5", str(go)],
                         env=child_env(), stderr=subprocess.PIPE, text=True)
        for case in ("alice", "bob")
    ]
    time.sleep(0.5)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    entries = bank.entries()
    assert sorted((e.case_id, e.index) for e in entries) == sorted(
        (c, i) for c in ("alice", "bob") for i in range(5)
    )
    rows = bank.embeddings()
    for n, e in enumerate(bank.entries(include_retired=True)):  # rows stay aligned with entries
        np.testing.assert_allclose(rows[n], emb.embed([bank.load_entry(e.id).image])[0], atol=1e-6)
    assert bank.verify().ok


KILLED_CHILD = HASH_EMBEDDER_SRC + textwrap.dedent('''
import os, sys, time
bank_path, target = sys.argv[1], sys.argv[2]
real_replace = os.replace
def replace(src, dst):
    name = os.path.basename(dst)
    if name == target or (target == "npz" and name.endswith(".npz")):
        print("PAUSED", flush=True)  # the parent kills us here, before this file is committed
        time.sleep(300)
    return real_replace(src, dst)
os.replace = replace
from RetrievalSegLib.bank import db as bank_db
real_write = bank_db._write
def write(*args, **kwargs):  # every statement of the commit done, COMMIT not yet
    real_write(*args, **kwargs)
    if target == "transaction":
        print("PAUSED", flush=True)
        time.sleep(300)
bank_db._write = write
from RetrievalSegLib.bank.support_bank import SupportBank

img = np.full((16, 16), 42, dtype=np.uint8)
SupportBank.open(bank_path).add_slice(img, {1: img > 0}, "intruder", "k", 0, (1.0, 1.0), HashEmbedder())
''')


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("killed_before", ["npz", "transaction"])
def test_writer_killed_mid_write_leaves_every_committed_entry(tmp_path, killed_before):
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    committed = bank.add_volume(*make_case(4), "p01", emb)
    script = tmp_path / "killed.py"
    script.write_text(KILLED_CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(bank.path), killed_before],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.readline().strip() == "PAUSED", proc.stderr.read()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    survivor = SupportBank.open(bank.path)
    assert survivor.entries() == committed  # the interrupted add is simply absent
    for e in committed:
        survivor.load_entry(e.id)
    q = emb.embed([survivor.load_entry(committed[0].id).image])
    assert survivor.search(q, k=1, case_policy="ignore")[0][0][0] == committed[0].id
    report = survivor.verify()
    assert report.ok and (report.temp_files or report.orphan_files)  # leftovers are noted, not problems
    assert survivor.revision == bank.revision  # the previous revision, whole
    repaired = survivor.verify(repair=True)
    assert repaired.ok and not repaired.temp_files, repaired.summary()
    assert survivor.entries() == committed
    survivor.add_slice(np.zeros((16, 16), np.uint8), {}, "p02", "k", 0, (1.0, 1.0), emb)
    assert len(survivor) == len(committed) + 1 and survivor.verify().ok


def test_lock_timeout_is_a_clear_error(tmp_path):
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    (e,) = bank.add_volume(*make_case(5), "p01", emb, slices=[2])
    other = SupportBank.open(bank.path, lock_timeout=0.2)
    with bank.locked():
        with pytest.raises(BankLockTimeout, match=r"is busy.*held by pid"):
            other.remove(e.id)
    assert other.remove(e.id).retired  # free again once released


def test_a_lock_file_with_another_hard_link_is_refused_untouched(tmp_path):
    """The writer signs .lock (pid, host): it must not do that to a file that also lives elsewhere."""
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    (e,) = bank.add_volume(*make_case(5), "p01", emb, slices=[2])
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes")
    (bank.path / ".lock").unlink()
    os.link(notes, bank.path / ".lock")
    with pytest.raises(BankError, match=r"\.lock is not a plain file of its own .*2 hard links"):
        bank.remove(e.id)
    assert notes.read_text() == "the user's notes" and not bank.entry(e.id).retired
    (bank.path / ".lock").unlink()
    assert bank.remove(e.id).retired  # a fresh lock file is fine


def test_an_old_filelock_is_a_clear_error(tmp_path, monkeypatch):
    """filelock 3.x has no on_acquired hook and opens lock files through links: refuse it, say what to do."""
    import filelock

    class OldFileLock:  # filelock 3.x's constructor: no fallback_to_soft, no on_acquired
        def __init__(self, lock_file, timeout=-1, mode=0o644, thread_local=True, *, blocking=True,
                     is_singleton=False, poll_interval=0.05):
            raise AssertionError("not reached: the keyword arguments are checked first")

    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    (e,) = bank.add_volume(*make_case(5), "p01", emb, slices=[2])
    monkeypatch.setattr(filelock, "FileLock", OldFileLock)
    with pytest.raises(BankError, match=r"needs filelock >= 4\.3 .*pip install 'filelock>=4\.3'"):
        bank.remove(e.id)


# ----------------------------------------------------------------------------- damage
def test_verify_finds_corrupt_and_missing_entries_and_never_drops_them(tmp_path):
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    entries = bank.add_volume(*make_case(6, annotated=(1, 2, 3, 4, 5)), "p01", emb)
    corrupt, missing = entries[1], entries[3]
    f = bank.path / "entries" / f"{corrupt.id}.npz"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    (bank.path / "entries" / f"{missing.id}.npz").unlink()
    cache = bank.path / "memories" / "sam2.1-tiny_512_random-seed0-0123abcd"  # an older version's cache
    cache.mkdir(parents=True)
    (cache / "x.pt").write_bytes(b"cached")

    report = bank.verify()
    assert not report.ok
    assert report.missing == [missing.id] and list(report.corrupt) == [corrupt.id]
    assert "sha256" in report.corrupt[corrupt.id]
    with pytest.raises(BankCorruptError, match=str(f.name)):
        bank.load_entry(corrupt.id)

    repaired = bank.verify(repair=True)
    assert {e.id for e in bank.entries()} == {e.id for e in entries}  # still listed
    assert bank.entry(corrupt.id).status == "damaged" and bank.entry(missing.id).status == "damaged"
    assert repaired.damaged == sorted([corrupt.id, missing.id]) and not repaired.ok
    assert not cache.exists() and bank.sam2_identities == ()  # caches are rebuildable
    q = emb.embed([bank.load_entry(entries[0].id).image])
    hits = [i for i, _ in bank.search(q, k=3, case_policy="ignore")[0]]
    assert corrupt.id not in hits and missing.id not in hits
    with pytest.raises(ValueError, match="only 3 usable entries.*2 damaged"):
        bank.search(q, k=4, case_policy="ignore")
    # Retiring the damaged entries acknowledges them: still listed, the bank is ok again.
    bank.remove(corrupt.id)
    bank.remove(missing.id)
    final = bank.verify()
    assert final.ok and final.damaged == sorted([corrupt.id, missing.id])


def test_entry_file_carrying_a_pickled_object_is_refused(tmp_path):
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    (e,) = bank.add_volume(*make_case(7), "p01", emb, slices=[2])
    buf = io.BytesIO()
    np.savez(buf, image=np.array([{"run": "code"}], dtype=object), intensities=np.zeros((28, 32)))
    f = bank.path / "entries" / f"{e.id}.npz"
    f.write_bytes(buf.getvalue())
    import hashlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(bank.path / "bank.db")) as con, con:  # a forger also fixes the checksum
        con.execute("UPDATE entries SET sha256 = ? WHERE id = ?", (hashlib.sha256(buf.getvalue()).hexdigest(), e.id))
    with pytest.raises(BankCorruptError, match=r"pickled Python object \(array 'image'\)"):
        SupportBank.open(bank.path).load_entry(e.id)


# ----------------------------------------------------------------------------- corrections
def test_newer_correction_retires_the_older_entry_and_restore_swaps_back(tmp_path):
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    first = {e.index: e for e in bank.add_volume(*make_case(8), "p01", emb)}
    old = first[3]
    fixed = np.array(bank.load_entry(old.id).image)
    mask = np.zeros((28, 32), bool)
    mask[10:20, 10:20] = True
    new = bank.add_slice(fixed, {1: mask}, "p01", "k", 3, old.spacing, emb)

    assert new.origin == "correction" and new.labels_present == (1,)
    assert bank.entry(old.id).retired and bank.entry(old.id).retired_by == new.id
    assert old.id not in {e.id for e in bank.entries()}
    assert old.id in {e.id for e in bank.entries(include_retired=True)}
    q = emb.embed([fixed])
    assert all(i != old.id for i, _ in bank.search(q, k=3, case_policy="ignore")[0])

    bank.restore(old.id)
    assert bank.entry(old.id).active and bank.entry(new.id).retired_by == old.id
    assert len(bank) == 3  # never two active entries for one slice
    bank.remove(old.id)
    assert bank.entry(old.id).retired_by == "user" and len(bank) == 2


# ----------------------------------------------------------------------------- models
def test_bank_made_with_another_model_is_refused_with_the_reembed_command(tmp_path, dinov2_embedder):
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    bank.add_volume(*make_case(9), "p01", emb)
    with pytest.raises(BankModelMismatchError) as err:
        bank.check_models("dinov2-base:sha256-0123456789abcdef@224")
    msg = str(err.value)
    assert f"support bank at {bank.path} was made with {emb.identity}" in msg
    assert "engine uses dinov2-base:sha256-0123456789abcdef@224" in msg
    assert f"rseg bank verify --reembed {bank.path} --dinov2 base" in msg
    with pytest.raises(BankModelMismatchError):
        bank.add_volume(*make_case(9), "p02", dinov2_embedder)

    bank.reembed(dinov2_embedder)
    bank.check_models(dinov2_embedder.identity)
    assert bank.embeddings().shape == (3, 384)
    q = dinov2_embedder.embed([bank.load_entry(bank.entries()[1].id).image])
    (best, score), *_ = bank.search(q, k=2, case_policy="ignore")[0]
    assert best == bank.entries()[1].id and score == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------- search
def test_search_case_policies_and_too_large_k(tmp_path):
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    a = bank.add_volume(*make_case(10, annotated=(1, 2, 3)), "A", emb)
    b = bank.add_volume(*make_case(11, annotated=(1, 2, 3, 4)), "B", emb)
    q = emb.embed([bank.load_entry(a[0].id).image])
    rows, ids = bank.embeddings(), [e.id for e in bank.entries()]
    scores = dict(zip(ids, (rows @ q[0]).tolist()))
    by_score = lambda group: sorted((e.id for e in group), key=lambda i: -scores[i])  # noqa: E731

    ignore = [i for i, _ in bank.search(q, 7, case_id="A", case_policy="ignore")[0]]
    assert ignore[0] == a[0].id and ignore == by_score(a + b)
    exclude = bank.search(q, 4, case_id="A")[0]  # "exclude" is the default: honest evaluation
    assert [i for i, _ in exclude] == by_score(b)
    assert [s for _, s in exclude] == pytest.approx([scores[i] for i in by_score(b)], abs=1e-6)
    prefer = [i for i, _ in bank.search(q, 5, case_id="A", case_policy="prefer")[0]]
    assert prefer == by_score(a) + by_score(b)[:2]

    with pytest.raises(ValueError, match=r"k=5 .* only 4 usable entries \(3 of case 'A' excluded\)"):
        bank.search(q, 5, case_id="A")
    with pytest.raises(ValueError, match="k=8"):
        bank.search(q, 8, case_policy="ignore")
    with pytest.raises(ValueError, match="case_policy"):
        bank.search(q, 1, case_policy="sometimes")


# ----------------------------------------------------------------------------- export / import
@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_export_import_round_trip(tmp_path, suffix):
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    bank.add_volume(*make_case(12), "p01", emb)
    bank.remove(bank.entries()[0].id)
    (bank.path / "memories" / "sam2.1-tiny_512_x-0123abcd").mkdir(parents=True)  # an older version's cache
    archive = bank.export(tmp_path / f"out{suffix}")

    copy = SupportBank.import_archive(archive, tmp_path / "copy")
    assert copy.entries(include_retired=True) == bank.entries(include_retired=True)
    assert copy.labels == bank.labels and copy.dinov2_identity == bank.dinov2_identity
    np.testing.assert_array_equal(copy.embeddings(), bank.embeddings())
    for e in bank.entries(include_retired=True):
        a, b = bank.load_entry(e.id), copy.load_entry(e.id)
        np.testing.assert_array_equal(a.intensities, b.intensities)
        assert all(np.array_equal(a.masks[v], b.masks[v]) for v in (1, 2))
    assert copy.verify().ok and not any((copy.path / "memories").iterdir())
    with pytest.raises(FileExistsError, match="not an empty folder"):
        SupportBank.import_archive(archive, tmp_path / "copy")


def test_import_refuses_unsafe_archive_members(tmp_path):
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    bank.add_volume(*make_case(13), "p01", emb, slices=[2])
    evil_tar = tmp_path / "evil.tar.gz"
    with tarfile.open(evil_tar, "w:gz") as tf:
        tf.add(bank.path / "bank.json", arcname="bank.json")
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(BankCorruptError, match=r"unsafe member name '\.\./escaped\.txt'"):
        SupportBank.import_archive(evil_tar, tmp_path / "dest")
    evil_zip = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil_zip, "w") as zf:
        zf.writestr("bank.json", (bank.path / "bank.json").read_bytes())
        zf.writestr("/etc/evil", b"bad")
    with pytest.raises(BankCorruptError, match="absolute path"):
        SupportBank.import_archive(evil_zip, tmp_path / "dest")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "dest").exists()
    # An archive whose entry file was altered in transit is refused, nothing imported.
    good = bank.export(tmp_path / "good.zip")
    with zipfile.ZipFile(good) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    name = next(n for n in members if n.endswith(".npz"))
    members[name] = members[name][:-10]
    with zipfile.ZipFile(tmp_path / "altered.zip", "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    with pytest.raises(BankCorruptError, match="damaged entries"):
        SupportBank.import_archive(tmp_path / "altered.zip", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


# ----------------------------------------------------------------------------- command line
def test_command_line_round_trip(tmp_path, capsys):
    from RetrievalSegLib.cli.bank import add_bank_parser
    from RetrievalSegLib.data.volume import write_volume

    built = []

    def make_embedder(args):
        built.append(args.bank_command)
        return HashEmbedder()

    parser = argparse.ArgumentParser(prog="rseg")
    add_bank_parser(parser.add_subparsers(dest="command"), make_embedder)

    def rseg(*argv: str) -> int:
        args = parser.parse_args(["bank", *map(str, argv)])
        return args.func(args)

    image, labels = make_case(14)
    write_volume(image, tmp_path / "img.nrrd")
    write_volume(labels, tmp_path / "lab.nrrd")
    bank = tmp_path / "bank"
    assert rseg("create", bank, "--labels", "1:RV,2:Myo", "--colors", "2:#00ff00") == 0
    assert SupportBank.open(bank).labels[1].color == (0.0, 1.0, 0.0)
    assert rseg("add", bank, tmp_path / "img.nrrd", tmp_path / "lab.nrrd", "--case", "p01",
                "--negatives", "1", "--window", "400", "--level", "200") == 0
    assert rseg("add-slice", bank, tmp_path / "img.nrrd", tmp_path / "lab.nrrd", "--case", "p01",
                "--axis", "k", "--index", "3") == 0
    capsys.readouterr()
    assert rseg("list", bank, "--all", "--json") == 0
    listing = json.loads(capsys.readouterr().out)
    assert [e["status"] for e in listing["entries"]].count("retired") == 1
    assert len(listing["entries"]) == 5 and listing["active"] == 4
    some = listing["entries"][0]["id"]
    assert rseg("remove", bank, some) == 0 and rseg("restore", bank, some) == 0
    assert rseg("remove", bank, "no-such-id") == 1
    assert "has no entry 'no-such-id'" in capsys.readouterr().err
    assert rseg("verify", bank) == 0
    import sqlite3

    with contextlib.closing(sqlite3.connect(bank / "bank.db")) as con, con:
        con.execute("DELETE FROM embeddings")  # rebuildable: only --repair builds the model for it
    assert rseg("verify", bank) == 1
    assert rseg("verify", bank, "--repair") == 0
    assert rseg("export", bank, tmp_path / "b.zip") == 0
    assert rseg("import", tmp_path / "b.zip", tmp_path / "copy") == 0
    assert rseg("add", bank, tmp_path / "img.nrrd", tmp_path / "lab.nrrd", "--case", "p01",
                "--window", "400") == 2  # --window without --level is a usage error
    assert built == ["create", "add", "add-slice", "verify"]  # list/remove/export never did
    with pytest.raises(SystemExit) as usage:
        parser.parse_args(["bank", "create", str(tmp_path / "x"), "--labels", "RV"])
    assert usage.value.code == 2
