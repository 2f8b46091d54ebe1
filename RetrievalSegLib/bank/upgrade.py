"""Upgrading a schema-1 bank (bank.json + embeddings.npy) to schema 2 (SQLite `bank.db`).

Order, so that a writer killed at any point leaves a bank that opens with every entry:
1. the old bank.json and embeddings.npy are copied into `backup-v1-<time>/` beside the index;
2. `bank.db` is written complete under a temp name, flushed and moved into place (a v1 bank
   ignores it, so a half-done upgrade is simply redone);
3. bank.json is replaced (atomically) by the schema-2 descriptor: from here on the bank is v2;
4. embeddings.npy and a stale index.faiss are removed (their copies are in the backup).
Entry files are not touched: their names and SHA-256 stay the same.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import db as bank_db
from .format import (
    BANK_FILE,
    DB_FILE,
    EMBEDDINGS_FILE,
    INDEX_FILE,
    SCHEMA_VERSION,
    V1_BACKUP_PREFIX,
    V1_SCHEMA,
    BankCorruptError,
    _feature_dim,
    _now,
    _rows_sha256,
    _State,
    _state_from_json,
    feature_file,
)
from ..data.fileio import atomic_write_bytes, check_no_links, is_link, read_bytes


def descriptor_bytes(state: _State) -> bytes:
    """bank.json of a schema-2 bank: what it is and where its index lives (never rewritten)."""
    return json.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "bank_id": state.bank_id,
            "created": state.created,
            "index": DB_FILE,
            "note": "entries, labels, models and embeddings live in bank.db (SQLite); see docs/BANK_FORMAT.md",
        },
        indent=1,
    ).encode("utf-8")


def write_new_bank(path: Path, state: _State) -> None:
    """Files of a new, empty schema-2 bank (database first, then the descriptor)."""
    bank_db.create_db(path, state, None)
    atomic_write_bytes(path / BANK_FILE, descriptor_bytes(state), path)


def upgrade_locked(store: Any, backup: bool = True) -> Path | None:
    """Upgrade the store's bank to schema 2 (caller holds the lock); the backup folder, or None.

    Without `backup` (an import's private temp folder) the old files are simply removed.
    """
    path = store.path
    raw = read_bytes(path / BANK_FILE, path)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BankCorruptError(f"{path / BANK_FILE} is not valid JSON ({e}); nothing was upgraded") from e
    if isinstance(meta, dict) and meta.get("schema_version") == SCHEMA_VERSION:
        return None
    state = _state_from_json(meta, path / BANK_FILE)
    if state.schema != V1_SCHEMA:
        return None
    rows, kind, _ = store._embeddings_status(state)
    emb = path / EMBEDDINGS_FILE
    folder: Path | None = None
    if backup:
        stamp = _now().replace(":", "").replace("-", "").split(".")[0]
        folder = path / f"{V1_BACKUP_PREFIX}{stamp}"
        n = 1
        while folder.exists() or is_link(folder):
            n += 1
            folder = path / f"{V1_BACKUP_PREFIX}{stamp}-{n}"
        check_no_links(path, folder)
        folder.mkdir()
        atomic_write_bytes(folder / BANK_FILE, raw, path)
        if emb.is_file() and not is_link(emb):
            atomic_write_bytes(folder / EMBEDDINGS_FILE, read_bytes(emb, path), path)
    note = f" (backup in {folder.name}/)" if folder is not None else " (import)"
    new = dataclasses.replace(state, schema=SCHEMA_VERSION, revision=state.revision + 1,
                              action=f"upgrade from schema 1{note}")
    if new.bank_id is None:
        new.bank_id = store.bank_id  # keep the id the per-user caches were keyed by
    if rows is not None and len(rows) == len(state.entries):
        good = np.asarray(rows, np.float32)
    else:  # unusable embeddings.npy: no rows; verify --repair rebuilds them from the entry files
        good = np.zeros((0, state.embedding_dim or 0), np.float32)
        _ = kind
    new.all_feature_rows = {f: _feature_rows(path, state, f) for f in state.features}  # (an import's)
    bank_db.create_db(path, new, good)
    atomic_write_bytes(path / BANK_FILE, descriptor_bytes(new), path)
    for stale in (emb, path / INDEX_FILE, *(path / feature_file(f) for f in state.features)):
        with contextlib.suppress(OSError):
            check_no_links(path, stale)
            os.unlink(stale)
    store.close()
    store.reload()
    return folder


def _feature_rows(path: Path, state: _State, feature: str) -> np.ndarray:
    """A further feature's rows from an export archive's .npy, checked (size, SHA-256, finite) or refused."""
    f = path / feature_file(feature)
    want = (len(state.entries), _feature_dim(state, feature) or 0)
    try:
        import io

        rows = np.load(io.BytesIO(read_bytes(f, path)), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem
        raise BankCorruptError(f"{f.name} (the {feature} embeddings) cannot be read ({type(e).__name__}: {e})", f) from e
    if rows.dtype != np.float32 or rows.shape != want or not np.isfinite(rows).all() \
            or _rows_sha256(rows) != state.features_sha256.get(feature):
        raise BankCorruptError(
            f"{f.name} (the {feature} embeddings) holds {rows.dtype} {rows.shape}, expected float32 {want} finite "
            "values matching the SHA-256 in bank.json", f)
    return rows


def upgrade(store: Any) -> Path | None:
    """`rseg bank upgrade`: lock and upgrade; None when the bank already has schema 2."""
    from .format import BankReadOnlyError

    if store._current().schema != V1_SCHEMA:
        return None
    if not store.writable():
        raise BankReadOnlyError(store._v1_read_only_message())
    with store.locked():
        return upgrade_locked(store)
