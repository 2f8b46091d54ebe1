"""Support bank index, schema 2: one SQLite database (`bank.db`, WAL mode).

Tables: `meta` (id, created, revision, embedding size), `labels`, `models` (the DINOv2 identity
that made the embeddings, SAM 2 identities with a memory cache), `entries` (one row per support
slice; `seq` is its position in bank order), `embeddings` (one float32 row per entry, with its
SHA-256) and `provenance` (one row per committed revision: what changed, when, by which process).

Every change is one SQLite transaction, so a writer killed at any point leaves the previous
revision; readers see a consistent snapshot and are never blocked by a writer (WAL). A commit
writes only what changed (new and modified entries, new rows): its cost does not grow with the
bank. Entry NPZ files stay content-addressed files beside the database (docs/BANK_FORMAT.md).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sqlite3
import uuid
from pathlib import Path
from urllib.parse import quote

import numpy as np

from .bank_format import (
    DB_FILE,
    SCHEMA_VERSION,
    BankCorruptError,
    BankEntry,
    BankError,
    BankReadOnlyError,
    LabelInfo,
    _now,
    _State,
)
from .fileio import TMP_PREFIX, check_no_links, default_file_mode, fsync_dir

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


def _entry_from_row(r: tuple) -> BankEntry:
    return BankEntry(
        id=r[1], case_id=r[2], axis=int(r[3]), index=int(r[4]), spacing=(float(r[5]), float(r[6])),
        added=r[7], origin=r[8], retired=bool(r[9]), retired_by=r[10], sha256=r[11],
        shape=(int(r[12]), int(r[13])),
        labels_present=tuple(int(v) for v in r[14].split(",") if v),
        window=None if r[15] is None else (float(r[15]), float(r[16])), damaged=r[17],
    )


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
        try:
            con = sqlite3.connect(
                f"file:{quote(str(f))}?mode={mode}", uri=True, timeout=timeout,
                isolation_level=None, check_same_thread=False,
            )
            con.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
            return con
        except sqlite3.DatabaseError as e:
            last = e
            if "not a database" in str(e) or "malformed" in str(e) or "no such table" in str(e):
                raise _corrupt(f, e) from e
    if write:
        raise BankReadOnlyError(
            f"support bank at {bank_path} is read-only for you (cannot write {f}: {last}); changing "
            "it needs write access"
        )
    raise _corrupt(f, last)  # type: ignore[arg-type]


def revision(con: sqlite3.Connection) -> int:
    """The committed revision (one indexed read: cheap enough to ask before every use)."""
    return int(con.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0])


# ----------------------------------------------------------------------------- reading
def read_state(con: sqlite3.Connection, f: Path) -> _State:
    """The whole committed state in one read transaction (a consistent snapshot)."""
    try:
        con.execute("BEGIN")
        try:
            meta = dict(con.execute("SELECT key, value FROM meta"))
            version = int(meta.get("schema_version", "0"))
            if version != SCHEMA_VERSION:
                raise BankCorruptError(f"{f} has schema version {version}, expected {SCHEMA_VERSION}", f)
            labels = tuple(
                LabelInfo(int(v), n, (r, g, b))
                for v, n, r, g, b in con.execute("SELECT value, name, r, g, b FROM labels ORDER BY rowid")
            )
            models = con.execute("SELECT role, identity FROM models ORDER BY rowid").fetchall()
            entries = [_entry_from_row(r) for r in con.execute(f"SELECT {_ENTRY_COLUMNS} FROM entries ORDER BY seq")]
        finally:
            con.execute("COMMIT")
    except sqlite3.DatabaseError as e:
        raise _corrupt(f, e) from e
    dim = meta.get("embedding_dim")
    state = _State(
        labels=labels,
        dinov2=next((i for r, i in models if r == "dinov2"), ""),
        sam2=[i for r, i in models if r == "sam2"],
        entries=entries,
        embedding_dim=None if not dim else int(dim),
        embeddings_sha256=None,
        revision=int(meta["revision"]),
        created=meta.get("created", ""),
        bank_id=meta.get("bank_id"),
    )
    state.base = list(entries)
    return state


def read_rows(con: sqlite3.Connection, n: int, dim: int, check_sha: bool = False
              ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(rows [n, dim] float32, has-a-row mask [n], seqs whose row fails its size or SHA-256)."""
    rows = np.zeros((n, dim), dtype=np.float32)
    have = np.zeros(n, dtype=bool)
    bad: list[int] = []
    width = dim * 4
    for seq, blob, sha in con.execute("SELECT seq, row, sha256 FROM embeddings ORDER BY seq"):
        if not 0 <= seq < n:
            continue
        if len(blob) != width or (check_sha and row_sha256(blob) != sha):
            bad.append(int(seq))
            continue
        rows[seq] = np.frombuffer(blob, dtype="<f4")
        have[seq] = True
    return rows, have, bad


def provenance(con: sqlite3.Connection, limit: int = 20) -> list[dict]:
    """The latest committed changes, newest first."""
    cur = con.execute("SELECT revision, time, action, host, pid FROM provenance ORDER BY revision DESC LIMIT ?", (limit,))
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
                    [("dinov2", state.dinov2)] + [("sam2", s) for s in state.sam2])
    con.execute("REPLACE INTO provenance VALUES (?, ?, ?, ?, ?)",
                (state.revision, _now(), state.action or "change", socket.gethostname(), os.getpid()))


def commit(con: sqlite3.Connection, state: _State, f: Path) -> None:
    """Write `state` as the next revision in one transaction (only what changed since `state.base`)."""
    base = state.base or []
    try:
        con.execute("BEGIN IMMEDIATE")
        try:
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
