"""Schema 2 (SQLite index): migration of schema-1 banks written by the previous code, export and
import across versions, readers beside writers, exclusion at scale, the bounded memory cache."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from RetrievalSegLib.bank.support_bank import (
    BankEntry,
    BankReadOnlyError,
    BankStore,
    LabelInfo,
    SupportBank,
    _State,
    same_subject,
)
from RetrievalSegLib.bank.search import _RevisionIndex
from _bank_helpers import HASH_EMBEDDER_SRC, HashEmbedder, child_env, new_bank

DATA = Path(__file__).resolve().parents[1] / "data"


def v1_bank(tmp_path: Path) -> Path:
    """The schema-1 bank of data/make_v1_bank.py (written by the schema-1 code), unpacked."""
    dest = tmp_path / "v1bank"
    with zipfile.ZipFile(DATA / "bank_v1_folder.zip") as zf:
        zf.extractall(dest)
    (dest / "memories").mkdir(exist_ok=True)
    return dest


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*argv) -> int:
    import argparse

    from RetrievalSegLib.cli.bank import add_bank_parser

    parser = argparse.ArgumentParser(prog="rseg")
    add_bank_parser(parser.add_subparsers(dest="command"), lambda args: HashEmbedder())
    args = parser.parse_args(["bank", *map(str, argv)])
    return args.func(args)


# ----------------------------------------------------------------------------- migration
def test_upgrade_keeps_every_entry_retirement_correction_and_damage_mark(tmp_path, capsys):
    path = v1_bank(tmp_path)
    original = files(path)
    old = SupportBank.open(path)
    assert old.schema_version == 1
    entries = old.entries(include_retired=True)
    assert {e.origin for e in entries} == {"initial", "correction"}
    assert {e.retired_by for e in entries if e.retired} >= {"user"} and any(e.damaged for e in entries)
    rows = np.array(old.embeddings())
    emb = HashEmbedder()
    queries = emb.embed([old.load_entry(e.id).image for e in entries if e.usable])
    before = [old.search(queries, 3, case_id=c) for c in ("p01", "p02", None)]
    problems = old.verify().problems

    assert cli("upgrade", path) == 0
    assert "the old bank.json and embeddings.npy are in" in capsys.readouterr().out
    new = SupportBank.open(path)
    assert new.schema_version == 2 and old.schema_version == 2  # the old object follows the change
    assert new.entries(include_retired=True) == entries  # ids, retired_by, origin, damaged, sha256
    assert new.bank_id == old.bank_id and new.labels == old.labels and new.dinov2_identity == old.dinov2_identity
    np.testing.assert_array_equal(new.embeddings(), rows)
    assert [new.search(queries, 3, case_id=c) for c in ("p01", "p02", None)] == before
    assert new.verify().problems == problems  # the damaged entry is still reported, nothing new
    (backup,) = path.glob("backup-v1-*")
    assert (backup / "bank.json").read_bytes() == original["bank.json"]
    assert (backup / "embeddings.npy").read_bytes() == original["embeddings.npy"]
    assert not (path / "embeddings.npy").exists()
    for name, data in original.items():  # entry files untouched
        if name.startswith("entries/"):
            assert (path / name).read_bytes() == data
    assert cli("upgrade", path) == 0 and "nothing to do" in capsys.readouterr().out


def test_first_write_upgrades_automatically_with_a_backup(tmp_path):
    path = v1_bank(tmp_path)
    bank = SupportBank.open(path)
    entries = bank.entries(include_retired=True)
    problems = bank.verify().problems  # the damaged entry, nothing else
    assert len(problems) == 1
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    added = bank.add_slice(img, {1: img > 100}, "p03", "k", 0, (1.0, 1.0), HashEmbedder())
    assert bank.schema_version == 2 and len(list(path.glob("backup-v1-*"))) == 1
    assert SupportBank.open(path).entries(include_retired=True) == entries + [added]
    assert SupportBank.open(path).verify().problems == problems


def test_a_read_only_v1_bank_reads_and_refuses_changes_with_the_command(tmp_path, monkeypatch):
    path = v1_bank(tmp_path)
    before = files(path)
    monkeypatch.setattr(BankStore, "writable", lambda self: False)
    bank = SupportBank.open(path)
    e = next(e for e in bank.entries() if e.usable)
    q = HashEmbedder().embed([bank.load_entry(e.id).image])
    assert bank.search(q, 1, case_policy="ignore")[0][0][0] == e.id  # reading needs no upgrade
    with pytest.raises(BankReadOnlyError, match=rf"schema version 1 .*`rseg bank upgrade {path}`"):
        bank.remove(e.id)
    assert cli("upgrade", path) == 1
    assert files(path) == before  # nothing written


def test_a_v1_bank_whose_embeddings_were_replaced_is_refused(tmp_path):
    """Schema 1 keeps its own check: embeddings.npy rows that do not match embeddings_sha256 in
    bank.json (an interrupted re-embed by the schema-1 code) are never searched."""
    from RetrievalSegLib.bank.support_bank import BankCorruptError

    path = v1_bank(tmp_path)
    rows = np.load(path / "embeddings.npy")
    np.save(path / "embeddings.npy", rows[:, ::-1].copy())
    with pytest.raises(BankCorruptError, match="does not match bank.json"):
        SupportBank.open(path).search(rows[:1], 1)


def test_export_and_import_across_versions(tmp_path):
    """An archive of the schema-1 code imports as schema 2; a schema-2 export round-trips."""
    v1 = SupportBank.open(v1_bank(tmp_path))
    imported = SupportBank.import_archive(DATA / "bank_v1_export.zip", tmp_path / "imported")
    assert imported.schema_version == 2 and not list(imported.path.glob("backup-v1-*"))
    assert imported.entries(include_retired=True) == v1.entries(include_retired=True)
    np.testing.assert_array_equal(imported.embeddings(), v1.embeddings())
    imported.export(tmp_path / "again.tar.gz")
    again = SupportBank.import_archive(tmp_path / "again.tar.gz", tmp_path / "again")
    assert again.entries(include_retired=True) == v1.entries(include_retired=True)
    np.testing.assert_array_equal(again.embeddings(), v1.embeddings())
    assert again.verify().damaged == v1.verify().damaged == [e.id for e in v1.entries(True) if e.damaged]


# ----------------------------------------------------------------------------- readers beside writers
READER_CHILD = textwrap.dedent('''
import os, sys, time
import numpy as np
from RetrievalSegLib.bank.support_bank import SupportBank

bank_path, go, stop = sys.argv[1], sys.argv[2], sys.argv[3]
while not os.path.exists(go):
    time.sleep(0.005)
bank = SupportBank.open(bank_path)
last, reads, slowest = -1, 0, 0.0
q = np.ones((1, 16), np.float32) / 4
while not os.path.exists(stop) or reads < 5:
    t0 = time.perf_counter()
    state, rows = bank._state_and_rows()
    assert len(rows) == len(state.entries), (len(rows), len(state.entries))
    assert state.revision >= last, (state.revision, last)
    last = state.revision
    if any(e.usable for e in state.entries):
        bank.search(q, 1, case_policy="ignore")
    slowest = max(slowest, time.perf_counter() - t0)
    reads += 1
print(reads, last, round(slowest, 3))
''')


@pytest.mark.skipif(os.name != "posix", reason="POSIX processes")
def test_readers_see_whole_revisions_while_two_writers_add(tmp_path):
    from _bank_helpers import CONCURRENT_CHILD

    bank = new_bank(tmp_path, HashEmbedder())
    (tmp_path / "writer.py").write_text(CONCURRENT_CHILD)
    (tmp_path / "reader.py").write_text(READER_CHILD)
    go, stop = tmp_path / "go", tmp_path / "stop"
    writers = [subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), str(bank.path), case, "6", str(go)],
                                env=child_env(), stderr=subprocess.PIPE, text=True) for case in ("alice", "bob")]
    readers = [subprocess.Popen([sys.executable, str(tmp_path / "reader.py"), str(bank.path), str(go), str(stop)],
                                env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    try:
        go.touch()
        for p in writers:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        stop.touch()
        for p in readers:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            reads, last, slowest = out.split()
            assert int(reads) >= 5 and 0 <= int(last) <= bank.revision
            assert float(slowest) < 30  # never blocked for a writer's whole run
    finally:  # a failed writer must not leave the readers spinning for the rest of the suite
        stop.touch()
        for p in writers + readers:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert sorted((e.case_id, e.index) for e in bank.entries()) == sorted(
        (c, i) for c in ("alice", "bob") for i in range(6))
    assert bank.verify().ok


# ----------------------------------------------------------------------------- exclusion at scale
TRICKY = ["patient01", "patient010", "patient01_frame02", "patient01-b", "patient01.x", "patient01 y",
          "patient0", "patient", "p", "p_1", "patient01_frame02_z", "patient011", "Patient01"]


def test_exclusion_at_scale_never_returns_an_entry_of_the_subject():
    """20,000 entries over 2,013 case ids (prefix traps: patient01 vs patient010): every query,
    for every tricky subject, returns k entries none of which `same_subject` matches."""
    rng = np.random.default_rng(0)
    cases = TRICKY + [f"c{n:04d}" + ("_f1" if n % 3 == 0 else "") for n in range(2000)]
    entries, rows = [], rng.standard_normal((20000, 16)).astype(np.float32)
    for n in range(20000):
        case = cases[n % len(cases)] if n % 5 else TRICKY[n % len(TRICKY)]  # the traps are frequent
        entries.append(BankEntry(f"e{n}", case, 2, n, (1.0, 1.0), "t", "initial", False, None, "0" * 64, (4, 4), ()))
    state = _State(labels=(LabelInfo(1, "x"),), dinov2="d", sam2=[], entries=entries, embedding_dim=16,
                   embeddings_sha256=None, revision=1, created="t")
    ix = _RevisionIndex(state, rows)
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    for subject in TRICKY + ["c0003", "c0004", "nobody"]:
        mask = ix.case_mask(subject, "exclude")
        truth = np.array([same_subject(e.case_id, subject) for e in entries])
        np.testing.assert_array_equal(mask, truth)
        _, pos = ix.search(queries, 50, keep=~mask)
        assert pos.shape == (40, 50) and (pos >= 0).all()
        assert not truth[pos].any(), f"an entry of subject {subject!r} was returned"
        scores = queries @ rows[~truth].T  # and they are the best 50 of the rest
        np.testing.assert_allclose(np.sort(_[:, -1]), np.sort(np.sort(scores, axis=1)[:, -50]), rtol=1e-5)


def test_bank_search_excludes_the_subject_through_the_index(tmp_path):
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    rng = np.random.default_rng(1)
    for case in ("patient01", "patient010", "patient01_frame02", "patient02"):
        for i in range(6):
            img = rng.integers(0, 256, (16, 16), dtype=np.uint8)
            bank.add_slice(img, {1: img > 128}, case, "k", i, (1.0, 1.0), emb)
    ids = {e.id: e.case_id for e in bank.entries()}
    q = emb.embed([bank.load_entry(e).image for e in ids])
    for row in bank.search(q, 12, case_id="patient01"):  # only patient010 and patient02 remain
        assert {ids[i] for i, _ in row} == {"patient010", "patient02"}
    for row in bank.search(q, 8, case_id="patient01", case_policy="prefer"):
        assert [ids[i] for i, _ in row[:6]] == ["patient01"] * 6


# ----------------------------------------------------------------------------- bounded memory cache
@pytest.fixture(scope="module")
def engine():
    from RetrievalSegLib.engine.pipeline import RetrievalEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RetrievalEngine.load(random_weights=True, image_size=256, device="cpu", dinov2_input_size=56)


def test_cache_eviction_keeps_results_identical(tmp_path, engine, monkeypatch):
    from RetrievalSegLib.engine.pipeline import RetrievalEngine
    from RetrievalSegLib.segmentation.segment import segment_volume
    from RetrievalSegLib.data.synthetic import LABELS, make_synthetic_study

    study = make_synthetic_study(2, shape=(6, 32, 32), spacing=(1.2, 1.2, 5.0))
    bank = SupportBank.create(tmp_path / "bank", [LabelInfo(v, n, c) for v, (n, c) in LABELS.items()],
                              engine.embedder.identity)
    bank.add_volume(study[0].image, study[0].labels, study[0].case_id, engine.embedder, negatives=3)
    assert len(bank) >= 4
    shutil.copytree(bank.path, tmp_path / "capped", ignore=shutil.ignore_patterns(".lock"))
    free = segment_volume(study[1].image, bank, RetrievalEngine(engine.embedder, engine.sam), k=2, slice_range=(2, 4))
    one = RetrievalEngine(engine.embedder, engine.sam).memory_cache(bank)
    assert one.stats()["evicted"] == 0
    from RetrievalSegLib.engine.memory_cache import user_cache_root

    size = max(p.stat().st_size for p in (user_cache_root() / "memories" / bank.bank_id).rglob("*.safetensors"))
    monkeypatch.setenv("RSEG_MEMORY_CACHE_GB", str(1.5 * size / 2**30))  # room for one memory
    monkeypatch.setenv("RSEG_CACHE_DIR", str(tmp_path / "capped-cache"))  # the copy has the same bank id: start cold
    capped_engine = RetrievalEngine(engine.embedder, engine.sam)
    capped_bank = SupportBank.open(tmp_path / "capped")
    capped = segment_volume(study[1].image, capped_bank, capped_engine, k=2, slice_range=(2, 4))
    stats = capped_engine.memory_cache(capped_bank).stats()
    assert stats["evicted"] > 0 and stats["evicted_files"] > 0 and stats["memory_items"] == 1
    assert stats["disk_bytes"] <= stats["cap_bytes"]
    on_disk = list((tmp_path / "capped-cache" / "memories").rglob("*.safetensors"))
    assert len(on_disk) == 1
    np.testing.assert_array_equal(capped.labelmap.array, free.labelmap.array)
    np.testing.assert_array_equal(capped.confidence, free.confidence)


def test_cache_cli_stats_warm_up_to_the_cap_and_clear(tmp_path, engine, capsys, monkeypatch):
    import argparse
    import json

    from RetrievalSegLib.engine import build as engine_build
    from RetrievalSegLib.cli.bank import add_bank_parser
    from RetrievalSegLib.cli.common import model_options

    emb = engine.embedder
    bank = SupportBank.create(tmp_path / "bank", [LabelInfo(1, "x")], emb.identity)
    rng = np.random.default_rng(3)
    for i in range(4):
        img = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        bank.add_slice(img, {1: img > 128}, "p1", "k", i, (1.0, 1.0), emb)
    monkeypatch.setattr(engine_build, "make_engine", lambda args: engine)
    parser = argparse.ArgumentParser()
    add_bank_parser(parser.add_subparsers(dest="command"), lambda a: emb, parents=[model_options()])

    def rseg(*argv) -> dict:
        args = parser.parse_args(["bank", "cache", str(bank.path), *argv, "--json", "--device", "cpu"])
        assert args.func(args) == 0
        return json.loads(capsys.readouterr().out)

    own = rseg("--warm", "--cache-dir", str(tmp_path / "cohort"))  # a cohort's own folder, default cap
    assert own["computed"] == 4 and own["did_not_fit"] == 0 and str(tmp_path / "cohort") in own["folder"]
    size = own["bytes"] / 4
    first = rseg("--warm", "--cap-gb", str(2.5 * size / 2**30))  # room for 2 of the 4 memories
    assert first["computed"] == 2 and first["did_not_fit"] == 2 and first["bytes"] <= first["cap_bytes"]
    stats = rseg("--stats")
    assert stats["files"] == 2 and stats["usable_entries"] == 4
    full = rseg("--warm", "--cap-gb", "1")
    assert full["computed"] == 2 and full["already_cached"] == 2 and full["did_not_fit"] == 0
    assert rseg("--clear")["deleted"] == 4 and rseg("--stats")["files"] == 0
    assert rseg("--stats", "--cache-dir", str(tmp_path / "cohort"))["files"] == 4
