"""Support bank index, schema 2: one SQLite database (`bank.db`, WAL mode).

Tables: `meta` (id, created, revision, embedding size), `labels`, `models` (the DINOv2 identity
that made the embeddings, SAM 2 identities with a memory cache), `entries` (one row per support
slice; `seq` is its position in bank order), `embeddings` (one float32 row per entry, with its
SHA-256) and `provenance` (one row per committed revision: what changed, when, by which process).
A bank that holds further retrieval features (`rseg bank reembed --retrieval-feature F`) lists them
in `models` (role `feature`) and keeps their rows in `feature_embeddings` (feature, seq), made by
the first commit that needs it (see `_FEATURES_SCHEMA` for why not a schema bump).

Every change is one SQLite transaction, so a writer killed at any point leaves the previous
revision; readers see a consistent snapshot and are never blocked by a writer (WAL). A commit
writes only what changed (new and modified entries, new rows): its cost does not grow with the
bank. Entry NPZ files stay content-addressed files beside the database (docs/BANK_FORMAT.md).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import socket
import sqlite3
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import numpy as np

from . import schema as bank_schema
from .format import (
    _ID_RE,
    valid_feature,
    DB_FILE,
    ORIGINS,
    SCHEMA_VERSION,
    BankCorruptError,
    BankEntry,
    BankError,
    BankReadOnlyError,
    LabelInfo,
    _now,
    _State,
    valid_bank_id,
)
from ..data.fileio import TMP_PREFIX, check_no_links, default_file_mode, fsync_dir

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE labels (value INTEGER PRIMARY KEY, name TEXT NOT NULL,
                     r REAL NOT NULL, g REAL NOT NULL, b REAL NOT NULL);
CREATE TABLE models (role TEXT NOT NULL, identity TEXT NOT NULL, PRIMARY KEY (role, identity));
CREATE TABLE entries (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, case_id TEXT NOT NULL,
    axis INTEGER NOT NULL, idx INTEGER NOT NULL, spacing_r REAL NOT NULL, spacing_c REAL NOT NULL,
    added TEXT NOT NULL, origin TEXT NOT NULL, retired INTEGER NOT NULL, retired_by TEXT,
    sha256 TEXT NOT NULL, height INTEGER NOT NULL, width INTEGER NOT NULL,
    labels_present TEXT NOT NULL, window_lo REAL, window_hi REAL, damaged TEXT);
CREATE INDEX entries_case ON entries (case_id);
CREATE TABLE embeddings (seq INTEGER PRIMARY KEY REFERENCES entries (seq),
                         row BLOB NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE provenance (revision INTEGER PRIMARY KEY, time TEXT NOT NULL, action TEXT NOT NULL,
                         host TEXT NOT NULL, pid INTEGER NOT NULL);
"""
# Further retrieval features (`rseg bank reembed --retrieval-feature F`): one row per (feature, entry)
# beside the primary feature's `embeddings`. A table of its own, made by the first commit that holds a
# further feature, rather than a schema-3 bump: a bank without one keeps schema 2's exact objects, so
# older RetrievalSeg versions and every schema-2 bank open as before (no migration, nothing rewritten),
# while a bank with one is refused by older versions' schema check (they would add entries without
# these rows). `schema` accepts exactly these two object sets, nothing else.
_FEATURES_TABLE = "feature_embeddings"
_FEATURES_SCHEMA = """
CREATE TABLE feature_embeddings (feature TEXT NOT NULL, seq INTEGER NOT NULL REFERENCES entries (seq),
                                 row BLOB NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (feature, seq));
"""
#: The schemas a bank.db may have (bank_schema.check_schema): schema 2, or schema 2 with further features.
_SCHEMAS = (_SCHEMA, _SCHEMA + _FEATURES_SCHEMA)
#: models.role of a further feature (identity: the feature's name, e.g. "mean").
FEATURE_ROLE = "feature"
_ENTRY_COLUMNS = (
    "seq, id, case_id, axis, idx, spacing_r, spacing_c, added, origin, retired, retired_by, sha256, "
    "height, width, labels_present, window_lo, window_hi, damaged"
)


def _entry_values(seq: int, e: BankEntry) -> tuple:
    w = e.window
    return (
        seq, e.id, e.case_id, e.axis, e.index, e.spacing[0], e.spacing[1], e.added, e.origin,
        int(e.retired), e.retired_by, e.sha256, e.shape[0], e.shape[1],
        ",".join(str(v) for v in e.labels_present), None if w is None else w[0],
        None if w is None else w[1], e.damaged,
    )


# ----------------------------------------------------------------------------- checking what was read
# bank.db may come from anywhere: every value is checked for type and range as it is read (SQLite
# keeps a value of another type in any column), so a bad one is an error naming the file, the
# field and what to do, never a crash later (`'ijk'[axis]`) or a path built from it (ids).
_MAX_SIDE = 2**16
_INF = math.inf
_NUM = (int, float)
_HEX = "0123456789abcdef"


def _damaged(f: Path, where: str, field: str, value: object, why: str) -> BankCorruptError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "..."
    return BankCorruptError(
        f"{f} is damaged or was changed outside RetrievalSeg: {where} has {field} = {shown}, {why}. "
        "Restore it from a backup or import an export of the bank (the entry files in entries/ are "
        "not affected)",
        f,
    )


def _number(v: object) -> bool:
    return type(v) in _NUM and -_INF < v < _INF  # type: ignore[operator]  (NaN fails both)


def _entry_from_row(r: tuple, n: int, f: Path) -> BankEntry:
    """One `entries` row as a BankEntry; BankCorruptError naming the field unless every value is valid.

    Runs once per entry on every open (20,000 at a time): one chain of plain comparisons, and only
    when it fails, `_row_problem` finds the field to name.
    """
    seq, eid, case_id, axis, idx, sr, sc, added, origin, retired, retired_by, sha, h, w, present, lo, hi, dmg = r
    if not (
        type(eid) is str and _ID_RE.fullmatch(eid) and seq == n and type(seq) is int
        and type(axis) is int and 0 <= axis <= 2 and type(idx) is int and idx >= 0
        and type(sr) in _NUM and 0 < sr < _INF and type(sc) in _NUM and 0 < sc < _INF
        and type(h) is int and 1 <= h <= _MAX_SIDE and type(w) is int and 1 <= w <= _MAX_SIDE
        and origin in ORIGINS and type(retired) is int and retired in (0, 1)
        and type(sha) is str and len(sha) == 64 and not sha.strip(_HEX)
        and type(present) is str and (not present or present.replace(",", "").isdecimal() and present.isascii())
        and ((lo is None and hi is None) or (_number(lo) and _number(hi)))
        and type(case_id) is str and type(added) is str
        and (retired_by is None or type(retired_by) is str) and (dmg is None or type(dmg) is str)
    ):
        raise _row_problem(r, n, f)
    return BankEntry(
        id=eid, case_id=case_id, axis=axis, index=idx, spacing=(float(sr), float(sc)),
        added=added, origin=origin, retired=bool(retired), retired_by=retired_by, sha256=sha,
        shape=(h, w), labels_present=tuple(int(v) for v in present.split(",") if v) if present else (),
        window=None if lo is None else (float(lo), float(hi)), damaged=dmg,
    )


def _row_problem(r: tuple, n: int, f: Path) -> BankCorruptError:
    """The first invalid field of an `entries` row, as an error naming it (the slow path)."""
    seq, eid, case_id, axis, idx, sr, sc, added, origin, retired, retired_by, sha, h, w, present, lo, hi, dmg = r
    if type(eid) is not str or not _ID_RE.fullmatch(eid):
        return _damaged(f, f"entry #{n}", "id", eid, "not an entry id (letters, digits, '.', '_', '-'; it "
                        "names the entry's file, so it may never be a path)")
    where = f"entry {eid}"
    checks = [
        ("seq", seq, seq == n and type(seq) is int, f"expected {n} (entries are numbered 0, 1, ... in bank order)"),
        ("axis", axis, type(axis) is int and 0 <= axis <= 2, "expected 0, 1 or 2 (i, j, k)"),
        ("idx", idx, type(idx) is int and idx >= 0, "expected a slice index (an integer >= 0)"),
        ("spacing_r", sr, type(sr) in _NUM and 0 < sr < _INF, "expected a spacing in mm (a finite number > 0)"),
        ("spacing_c", sc, type(sc) in _NUM and 0 < sc < _INF, "expected a spacing in mm (a finite number > 0)"),
        ("height", h, type(h) is int and 1 <= h <= _MAX_SIDE, f"expected a size in pixels (1..{_MAX_SIDE})"),
        ("width", w, type(w) is int and 1 <= w <= _MAX_SIDE, f"expected a size in pixels (1..{_MAX_SIDE})"),
        ("origin", origin, origin in ORIGINS, f"expected one of {', '.join(ORIGINS)}"),
        ("retired", retired, type(retired) is int and retired in (0, 1), "expected 0 or 1"),
        ("sha256", sha, type(sha) is str and len(sha) == 64 and not sha.strip(_HEX),
         "expected 64 lower-case hex digits"),
        ("labels_present", present, type(present) is str and (not present or (
            present.replace(",", "").isdecimal() and present.isascii())), "expected label values separated by commas"),
        ("window_lo", lo, (lo is None and hi is None) or _number(lo), "expected a finite number, or empty with window_hi"),
        ("window_hi", hi, (lo is None and hi is None) or _number(hi), "expected a finite number, or empty with window_lo"),
        ("case_id", case_id, type(case_id) is str, "expected text"),
        ("added", added, type(added) is str, "expected text"),
        ("retired_by", retired_by, retired_by is None or type(retired_by) is str, "expected text or empty"),
        ("damaged", dmg, dmg is None or type(dmg) is str, "expected text or empty"),
    ]
    field, value, _, why = next((c for c in checks if not c[2]), ("a field", r, False, "a value out of range"))
    return _damaged(f, where, field, value, why)


def _meta_int(value: object, key: str, f: Path, lowest: int, highest: int = 2**62) -> int:
    try:
        number = int(value) if type(value) in (str, int) else None  # type: ignore[arg-type]
    except ValueError:
        number = None
    if number is None or not lowest <= number <= highest:
        raise _damaged(f, "table meta", key, value, f"expected an integer in {lowest}..{highest}")
    return number


def _labels(rows: list[tuple], f: Path) -> tuple[LabelInfo, ...]:
    out = []
    for v, name, r, g, b in rows:
        try:
            if type(v) is not int or type(name) is not str or not all(_number(c) for c in (r, g, b)):
                raise ValueError("expected an integer value, a name and three colour numbers")
            out.append(LabelInfo(v, name, (r, g, b)))
        except ValueError as e:
            raise _damaged(f, "table labels", "a row", (v, name, r, g, b), str(e)) from None
    return tuple(out)


def row_sha256(row: bytes) -> str:
    """SHA-256 of one embedding row's float32 little-endian bytes."""
    return hashlib.sha256(row).hexdigest()


def _row_bytes(row: np.ndarray) -> bytes:
    return np.ascontiguousarray(row, dtype="<f4").tobytes()


# ----------------------------------------------------------------------------- connections
def _corrupt(f: Path, e: Exception) -> BankCorruptError:
    return BankCorruptError(
        f"{f} cannot be read as a support bank index ({e}); restore it from a backup or import an "
        "export (the entry files in entries/ are not affected)",
        f,
    )


def connect(bank_path: Path, write: bool, timeout: float = 60.0) -> sqlite3.Connection:
    """A connection to the bank's database (autocommit; transactions are explicit).

    Never through a link (bank.db and its -wal/-shm files). A reader that cannot write the
    folder (read-only bank, another user's bank) opens it immutable: nothing is written.
    """
    f = bank_path / DB_FILE
    for p in (f, Path(f"{f}-wal"), Path(f"{f}-shm")):
        check_no_links(bank_path, p)
    if not f.is_file():
        raise BankCorruptError(
            f"{f} is missing but {bank_path / 'bank.json'} says the bank keeps its index there; "
            "restore it from a backup or import an export",
            f,
            missing=True,
        )
    modes = ["rw"] if write else ["ro", "ro&immutable=1"]
    last: Exception | None = None
    for mode in modes:
        con: sqlite3.Connection | None = None
        try:
            con = sqlite3.connect(
                f"file:{quote(str(f))}?mode={mode}", uri=True, timeout=timeout,
                isolation_level=None, check_same_thread=False, factory=bank_schema.BankConnection,
            )
            con.path = f  # type: ignore[attr-defined]
            # Hardened, then the schema checked, before any statement touches a table: the file is
            # data from anywhere (bank_schema). revision() checks first, in its read transaction.
            bank_schema.harden(con)
            revision(con)
            return con
        except BankCorruptError:
            con.close()  # type: ignore[union-attr]
            raise
        except sqlite3.DatabaseError as e:
            if con is not None:
                con.close()
            last = e
            if any(s in str(e) for s in ("not a database", "malformed", "no such table", "too big")):
                raise _corrupt(f, e) from e
    if write:
        raise BankReadOnlyError(
            f"support bank at {bank_path} is read-only for you (cannot write {f}: {last}); changing "
            "it needs write access"
        )
    raise _corrupt(f, last)  # type: ignore[arg-type]


def revision(con: sqlite3.Connection) -> int:
    """The committed revision (one indexed read: cheap enough to ask before every use)."""
    f = getattr(con, "path", None) or Path(DB_FILE)
    with bank_schema.checked_read(con, f, _SCHEMAS):
        row = con.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
    return _meta_int(None if row is None else row[0], "revision", f, 0)


# ----------------------------------------------------------------------------- reading
def read_state(con: sqlite3.Connection, f: Path) -> _State:
    """The whole committed state in one read transaction (a consistent snapshot)."""
    try:
        con.execute("BEGIN")
        try:
            bank_schema.ensure_checked(con, f, _SCHEMAS)  # (a no-op unless the schema changed since)
            meta = dict(con.execute("SELECT key, value FROM meta"))
            version = _meta_int(meta.get("schema_version"), "schema_version", f, 0)
            if version != SCHEMA_VERSION:
                raise _damaged(f, "table meta", "schema_version", version,
                               f"but {f.parent / 'bank.json'} says {SCHEMA_VERSION}")
            labels = _labels(con.execute("SELECT value, name, r, g, b FROM labels ORDER BY rowid").fetchall(), f)
            models = con.execute("SELECT role, identity FROM models ORDER BY rowid").fetchall()
            entries = [_entry_from_row(r, n, f) for n, r in
                       enumerate(con.execute(f"SELECT {_ENTRY_COLUMNS} FROM entries ORDER BY seq"))]
        finally:
            con.execute("COMMIT")
    except sqlite3.DatabaseError as e:
        raise _corrupt(f, e) from e
    dim = meta.get("embedding_dim")
    bank_id = meta.get("bank_id")
    if not valid_bank_id(bank_id):
        raise _damaged(f, "table meta", "bank_id", bank_id, "not a plain folder name (letters, digits, '.', "
                       "'_', '-'; it names cache folders, so it may never be a path)")
    for role, identity in models:
        if type(identity) is not str:
            raise _damaged(f, "table models", f"the {role} identity", identity, "expected text")
    dinov2 = next((i for r, i in models if r == "dinov2"), "")
    features = tuple(i for r, i in models if r == FEATURE_ROLE)
    for feature in features:
        if not valid_feature(feature) or feature == _primary_feature(dinov2) or features.count(feature) > 1:
            raise _damaged(f, "table models", "a further retrieval feature", feature,
                           "expected a feature name other than the primary one, listed once")
    if len({e.id for e in entries}) != len(entries):
        twice = sorted(i for i, c in Counter(e.id for e in entries).items() if c > 1)
        raise _damaged(f, "table entries", "id", twice[:3], "listed more than once")
    state = _State(
        labels=labels,
        dinov2=dinov2,
        sam2=[i for r, i in models if r == "sam2"],
        entries=entries,
        embedding_dim=None if dim in (None, "") else _meta_int(dim, "embedding_dim", f, 1, 65536),
        embeddings_sha256=None,
        revision=_meta_int(meta.get("revision"), "revision", f, 0),
        created=str(meta.get("created", "")),
        bank_id=bank_id,
        features=features,
    )
    state.base = list(entries)
    return state


def _primary_feature(identity: str) -> str:
    from .format import _retrieval_feature

    return _retrieval_feature(identity)


def has_features_table(con: sqlite3.Connection) -> bool:
    """Whether bank.db has the further features' table (read from sqlite_master: runs no schema SQL)."""
    return con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                       (_FEATURES_TABLE,)).fetchone() is not None


def _rows_from(cursor, n: int, dim: int, check_sha: bool) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(rows [n, dim] float32, has-a-row mask [n], seqs whose row fails its size or SHA-256) from
    (seq, row, sha256) tuples; a seq outside 0..n-1 is skipped."""
    rows = np.zeros((n, dim), dtype=np.float32)
    have = np.zeros(n, dtype=bool)
    bad: list[int] = []
    width = dim * 4
    for seq, blob, sha in cursor:
        if type(seq) is not int or not 0 <= seq < n:
            continue
        if type(blob) is not bytes or len(blob) != width or (check_sha and row_sha256(blob) != sha):
            bad.append(int(seq))
            continue
        rows[seq] = np.frombuffer(blob, dtype="<f4")
        have[seq] = True
    return rows, have, bad


def read_rows(con: sqlite3.Connection, n: int, dim: int, check_sha: bool = False
              ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(rows [n, dim] float32, has-a-row mask [n], seqs whose row fails its size or SHA-256)."""
    with bank_schema.checked_read(con, getattr(con, "path", None) or Path(DB_FILE), _SCHEMAS):
        return _rows_from(con.execute("SELECT seq, row, sha256 FROM embeddings ORDER BY seq"), n, dim, check_sha)


def read_feature_rows(con: sqlite3.Connection, feature: str, n: int, dim: int, check_sha: bool = False
                      ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """As `read_rows`, for a further feature's rows (none at all before the first feature was added)."""
    with bank_schema.checked_read(con, getattr(con, "path", None) or Path(DB_FILE), _SCHEMAS):
        if not has_features_table(con):
            return _rows_from((), n, dim, check_sha)
        return _rows_from(con.execute("SELECT seq, row, sha256 FROM feature_embeddings WHERE feature = ? "
                                      "ORDER BY seq", (feature,)), n, dim, check_sha)


def feature_rows_status(connection, bank_path: Path, state: _State, feature: str, check_sha: bool = True
                        ) -> tuple[np.ndarray | None, str | None, str | None]:
    """(rows or None, problem kind or None, message) of a further feature, as the primary's are judged
    (`BankStore._db_rows_status`); `connection()` gives the bank's connection, opened only when needed."""
    from .format import _feature_dim, _nonfinite_ids

    n, dim = len(state.entries), _feature_dim(state, feature) or 0
    f = bank_path / DB_FILE
    fix = f"rebuild them with `rseg bank verify {bank_path} --repair` (with the bank's DINOv2 model)"
    if n == 0:
        return np.zeros((0, dim), dtype=np.float32), None, None
    try:
        rows, have, bad = read_feature_rows(connection(), feature, n, dim, check_sha)
    except sqlite3.Error as e:
        return None, "unreadable", f"the {feature} embeddings in {f} cannot be read ({e}); {fix}"
    if bad:
        shown = ", ".join(state.entries[s].id for s in bad[:5])
        return None, "sha", (f"{f} holds {len(bad)} {feature} embedding rows that do not match their recorded "
                             f"size or SHA-256 ({shown}{', ...' if len(bad) > 5 else ''}); {fix}")
    missing = int((~have).sum())
    if missing:
        return None, "missing", f"{f} has no {feature} embedding row for {missing} of its {n} entries; {fix}"
    bad_ids = _nonfinite_ids(state, rows)
    if bad_ids:
        return rows, "nonfinite", (f"{f} holds non-finite values (NaN or Inf) in the {feature} rows of "
                                   f"{len(bad_ids)} entries ({', '.join(bad_ids[:5])}); {fix}")
    return rows, None, None


def provenance(con: sqlite3.Connection, limit: int = 20) -> list[dict]:
    """The latest committed changes, newest first."""
    with bank_schema.checked_read(con, getattr(con, "path", None) or Path(DB_FILE), _SCHEMAS):
        cur = con.execute("SELECT revision, time, action, host, pid FROM provenance ORDER BY revision DESC LIMIT ?",
                          (limit,))
        return [dict(zip(("revision", "time", "action", "host", "pid"), r)) for r in cur]


# ----------------------------------------------------------------------------- writing
def _write(con: sqlite3.Connection, state: _State, base: list[BankEntry], full: bool) -> None:
    """The statements of one commit (inside the caller's transaction)."""
    if full:
        for table in ("meta", "labels", "models", "entries", "embeddings"):
            con.execute(f"DELETE FROM {table}")
        con.executemany("INSERT INTO labels VALUES (?, ?, ?, ?, ?)",
                        [(lab.value, lab.name, *lab.color) for lab in state.labels])
        base = []
    if len(state.entries) < len(base) or any(a.id != b.id for a, b in zip(base, state.entries)):
        raise BankError("internal error: entries may only be changed in place or appended")
    changed = [(n, e) for n, (a, e) in enumerate(zip(base, state.entries)) if a is not e]
    con.executemany(f"REPLACE INTO entries ({_ENTRY_COLUMNS}) VALUES ({', '.join('?' * 18)})",
                    [_entry_values(n, e) for n, e in changed])
    start = len(base)
    con.executemany(f"INSERT INTO entries ({_ENTRY_COLUMNS}) VALUES ({', '.join('?' * 18)})",
                    [_entry_values(start + n, e) for n, e in enumerate(state.entries[start:])])
    rows: list[tuple[int, bytes, str]] = []
    if state.all_rows is not None:
        con.execute("DELETE FROM embeddings")
        blobs = [(n, _row_bytes(r)) for n, r in enumerate(state.all_rows)]
    else:
        pos = {e.id: start + n for n, e in enumerate(state.entries[start:])}
        blobs = [(pos[i], _row_bytes(r)) for i, r in state.new_rows.items()]
    rows = [(n, b, row_sha256(b)) for n, b in blobs]
    con.executemany("INSERT INTO embeddings VALUES (?, ?, ?)", rows)
    _write_features(con, state, start)
    meta = {
        "schema_version": str(SCHEMA_VERSION),
        "bank_id": str(state.bank_id),
        "created": state.created,
        "revision": str(state.revision),
        "embedding_dim": "" if state.embedding_dim is None else str(state.embedding_dim),
    }
    con.executemany("REPLACE INTO meta VALUES (?, ?)", list(meta.items()))
    con.execute("DELETE FROM models")
    con.executemany("INSERT INTO models VALUES (?, ?)",
                    [("dinov2", state.dinov2)] + [("sam2", s) for s in state.sam2]
                    + [(FEATURE_ROLE, feature) for feature in state.features])
    con.execute("REPLACE INTO provenance VALUES (?, ?, ?, ?, ?)",
                (state.revision, _now(), state.action or "change", socket.gethostname(), os.getpid()))


def _write_features(con: sqlite3.Connection, state: _State, start: int) -> None:
    """The further features' rows of one commit: new entries' rows, whole features, and no rows of a
    feature the bank no longer lists. Every listed feature must have a row for every new entry."""
    if not state.features and not state.all_feature_rows and not has_features_table(con):
        return
    unknown = set(state.all_feature_rows) - set(state.features)
    if unknown:
        raise BankError(f"internal error: rows of features {sorted(unknown)} the bank does not list")
    if not has_features_table(con):
        con.execute(_FEATURES_SCHEMA.strip().rstrip(";"))  # inside the commit's transaction
    listed = sorted(state.features)
    con.execute(f"DELETE FROM feature_embeddings WHERE feature NOT IN ({', '.join('?' * len(listed))})", listed)
    new_ids = [e.id for e in state.entries[start:]]
    for feature in state.features:
        whole = state.all_feature_rows.get(feature)
        if whole is not None:
            con.execute("DELETE FROM feature_embeddings WHERE feature = ?", (feature,))
            blobs = [(n, _row_bytes(r)) for n, r in enumerate(whole)]
        else:
            new = state.new_feature_rows.get(feature, {})
            missing = [i for i in new_ids if i not in new]
            if missing:
                raise BankError(f"internal error: new entries {missing[:3]} have no {feature} embedding")
            blobs = [(start + n, _row_bytes(new[i])) for n, i in enumerate(new_ids)]
        con.executemany("INSERT INTO feature_embeddings VALUES (?, ?, ?, ?)",
                        [(feature, n, b, row_sha256(b)) for n, b in blobs])


def commit(con: sqlite3.Connection, state: _State, f: Path) -> None:
    """Write `state` as the next revision in one transaction (only what changed since `state.base`)."""
    base = state.base or []
    try:
        con.execute("BEGIN IMMEDIATE")
        try:
            bank_schema.ensure_checked(con, f, _SCHEMAS)  # under the write lock: no trigger can appear now
            if revision(con) != state.revision - 1:
                raise BankError(f"{f} changed while a writer held the bank's lock; retry")
            _write(con, state, base, full=False)
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                con.execute("ROLLBACK")
            raise
        # Copy the committed pages into bank.db now (PASSIVE: never waits for readers), so the
        # database file holds the whole revision and a reader's connection closing later has
        # nothing to write into it: a bank only read (a cohort run) stays byte-identical.
        with contextlib.suppress(sqlite3.Error):
            con.execute("PRAGMA wal_checkpoint(PASSIVE)")
    except sqlite3.OperationalError as e:
        if "readonly" in str(e) or "read-only" in str(e):
            raise BankReadOnlyError(f"cannot change {f}: {e}") from e
        raise OSError(f"cannot write {f}: {e} (full disk?); nothing of this change was committed") from e


def create_db(bank_path: Path, state: _State, rows: np.ndarray | None) -> None:
    """Write a complete database under a temp name, flush it, then move it into place."""
    f = bank_path / DB_FILE
    check_no_links(bank_path, f)
    tmp = bank_path / f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{DB_FILE}"
    try:
        con = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode = WAL")
            con.executescript(_SCHEMA)
            con.execute("BEGIN")
            state.all_rows = rows if rows is not None else np.zeros((0, state.embedding_dim or 0), np.float32)
            _write(con, state, [], full=True)
            con.execute("COMMIT")
        finally:
            con.close()  # the last connection checkpoints and removes the -wal file
        with open(tmp, "rb+") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), default_file_mode())  # SQLite makes 0644; the umask decides
            os.fsync(fh.fileno())
        os.replace(tmp, f)
        fsync_dir(bank_path)
    finally:
        for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        state.all_rows = None
