"""The support bank: annotated slices, their DINOv2 embeddings and SAM 2 memory caches, on disk.

A bank is a clinician's accumulated work, so it is handled like a small database (format:
docs/BANK_FORMAT.md):

* Every file is written atomically (temp file in the same folder, fsync, `os.replace`), entry
  files before the `embeddings.npy` rows and `bank.json` that reference them, so a writer killed
  at any point leaves a bank that opens with every committed entry.
* Every mutating operation holds an OS-level exclusive lock on `<bank>/.lock` for its whole
  read-modify-write and re-reads `bank.json` after taking it, so concurrent writers all land.
  Readers take no lock: atomic replacement gives them a consistent snapshot.
* Nothing is deleted behind the user's back: a correction retires (not deletes) the entry it
  replaces, `remove` retires, `verify --repair` marks damaged entries instead of dropping them.
  Only rebuildable data (embeddings, index, memory caches, temp files) is ever rebuilt or deleted.
"""
from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import threading
import time
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, Union

import numpy as np

from .fileio import (
    TMP_PREFIX,
    UnsafeLinkError,
    atomic_write_bytes,
    check_no_links,
    current_umask,
    default_file_mode,
    is_link,
    read_bytes,
)
from .volume import (
    AXIS_NAMES,
    Volume,
    array_axis,
    in_plane_spacing,
    num_slices,
    parse_axis,
    slice_view,
    through_plane_axis,
)

SCHEMA_VERSION = 1
BANK_FILE = "bank.json"
ENTRIES_DIR = "entries"
EMBEDDINGS_FILE = "embeddings.npy"
INDEX_FILE = "index.faiss"
MEMORIES_DIR = "memories"
LOCK_FILE = ".lock"
ENV_LOCK_TIMEOUT = "RSEG_BANK_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 60.0
ORIGINS = ("initial", "correction")
CASE_POLICIES = ("exclude", "prefer", "ignore")
#: Characters that end a subject id inside a longer case id (`patient005` -> `patient005_frame01`).
SUBJECT_SEPARATORS = "_-. "
RETIRED_BY_USER = "user"

def same_subject(case_id: str, subject: str) -> bool:
    """Whether `case_id` and `subject` name the same patient/subject.

    Equal, or one is the other followed by a separator (`_`, `-`, `.`, space) and more:
    `patient005` and `patient005_frame01` match, `patient01` and `patient010` do not.
    """
    a, b = str(case_id), str(subject)
    if a == b:
        return True
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return bool(short) and long_.startswith(short) and long_[len(short)] in SUBJECT_SEPARATORS


_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
#: Import limits: an archive may not make the importer write (or hold) more than a bank needs.
MAX_ARCHIVE_MEMBERS = 200_000  # a bank of 100k slices has about 100k members
MAX_BANK_JSON_BYTES = 256 * 2**20
_ENTRY_SLACK_BYTES = 2**20  # npz headers and compression overhead beyond the raw arrays


# ----------------------------------------------------------------------------- errors
class BankError(Exception):
    """Base class of support bank errors."""


class BankNotFoundError(BankError, FileNotFoundError):
    """The folder is missing or is not a support bank."""


class BankCorruptError(BankError):
    """A bank file is missing, unreadable or differs from what bank.json recorded."""

    def __init__(self, message: str, path: Path | None = None, missing: bool = False) -> None:
        super().__init__(message)
        self.path = path
        self.missing = missing


class BankSchemaError(BankError):
    """The bank was written by a newer RetrievalSeg (higher schema_version)."""


class BankModelMismatchError(BankError):
    """The bank's embeddings come from another DINOv2 model than the one in use."""


class BankReadOnlyError(BankError, PermissionError):
    """The bank cannot be changed by this user (read-only folder or file system)."""


class BankLockTimeout(BankError, TimeoutError):
    """Another process held the bank's write lock for longer than the timeout."""


class BlankSliceWarning(UserWarning):
    """A slice added as a support has one value everywhere: it shows nothing to the models."""


class UnknownEntryError(BankError, LookupError):
    """No entry with that id exists in the bank."""


# ----------------------------------------------------------------------------- data
class Embedder(Protocol):
    """What the bank needs from a slice embedder (RetrievalSegLib.retrieval.SliceEmbedder)."""

    @property
    def identity(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, images_u8: Sequence[np.ndarray]) -> np.ndarray: ...


EmbedderSource = Union[Embedder, Callable[[], Embedder]]


@dataclass(frozen=True)
class LabelInfo:
    """One label of the bank: the value in label maps, a name and an RGB colour in 0..1."""

    value: int
    name: str
    color: tuple[float, float, float] = (1.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, np.integer)):
            raise ValueError(f"label value must be an integer, got {self.value!r}")
        if not 1 <= int(self.value) <= 2**31 - 1:
            raise ValueError(f"label value must be >= 1 (0 is background), got {self.value}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"label {self.value} needs a non-empty name, got {self.name!r}")
        color = tuple(float(c) for c in self.color)
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise ValueError(
                f"label {self.value} ({self.name}) colour must be 3 numbers in 0..1, got {self.color!r}"
            )
        object.__setattr__(self, "value", int(self.value))
        object.__setattr__(self, "name", self.name.strip())
        object.__setattr__(self, "color", color)

    def to_json(self) -> dict[str, Any]:
        """The bank.json form of this label."""
        return {"value": self.value, "name": self.name, "color": list(self.color)}


@dataclass(frozen=True)
class BankEntry:
    """Metadata of one support slice, as listed in bank.json."""

    id: str
    case_id: str
    axis: int  # IJK slice axis: 0 = i, 1 = j, 2 = k
    index: int
    spacing: tuple[float, float]  # mm along (rows, columns) of the slice
    added: str  # ISO 8601 UTC
    origin: str  # "initial" | "correction"
    retired: bool
    retired_by: str | None  # id of the entry that replaced it, "user", or None
    sha256: str  # of entries/<id>.npz
    shape: tuple[int, int]
    labels_present: tuple[int, ...]
    window: tuple[float, float] | None = None  # intensity bounds that made `image`
    damaged: str | None = None  # set by verify --repair when its file is missing or corrupt

    @property
    def key(self) -> tuple[str, int, int]:
        """(case_id, axis, index): at most one active entry per key."""
        return (self.case_id, self.axis, self.index)

    @property
    def active(self) -> bool:
        """Not retired."""
        return not self.retired

    @property
    def usable(self) -> bool:
        """Active and not marked damaged: the entries search may return."""
        return not self.retired and self.damaged is None

    @property
    def status(self) -> str:
        """'active', 'retired' or 'damaged' (damaged wins)."""
        if self.damaged is not None:
            return "damaged"
        return "retired" if self.retired else "active"

    @property
    def file_name(self) -> str:
        """Path of the entry file relative to the bank folder."""
        return f"{ENTRIES_DIR}/{self.id}.npz"

    def to_json(self) -> dict[str, Any]:
        """The bank.json form of this entry."""
        d: dict[str, Any] = {
            "id": self.id,
            "case_id": self.case_id,
            "axis": self.axis,
            "index": self.index,
            "spacing": list(self.spacing),
            "added": self.added,
            "origin": self.origin,
            "retired": self.retired,
            "retired_by": self.retired_by,
            "sha256": self.sha256,
            "shape": list(self.shape),
            "labels_present": list(self.labels_present),
            "window": list(self.window) if self.window is not None else None,
        }
        if self.damaged is not None:
            d["damaged"] = self.damaged
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> "BankEntry":
        """Parse one bank.json entry; BankCorruptError naming `where` when it is malformed."""
        try:
            if not isinstance(d, dict):
                raise ValueError("not an object")
            eid = str(d["id"])
            if not _ID_RE.match(eid):
                raise ValueError(f"id {eid!r} is not a valid entry id")
            axis, index = int(d["axis"]), int(d["index"])
            if axis not in (0, 1, 2) or index < 0:
                raise ValueError(f"axis {axis} / index {index} out of range")
            origin = str(d["origin"])
            if origin not in ORIGINS:
                raise ValueError(f"origin {origin!r} is not one of {ORIGINS}")
            sha = str(d["sha256"])
            if not _SHA_RE.match(sha):
                raise ValueError(f"sha256 {sha!r} is not a hex SHA-256")
            spacing = tuple(float(s) for s in d["spacing"])
            shape = tuple(int(s) for s in d["shape"])
            if len(spacing) != 2 or len(shape) != 2:
                raise ValueError("spacing and shape need 2 values")
            window = d.get("window")
            return cls(
                id=eid,
                case_id=str(d["case_id"]),
                axis=axis,
                index=index,
                spacing=spacing,  # type: ignore[arg-type]
                added=str(d["added"]),
                origin=origin,
                retired=bool(d["retired"]),
                retired_by=None if d.get("retired_by") is None else str(d["retired_by"]),
                sha256=sha,
                shape=shape,  # type: ignore[arg-type]
                labels_present=tuple(int(v) for v in d["labels_present"]),
                window=None if window is None else (float(window[0]), float(window[1])),
                damaged=None if d.get("damaged") is None else str(d["damaged"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
            raise BankCorruptError(f"{where} is malformed: {detail}") from e


@dataclass
class EntryData:
    """The arrays of one entry: what the models see, the original intensities, one mask per label."""

    image: np.ndarray  # uint8 [H, W]
    intensities: np.ndarray  # [H, W], original dtype
    masks: dict[int, np.ndarray]  # label value -> bool [H, W]


@dataclass
class VerifyReport:
    """What `SupportBank.verify` found (and, with repair, did)."""

    path: Path
    entries_checked: int = 0
    missing: list[str] = field(default_factory=list)  # entry ids whose file is absent
    corrupt: dict[str, str] = field(default_factory=dict)  # entry id -> why (sha, unreadable...)
    embeddings_problem: str | None = None
    model_problem: str | None = None
    index_problem: str | None = None
    problems: list[str] = field(default_factory=list)  # what makes the bank not ok
    notes: list[str] = field(default_factory=list)  # harmless findings
    temp_files: list[str] = field(default_factory=list)
    orphan_files: list[str] = field(default_factory=list)
    memory_caches: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # links inside the bank (never followed)
    memory_problems: list[str] = field(default_factory=list)  # cached memories that fail their check
    actions: list[str] = field(default_factory=list)  # what repair did
    found_before_repair: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem left (notes such as leftover temp files do not count)."""
        return not self.problems

    @property
    def damaged(self) -> list[str]:
        """Ids of entries whose file is missing or corrupt."""
        return sorted(set(self.missing) | set(self.corrupt))

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable form."""
        return {
            "path": str(self.path),
            "ok": self.ok,
            "entries_checked": self.entries_checked,
            "missing": self.missing,
            "corrupt": self.corrupt,
            "embeddings_problem": self.embeddings_problem,
            "model_problem": self.model_problem,
            "index_problem": self.index_problem,
            "problems": self.problems,
            "notes": self.notes,
            "temp_files": self.temp_files,
            "orphan_files": self.orphan_files,
            "memory_caches": self.memory_caches,
            "links": self.links,
            "memory_problems": self.memory_problems,
            "actions": self.actions,
            "found_before_repair": self.found_before_repair,
        }

    def summary(self) -> str:
        """Human-readable multi-line summary."""
        head = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        lines = [f"support bank {self.path}: {self.entries_checked} entries checked, {head}"]
        if self.found_before_repair:
            lines.append("found:")
            lines += [f"  - {p}" for p in self.found_before_repair]
        if self.actions:
            lines.append("repaired:")
            lines += [f"  - {a}" for a in self.actions]
        if self.problems:
            lines.append("problems:" if not self.actions else "remaining problems:")
            lines += [f"  - {p}" for p in self.problems]
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class _State:
    """Parsed bank.json."""

    labels: tuple[LabelInfo, ...]
    dinov2: str
    sam2: list[str]
    entries: list[BankEntry]
    embedding_dim: int | None
    embeddings_sha256: str | None
    revision: int
    created: str
    bank_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "bank_id": self.bank_id,
            "created": self.created,
            "revision": self.revision,
            "labels": [lab.to_json() for lab in self.labels],
            "dinov2": self.dinov2,
            "sam2": list(self.sam2),
            "embedding_dim": self.embedding_dim,
            "embeddings_sha256": self.embeddings_sha256,
            "entries": [e.to_json() for e in self.entries],
        }


@dataclass
class _Prepared:
    """One slice ready to be written: arrays, metadata and its embedding."""

    case_id: str
    axis: int
    index: int
    spacing: tuple[float, float]
    image: np.ndarray
    intensities: np.ndarray
    masks: dict[int, np.ndarray]
    window: tuple[float, float] | None
    embedding: np.ndarray | None = None


# ----------------------------------------------------------------------------- file helpers
def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rows_sha256(rows: np.ndarray) -> str:
    """Content hash of embedding rows (float32 little-endian, C order)."""
    return _sha256(np.ascontiguousarray(rows, dtype="<f4").tobytes())


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(p: _Prepared, labels: Sequence[LabelInfo]) -> bytes:
    arrays: dict[str, np.ndarray] = {"image": p.image, "intensities": p.intensities}
    for lab in labels:
        arrays[f"mask_{lab.value}"] = p.masks.get(lab.value, np.zeros(p.image.shape, dtype=bool))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _sanitise(text: str, limit: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:limit]
    return slug or "x"


def memory_cache_name(sam2_identity: str) -> str:
    """Folder name under memories/ for a SAM 2 identity: readable slug plus a short hash."""
    digest = hashlib.sha256(sam2_identity.encode("utf-8")).hexdigest()[:8]
    return f"{_sanitise(sam2_identity, 80)}-{digest}"


def _nonfinite_ids(state: "_State", rows: np.ndarray) -> list[str]:
    """Ids of undamaged entries whose embedding row holds NaN or Inf."""
    if rows.size == 0:
        return []
    finite = np.isfinite(rows).all(axis=1)
    return [e.id for e, ok in zip(state.entries, finite) if not ok and e.damaged is None]


def _reembed_hint(path: Path, identity: str) -> str:
    m = re.match(r"dinov2-([a-z_]+)", identity)
    size = f" --dinov2 {m.group(1)}" if m else ""
    random = " --random-weights" if "random" in identity else ""
    return f"`rseg bank verify --reembed {path}{size}{random}`"


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


def _read_state(bank_path: Path) -> tuple[_State, tuple[int, int, int], bytes]:
    """Parse bank.json; also returns its (inode, mtime_ns, size) and raw bytes."""
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
    return _state_from_json(raw, f), (st.st_ino, st.st_mtime_ns, st.st_size), data


def _state_from_json(raw: Any, f: Path) -> _State:
    if not isinstance(raw, dict) or "schema_version" not in raw:
        raise BankCorruptError(f"{f} is not a support bank description (no schema_version)", f)
    version = raw["schema_version"]
    if not isinstance(version, int) or version < 1:
        raise BankCorruptError(f"{f} has an invalid schema_version {version!r}", f)
    if version > SCHEMA_VERSION:
        raise BankSchemaError(
            f"support bank at {f.parent} has schema version {version}, but this RetrievalSeg reads "
            f"versions up to {SCHEMA_VERSION}: update RetrievalSeg to use it"
        )
    try:
        labels = tuple(
            LabelInfo(int(d["value"]), str(d["name"]), tuple(d["color"]))  # type: ignore[arg-type]
            for d in raw["labels"]
        )
        dinov2 = str(raw["dinov2"])
        sam2 = [str(s) for s in raw.get("sam2", [])]
        entries_raw = raw["entries"]
        if not isinstance(entries_raw, list):
            raise ValueError("entries is not a list")
        dim = raw.get("embedding_dim")
        sha = raw.get("embeddings_sha256")
        state = _State(
            labels=labels,
            dinov2=dinov2,
            sam2=sam2,
            entries=[BankEntry.from_json(d, f"{f} entry #{n}") for n, d in enumerate(entries_raw)],
            embedding_dim=None if dim is None else int(dim),
            embeddings_sha256=None if sha is None else str(sha),
            revision=int(raw.get("revision", 0)),
            created=str(raw.get("created", "")),
            bank_id=None if raw.get("bank_id") is None else _sanitise(str(raw["bank_id"]), 64),
        )
    except BankCorruptError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise BankCorruptError(f"{f} is malformed: {detail}", f) from e
    ids = [e.id for e in state.entries]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise BankCorruptError(f"{f} lists entries {dup} more than once", f)
    return state


def _parse_entry_file(data: bytes, file: Path, entry: BankEntry, labels: Sequence[LabelInfo]) -> EntryData:
    """Arrays of an entry NPZ, validated against its metadata; never unpickles anything."""
    name = "?"
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays: dict[str, np.ndarray] = {}
            for name in z.files:
                arrays[name] = z[name]
    except ValueError as e:
        if "pickle" in str(e).lower() or "object arrays" in str(e).lower():
            raise BankCorruptError(
                f"{file} holds a pickled Python object (array {name!r}); RetrievalSeg never loads "
                "pickles from a support bank because they can run code. This file was not written "
                "by RetrievalSeg: restore it from a backup, or retire the entry with "
                f"`rseg bank remove {file.parent.parent} {entry.id}`",
                file,
            ) from e
        raise BankCorruptError(f"{file} cannot be read as an entry file: {e}", file) from e
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise BankCorruptError(f"{file} cannot be read as an entry file: {type(e).__name__}: {e}", file) from e
    shape = tuple(entry.shape)
    for req in ("image", "intensities"):
        if req not in arrays:
            raise BankCorruptError(f"{file} has no {req!r} array", file)
    image, intensities = arrays["image"], arrays["intensities"]
    if image.dtype != np.uint8 or image.shape != shape:
        raise BankCorruptError(
            f"{file}: 'image' is {image.dtype} {image.shape}, bank.json says uint8 {shape}", file
        )
    if intensities.shape != shape or intensities.dtype.kind not in "biuf":
        raise BankCorruptError(
            f"{file}: 'intensities' is {intensities.dtype} {intensities.shape}, expected numbers {shape}", file
        )
    masks: dict[int, np.ndarray] = {}
    for lab in labels:
        key = f"mask_{lab.value}"
        m = arrays.get(key)
        if m is None:
            raise BankCorruptError(f"{file} has no {key!r} array for label {lab.value} ({lab.name})", file)
        if m.dtype != np.bool_ or m.shape != shape:
            raise BankCorruptError(f"{file}: {key!r} is {m.dtype} {m.shape}, expected bool {shape}", file)
        masks[lab.value] = m
    return EntryData(image=image, intensities=intensities, masks=masks)


# ----------------------------------------------------------------------------- the bank
class SupportBank:
    """A support bank folder: open with `SupportBank.open`, make with `SupportBank.create`."""

    def __init__(self, path: Path, lock_timeout: float | None = None) -> None:
        """Use `SupportBank.open` or `SupportBank.create`."""
        self.path = Path(path)
        self.lock_timeout = _lock_timeout(lock_timeout)
        self._state, self._key, _ = _read_state(self.path)
        self._mutex = threading.RLock()
        self._lock_depth = 0
        self._os_lock: _BankLock | None = None
        self._emb_cache: tuple[tuple[int, int, int], str | None, np.ndarray] | None = None
        self._index_cache: tuple[Any, ...] | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        labels: Sequence[LabelInfo],
        embedder_identity: str,
        lock_timeout: float | None = None,
    ) -> "SupportBank":
        """Make a new, empty bank at `path` (refuses a non-empty existing folder)."""
        p = Path(path)
        labels = tuple(labels)
        if not labels:
            raise ValueError("a support bank needs at least one label, e.g. LabelInfo(1, 'liver')")
        for lab in labels:
            if not isinstance(lab, LabelInfo):
                raise TypeError(f"labels must be LabelInfo objects, got {lab!r}")
        values = [lab.value for lab in labels]
        if len(set(values)) != len(values):
            raise ValueError(f"label values must be unique, got {values}")
        names = [lab.name.lower() for lab in labels]
        if len(set(names)) != len(names):
            raise ValueError(f"label names must be unique, got {[lab.name for lab in labels]}")
        if not isinstance(embedder_identity, str) or not embedder_identity:
            raise ValueError(f"embedder_identity must be a non-empty string, got {embedder_identity!r}")
        if p.exists():
            if not p.is_dir():
                raise FileExistsError(f"cannot create a support bank at {p}: it is a file")
            if any(p.iterdir()):
                raise FileExistsError(
                    f"cannot create a support bank at {p}: the folder exists and is not empty; "
                    "choose a new folder (or open the existing bank)"
                )
        p.mkdir(parents=True, exist_ok=True)
        (p / ENTRIES_DIR).mkdir(exist_ok=True)
        (p / MEMORIES_DIR).mkdir(exist_ok=True)
        state = _State(
            labels=labels,
            dinov2=embedder_identity,
            sam2=[],
            entries=[],
            embedding_dim=None,
            embeddings_sha256=None,
            revision=0,
            created=_now(),
            bank_id=uuid.uuid4().hex,
        )
        atomic_write_bytes(p / BANK_FILE, json.dumps(state.to_json(), indent=1).encode("utf-8"))
        return cls(p, lock_timeout)

    @classmethod
    def open(cls, path: str | os.PathLike[str], lock_timeout: float | None = None) -> "SupportBank":
        """Open an existing bank (clear errors for a missing folder, bad bank.json, newer schema)."""
        return cls(Path(path), lock_timeout)

    # ---------------------------------------------------------------- snapshot
    def _current(self) -> _State:
        """The latest committed bank.json (re-read only when the file changed)."""
        try:
            st = os.stat(self.path / BANK_FILE)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        if key != self._key:
            self._state, self._key, _ = _read_state(self.path)
        return self._state

    def reload(self) -> None:
        """Re-read bank.json now."""
        self._state, self._key, _ = _read_state(self.path)

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

    def embeddings(self) -> np.ndarray:
        """[N, dim] float32 rows aligned with `entries(include_retired=True)`."""
        return self._state_and_rows()[1]

    def _state_and_rows(self) -> tuple[_State, np.ndarray]:
        """A bank.json snapshot and the embedding rows that belong to it."""
        try:
            state = self._current()
            return state, self._embeddings(state)
        except BankCorruptError:
            self.reload()  # a writer may have replaced embeddings.npy after our bank.json read
            state = self._current()
            return state, self._embeddings(state)

    def _embeddings(self, state: _State) -> np.ndarray:
        if self._emb_cache is not None and self._emb_cache[:2] == (self._key, state.embeddings_sha256):
            return self._emb_cache[2]
        rows, kind, message = self._embeddings_status(state)
        if rows is None:
            raise BankCorruptError(str(message), self.path / EMBEDDINGS_FILE)
        rows.setflags(write=False)
        self._emb_cache = (self._key, state.embeddings_sha256, rows)  # type: ignore[assignment]
        return rows

    def _embeddings_status(self, state: _State) -> tuple[np.ndarray | None, str | None, str | None]:
        """(rows or None, problem kind or None, message).

        Kinds: missing/unreadable/short/dim/sha/link (no usable rows), nonfinite (rows returned;
        the entries whose row holds NaN or Inf are never searched), extra (harmless).
        """
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

    # ---------------------------------------------------------------- model identity
    def check_models(self, embedder_identity: str) -> None:
        """Raise BankModelMismatchError unless the bank was embedded with `embedder_identity`."""
        made_with = self._current().dinov2
        if embedder_identity != made_with:
            raise BankModelMismatchError(
                f"support bank at {self.path} was made with {made_with}, engine uses "
                f"{embedder_identity}: re-embed it with {_reembed_hint(self.path, embedder_identity)}"
            )

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
    def _transaction(self) -> Iterator[_State]:
        """Lock, re-read bank.json, yield it for modification; `_commit` writes it."""
        with self.locked():
            self.reload()
            yield self._state

    def _commit(self, state: _State) -> None:
        state.revision += 1
        if state.bank_id is None:
            state.bank_id = uuid.uuid4().hex
        atomic_write_bytes(self.path / BANK_FILE, json.dumps(state.to_json(), indent=1).encode("utf-8"), self.path)
        self.reload()

    def _write_embeddings(self, state: _State, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        atomic_write_bytes(self.path / EMBEDDINGS_FILE, _npy_bytes(rows), self.path)
        state.embeddings_sha256 = _rows_sha256(rows)
        if rows.shape[1]:
            state.embedding_dim = int(rows.shape[1])

    # ---------------------------------------------------------------- adding
    def add_volume(
        self,
        image: Volume,
        labelmap: Volume,
        case_id: str,
        embedder: Embedder,
        axis: int | str | None = None,
        window: tuple[float, float] | None = None,
        negatives: int = 0,
        slices: Sequence[int] | None = None,
        origin: str = "initial",
        progress: Callable[[int, int], None] | None = None,
    ) -> list[BankEntry]:
        """Add the annotated slices of a volume (plus up to `negatives` empty ones); newest wins."""
        from .preprocess import robust_window, to_uint8

        self.check_models(embedder.identity)
        case_id = self._check_case(case_id)
        origin = self._check_origin(origin)
        if not isinstance(image, Volume) or not isinstance(labelmap, Volume):
            raise TypeError("add_volume needs RetrievalSegLib.volume.Volume objects for image and labelmap")
        if not image.same_geometry(labelmap):
            raise ValueError(
                f"image and label map of case {case_id!r} do not share a geometry: image size "
                f"{image.size} spacing {image.spacing} origin {image.origin}, label map size "
                f"{labelmap.size} spacing {labelmap.spacing} origin {labelmap.origin}; resample "
                "the label map onto the image first"
            )
        lab = self._integer_labels(labelmap.array, case_id)
        ax = parse_axis(axis)
        if ax is None:
            ax = through_plane_axis(image.spacing)
        n = num_slices(image.array, ax)
        other = tuple(a for a in range(3) if a != array_axis(ax))
        annotated = np.asarray((lab != 0).any(axis=other))  # [n]
        if slices is not None:
            chosen: list[int] = []
            for s in slices:
                if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= int(s) < n:
                    raise ValueError(
                        f"slice {s!r} is outside 0..{n - 1} along axis {AXIS_NAMES[ax]} of case {case_id!r}"
                    )
                if int(s) not in chosen:
                    chosen.append(int(s))
            chosen.sort()
        else:
            chosen = [int(i) for i in np.flatnonzero(annotated)]
        if isinstance(negatives, bool) or int(negatives) < 0:
            raise ValueError(f"negatives must be a count >= 0, got {negatives!r}")
        empty = [i for i in range(n) if not annotated[i] and i not in chosen]
        picked: list[int] = []
        if negatives and empty:
            m = min(int(negatives), len(empty))
            picked = sorted({empty[int((j + 0.5) * len(empty) / m)] for j in range(m)})
        indices = sorted(chosen + picked)
        if not indices:
            raise ValueError(
                f"label map of case {case_id!r} has no annotated slice along axis {AXIS_NAMES[ax]} "
                "(all zero); draw at least one slice, pick another axis, or ask for negatives"
            )
        if window is None:
            bounds = robust_window(image.array)
        else:
            bounds = (float(window[0]), float(window[1]))
            if not bounds[1] > bounds[0]:
                raise ValueError(f"intensity window needs low < high, got {window!r}")
        spacing = in_plane_spacing(image.spacing, ax)
        prepared = []
        for i in indices:
            inten = np.array(slice_view(image.array, ax, i))
            lab2 = slice_view(lab, ax, i)
            masks = {v: np.asarray(lab2 == v) for v in self.label_values}
            prepared.append(
                _Prepared(case_id, ax, i, spacing, to_uint8(inten, bounds), inten, masks, bounds)
            )
        self._embed_prepared(prepared, embedder, progress)
        added = self._add_prepared(prepared, origin, embedder.identity)
        self._warn_blank(prepared, added)
        return added

    def _warn_blank(self, prepared: Sequence[_Prepared], added: Sequence[BankEntry]) -> None:
        """Warn about added slices whose intensities are all one value (or not finite).

        SimpleITK reads NaN voxels of a NIfTI file as 0, so a slice of NaNs arrives as a blank
        slice; as a support it retrieves and teaches nothing, which the user should know.
        """
        blank: list[str] = []
        for p, e in zip(prepared, added):
            inten = np.asarray(p.intensities)
            finite = inten[np.isfinite(inten)] if inten.dtype.kind == "f" else inten
            if finite.size < inten.size:
                blank.append(f"{AXIS_NAMES[e.axis]}={e.index} ({e.id}: holds NaN or Inf)")
            elif finite.size == 0 or finite.min() == finite.max():
                value = finite.flat[0] if finite.size else "nothing"
                blank.append(f"{AXIS_NAMES[e.axis]}={e.index} ({e.id}: every voxel is {value})")
        if blank:
            case = added[0].case_id
            warnings.warn(
                f"case {case!r}: {len(blank)} slice(s) added as supports are blank: "
                + ", ".join(blank)
                + ". A blank image shows the models nothing (NaN voxels of a NIfTI file are read as 0);"
                f" check the image, and retire unintended entries with `rseg bank remove {self.path} ID`",
                BlankSliceWarning,
                stacklevel=3,
            )

    def add_slice(
        self,
        image_slice: np.ndarray,
        masks: Mapping[int, np.ndarray],
        case_id: str,
        axis: int | str,
        index: int,
        spacing: tuple[float, float],
        embedder: Embedder,
        intensities: np.ndarray | None = None,
        origin: str = "correction",
        window: tuple[float, float] | None = None,
    ) -> BankEntry:
        """Add one (corrected) slice; an older active entry of the same case/axis/index is retired.

        `image_slice` is the uint8 slice the models see; a non-uint8 slice is windowed (with
        `window`, default robust percentiles) and kept as `intensities`.
        """
        from .preprocess import robust_window, to_uint8, validate_image, validate_mask

        self.check_models(embedder.identity)
        case_id = self._check_case(case_id)
        origin = self._check_origin(origin)
        ax = parse_axis(axis)
        if ax is None:
            raise ValueError("add_slice needs an explicit slice axis (i, j or k), not 'auto'")
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"slice index must be an integer >= 0, got {index!r}")
        img = validate_image(image_slice, "image slice")
        if img.ndim != 2:
            raise ValueError(f"image slice must be grey 2D (H, W), got shape {img.shape}")
        sp = tuple(float(s) for s in spacing)
        if len(sp) != 2 or not all(s > 0 for s in sp):
            raise ValueError(f"spacing must be 2 positive numbers (rows, columns) in mm, got {spacing!r}")
        bounds: tuple[float, float] | None = None
        if img.dtype == np.uint8 and window is None:
            image_u8 = np.array(img)
        else:
            bounds = (
                (float(window[0]), float(window[1])) if window is not None else robust_window(img)
            )
            if not bounds[1] > bounds[0]:
                raise ValueError(f"intensity window needs low < high, got {window!r}")
            image_u8 = to_uint8(img, bounds)
        inten = np.array(img if intensities is None else intensities)
        if inten.shape != img.shape:
            raise ValueError(f"intensities have shape {inten.shape} but the image slice has {img.shape}")
        unknown = sorted(set(int(k) for k in masks) - set(self.label_values))
        if unknown:
            raise ValueError(
                f"masks for labels {unknown} given, but the support bank at {self.path} has labels "
                f"{self._labels_text()}"
            )
        mm = {
            int(v): validate_mask(m, img.shape, f"mask of label {v}") for v, m in masks.items()
        }
        for v in self.label_values:
            mm.setdefault(v, np.zeros(img.shape, dtype=bool))
        p = _Prepared(case_id, ax, int(index), sp, image_u8, inten, mm, bounds)  # type: ignore[arg-type]
        self._embed_prepared([p], embedder, None)
        added = self._add_prepared([p], origin, embedder.identity)
        self._warn_blank([p], added)
        return added[0]

    def _check_case(self, case_id: str) -> str:
        if not isinstance(case_id, str) or not case_id.strip():
            raise ValueError(f"case_id must be a non-empty string naming the patient/study, got {case_id!r}")
        return case_id.strip()

    @staticmethod
    def _check_origin(origin: str) -> str:
        if origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, got {origin!r}")
        return origin

    def _labels_text(self) -> str:
        return ", ".join(f"{lab.value}={lab.name}" for lab in self.labels)

    def _integer_labels(self, array: np.ndarray, case_id: str) -> np.ndarray:
        lab = np.asarray(array)
        if lab.dtype == np.bool_:
            lab = lab.astype(np.uint8)
        elif lab.dtype.kind == "f":
            if not np.isfinite(lab).all() or not np.array_equal(lab, np.round(lab)):
                raise ValueError(
                    f"label map of case {case_id!r} holds non-integer values; it must be a label map "
                    "(0 = background, integers for labels)"
                )
        elif lab.dtype.kind not in "iu":
            raise ValueError(f"label map of case {case_id!r} has dtype {lab.dtype}, expected integers")
        values = set(int(v) for v in np.unique(lab)) - {0}
        unknown = sorted(values - set(self.label_values))
        if unknown:
            shown = ", ".join(str(v) for v in unknown[:8]) + (", ..." if len(unknown) > 8 else "")
            what = f"{len(unknown)} values ({shown})" if len(unknown) > 8 else f"values [{shown}]"
            hint = " (is it an image rather than a label map?)" if len(unknown) > 8 else ""
            raise ValueError(
                f"label map of case {case_id!r} holds {what}{hint} that are not labels of the "
                f"support bank at {self.path} (it has {self._labels_text()}); relabel them to the "
                "bank's values or to 0, or use a bank with those labels"
            )
        return lab

    @staticmethod
    def _embed_prepared(
        prepared: list[_Prepared], embedder: Embedder, progress: Callable[[int, int], None] | None
    ) -> None:
        images = [p.image for p in prepared]
        if progress is not None:
            rows = embedder.embed(images, progress=progress)  # type: ignore[call-arg]
        else:
            rows = embedder.embed(images)
        rows = np.asarray(rows, dtype=np.float32)
        if rows.shape != (len(prepared), embedder.dim) or not np.isfinite(rows).all():
            raise ValueError(
                f"embedder {embedder.identity} returned {rows.shape} (finite: "
                f"{bool(np.isfinite(rows).all())}) for {len(prepared)} slices, expected "
                f"({len(prepared)}, {embedder.dim}) finite values"
            )
        for p, r in zip(prepared, rows):
            p.embedding = r

    def _add_prepared(self, prepared: list[_Prepared], origin: str, identity: str) -> list[BankEntry]:
        with self._transaction() as state:
            self.check_models(identity)  # re-check: someone may have re-embedded meanwhile
            dim = int(prepared[0].embedding.shape[0])  # type: ignore[union-attr]
            if state.embedding_dim is not None and state.embedding_dim != dim:
                raise BankModelMismatchError(
                    f"support bank at {self.path} holds {state.embedding_dim}-d embeddings but "
                    f"{identity} gives {dim}-d ones: re-embed it with {_reembed_hint(self.path, identity)}"
                )
            old_rows = self._embeddings(state) if state.entries else np.zeros((0, dim), np.float32)
            taken = {e.id for e in state.entries}
            new_entries: list[BankEntry] = []
            for p in prepared:
                eid = self._new_id(p, taken)
                taken.add(eid)
                data = _npz_bytes(p, state.labels)
                atomic_write_bytes(self.path / ENTRIES_DIR / f"{eid}.npz", data, self.path)  # before any reference
                present = tuple(v for v, m in sorted(p.masks.items()) if m.any())
                new_entries.append(
                    BankEntry(
                        id=eid,
                        case_id=p.case_id,
                        axis=p.axis,
                        index=p.index,
                        spacing=p.spacing,
                        added=_now(),
                        origin=origin,
                        retired=False,
                        retired_by=None,
                        sha256=_sha256(data),
                        shape=(int(p.image.shape[0]), int(p.image.shape[1])),
                        labels_present=present,
                        window=None if p.window is None else (float(p.window[0]), float(p.window[1])),
                    )
                )
            entries = list(state.entries)
            for ne in new_entries:  # newest wins: retire the active entry it replaces
                for n, e in enumerate(entries):
                    if e.active and e.key == ne.key:
                        entries[n] = replace(e, retired=True, retired_by=ne.id)
                entries.append(ne)
            rows = np.concatenate([old_rows, np.stack([p.embedding for p in prepared])], axis=0)  # type: ignore[misc]
            self._write_embeddings(state, rows)  # rows first: a longer file is still valid
            state.entries = entries
            self._commit(state)
        return new_entries

    def _new_id(self, p: _Prepared, taken: set[str]) -> str:
        while True:
            eid = f"{_sanitise(p.case_id, 40)}-{AXIS_NAMES[p.axis]}{p.index:04d}-{uuid.uuid4().hex[:6]}"
            if eid not in taken and not (self.path / ENTRIES_DIR / f"{eid}.npz").exists():
                return eid

    # ---------------------------------------------------------------- retire / restore
    def remove(self, entry_id: str) -> BankEntry:
        """Retire an entry (its file is kept; `restore` brings it back)."""
        with self._transaction() as state:
            n, e = self._find(state, entry_id)
            if e.retired:
                return e
            state.entries[n] = replace(e, retired=True, retired_by=RETIRED_BY_USER)
            self._commit(state)
            return state.entries[n]

    def restore(self, entry_id: str) -> BankEntry:
        """Un-retire an entry; the active entry of the same case/axis/index, if any, is retired."""
        with self._transaction() as state:
            n, e = self._find(state, entry_id)
            if e.active:
                return e
            for m, other in enumerate(state.entries):
                if m != n and other.active and other.key == e.key:
                    state.entries[m] = replace(other, retired=True, retired_by=e.id)
            state.entries[n] = replace(e, retired=False, retired_by=None)
            self._commit(state)
            return state.entries[n]

    # ---------------------------------------------------------------- search
    def search(
        self,
        query_embeddings: np.ndarray,
        k: int,
        case_id: str | None = None,
        case_policy: str = "exclude",
    ) -> list[list[tuple[str, float]]]:
        """Top-k (entry id, cosine) per query over usable entries, with a policy for `case_id`.

        "exclude": never return entries of the subject `case_id` names (honest evaluation):
        entries whose case id is `case_id` or shares it as a prefix up to a separator
        (`same_subject`: `patient005` excludes `patient005_frame01` and the reverse, not
        `patient0050`); "prefer": entries of exactly `case_id` first (by score), then the others;
        "ignore": plain top-k.
        """
        if case_policy not in CASE_POLICIES:
            raise ValueError(f"case_policy must be one of {CASE_POLICIES}, got {case_policy!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        q = np.atleast_2d(np.asarray(query_embeddings, dtype=np.float32))
        if q.ndim != 2 or not np.isfinite(q).all():
            raise ValueError(f"query embeddings must be finite [Q, dim], got shape {q.shape}")
        state, rows = self._state_and_rows()
        if state.embedding_dim is not None and q.shape[1] != state.embedding_dim:
            raise BankModelMismatchError(
                f"query embeddings have {q.shape[1]} values, the support bank at {self.path} holds "
                f"{state.embedding_dim}-d embeddings from {state.dinov2}; use the same DINOv2 model"
            )
        if not any(e.usable for e in state.entries):
            raise ValueError(
                f"k={k} supports requested but the support bank at {self.path} has no usable "
                f"entries; add annotated slices with `rseg bank add {self.path} IMAGE LABELS --case ID`"
            )
        index, usable, cases = self._index(state, rows)
        if case_id is None:
            in_case = np.zeros(len(usable), dtype=bool)
        elif case_policy == "exclude":  # the whole subject: its other frames/series too
            in_case = np.array([same_subject(c, case_id) for c in cases], dtype=bool)
        else:
            in_case = cases == case_id
        n_case = int(in_case.sum())
        available = len(usable) - (n_case if case_policy == "exclude" else 0)
        if k > available:
            retired = sum(1 for e in state.entries if e.retired)
            damaged = sum(1 for e in state.entries if e.active and e.damaged is not None)
            nonfinite = sum(1 for i in _nonfinite_ids(state, rows) if not self._find(state, i)[1].retired)
            why = []
            if case_policy == "exclude" and n_case:
                why.append(f"{n_case} of case {case_id!r} excluded")
            if retired:
                why.append(f"{retired} retired")
            if damaged:
                why.append(f"{damaged} damaged")
            if nonfinite:
                why.append(
                    f"{nonfinite} with non-finite embeddings: `rseg bank verify {self.path} --repair` recomputes them"
                )
            raise ValueError(
                f"k={k} supports requested but the support bank at {self.path} has only "
                f"{available} usable entries" + (f" ({', '.join(why)})" if why else "")
                + "; lower k or add annotated slices"
            )
        results: list[list[tuple[str, float]]] = []
        ids = [e.id for e in (state.entries[i] for i in usable)]
        exclude_case = set(np.flatnonzero(in_case).tolist())
        exclude_other = set(np.flatnonzero(~in_case).tolist())
        for row in q:
            pairs: list[tuple[int, float]] = []
            if case_policy == "prefer" and n_case:
                k1 = min(k, n_case)
                s, i = index.search(row[None], k1, exclude=exclude_other)
                pairs += list(zip(i[0].tolist(), s[0].tolist()))
                if k > k1:
                    s, i = index.search(row[None], k - k1, exclude=exclude_case)
                    pairs += list(zip(i[0].tolist(), s[0].tolist()))
            else:
                excl = exclude_case if case_policy == "exclude" else None
                s, i = index.search(row[None], k, exclude=excl)
                pairs = list(zip(i[0].tolist(), s[0].tolist()))
            results.append([(ids[j], float(sc)) for j, sc in pairs])
        return results

    def _index(self, state: _State, rows: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
        key = (self._key, state.embeddings_sha256)
        if self._index_cache is not None and self._index_cache[0] == key:
            return self._index_cache[1:]  # type: ignore[return-value]
        from .retrieval import InnerProductIndex

        finite = np.isfinite(rows).all(axis=1) if rows.size else np.ones(len(state.entries), dtype=bool)
        usable = np.array([n for n, e in enumerate(state.entries) if e.usable and finite[n]], dtype=np.int64)
        dim = state.embedding_dim or (rows.shape[1] if rows.ndim == 2 else 0)
        index = InnerProductIndex(rows[usable] if len(usable) else np.zeros((0, dim), np.float32))
        cases = np.array([state.entries[n].case_id for n in usable], dtype=object)
        self._index_cache = (key, index, usable, cases)
        return index, usable, cases

    # ---------------------------------------------------------------- memory caches
    def memory_cache_dir(self, sam2_identity: str, create: bool = True) -> Path:
        """Folder for the SAM 2 memory cache of `sam2_identity`.

        Inside the bank (`memories/<slug>-<hash8>/`, recorded in bank.json) when the bank is
        writable; otherwise (read-only folder or file system, another user's bank) a per-user
        folder `<user cache>/memories/<bank id>-r<revision>/<slug>-<hash8>/`, so that reading a
        bank never needs write access to it. With create=False, the in-bank path, untouched.
        """
        if not isinstance(sam2_identity, str) or not sam2_identity:
            raise ValueError(f"sam2_identity must be a non-empty string, got {sam2_identity!r}")
        name = memory_cache_name(sam2_identity)
        d = self.path / MEMORIES_DIR / name
        check_no_links(self.path, d)  # a linked memories/ would receive (and lose) files elsewhere
        if not create:
            return d
        if self.writable():
            try:
                d.mkdir(parents=True, exist_ok=True)
                check_no_links(self.path, d)
                if sam2_identity not in self._current().sam2:
                    with self._transaction() as state:
                        if sam2_identity not in state.sam2:
                            state.sam2.append(sam2_identity)
                            self._commit(state)
                return d
            except UnsafeLinkError:
                raise
            except (BankReadOnlyError, PermissionError) as e:
                _ = e  # not writable after all: use the per-user cache below
            except OSError as e:
                if e.errno != errno.EROFS:
                    raise
        return self._user_memory_dir(name)

    def _user_memory_dir(self, name: str) -> Path:
        """Per-user memory cache folder for this bank's id and revision (older revisions pruned)."""
        from .memory import user_cache_root

        root = user_cache_root() / MEMORIES_DIR
        this = f"{_sanitise(self.bank_id, 64)}-r{self.revision}"
        with contextlib.suppress(OSError):
            for old in root.iterdir():
                if old.name.startswith(this.rsplit("-r", 1)[0] + "-r") and old.name != this:
                    if not is_link(old) and old.is_dir():
                        shutil.rmtree(old, ignore_errors=True)
        return root / this / name

    # ---------------------------------------------------------------- embeddings
    def _embed_entries(
        self,
        entries: Sequence[BankEntry],
        labels: Sequence[LabelInfo],
        embedder: Embedder,
        progress: Callable[[int, int], None] | None = None,
        batch: int = 64,
    ) -> dict[str, np.ndarray]:
        """Embeddings of readable entries by id (entries marked damaged are skipped)."""
        todo = [e for e in entries if e.damaged is None]
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            images = [self._load(e, labels).image for e in chunk]
            rows = np.asarray(embedder.embed(images), dtype=np.float32)
            if rows.shape != (len(chunk), embedder.dim):
                raise ValueError(f"embedder {embedder.identity} returned shape {rows.shape} for {len(chunk)} slices")
            bad = [e.id for e, r in zip(chunk, rows) if not np.isfinite(r).all()]
            if bad:
                raise ValueError(
                    f"embedder {embedder.identity} returned non-finite values (NaN or Inf) for entries "
                    f"{bad[:5]}{' ...' if len(bad) > 5 else ''}; nothing was written. Check the model "
                    "(weights, device, precision) and retry"
                )
            out.update({e.id: r for e, r in zip(chunk, rows)})
            if progress is not None:
                progress(min(start + batch, len(todo)), len(todo))
        return out

    def _rows_for(self, state: _State, vectors: Mapping[str, np.ndarray], dim: int) -> np.ndarray:
        rows = np.zeros((len(state.entries), dim), dtype=np.float32)  # damaged entries: zero rows
        for n, e in enumerate(state.entries):
            if e.id in vectors:
                rows[n] = vectors[e.id]
        return rows

    def reembed(self, embedder: Embedder, progress: Callable[[int, int], None] | None = None) -> None:
        """Recompute every embedding with `embedder` and adopt its identity."""
        snapshot = self._current()
        # The slow part runs without the lock; entries added meanwhile are embedded under it.
        vectors = self._embed_entries(snapshot.entries, snapshot.labels, embedder, progress)
        with self._transaction() as state:
            self._apply_reembed(state, embedder, vectors)
            self._commit(state)

    def _apply_reembed(self, state: _State, embedder: Embedder, vectors: dict[str, np.ndarray]) -> None:
        new = [e for e in state.entries if e.id not in vectors and e.damaged is None]
        if new:
            vectors.update(self._embed_entries(new, state.labels, embedder))
        self._write_embeddings(state, self._rows_for(state, vectors, int(embedder.dim)))
        state.embedding_dim = int(embedder.dim)
        state.dinov2 = embedder.identity

    # ---------------------------------------------------------------- verify
    def verify(
        self,
        embedder: EmbedderSource | None = None,
        repair: bool = False,
        reembed: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> VerifyReport:
        """Check every file against bank.json; with `repair`, rebuild what is rebuildable.

        Repair removes temp files, marks damaged entries (never drops them), trims or rebuilds
        embeddings.npy (rebuilding needs `embedder`, or a zero-argument callable that makes one),
        deletes a stale index.faiss and the SAM 2 memory caches. `reembed` re-embeds everything
        with `embedder` (implies repair).
        """
        if reembed:
            repair = True
            if embedder is None:
                raise ValueError("reembed needs an embedder")
        if not repair:
            return self._check(self._current(), embedder if _is_embedder(embedder) else None)
        with self._transaction() as state:
            found = self._check(state, None)
            actions: list[str] = []
            for t in found.temp_files:
                if self._remove_rebuildable(self.path / t):
                    actions.append(f"removed leftover temp file {t}")
            damaged = {e: "missing file" for e in found.missing}
            damaged.update(found.corrupt)
            for n, e in enumerate(state.entries):
                reason = damaged.get(e.id)
                if reason is not None and e.damaged != reason:
                    state.entries[n] = replace(e, damaged=reason)
                    actions.append(f"marked entry {e.id} damaged ({reason}); it is kept but not retrieved")
                elif reason is None and e.damaged is not None:
                    state.entries[n] = replace(e, damaged=None)
                    actions.append(f"entry {e.id} is readable again: cleared its damaged mark")
            kind = self._embeddings_status(state)[1] if state.entries else None
            needs_embedder = False
            if reembed:
                emb = _resolve_embedder(embedder)
                vectors = self._embed_entries(state.entries, state.labels, emb, progress)
                old = state.dinov2
                self._apply_reembed(state, emb, vectors)
                actions.append(f"re-embedded {len(vectors)} entries with {emb.identity} (was {old})")
            elif kind == "extra":
                rows = self._embeddings_status(state)[0]
                self._write_embeddings(state, rows)  # type: ignore[arg-type]
                actions.append(f"trimmed extra rows from {EMBEDDINGS_FILE}")
            elif kind is not None:
                if embedder is None:
                    needs_embedder = True  # reported below as a remaining problem
                else:
                    emb = _resolve_embedder(embedder)
                    self.check_models(emb.identity)
                    vectors = self._embed_entries(state.entries, state.labels, emb, progress)
                    self._write_embeddings(state, self._rows_for(state, vectors, int(emb.dim)))
                    state.embedding_dim = int(emb.dim)
                    actions.append(f"rebuilt {EMBEDDINGS_FILE} from the entry files with {emb.identity}")
            index_file = self.path / INDEX_FILE
            if index_file.exists() and not found.links and (found.index_problem or reembed or kind is not None):
                if self._remove_rebuildable(index_file):
                    actions.append(f"removed stale {INDEX_FILE} (the index is rebuilt in memory)")
            mem = self.path / MEMORIES_DIR
            for name in found.memory_caches:
                if self._remove_rebuildable(mem / name):
                    actions.append(f"deleted SAM 2 memory cache {MEMORIES_DIR}/{name} (rebuilt on next use)")
            state.sam2 = [s for s in state.sam2 if (mem / memory_cache_name(s)).exists()]
            self._commit(state)
            report = self._check(self._current(), embedder if _is_embedder(embedder) else None)
            report.actions = actions
            report.found_before_repair = found.problems + found.notes
            if needs_embedder:
                report.problems.append(
                    f"{EMBEDDINGS_FILE} needs rebuilding and no embedder was given: run "
                    f"`rseg bank verify {self.path} --repair` with the bank's DINOv2 model"
                )
            return report

    def _remove_rebuildable(self, p: Path) -> bool:
        """Delete a temp file, stale index or memory cache folder inside the bank, never via a link.

        Every component from the bank folder down is checked with lstat; a link anywhere on the
        way is left alone (verify reports it). rmtree itself does not follow links inside the
        folder where the platform allows (`shutil.rmtree.avoids_symlink_attacks`).
        """
        try:
            check_no_links(self.path, p)
            st = os.lstat(p)
        except OSError:
            return False
        try:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        except OSError:
            return False
        return True

    def _links(self) -> list[str]:
        """Paths (relative to the bank) of links inside the bank, found with lstat only."""
        found: list[str] = []
        for folder in (self.path, self.path / ENTRIES_DIR, self.path / MEMORIES_DIR):
            if folder != self.path and (is_link(folder) or not folder.is_dir()):
                continue
            try:
                children = sorted(folder.iterdir())
            except OSError:
                continue
            for p in children:
                if is_link(p):
                    found.append(p.relative_to(self.path).as_posix())
                elif folder.name == MEMORIES_DIR and folder != self.path and p.is_dir():
                    with contextlib.suppress(OSError):
                        found += [c.relative_to(self.path).as_posix() for c in sorted(p.iterdir()) if is_link(c)]
        return found

    def _check(self, state: _State, embedder: Embedder | None) -> VerifyReport:
        report = VerifyReport(self.path, entries_checked=len(state.entries))
        report.links = self._links()
        for rel in report.links:
            try:
                target = f" (to {os.readlink(self.path / rel)})"
            except OSError:
                target = ""
            report.problems.append(
                f"{rel} is a link{target}: RetrievalSeg never follows a link inside a bank (nothing "
                "outside it is read, written or deleted through it). Replace the link with the real "
                "file or folder"
            )
        for e in state.entries:
            try:
                self._load(e, state.labels)
                problem = None
            except BankCorruptError as err:
                problem = err
            where = f"entry {e.id} (case {e.case_id}, {AXIS_NAMES[e.axis]}={e.index}, {e.status})"
            if problem is None:
                if e.damaged is not None:
                    report.problems.append(
                        f"{where} is marked damaged but its file is fine now: "
                        f"`rseg bank verify {self.path} --repair` clears the mark"
                    )
                continue
            if problem.missing:
                report.missing.append(e.id)
                reason = f"missing {e.file_name}"
            else:
                report.corrupt[e.id] = str(problem)
                reason = str(problem)
            if e.retired:
                report.notes.append(f"retired {where}: {reason}")
            elif e.damaged is not None:
                report.problems.append(
                    f"{where} is damaged ({reason}); it is not retrieved. Restore the file from a "
                    f"backup, or retire it with `rseg bank remove {self.path} {e.id}`"
                )
            else:
                report.problems.append(f"{where}: {reason}")
        _, kind, message = self._embeddings_status(state)
        if kind == "extra":
            report.notes.append(str(message))
        elif kind is not None:
            report.embeddings_problem = message
            report.problems.append(str(message))
        if embedder is not None and embedder.identity != state.dinov2:
            report.model_problem = (
                f"support bank was made with {state.dinov2}, the given embedder is "
                f"{embedder.identity}: re-embed it with {_reembed_hint(self.path, embedder.identity)}"
            )
            report.problems.append(report.model_problem)
        index_file = self.path / INDEX_FILE
        if index_file.exists() and not is_link(index_file):
            try:
                import faiss

                ntotal = faiss.read_index(str(index_file)).ntotal
                if ntotal != len(state.entries):
                    report.index_problem = f"{INDEX_FILE} has {ntotal} rows, bank.json lists {len(state.entries)}"
            except Exception as e:  # noqa: BLE001
                report.index_problem = f"{INDEX_FILE} cannot be read ({e})"
            if report.index_problem:
                report.problems.append(report.index_problem + "; `verify --repair` removes it")
        ids = {e.id for e in state.entries}
        for folder in (self.path, self.path / ENTRIES_DIR, self.path / MEMORIES_DIR):
            if folder.is_dir() and not is_link(folder):
                for p in sorted(folder.iterdir()):
                    rel = p.relative_to(self.path).as_posix()
                    if p.name.startswith(TMP_PREFIX):
                        report.temp_files.append(rel)
                    elif folder.name == ENTRIES_DIR and p.suffix == ".npz" and p.stem not in ids:
                        report.orphan_files.append(rel)
        if report.temp_files:
            report.notes.append(
                f"{len(report.temp_files)} leftover temp file(s) from interrupted writes (ignored; "
                "verify --repair removes them)"
            )
        if report.orphan_files:
            report.notes.append(
                f"{len(report.orphan_files)} entry file(s) not listed in bank.json (from interrupted "
                f"adds; never part of the bank; kept): {', '.join(report.orphan_files[:5])}"
            )
        mem = self.path / MEMORIES_DIR
        if mem.is_dir() and not is_link(mem):
            report.memory_caches = sorted(
                p.name for p in mem.iterdir() if p.is_dir() and not is_link(p) and not p.name.startswith(TMP_PREFIX)
            )
            self._check_memory_files(report)
        return report

    def _check_memory_files(self, report: VerifyReport) -> None:
        """Every cached memory must match its content hash, model identity and entry key."""
        from .memory import FORMAT_VERSION, _split, inspect_memory_file, sanitize

        mem = self.path / MEMORIES_DIR
        stale = 0
        for name in report.memory_caches:
            folder = mem / name
            try:
                identity = json.loads(read_bytes(folder / "identity.json", self.path)).get("identity")
            except (OSError, ValueError, AttributeError):
                identity = None
            for f in sorted(folder.glob("*.safetensors")):
                if is_link(f):
                    continue  # reported as a link
                rel = f.relative_to(self.path).as_posix()
                try:
                    data = read_bytes(f, self.path)
                    meta = _split(data)[0].get("__metadata__") or {}
                except (OSError, ValueError, UnicodeDecodeError) as e:
                    why: str | None = f"unreadable ({e})"
                else:
                    if meta.get("format") != str(FORMAT_VERSION):
                        stale += 1  # an older RetrievalSeg's file: recomputed on use, never trusted
                        continue
                    why = inspect_memory_file(data, identity)
                    if why is None and sanitize(str(meta.get("key"))) != f.stem:
                        why = f"computed for entry {meta.get('key')!r}, but named {f.name}"
                if why is not None:
                    report.memory_problems.append(rel)
                    report.problems.append(
                        f"memory cache file {rel}: {why}; it is not used (segment recomputes it). "
                        f"`rseg bank verify {self.path} --repair` deletes the caches (rebuilt on use)"
                    )
        if stale:
            report.notes.append(
                f"{stale} memory cache file(s) from an older RetrievalSeg without a content hash: "
                "recomputed on use (verify --repair deletes them)"
            )

    # ---------------------------------------------------------------- export / import
    def _export_files(self, lock_free: bool = False) -> list[tuple[str, bytes]]:
        """(archive name, bytes) of bank.json, embeddings.npy and entry files, consistent.

        Under the lock nothing changes meanwhile. Lock-free (read-only bank), entry files are
        immutable and checked by their SHA-256, and embeddings.npy is checked against the
        bank.json read first (re-read when a writer replaced both in between).
        """
        for attempt in range(5):
            state, _, raw = _read_state(self.path)
            files: list[tuple[str, bytes]] = [(BANK_FILE, raw)]
            emb = self.path / EMBEDDINGS_FILE
            if emb.is_file() or is_link(emb):
                data = read_bytes(emb, self.path)
                if lock_free and state.embeddings_sha256 is not None and attempt < 4:
                    try:
                        rows = np.load(io.BytesIO(data), allow_pickle=False)[: len(state.entries)]
                        if _rows_sha256(rows) != state.embeddings_sha256:
                            continue
                    except Exception:  # noqa: BLE001 - exported as is; verify on import judges it
                        pass
                files.append((EMBEDDINGS_FILE, data))
            for e in state.entries:
                f = self.path / ENTRIES_DIR / f"{e.id}.npz"
                if e.damaged is not None:
                    if f.is_file() and not is_link(f):
                        files.append((e.file_name, read_bytes(f, self.path)))
                    continue
                try:
                    data = read_bytes(f, self.path)
                except FileNotFoundError:
                    data = b""
                if _sha256(data) != e.sha256:
                    raise BankCorruptError(
                        f"cannot export {self.path}: entry file {f} is missing or altered; run "
                        f"`rseg bank verify {self.path} --repair` first (it marks damaged entries)",
                        f,
                    )
                files.append((e.file_name, data))
            return files
        raise BankError(f"cannot export {self.path}: it kept changing while being read; retry")

    def export(self, archive_path: str | os.PathLike[str]) -> Path:
        """Write the bank (bank.json, embeddings, entry files; no caches) to one .zip or .tar.gz."""
        archive = Path(archive_path)
        fmt = _archive_format(archive)
        if archive.resolve().is_relative_to(self.path.resolve()):
            raise ValueError(f"export to a file outside the bank folder, not {archive}")
        try:
            with self.locked():
                files = self._export_files()
        except BankReadOnlyError:
            files = self._export_files(lock_free=True)  # a read-only bank has no writer to wait for
        archive.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=archive.parent, prefix=TMP_PREFIX, suffix="-" + archive.name)
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, default_file_mode())  # mkstemp makes 0600; the umask decides
            with os.fdopen(fd, "wb") as fh:
                if fmt == "zip":
                    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                        for name, data in files:
                            zf.writestr(name, data)
                else:
                    with tarfile.open(fileobj=fh, mode="w:gz") as tf:
                        for name, data in files:
                            info = tarfile.TarInfo(name)
                            info.size = len(data)
                            info.mtime = int(time.time())
                            info.mode = 0o644
                            tf.addfile(info, io.BytesIO(data))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, archive)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return archive

    @classmethod
    def import_archive(
        cls,
        archive_path: str | os.PathLike[str],
        dest: str | os.PathLike[str],
        lock_timeout: float | None = None,
    ) -> "SupportBank":
        """Unpack an exported bank into `dest` (new or empty), safely, and verify it.

        Only what bank.json lists is written (bank.json, embeddings.npy, entries/<id>.npz of its
        entries); every member's size is capped by what that bank needs and checked before and
        while it is written, and the member count is capped, so an archive bomb writes nothing.
        Caches and index.faiss are rebuildable and never imported.
        """
        archive, target = Path(archive_path), Path(dest)
        if not archive.is_file():
            raise FileNotFoundError(f"no such archive: {archive}")
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise FileExistsError(
                f"cannot import into {target}: it exists and is not an empty folder; choose a new folder"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=TMP_PREFIX + "import-"))
        try:
            tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the umask decides
            _safe_extract(archive, tmp)
            (tmp / ENTRIES_DIR).mkdir(exist_ok=True)
            (tmp / MEMORIES_DIR).mkdir(exist_ok=True)
            bank = cls(tmp, lock_timeout)
            report = bank.verify()
            state = bank._current()
            marked = {e.id for e in state.entries if e.damaged is not None}
            fatal = [i for i in report.damaged if i not in marked]
            kind = bank._embeddings_status(state)[1] if state.entries else None
            if fatal or kind not in (None, "extra"):
                details = []
                if fatal:
                    details.append(
                        f"damaged entries {fatal[:5]}{' ...' if len(fatal) > 5 else ''}: their files "
                        "are missing or do not match their checksums"
                    )
                if kind not in (None, "extra"):
                    details.append(f"its {EMBEDDINGS_FILE} {_EMBEDDINGS_PROBLEMS.get(str(kind), 'is unusable')}")
                raise BankCorruptError(
                    f"archive {archive} holds a damaged support bank ({'; '.join(details)}); nothing "
                    f"was imported into {target}. Export the bank again from its original folder "
                    "(if `rseg bank verify` reports problems there, run `rseg bank verify --repair` "
                    "there first), or restore the archive from a backup"
                )
            with contextlib.suppress(FileNotFoundError):
                target.rmdir()
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(target, lock_timeout)


_EMBEDDINGS_PROBLEMS = {
    "missing": "is missing",
    "unreadable": "cannot be read",
    "short": "has fewer rows than bank.json lists entries",
    "dim": "rows have another length than bank.json says",
    "sha": "does not match the checksum in bank.json",
    "nonfinite": "holds NaN or Inf values",
    "link": "is a link",
}


# ----------------------------------------------------------------------------- helpers
def _is_embedder(obj: Any) -> bool:
    return obj is not None and hasattr(obj, "embed") and hasattr(obj, "identity")


def _resolve_embedder(source: EmbedderSource | None) -> Embedder:
    if source is None:
        raise ValueError("this repair needs an embedder")
    if _is_embedder(source):
        return source  # type: ignore[return-value]
    emb = source()  # type: ignore[operator]
    if not _is_embedder(emb):
        raise TypeError(f"the embedder factory returned {emb!r}, not an embedder")
    return emb


def _archive_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    raise ValueError(f"archive name must end in .zip, .tar.gz or .tgz, got {path.name!r}")


def _member_target(name: str, archive: Path) -> str:
    """Normalised member name; BankCorruptError for absolute paths, '..' or backslashes."""
    if "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise BankCorruptError(f"archive {archive} has an unsafe member name {name!r} (absolute path); refusing it")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise BankCorruptError(f"archive {archive} has an unsafe member name {name!r} ('..'); refusing it")
    return "/".join(p for p in parts if p not in (".", ""))


def _entry_cap(e: BankEntry, n_labels: int) -> int:
    """Most bytes an entry file of this shape can need (uint8 image, <= 8-byte intensities, masks)."""
    h, w = e.shape
    return int(h) * int(w) * (1 + 8 + n_labels) + _ENTRY_SLACK_BYTES


def _safe_extract(archive: Path, dest: Path) -> list[str]:
    """Extract only the files bank.json lists (optionally under one top folder), size-capped.

    Refuses unsafe names, links and special files, more than MAX_ARCHIVE_MEMBERS members, and any
    listed member larger than what its bank needs; checked on the declared size before writing
    and on the bytes actually written. Everything else in the archive is ignored.
    """
    members: dict[str, tuple[int, Callable[[], Any]]] = {}
    count = 0

    def add(name: str, size: int, opener: Callable[[], Any]) -> None:
        if name in members:
            raise BankCorruptError(f"archive {archive} holds {name!r} twice; refusing it")
        members[name] = (size, opener)

    if zipfile.is_zipfile(archive):
        zf: Any = zipfile.ZipFile(archive)
        infos = zf.infolist()
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            zf.close()
            raise BankCorruptError(
                f"archive {archive} has {len(infos)} members, more than the {MAX_ARCHIVE_MEMBERS} a "
                "support bank export can hold; refusing it"
            )
        for info in infos:
            name = _member_target(info.filename, archive)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BankCorruptError(f"archive {archive} member {info.filename!r} is a link; refusing it")
            if not info.is_dir():
                add(name, info.file_size, lambda info=info: zf.open(info))
    elif tarfile.is_tarfile(archive):
        zf = tarfile.open(archive, "r:*")
        for ti in zf:
            count += 1
            if count > MAX_ARCHIVE_MEMBERS:
                zf.close()
                raise BankCorruptError(
                    f"archive {archive} has more than {MAX_ARCHIVE_MEMBERS} members, more than a "
                    "support bank export can hold; refusing it"
                )
            name = _member_target(ti.name, archive)
            if ti.issym() or ti.islnk():
                raise BankCorruptError(f"archive {archive} member {ti.name!r} is a link; refusing it")
            if ti.isfile():
                add(name, ti.size, lambda ti=ti: zf.extractfile(ti))
            elif not ti.isdir():
                raise BankCorruptError(f"archive {archive} member {ti.name!r} is not a plain file; refusing it")
    else:
        raise BankCorruptError(f"{archive} is neither a zip nor a tar archive")
    try:
        prefix = ""
        if BANK_FILE not in members:
            tops = [n[: -len(BANK_FILE)] for n in members if n.endswith("/" + BANK_FILE) and n.count("/") == 1]
            if len(tops) != 1:
                raise BankCorruptError(f"archive {archive} holds no {BANK_FILE}: it is not a support bank export")
            prefix = tops[0]
        raw = _read_member(archive, prefix + BANK_FILE, *members[prefix + BANK_FILE], MAX_BANK_JSON_BYTES)
        shown = archive / BANK_FILE  # messages name the member inside the archive
        try:
            state = _state_from_json(json.loads(raw.decode("utf-8")), shown)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BankCorruptError(f"{shown} is not valid JSON ({e}); refusing the archive", shown) from e
        labels = len(state.labels)
        wanted: dict[str, int] = {e.file_name: _entry_cap(e, labels) for e in state.entries}
        dim = state.embedding_dim or 0
        wanted[EMBEDDINGS_FILE] = (len(state.entries) + 4096) * max(dim, 1) * 4 + _ENTRY_SLACK_BYTES
        for rel, cap in wanted.items():  # every declared size first: nothing is written for a bomb
            if prefix + rel in members and members[prefix + rel][0] > cap:
                raise BankCorruptError(
                    f"archive {archive} member {prefix + rel!r} declares {members[prefix + rel][0]} bytes, "
                    f"more than the {cap} bytes this bank can need; refusing the archive (nothing was written)"
                )
        (dest / BANK_FILE).write_bytes(raw)
        written = [BANK_FILE]
        for rel, cap in wanted.items():
            if prefix + rel not in members:
                continue  # verify reports a missing entry file or embeddings
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(_read_member(archive, prefix + rel, *members[prefix + rel], cap))
            written.append(rel)
        return written
    finally:
        zf.close()


def _read_member(archive: Path, name: str, size: int, opener: Callable[[], Any], cap: int) -> bytes:
    """The bytes of one member, refusing more than `cap` (declared or actually decompressed)."""
    if size > cap:
        raise BankCorruptError(
            f"archive {archive} member {name!r} declares {size} bytes, more than the {cap} bytes it "
            "can need; refusing the archive (nothing was written)"
        )
    with opener() as src:
        data = src.read(cap + 1)
    if len(data) > cap:
        raise BankCorruptError(
            f"archive {archive} member {name!r} unpacks to more than the {cap} bytes it can need; "
            "refusing the archive"
        )
    return data
