"""The support bank: annotated slices, their DINOv2 embeddings and SAM 2 memory caches, on disk.

A bank is a clinician's accumulated work, so it is handled like a small database (format:
docs/BANK_FORMAT.md):

* The index (entries, labels, models, embeddings, provenance) is one SQLite database,
  `bank.db`, in WAL mode (schema 2). Every change is one transaction that writes only what
  changed, after the entry files it references (written atomically: temp file, fsync,
  `os.replace`), so a writer killed at any point leaves the previous revision, whole.
* Every mutating operation holds an OS-level exclusive lock on `<bank>/.lock` for its whole
  read-modify-write (entry files + transaction) and takes the latest revision after taking it,
  so concurrent writers all land. Readers take no lock and are never blocked (WAL snapshots).
* Nothing is deleted behind the user's back: a correction retires (not deletes) the entry it
  replaces, `remove` retires, `verify --repair` marks damaged entries instead of dropping them.
  Only rebuildable data (embeddings, memory caches, temp files) is ever rebuilt or deleted.
* Banks of schema 1 (bank.json + embeddings.npy) are read as they are and upgraded on their
  first change, with a backup beside the index (`bank.upgrade`, `rseg bank upgrade`).

The code lives in one module per job; `SupportBank` is the facade that joins them, and this
module re-exports the public names (import them from here):

* `format`        schema constants, errors, `LabelInfo`/`BankEntry`/state, (de)serialisation,
                  `same_subject`
* `storage`       the writer lock, snapshots per revision, entry files, commits, memory cache
                  folders (`BankStore`, the base of every job below)
* `db`            the SQLite index (schema 2), checked by `schema` before any query; `upgrade`
                  schema 1 -> 2
* `edit`          adding slices and volumes, retiring and restoring (`BankEditing`)
* `search`        nearest-neighbour search and case policies (`BankSearch`)
* `verify`        verify, repair, re-embed (`BankVerify`)
* `transfer`      export and import archives, verified on import (`BankTransfer`)
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Sequence

from .edit import BankEditing
from .format import (
    BANK_FILE,
    CASE_POLICIES,
    DB_FILE,
    EMBEDDINGS_FILE,
    ENTRIES_DIR,
    ENV_LOCK_TIMEOUT,
    DEFAULT_LOCK_TIMEOUT,
    INDEX_FILE,
    LOCK_FILE,
    ORIGINS,
    RETIRED_BY_USER,
    SCHEMA_VERSION,
    SUBJECT_SEPARATORS,
    BankCorruptError,
    BankEntry,
    BankError,
    BankLockTimeout,
    BankModelMismatchError,
    BankNotFoundError,
    BankReadOnlyError,
    BankSchemaError,
    BlankSliceWarning,
    Embedder,
    EmbedderSource,
    EntryData,
    LabelInfo,
    UnknownEntryError,
    VerifyReport,
    _now,
    _State,
    same_subject,
)
from ..engine.memory_cache import MEMORIES_DIR, memory_cache_name
from .search import BankSearch
from .storage import FILELOCK_MINIMUM, BankStore
from .transfer import MAX_ARCHIVE_MEMBERS, MAX_BANK_JSON_BYTES, BankTransfer
from .verify import BankVerify
from .upgrade import upgrade, write_new_bank

__all__ = [
    "BANK_FILE", "CASE_POLICIES", "DB_FILE", "DEFAULT_LOCK_TIMEOUT", "EMBEDDINGS_FILE", "ENTRIES_DIR",
    "ENV_LOCK_TIMEOUT", "FILELOCK_MINIMUM", "INDEX_FILE", "LOCK_FILE", "MAX_ARCHIVE_MEMBERS",
    "MAX_BANK_JSON_BYTES", "MEMORIES_DIR", "ORIGINS", "RETIRED_BY_USER", "SCHEMA_VERSION",
    "SUBJECT_SEPARATORS", "BankCorruptError", "BankEditing", "BankEntry", "BankError",
    "BankLockTimeout", "BankModelMismatchError", "BankNotFoundError", "BankReadOnlyError",
    "BankSchemaError", "BankSearch", "BankStore", "BankTransfer", "BankVerify", "BlankSliceWarning",
    "Embedder", "EmbedderSource", "EntryData", "LabelInfo", "SupportBank", "UnknownEntryError",
    "VerifyReport", "memory_cache_name", "same_subject",
]


# ----------------------------------------------------------------------------- the bank
class SupportBank(BankTransfer, BankSearch, BankEditing):
    """A support bank folder: open with `SupportBank.open`, make with `SupportBank.create`."""

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
        write_new_bank(p, state)
        return cls(p, lock_timeout)

    @classmethod
    def open(cls, path: str | os.PathLike[str], lock_timeout: float | None = None) -> "SupportBank":
        """Open an existing bank (clear errors for a missing folder, bad bank.json, newer schema)."""
        return cls(Path(path), lock_timeout)

    def upgrade(self) -> Path | None:
        """Upgrade a schema-1 bank to schema 2 (SQLite); the backup folder, None if already 2.

        Also happens automatically on the first change; refused (with this command) on a bank
        that is read-only for the user.
        """
        return upgrade(self)

