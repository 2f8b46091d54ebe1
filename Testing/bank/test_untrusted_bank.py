"""A support bank file from someone else is data, never code, and never a path out of the bank.

A bank travels (exported, imported, copied from a colleague, opened from a shared drive), so
whoever can write its `bank.db` can put anything there: triggers, views, extra tables, ids that
are paths, values that are not numbers. Each test below is one such change, made with Python's
`sqlite3` as an attacker would; every one must be refused before anything runs, with a message
naming the file and what was found, and `rseg bank verify` must never call the bank OK.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from RetrievalSegLib.bank import db as bank_db
from RetrievalSegLib.bank import schema as bank_schema
from RetrievalSegLib.bank.support_bank import BankCorruptError, BankError, LabelInfo, SupportBank

from _bank_helpers import HashEmbedder, bank_cli, child_env, filled_bank, make_case, tree

REPO = Path(__file__).resolve().parents[2]


def tamper(bank: Path, *statements: str) -> None:
    """Change bank.db behind RetrievalSeg's back, as anyone with write access to the file can."""
    con = sqlite3.connect(bank / "bank.db", isolation_level=None)
    try:
        for s in statements:
            con.executescript(s)
    finally:
        con.close()


def closed_bank(tmp_path: Path, name: str = "bank") -> Path:
    bank = filled_bank(tmp_path, name)
    bank.close()
    return bank.path


def verify_output(capsys, bank: Path, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = bank_cli()("verify", bank, *extra)
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_never_ok(code: int, text: str) -> None:
    assert code == 1, text
    assert ", OK" not in text and "OK\n" not in text, text


# ----------------------------------------------------------------------------- 1. SQL never runs
def test_a_trigger_in_bank_db_never_fires(tmp_path, capsys):
    """The attack of the issue: a trigger on provenance silently retires every entry on the next add."""
    path = closed_bank(tmp_path)
    tamper(path, "CREATE TRIGGER t AFTER INSERT ON provenance BEGIN UPDATE entries SET retired = 1; END;")
    image, labels = make_case(1)
    with pytest.raises(BankCorruptError) as err:
        SupportBank.open(path).add_volume(image, labels, "p02", HashEmbedder())
    msg = str(err.value)
    assert str(path / "bank.db") in msg and "trigger 't'" in msg and "restore" in msg.lower(), msg
    con = sqlite3.connect(path / "bank.db")
    assert con.execute("SELECT count(*) FROM entries WHERE retired = 1").fetchone()[0] == 0
    con.close()
    code, text = verify_output(capsys, path)
    assert_never_ok(code, text)
    assert "trigger 't'" in text


TAMPERINGS = {
    "extra-view": ("CREATE VIEW v AS SELECT 1;", "view 'v'"),
    "meta-replaced-by-a-view": (
        "CREATE TABLE m2 AS SELECT * FROM meta; DROP TABLE meta; CREATE VIEW meta AS SELECT key, value FROM m2;",
        "view 'meta'",
    ),
    "extra-table": ("CREATE TABLE notes (x TEXT);", "table 'notes'"),
    "extra-index": ("CREATE INDEX entries_sha ON entries (sha256);", "index 'entries_sha'"),
    "index-on-an-expression": ("CREATE INDEX entries_x ON entries (abs(idx) + 1);", "index 'entries_x'"),
    "missing-index": ("DROP INDEX entries_case;", "index 'entries_case'"),
    "added-column": ("ALTER TABLE entries ADD COLUMN note TEXT DEFAULT 'x';", "table 'entries'"),
    "table-definition-rewritten": (
        "PRAGMA writable_schema = ON; UPDATE sqlite_master SET sql = replace(sql, 'NOT NULL', '') "
        "WHERE name = 'labels'; PRAGMA writable_schema = OFF;",
        "table 'labels'",
    ),
}


@pytest.mark.parametrize("change", list(TAMPERINGS))
def test_schema_objects_must_be_exactly_the_projects(tmp_path, capsys, change):
    sql, named = TAMPERINGS[change]
    path = closed_bank(tmp_path)
    tamper(path, sql)
    before = tree(path)
    with pytest.raises(BankCorruptError) as err:
        len(SupportBank.open(path))
    msg = str(err.value)
    assert str(path / "bank.db") in msg and named in msg and "restore" in msg.lower(), msg
    code, text = verify_output(capsys, path)
    assert_never_ok(code, text)
    assert named in text
    code, text = verify_output(capsys, path, "--json")
    assert code == 1 and json.loads(text)["ok"] is False
    after = tree(path)
    for f in ("bank.db-wal", "bank.db-shm"):  # SQLite's transient files come and go with connections
        before.pop(f, None), after.pop(f, None)
    assert after == before  # refused, so nothing was written either


def test_a_recursive_view_as_meta_is_refused_not_run(tmp_path):
    """`meta` as an endless recursive view made list and verify hang forever; now refused at once."""
    path = closed_bank(tmp_path)
    tamper(path, "CREATE TABLE m2 AS SELECT * FROM meta; DROP TABLE meta;"
                 "CREATE VIEW meta AS WITH RECURSIVE c(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM c) "
                 "SELECT key, value FROM m2 UNION ALL SELECT 'pad' || n, n FROM c;")
    for command in ("verify", "list"):
        try:
            run = subprocess.run([sys.executable, "-m", "RetrievalSegLib.cli", "bank", command, str(path)],
                                 capture_output=True, text=True, timeout=60, env=child_env(), cwd=REPO)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`rseg bank {command}` ran the view in bank.db (still running after 60 s)")
        assert run.returncode == 1 and "view 'meta'" in run.stderr + run.stdout, run
        assert "Traceback" not in run.stderr


def test_a_trigger_hidden_in_the_wal_is_refused(tmp_path):
    """bank.db-wal is read before any query sees the schema: a trigger committed only to the WAL
    (the bank copied while a connection held it) is in the schema the check reads."""
    path = closed_bank(tmp_path)
    con = sqlite3.connect(path / "bank.db", isolation_level=None)
    con.execute("PRAGMA wal_autocheckpoint = 0")
    con.execute("CREATE TRIGGER t AFTER INSERT ON provenance BEGIN UPDATE entries SET retired = 1; END")
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    con.close()
    assert (copy / "bank.db-wal").stat().st_size > 0
    plain = sqlite3.connect(copy / "bank.db")
    assert "t" in {n for (n,) in plain.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    plain.close()
    with pytest.raises(BankCorruptError, match="trigger 't'"):
        SupportBank.open(copy)


def test_a_huge_value_is_an_error_not_a_read(tmp_path):
    """A 32 MiB label name (or a gigabyte blob) is refused by SQLite's length limit, not loaded."""
    path = closed_bank(tmp_path)
    tamper(path, f"UPDATE labels SET name = '{'x' * (32 * 2**20)}' WHERE value = 1")
    with pytest.raises(BankCorruptError, match="too big"):
        SupportBank.open(path)


def test_expected_schema_comes_from_the_projects_own_create_statements():
    """One source of truth: the check derives its objects from bank_db's CREATE statements."""
    objects = bank_schema.expected_objects(bank_db._SCHEMA)
    names = {(t, n) for t, n, _, _ in objects}
    assert ("table", "entries") in names and ("index", "entries_case") in names
    assert {t for t, _ in names} == {"table", "index"}  # no trigger or view
    con = sqlite3.connect(":memory:")
    con.executescript(bank_db._SCHEMA)  # a database made by the project passes
    bank_schema.check_schema(con, Path("made-here.db"), bank_db._SCHEMA)
    con.executescript("CREATE TABLE later_addition (x);")  # and anything beyond it does not
    with pytest.raises(BankCorruptError, match="later_addition"):
        bank_schema.check_schema(con, Path("made-here.db"), bank_db._SCHEMA)


def test_every_connection_has_trusted_schema_off(tmp_path, monkeypatch):
    """Defence in depth: even if a check missed an object, schema SQL may not call unsafe functions."""
    bank = filled_bank(tmp_path)
    for write in (True, False):
        con = bank_db.connect(bank.path, write=write)
        assert con.execute("PRAGMA trusted_schema").fetchone()[0] == 0
        con.close()
    real_connect = sqlite3.connect

    def read_only(database, *a, **kw):  # a reader that cannot open it read-only falls back to immutable
        if "mode=ro" in str(database) and "immutable" not in str(database):
            raise sqlite3.OperationalError("unable to open database file")
        return real_connect(database, *a, **kw)

    monkeypatch.setattr(bank_db.sqlite3, "connect", read_only)
    con = bank_db.connect(bank.path, write=False)
    assert con.execute("PRAGMA trusted_schema").fetchone()[0] == 0
    con.close()
    bank.close()
    monkeypatch.setattr(bank_db.sqlite3, "connect", real_connect)
    tamper(bank.path, "CREATE VIEW v AS SELECT 1;")
    monkeypatch.setattr(bank_db.sqlite3, "connect", read_only)
    with pytest.raises(BankCorruptError, match="view 'v'"):  # an immutable reader checks the schema too
        bank_db.connect(bank.path, write=False)


def test_defensive_mode_is_set_where_python_offers_it(tmp_path, monkeypatch):
    """Python 3.12 has Connection.setconfig; this machine's 3.11 does not, so a stand-in with 3.12's
    signature (positional only, op must be one of the module's SQLITE_DBCONFIG_* constants) records
    the calls; without setconfig nothing is called and the bank still opens."""
    bank = filled_bank(tmp_path)
    bank.close()
    calls: list[tuple[int, bool]] = []
    constants = {"SQLITE_DBCONFIG_DEFENSIVE": 1010, "SQLITE_DBCONFIG_ENABLE_TRIGGER": 1003,
                 "SQLITE_DBCONFIG_ENABLE_VIEW": 1015, "SQLITE_DBCONFIG_TRUSTED_SCHEMA": 1017}

    def setconfig(self, op, enable=True, /):
        if op not in constants.values():
            raise sqlite3.ProgrammingError(f"unknown config 'op': {op}")
        calls.append((op, bool(enable)))
        return bool(enable)

    if not hasattr(sqlite3.Connection, "setconfig"):
        assert len(SupportBank.open(bank.path)) == 3  # 3.11: no setconfig, nothing to call
        for name, value in constants.items():
            monkeypatch.setattr(sqlite3, name, value, raising=False)
        monkeypatch.setattr(bank_schema, "BankConnection", type("C", (bank_schema.BankConnection,), {"setconfig": setconfig}))
    else:
        real = sqlite3.Connection.setconfig
        monkeypatch.setattr(bank_schema, "BankConnection", type("C", (bank_schema.BankConnection,), {
            "setconfig": lambda self, op, enable=True, /: (setconfig(self, op, enable), real(self, op, enable))[1]}))
    assert len(SupportBank.open(bank.path)) == 3
    assert (1010, True) in calls  # SQLITE_DBCONFIG_DEFENSIVE on
    assert (1003, False) in calls and (1015, False) in calls and (1017, False) in calls


# ----------------------------------------------------------------------------- 2. bank_id
@pytest.mark.parametrize("bank_id", ["../../victim", "ABSOLUTE", "", "a/b", "..", "x" * 200, "id\n"],
                         ids=["dotdot", "absolute", "empty", "slash", "parent", "long", "newline"])
def test_a_bank_id_that_is_a_path_is_refused(tmp_path, capsys, bank_id):
    victim = tmp_path / "victim"
    (victim / "cache-of-someone").mkdir(parents=True)
    (victim / "cache-of-someone" / "precious.safetensors").write_bytes(b"the user's data")
    if bank_id == "ABSOLUTE":
        bank_id = str(victim)
    path = closed_bank(tmp_path)
    tamper(path, f"UPDATE meta SET value = {sqlite3_quote(bank_id)} WHERE key = 'bank_id'")
    with pytest.raises(BankCorruptError, match="bank_id"):
        SupportBank.open(path).bank_id
    cache = tmp_path / "cache" / "sub"
    cache.mkdir(parents=True)
    before = tree(tmp_path / "victim")
    rseg = bank_cli()
    capsys.readouterr()
    assert rseg("cache", path, "--clear", "--cache-dir", cache) == 1
    assert "bank_id" in capsys.readouterr().err
    assert tree(tmp_path / "victim") == before
    code, text = verify_output(capsys, path)
    assert_never_ok(code, text)


def sqlite3_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def test_cache_folders_are_children_of_the_folder_named(tmp_path):
    from RetrievalSegLib.bank.cache import cache_folders

    bank = filled_bank(tmp_path)
    bank._state.bank_id = "../outside"  # as if the reader's check were bypassed: still refused here
    bank._key = ("db", bank.revision)
    with pytest.raises(BankError, match="not a plain folder name"):
        cache_folders(bank, tmp_path / "cache")


# ----------------------------------------------------------------------------- 3. entry ids
def test_an_entry_id_that_is_a_path_is_never_read_or_exported(tmp_path, capsys):
    path = closed_bank(tmp_path)
    first = SupportBank.open(path).entries()[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(path / "entries" / f"{first.id}.npz", outside / "secret.npz")  # same bytes, same SHA-256
    tamper(path, f"UPDATE entries SET id = '../../outside/secret' WHERE id = '{first.id}'")
    with pytest.raises(BankCorruptError) as err:
        SupportBank.open(path).entries()
    assert "'../../outside/secret'" in str(err.value) and "id" in str(err.value)
    code, text = verify_output(capsys, path)
    assert_never_ok(code, text)
    rseg = bank_cli()
    capsys.readouterr()
    assert rseg("export", path, tmp_path / "out.zip") == 1
    assert not (tmp_path / "out.zip").exists()


def test_export_refuses_a_member_outside_the_archive_root(tmp_path, monkeypatch):
    """Even a name that got past the reader never becomes a zip-slip member: nothing is written."""
    from RetrievalSegLib.bank.transfer import BankTransfer

    bank = filled_bank(tmp_path)
    real = BankTransfer._export_files
    for bad in ("entries/../../evil.npz", "/etc/evil", "..", "entries\\..\\x.npz", "C:/evil.npz"):
        monkeypatch.setattr(BankTransfer, "_export_files",
                            lambda self, lock_free=False, bad=bad: real(self, lock_free) + [(bad, b"x")])
        for name in ("out.zip", "out.tar.gz"):
            with pytest.raises(BankCorruptError, match="outside the archive"):
                bank.export(tmp_path / name)
            assert not (tmp_path / name).exists() and not list(tmp_path.glob(".tmp-*"))


# ----------------------------------------------------------------------------- 4. malformed values
MALFORMED = {
    "schema_version-not-a-number": ("UPDATE meta SET value = 'two' WHERE key = 'schema_version'", "schema_version"),
    "revision-not-a-number": ("UPDATE meta SET value = 'x' WHERE key = 'revision'", "revision"),
    "revision-missing": ("DELETE FROM meta WHERE key = 'revision'", "revision"),
    "revision-negative": ("UPDATE meta SET value = '-3' WHERE key = 'revision'", "revision"),
    "embedding_dim-not-a-number": ("UPDATE meta SET value = 'abc' WHERE key = 'embedding_dim'", "embedding_dim"),
    "embedding_dim-zero": ("UPDATE meta SET value = '0' WHERE key = 'embedding_dim'", "embedding_dim"),
    "axis-out-of-range": ("UPDATE entries SET axis = 7 WHERE seq = 0", "axis"),
    "axis-a-letter": ("UPDATE entries SET axis = 'k' WHERE seq = 0", "axis"),
    "index-negative": ("UPDATE entries SET idx = -1 WHERE seq = 0", "idx"),
    "height-zero": ("UPDATE entries SET height = 0 WHERE seq = 0", "height"),
    "width-a-float": ("UPDATE entries SET width = 2.5 WHERE seq = 0", "width"),
    "labels_present-not-numbers": ("UPDATE entries SET labels_present = '1,x' WHERE seq = 0", "labels_present"),
    "origin-unknown": ("UPDATE entries SET origin = 'evil' WHERE seq = 0", "origin"),
    "sha256-not-hex": ("UPDATE entries SET sha256 = 'zz' WHERE seq = 0", "sha256"),
    "spacing-a-word": ("UPDATE entries SET spacing_r = 'wide' WHERE seq = 0", "spacing_r"),
    "spacing-not-finite": ("UPDATE entries SET spacing_c = 9e999 WHERE seq = 0", "spacing_c"),
    "retired-a-word": ("UPDATE entries SET retired = 'maybe' WHERE seq = 0", "retired"),
    "window-a-word": ("UPDATE entries SET window_lo = 'low' WHERE seq = 0", "window_lo"),
    "seq-with-a-gap": ("UPDATE entries SET seq = 7 WHERE seq = 2", "seq"),
    "label-value-zero": ("UPDATE labels SET value = 0 WHERE value = 1", "labels"),
    "label-colour-out-of-range": ("UPDATE labels SET r = 7 WHERE value = 1", "labels"),
}


@pytest.mark.parametrize("change", list(MALFORMED))
def test_malformed_values_name_the_file_the_field_and_what_to_do(tmp_path, capsys, change):
    sql, field = MALFORMED[change]
    path = closed_bank(tmp_path)
    tamper(path, sql)
    with pytest.raises(BankCorruptError) as err:
        SupportBank.open(path).entries()
    msg = str(err.value)
    assert str(path / "bank.db") in msg and field in msg and "restore it from a backup" in msg.lower(), msg
    capsys.readouterr()
    assert bank_cli()("list", path) == 1
    err_text = capsys.readouterr().err
    assert field in err_text and str(path / "bank.db") in err_text
    code, text = verify_output(capsys, path)
    assert_never_ok(code, text)


# ----------------------------------------------------------------------------- 5. --cache-dir
@pytest.fixture(scope="module")
def engine():
    from RetrievalSegLib.engine.pipeline import RetrievalEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RetrievalEngine.load(random_weights=True, image_size=256, device="cpu", dinov2_input_size=56)


def test_a_cache_dir_inside_the_bank_is_refused(tmp_path, engine, capsys, monkeypatch):
    import argparse

    from RetrievalSegLib.engine import build as engine_build
    from RetrievalSegLib.bank.cache import warm
    from RetrievalSegLib.cli.bank import add_bank_parser
    from RetrievalSegLib.cli.common import model_options

    emb = engine.embedder
    bank = SupportBank.create(tmp_path / "bank", [LabelInfo(1, "x")], emb.identity)
    img = np.random.default_rng(3).integers(0, 256, (32, 32), dtype=np.uint8)
    bank.add_slice(img, {1: img > 128}, "p1", "k", 0, (1.0, 1.0), emb)
    bank.close()
    (tmp_path / "link-to-bank").symlink_to(bank.path, target_is_directory=True)
    before = tree(bank.path)
    monkeypatch.setattr(engine_build, "make_engine", lambda args: engine)
    parser = argparse.ArgumentParser()
    add_bank_parser(parser.add_subparsers(dest="command"), lambda a: emb, parents=[model_options()])
    for inside in (bank.path, bank.path / "cohort-cache", tmp_path / "link-to-bank" / "memories",
                   tmp_path / "bank" / ".." / "bank" / "x"):
        for what in ("--warm", "--clear", "--stats"):
            args = parser.parse_args(["bank", "cache", str(bank.path), what, "--cache-dir", str(inside),
                                      "--device", "cpu"])
            capsys.readouterr()
            assert args.func(args) == 2, (inside, what)
            assert "inside the support bank" in capsys.readouterr().err
        with pytest.raises(ValueError, match="inside the support bank"):
            warm(SupportBank.open(bank.path), engine, cache_dir=inside)
    after = tree(bank.path)
    for f in ("bank.db-wal", "bank.db-shm", ".lock"):
        before.pop(f, None), after.pop(f, None)
    assert after == before
    args = parser.parse_args(["bank", "cache", str(bank.path), "--warm", "--cache-dir", str(tmp_path / "own"),
                              "--device", "cpu"])
    assert args.func(args) == 0  # a folder of its own is fine


# ----------------------------------------------------------------------------- further retrieval features
def _featured_bank(tmp_path: Path) -> Path:
    from _bank_helpers import FeatureHashEmbedder

    bank = filled_bank(tmp_path)
    bank.add_feature(FeatureHashEmbedder("mean"))  # makes the feature_embeddings table
    bank.close()
    return bank.path


def test_a_bank_with_further_features_has_exactly_the_projects_objects(tmp_path):
    path = _featured_bank(tmp_path)
    con = sqlite3.connect(path / "bank.db")
    found = bank_schema._objects(con)
    con.close()
    assert found == bank_schema.expected_objects(bank_db._SCHEMA + bank_db._FEATURES_SCHEMA)
    assert found != bank_schema.expected_objects(bank_db._SCHEMA)  # the table is new: only this set has it
    assert SupportBank.open(path).retrieval_features == ("cls", "mean")


FEATURE_TAMPERINGS = {
    "trigger-on-the-feature-table": (
        "CREATE TRIGGER tf AFTER INSERT ON feature_embeddings BEGIN UPDATE entries SET retired = 1; END;",
        "trigger 'tf'"),
    "feature-table-replaced-by-a-view": (
        "CREATE TABLE f2 AS SELECT * FROM feature_embeddings; DROP TABLE feature_embeddings; "
        "CREATE VIEW feature_embeddings AS SELECT * FROM f2;", "view 'feature_embeddings'"),
    "index-on-the-feature-table": ("CREATE INDEX fx ON feature_embeddings (abs(seq) + 1);", "index 'fx'"),
    "feature-table-column-added": ("ALTER TABLE feature_embeddings ADD COLUMN note TEXT DEFAULT 'x';",
                                   "table 'feature_embeddings'"),
}


@pytest.mark.parametrize("change", list(FEATURE_TAMPERINGS))
def test_the_feature_table_is_checked_like_every_other(tmp_path, capsys, change):
    sql, named = FEATURE_TAMPERINGS[change]
    path = _featured_bank(tmp_path)
    tamper(path, sql)
    with pytest.raises(BankCorruptError) as err:
        len(SupportBank.open(path))
    msg = str(err.value)
    assert str(path / "bank.db") in msg and named in msg and "restore" in msg.lower(), msg
    code, text = verify_output(capsys, path)
    assert_never_ok(code, text)


def test_a_feature_table_in_a_plain_schema_2_bank_is_made_only_as_the_project_makes_it(tmp_path):
    """A schema-2 bank without the table opens as before; one with a look-alike table does not."""
    path = closed_bank(tmp_path)
    tamper(path, "CREATE TABLE feature_embeddings (feature TEXT, seq INTEGER, row BLOB, sha256 TEXT);")
    with pytest.raises(BankCorruptError, match="table 'feature_embeddings' is defined differently"):
        SupportBank.open(path)


@pytest.mark.parametrize("name", ["../../etc", "cls", "Mean"])
def test_a_further_feature_name_that_is_a_path_or_the_primary_is_refused(tmp_path, name):
    """A feature's name becomes an export member's name and an identity: only a plain name, never
    the primary feature again (the models table's key keeps a name from being listed twice)."""
    path = _featured_bank(tmp_path)  # holds cls (primary) and mean
    tamper(path, f"INSERT INTO models VALUES ('feature', '{name}')")
    with pytest.raises(BankCorruptError) as err:
        SupportBank.open(path).entries()
    msg = str(err.value)
    assert str(path / "bank.db") in msg and "further retrieval feature" in msg and repr(name) in msg, msg
