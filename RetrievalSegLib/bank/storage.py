"""Support bank storage: the writer lock, reading bank.json, snapshots, entry files, atomic
commits and the memory cache folders (the base every bank job builds on)."""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import io
import json
import os
import socket
import sqlite3
import stat
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from . import db as bank_db
from .format import (
    BANK_FILE,
    DB_FILE,
    SCHEMA_VERSION,
    V1_SCHEMA,
    DEFAULT_LOCK_TIMEOUT,
    EMBEDDINGS_FILE,
    ENTRIES_DIR,
    ENV_LOCK_TIMEOUT,
    LOCK_FILE,
    BankCorruptError,
    BankEntry,
    BankError,
    BankLockTimeout,
    BankModelMismatchError,
    BankNotFoundError,
    BankReadOnlyError,
    EntryData,
    LabelInfo,
    UnknownEntryError,
    _feature_identity,
    _mismatch_message,
    _nonfinite_ids,
    _now,
    _parse_entry_file,
    _retrieval_feature,
    _rows_sha256,
    _sha256,
    _State,
    _state_from_json,
)
from ..engine.memory_cache import MEMORIES_DIR
from ..data.fileio import UnsafeLinkError, check_no_links, is_link, read_bytes
from ..data.volume import AXIS_NAMES, parse_axis


def _lock_timeout(value: float | None) -> float:
    if value is not None:
        return float(value)
    env = os.environ.get(ENV_LOCK_TIMEOUT)
    if env:
        try:
            return float(env)
        except ValueError:
            raise ValueError(f"{ENV_LOCK_TIMEOUT} must be a number of seconds, got {env!r}") from None
    return DEFAULT_LOCK_TIMEOUT


# ----------------------------------------------------------------------------- locking
FILELOCK_MINIMUM = "4.3"  # the first release read and tested here with on_acquired and O_NOFOLLOW


class _BankLock:
    """The bank's exclusive writer lock: `filelock` (fcntl.flock on POSIX, LockFileEx on Windows).

    What this adds to filelock: the lock file is never opened through a link and must be a plain
    file with one hard link before anything is written into it; the holder ("pid N on HOST since
    T") is written into it for the timeout message; no soft (marker-file) fallback, so a lock
    cannot go stale: it dies with its process; errors say what to do.
    """

    def __init__(self, lock_path: Path, timeout: float, bank_path: Path) -> None:
        self.lock_path = lock_path
        self.timeout = timeout
        self.bank_path = bank_path
        self._lock: Any = None

    def _check_and_record(self, fd: int) -> None:
        """filelock's on_acquired hook: refuse a lock file that may live elsewhere, then sign it."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise BankError(
                f"{self.lock_path} is not a plain file of its own (it is a special file or has "
                f"{st.st_nlink} hard links); RetrievalSeg writes into it, so it refuses to touch a "
                "file that may live elsewhere too. Delete it (no writer may be running) and retry"
            )
        info = f"pid {os.getpid()} on {socket.gethostname()} since {_now()}".encode()
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)  # (no os.pwrite on Windows)
            os.write(fd, info)

    def _holder(self) -> str:
        try:
            text = read_bytes(self.lock_path, self.bank_path)[:4096].decode("utf-8", errors="replace").strip()
        except OSError:
            return ""
        return f" (held by {text})" if text else ""

    def _read_only_error(self, e: OSError) -> BankReadOnlyError:
        return BankReadOnlyError(
            f"support bank at {self.bank_path} is read-only for you (cannot open its lock "
            f"file {self.lock_path}: {e.strerror or e}); changing it needs write access. Reading, "
            "segmenting and exporting work without it; to change a copy, "
            f"`rseg bank export {self.bank_path} COPY.zip` and `rseg bank import COPY.zip NEWBANK`"
        )

    def acquire(self) -> None:
        import filelock

        check_no_links(self.bank_path, self.lock_path)
        try:
            lock = filelock.FileLock(
                self.lock_path,
                timeout=self.timeout,
                thread_local=False,  # SupportBank.locked counts re-entry itself, across its threads
                poll_interval=0.05,
                fallback_to_soft=False,  # a marker file could outlive a killed writer
                on_acquired=self._check_and_record,
            )
        except TypeError as e:  # filelock 3.x: no on_acquired, and it opens lock files through links
            raise BankError(
                f"RetrievalSeg needs filelock >= {FILELOCK_MINIMUM} to lock a support bank safely, "
                f"found {getattr(filelock, '__version__', 'an older one')} ({e}); update it with "
                f"`pip install 'filelock>={FILELOCK_MINIMUM}'` (in Slicer's Python console: "
                f"`slicer.util.pip_install('filelock>={FILELOCK_MINIMUM}')`)"
            ) from e
        try:
            lock.acquire()
        except filelock.Timeout:
            raise BankLockTimeout(
                f"support bank at {self.bank_path} is busy: another process kept its lock "
                f"{self.lock_path}{self._holder()} for more than {self.timeout:g} s. Wait for it to "
                f"finish and retry, or raise the wait with {ENV_LOCK_TIMEOUT}=SECONDS. The "
                "lock is released automatically when that process exits."
            ) from None
        except BankError:
            raise
        except OSError as e:
            if is_link(self.lock_path):
                check_no_links(self.bank_path, self.lock_path)  # raises, naming the link
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise self._read_only_error(e) from e
            raise BankError(
                f"cannot lock {self.lock_path}: {e}. The support bank must be on a file "
                "system that supports file locks (a local disk, not some network shares)."
            ) from e
        self._lock = lock

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()


# ----------------------------------------------------------------------------- reading files
def _nofollow_opener(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))


def _read_state(bank_path: Path, store: "BankStore | None" = None) -> tuple[_State, tuple, bytes]:
    """Parse bank.json (and, schema 2, the database it names); also a change key and its bytes.

    The key is ("db", revision) for schema 2, bank.json's (inode, mtime_ns, size) for schema 1.
    """
    f = bank_path / BANK_FILE
    if bank_path.exists() and not bank_path.is_dir():
        raise BankNotFoundError(
            f"no support bank at {bank_path}: it is a file, not a folder. A support bank is a "
            "folder (with bank.json inside); give the folder's path"
            + (" (to unpack an exported bank, use `rseg bank import ARCHIVE NEWBANK`)"
               if bank_path.name.lower().endswith((".zip", ".tar.gz", ".tgz")) else "")
        )
    if not bank_path.is_dir():
        raise BankNotFoundError(
            f"no support bank at {bank_path}: the folder does not exist. Create one with "
            f"`rseg bank create {bank_path} --labels 1:NAME,...` or check the path."
        )
    check_no_links(bank_path, f)
    try:
        with open(f, "rb", opener=_nofollow_opener) as fh:
            st = os.fstat(fh.fileno())
            data = fh.read()
    except FileNotFoundError:
        hint = (
            " It has an entries/ folder, so bank.json was lost: restore it from a backup or an "
            "export."
            if (bank_path / ENTRIES_DIR).is_dir()
            else f" Create one with `rseg bank create {bank_path} --labels 1:NAME,...`."
        )
        raise BankNotFoundError(f"{bank_path} is not a support bank: it has no {BANK_FILE}.{hint}") from None
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BankCorruptError(
            f"{f} is not valid JSON ({e}); restore it from a backup or an export "
            "(the entry files in entries/ are not affected)",
            f,
        ) from e
    if isinstance(raw, dict) and raw.get("schema_version") == SCHEMA_VERSION:
        if store is not None:
            with store._db_mutex:
                state = bank_db.read_state(store._db(), bank_path / DB_FILE)
        else:
            con = bank_db.connect(bank_path, write=False)
            try:
                state = bank_db.read_state(con, bank_path / DB_FILE)
            finally:
                con.close()
        return state, ("db", state.revision), data
    return _state_from_json(raw, f), (st.st_ino, st.st_mtime_ns, st.st_size), data


class BankStore:
    """A bank folder's state on disk: snapshots, entry files, the writer lock and commits."""

    def __init__(self, path: Path, lock_timeout: float | None = None) -> None:
        """Use `SupportBank.open` or `SupportBank.create`."""
        self.path = Path(path)
        self.lock_timeout = _lock_timeout(lock_timeout)
        self._db_mutex = threading.RLock()
        self._con: sqlite3.Connection | None = None
        self._con_writes = False
        self._state, self._key, _ = _read_state(self.path, None)
        self._mutex = threading.RLock()
        self._lock_depth = 0
        self._os_lock: _BankLock | None = None
        self._emb_cache: tuple[tuple[int, int, int], str | None, np.ndarray] | None = None
        self._feature_cache: dict[str, tuple[Any, np.ndarray]] = {}  # feature -> (key, rows)
        self._index_cache: dict[Any, Any] | None = None  # {"key": revision key, feature or None: index}

    # ---------------------------------------------------------------- snapshot
    def _db(self, write: bool = False) -> sqlite3.Connection:
        """This object's connection to bank.db (schema 2), opened once; read-write when allowed."""
        with self._db_mutex:
            if self._con is not None and (self._con_writes or not write):
                return self._con
            if self._con is not None:
                self._con.close()
                self._con = None
            writes = write or self.writable()
            try:
                con = bank_db.connect(self.path, write=writes, timeout=self.lock_timeout)
            except BankReadOnlyError:
                if write:
                    raise
                writes, con = False, bank_db.connect(self.path, write=False)
            self._con, self._con_writes = con, writes
            return con

    def close(self) -> None:
        """Close the database connection (reopened on next use)."""
        with self._db_mutex:
            if self._con is not None:
                self._con.close()
                self._con = None

    def _probe(self) -> tuple | None:
        if self._state.schema == SCHEMA_VERSION:
            try:
                with self._db_mutex:
                    return ("db", bank_db.revision(self._db()))
            except (sqlite3.Error, BankError, OSError):
                return None
        try:
            st = os.stat(self.path / BANK_FILE)
            return (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    def _current(self) -> _State:
        """The latest committed state (re-read only when the revision or bank.json changed)."""
        if self._probe() != self._key:
            self.reload()
        return self._state

    def reload(self) -> None:
        """Re-read the bank's index now."""
        self._state, self._key, _ = _read_state(self.path, self if self._state.schema == SCHEMA_VERSION else None)

    @property
    def schema_version(self) -> int:
        """1 (bank.json + embeddings.npy, read as is; upgraded on first write) or 2 (SQLite)."""
        return self._current().schema

    def __repr__(self) -> str:
        return f"SupportBank({str(self.path)!r}, {len(self)} active entries)"

    def __len__(self) -> int:
        """Number of active (not retired) entries."""
        return sum(1 for e in self._current().entries if e.active)

    @property
    def labels(self) -> tuple[LabelInfo, ...]:
        """The bank's labels."""
        return self._current().labels

    @property
    def label_values(self) -> tuple[int, ...]:
        """Values of the bank's labels."""
        return tuple(lab.value for lab in self.labels)

    @property
    def dinov2_identity(self) -> str:
        """Identity of the embedder that made embeddings.npy."""
        return self._current().dinov2

    @property
    def retrieval_features(self) -> tuple[str, ...]:
        """The retrieval features the bank holds embeddings of: the primary one first, then those added
        with `rseg bank reembed --retrieval-feature F` (every entry has a row of each)."""
        state = self._current()
        return (_retrieval_feature(state.dinov2),) + tuple(state.features)

    def feature_identities(self) -> tuple[str, ...]:
        """The embedder identities the bank can be searched with (one per stored retrieval feature)."""
        state = self._current()
        return (state.dinov2,) + tuple(_feature_identity(state.dinov2, f) for f in state.features)

    @property
    def sam2_identities(self) -> tuple[str, ...]:
        """SAM 2 identities with a memory cache folder."""
        return tuple(self._current().sam2)

    @property
    def embedding_dim(self) -> int | None:
        """Embedding size (None until the first entry is added)."""
        return self._current().embedding_dim

    @property
    def bank_id(self) -> str:
        """A stable id of this bank (banks made before ids existed: derived from path and creation)."""
        state = self._current()
        if state.bank_id:
            return state.bank_id
        return "legacy-" + _sha256(f"{os.path.realpath(self.path)}|{state.created}".encode())[:16]

    def writable(self) -> bool:
        """Whether this process may change the bank (folder, memories/ and .lock writable)."""
        need = os.W_OK | os.X_OK
        if not os.access(self.path, need):
            return False
        mem, lock = self.path / MEMORIES_DIR, self.path / LOCK_FILE
        if mem.exists() and not os.access(mem, need):
            return False
        return not lock.exists() or os.access(lock, os.W_OK)

    @property
    def revision(self) -> int:
        """Counter bumped on every committed change."""
        return self._current().revision

    def entries(self, include_retired: bool = False) -> list[BankEntry]:
        """Entries in bank order (the order of embeddings.npy rows), active ones unless asked."""
        return [e for e in self._current().entries if include_retired or e.active]

    def list_entries(
        self,
        include_retired: bool = False,
        case_id: str | None = None,
        axis: int | str | None = None,
        origin: str | None = None,
    ) -> list[BankEntry]:
        """Entries filtered by case, slice axis and origin."""
        ax = parse_axis(axis) if axis is not None else None
        return [
            e
            for e in self.entries(include_retired)
            if (case_id is None or e.case_id == case_id)
            and (ax is None or e.axis == ax)
            and (origin is None or e.origin == origin)
        ]

    def entry(self, entry_id: str) -> BankEntry:
        """The entry with this id (retired ones included)."""
        return self._find(self._current(), entry_id)[1]

    def _find(self, state: _State, entry_id: str) -> tuple[int, BankEntry]:
        if state.schema == SCHEMA_VERSION:  # an indexed look-up instead of a scan
            with contextlib.suppress(sqlite3.Error, BankError, OSError):
                with self._db_mutex:
                    row = self._db().execute("SELECT seq FROM entries WHERE id = ?", (str(entry_id),)).fetchone()
                if row is not None and row[0] < len(state.entries) and state.entries[row[0]].id == entry_id:
                    return int(row[0]), state.entries[row[0]]
        for n, e in enumerate(state.entries):
            if e.id == entry_id:
                return n, e
        close = difflib.get_close_matches(str(entry_id), [e.id for e in state.entries], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownEntryError(
            f"support bank at {self.path} has no entry {entry_id!r}{hint} "
            f"(list them with `rseg bank list {self.path} --all`)"
        )

    # ---------------------------------------------------------------- reading entries
    def entry_path(self, entry_id: str) -> Path:
        """Path of an entry's NPZ file."""
        return self.path / ENTRIES_DIR / f"{self.entry(entry_id).id}.npz"

    def load_entry(self, entry_id: str) -> EntryData:
        """Arrays of an entry; BankCorruptError naming the file when it is missing or altered."""
        state = self._current()
        _, e = self._find(state, entry_id)
        return self._load(e, state.labels)

    def _load(self, e: BankEntry, labels: Sequence[LabelInfo]) -> EntryData:
        f = self.path / ENTRIES_DIR / f"{e.id}.npz"
        try:
            data = read_bytes(f, self.path)
        except UnsafeLinkError as e2:
            raise BankCorruptError(
                f"entry {e.id} (case {e.case_id}, {AXIS_NAMES[e.axis]}={e.index}): {e2.strerror}; "
                f"`rseg bank verify {self.path} --repair` marks the entry damaged until then",
                f,
            ) from None
        except FileNotFoundError:
            raise BankCorruptError(
                f"entry {e.id} (case {e.case_id}, {AXIS_NAMES[e.axis]}={e.index}) has lost its file "
                f"{f}; restore it from a backup, or run `rseg bank verify {self.path} --repair` to "
                "mark the entry damaged",
                f,
                missing=True,
            ) from None
        except OSError as e2:
            raise BankCorruptError(f"cannot read entry file {f}: {e2}", f) from e2
        digest = _sha256(data)
        if digest != e.sha256:
            raise BankCorruptError(
                f"entry file {f} was changed after it was written (sha256 {digest[:12]}... but "
                f"bank.json recorded {e.sha256[:12]}...); restore it from a backup, or run "
                f"`rseg bank verify {self.path} --repair` to mark the entry damaged",
                f,
            )
        return _parse_entry_file(data, f, e, labels)

    def embeddings(self, embedder_identity: str | None = None) -> np.ndarray:
        """[N, dim] float32 rows aligned with `entries(include_retired=True)`: the primary feature's, or
        those of the stored feature `embedder_identity` names (BankModelMismatchError if none)."""
        return self._state_and_rows(embedder_identity)[1]

    def _state_and_rows(self, identity: str | None = None) -> tuple[_State, np.ndarray]:
        """A bank.json snapshot and the embedding rows that belong to it: the primary feature's, or
        those of the stored feature `identity` names (BankModelMismatchError when it holds none)."""
        try:
            state = self._current()
            return state, self._rows_of(state, identity)
        except BankCorruptError:
            self.reload()  # a writer may have replaced embeddings.npy after our bank.json read
            state = self._current()
            return state, self._rows_of(state, identity)

    def _rows_of(self, state: _State, identity: str | None) -> np.ndarray:
        feature = self._stored_feature(state, identity)
        if feature is None:
            return self._embeddings(state)
        cached = self._feature_cache.get(feature)
        if cached is not None and cached[0] == self._key:
            return cached[1]
        rows, _, message = self._feature_rows_status(state, feature, check_sha=False)
        if rows is None:
            raise BankCorruptError(str(message), self.path / DB_FILE)
        rows.setflags(write=False)
        self._feature_cache = {**self._feature_cache, feature: (self._key, rows)}
        return rows

    def _stored_feature(self, state: _State, identity: str | None) -> str | None:
        """None for the primary feature's identity (or None), else the further feature it names."""
        if identity is None or identity == state.dinov2:
            return None
        for feature in state.features:
            if identity == _feature_identity(state.dinov2, feature):
                return feature
        raise self._mismatch(state, identity)

    def _feature_rows_status(self, state: _State, feature: str, check_sha: bool = True
                             ) -> tuple[np.ndarray | None, str | None, str | None]:
        """As `_db_rows_status`, for a further feature's rows (`db.feature_rows_status`)."""
        with self._db_mutex:
            return bank_db.feature_rows_status(self._db, self.path, state, feature, check_sha)

    def _embeddings(self, state: _State) -> np.ndarray:
        if self._emb_cache is not None and self._emb_cache[:2] == (self._key, state.embeddings_sha256):
            return self._emb_cache[2]
        rows, kind, message = self._embeddings_status(state)
        if rows is None:
            raise BankCorruptError(str(message), self.path / EMBEDDINGS_FILE)
        rows.setflags(write=False)
        self._emb_cache = (self._key, state.embeddings_sha256, rows)  # type: ignore[assignment]
        return rows

    def _embeddings_status(
        self, state: _State, check_sha: bool = True
    ) -> tuple[np.ndarray | None, str | None, str | None]:
        """(rows or None, problem kind or None, message).

        Kinds: missing/unreadable/short/dim/sha/link (no usable rows), nonfinite (rows returned;
        the entries whose row holds NaN or Inf are never searched), extra (harmless, schema 1).
        Schema 2 checks each row's SHA-256 when `check_sha` (verify), its size always.
        """
        if state.schema == SCHEMA_VERSION:
            return self._db_rows_status(state, check_sha)
        n = len(state.entries)
        f = self.path / EMBEDDINGS_FILE
        fix = (
            f"rebuild it with `rseg bank verify {self.path} --repair` (same DINOv2 model) "
            f"or `--reembed` (another model)"
        )
        if n == 0:
            return np.zeros((0, state.embedding_dim or 0), dtype=np.float32), None, None
        if is_link(f):
            return None, "link", f"{f} is a link; RetrievalSeg never reads through a link inside a bank: {fix}"
        if not f.is_file():
            return None, "missing", f"{f} is missing but bank.json lists {n} entries; {fix}"
        try:
            arr = np.load(io.BytesIO(read_bytes(f, self.path)), allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem
            return None, "unreadable", f"{f} cannot be read ({type(e).__name__}: {e}); {fix}"
        if arr.ndim != 2 or arr.dtype != np.float32:
            return None, "unreadable", f"{f} holds {arr.dtype} {arr.shape}, not float32 [N, dim]; {fix}"
        if state.embedding_dim is not None and arr.shape[1] != state.embedding_dim:
            return None, "dim", f"{f} rows have {arr.shape[1]} values, bank.json says {state.embedding_dim}; {fix}"
        if arr.shape[0] < n:
            return None, "short", f"{f} has {arr.shape[0]} rows but bank.json lists {n} entries; {fix}"
        rows = np.ascontiguousarray(arr[:n])
        if state.embeddings_sha256 is not None and _rows_sha256(rows) != state.embeddings_sha256:
            return None, "sha", (
                f"{f} does not match bank.json (its rows changed after bank.json was written, e.g. "
                f"an interrupted re-embed); {fix}"
            )
        bad = _nonfinite_ids(state, rows)
        if bad:
            return rows, "nonfinite", (
                f"{f} holds non-finite values (NaN or Inf) in the rows of {len(bad)} entries "
                f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); they are never retrieved "
                f"until the rows are recomputed: {fix}"
            )
        if arr.shape[0] > n:
            return rows, "extra", (
                f"{f} has {arr.shape[0] - n} extra rows left by an interrupted add (ignored; "
                "verify --repair trims them)"
            )
        return rows, None, None

    def _db_rows_status(self, state: _State, check_sha: bool) -> tuple[np.ndarray | None, str | None, str | None]:
        n, dim = len(state.entries), state.embedding_dim or 0
        f = self.path / DB_FILE
        fix = (
            f"rebuild them with `rseg bank verify {self.path} --repair` (same DINOv2 model) "
            f"or `--reembed` (another model)"
        )
        if n == 0:
            return np.zeros((0, dim), dtype=np.float32), None, None
        try:
            with self._db_mutex:
                rows, have, bad = bank_db.read_rows(self._db(), n, dim, check_sha)
        except sqlite3.Error as e:
            return None, "unreadable", f"the embeddings in {f} cannot be read ({e}); {fix}"
        if bad:
            shown = ", ".join(state.entries[s].id for s in bad[:5])
            return None, "sha", (
                f"{f} holds {len(bad)} embedding rows that do not match their recorded size or "
                f"SHA-256 ({shown}{', ...' if len(bad) > 5 else ''}); {fix}"
            )
        missing = int((~have).sum())
        if missing:
            return None, "missing", f"{f} has no embedding row for {missing} of its {n} entries; {fix}"
        bad_ids = _nonfinite_ids(state, rows)
        if bad_ids:
            return rows, "nonfinite", (
                f"{f} holds non-finite values (NaN or Inf) in the rows of {len(bad_ids)} entries "
                f"({', '.join(bad_ids[:5])}{', ...' if len(bad_ids) > 5 else ''}); they are never "
                f"retrieved until the rows are recomputed: {fix}"
            )
        return rows, None, None

    # ---------------------------------------------------------------- model identity
    def check_models(self, embedder_identity: str) -> None:
        """Raise BankModelMismatchError unless the bank holds embeddings of `embedder_identity` (its
        primary feature's, or a further feature's from the same DINOv2 model and input size)."""
        state = self._current()
        self._stored_feature(state, embedder_identity)

    def _mismatch(self, state: _State, embedder_identity: str) -> BankModelMismatchError:
        return BankModelMismatchError(_mismatch_message(self.path, state, embedder_identity))

    # ---------------------------------------------------------------- locking
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the bank's exclusive write lock (re-entrant within this object)."""
        with self._mutex:
            if self._lock_depth == 0:
                lock = _BankLock(self.path / LOCK_FILE, self.lock_timeout, self.path)
                lock.acquire()
                self._os_lock = lock
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._os_lock is not None:
                    self._os_lock.release()
                    self._os_lock = None

    @contextlib.contextmanager
    def _transaction(self, action: str = "change") -> Iterator[_State]:
        """Lock, take the latest state (a copy), yield it for modification; `_commit` writes it.

        A schema-1 bank is upgraded first (with a backup beside it), or refused when read-only.
        """
        if self._current().schema == V1_SCHEMA and not self.writable():
            raise BankReadOnlyError(self._v1_read_only_message())
        with self.locked():
            if self._current().schema == V1_SCHEMA:
                from .upgrade import upgrade_locked

                upgrade_locked(self)
            cur = self._current()
            yield dataclasses.replace(
                cur, entries=list(cur.entries), sam2=list(cur.sam2), base=cur.base, new_rows={},
                all_rows=None, action=action, new_feature_rows={}, all_feature_rows={}, features_sha256={},
            )

    def _v1_read_only_message(self) -> str:
        return (
            f"support bank at {self.path} has schema version 1 and is read-only for you; it must be "
            f"upgraded before it can change. Someone with write access runs `rseg bank upgrade "
            f"{self.path}` (a backup of the old index is kept beside it). Reading, segmenting and "
            "exporting work without it"
        )

    def _commit(self, state: _State) -> None:
        """Write `state` as the next revision: one SQLite transaction with only what changed."""
        if state.schema != SCHEMA_VERSION or state.base is None:
            raise BankError("internal error: commit needs a schema-2 state from _transaction")
        state.revision += 1
        if state.bank_id is None:
            state.bank_id = uuid.uuid4().hex
        old_key, cache = self._key, self._emb_cache
        with self._db_mutex:
            try:
                bank_db.commit(self._db(write=True), state, self.path / DB_FILE)
            except BaseException:
                self._state, self._key = self._state, None  # re-read on next use
                raise
        new_key = ("db", state.revision)
        if state.all_rows is not None:
            rows = np.ascontiguousarray(state.all_rows, dtype=np.float32)
        elif cache is not None and cache[0] == old_key and len(cache[2]) == len(state.base):
            added = [state.new_rows[e.id] for e in state.entries[len(state.base):]]
            rows = np.concatenate([cache[2], np.asarray(added, np.float32).reshape(len(added), -1)]) if added else cache[2]
        else:
            rows = None
        if rows is not None and np.isfinite(rows).all() and (not rows.size or rows.shape[1] == state.embedding_dim):
            rows.setflags(write=False)
            self._emb_cache = (new_key, None, rows)
        state.base, state.new_rows, state.all_rows = list(state.entries), {}, None
        state.new_feature_rows, state.all_feature_rows = {}, {}
        self._feature_cache = {}  # re-read (and size-checked) on next use
        self._state, self._key = state, new_key

    def _write_embeddings(self, state: _State, rows: np.ndarray) -> None:
        """Replace every embedding row at the next commit (re-embed, rebuild)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        state.all_rows = rows
        state.embeddings_sha256 = None
        if rows.shape[1]:
            state.embedding_dim = int(rows.shape[1])

    # ---------------------------------------------------------------- memory caches
    def memory_cache_dir(self, sam2_identity: str, create: bool = True) -> Path:
        """Folder for the SAM 2 memory cache of `sam2_identity`: per user, never in the bank.

        `<user cache>/memories/<bank id>/<slug>-<hash8>/` (`engine.memory_cache.user_memory_dir`). Segmenting
        only reads the bank: a new SAM 2 setting writes no row and never changes the revision.
        Banks of older versions may hold `memories/` folders and `sam2` rows in `models`; they are
        no longer used (`rseg bank cache BANK --clear` deletes the files).
        """
        from ..engine.memory_cache import user_memory_dir

        return user_memory_dir(self.bank_id, sam2_identity, create=create)
