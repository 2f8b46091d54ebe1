"""Support bank export / import: archives written from a consistent snapshot, imported safely
(member and size caps, only what bank.json lists, verified before it appears)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, TypeVar

import numpy as np

from .format import (
    BANK_FILE,
    DB_FILE,
    SCHEMA_VERSION,
    _npy_bytes,
    EMBEDDINGS_FILE,
    ENTRIES_DIR,
    LOCK_FILE,
    BankCorruptError,
    BankEntry,
    BankError,
    BankReadOnlyError,
    _rows_sha256,
    _sha256,
    _state_from_json,
    feature_file,
)
from ..engine.memory_cache import MEMORIES_DIR
from .storage import _read_state
from .verify import BankVerify
from ..data.fileio import TMP_PREFIX, current_umask, default_file_mode, is_link, read_bytes


#: Import limits: an archive may not make the importer write (or hold) more than a bank needs.
MAX_ARCHIVE_MEMBERS = 200_000  # a bank of 100k slices has about 100k members
MAX_BANK_JSON_BYTES = 256 * 2**20
_ENTRY_SLACK_BYTES = 2**20  # npz headers and compression overhead beyond the raw arrays

_Bank = TypeVar("_Bank", bound="BankTransfer")


class BankTransfer(BankVerify):
    """Export to and import from .zip / .tar.gz archives (an import is verified before it appears)."""

    # ---------------------------------------------------------------- export / import
    def _export_files(self, lock_free: bool = False) -> list[tuple[str, bytes]]:
        """(archive name, bytes) of bank.json, embeddings.npy and entry files, consistent.

        Under the lock nothing changes meanwhile. Lock-free (read-only bank), entry files are
        immutable and checked by their SHA-256, and embeddings.npy is checked against the
        bank.json read first (re-read when a writer replaced both in between).
        """
        for attempt in range(5):
            state, _, raw = _read_state(self.path, self if self._state.schema == SCHEMA_VERSION else None)
            files: list[tuple[str, bytes]] = [(BANK_FILE, raw)]
            emb = self.path / EMBEDDINGS_FILE
            if state.schema == SCHEMA_VERSION:
                # The archive keeps the schema-1 layout (bank.json + embeddings.npy + entries/):
                # every RetrievalSeg version imports it, and import writes the current schema.
                rows, kind, message = self._embeddings_status(state)
                if rows is None:
                    raise BankCorruptError(
                        f"cannot export {self.path}: {message}; run `rseg bank verify {self.path} "
                        "--repair` first", self.path / DB_FILE,
                    )
                if self._probe() != ("db", state.revision) and attempt < 4:
                    continue  # a writer committed between the two reads: take a new snapshot
                rows = np.ascontiguousarray(rows, np.float32)
                state.embeddings_sha256 = _rows_sha256(rows)
                more: list[tuple[str, bytes]] = []  # further retrieval features: one .npy each, listed in bank.json
                for feature in state.features:
                    frows, _, fmessage = self._feature_rows_status(state, feature)
                    if frows is None:
                        raise BankCorruptError(f"cannot export {self.path}: {fmessage}", self.path / DB_FILE)
                    frows = np.ascontiguousarray(frows, np.float32)
                    state.features_sha256[feature] = _rows_sha256(frows)
                    more.append((feature_file(feature), _npy_bytes(frows)))
                if self._probe() != ("db", state.revision) and attempt < 4:
                    continue
                files = [(BANK_FILE, json.dumps(state.to_json(), indent=1).encode("utf-8")),
                         (EMBEDDINGS_FILE, _npy_bytes(rows))] + more
            elif emb.is_file() or is_link(emb):
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
        for name, _ in files:  # names come from bank.db: never a member that unpacks elsewhere
            if not _inside_archive_root(name):
                raise BankCorruptError(
                    f"cannot export {self.path}: the member name {name!r} would lie outside the archive's root "
                    f"(an entry id that is a path?); nothing was written. Check the bank with `rseg bank "
                    f"verify {self.path}`", self.path / DB_FILE,
                )
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
        cls: type[_Bank],
        archive_path: str | os.PathLike[str],
        dest: str | os.PathLike[str],
        lock_timeout: float | None = None,
    ) -> _Bank:
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
            from .upgrade import upgrade_locked

            with bank.locked():
                try:
                    upgrade_locked(bank, backup=False)  # the archive's layout -> the current schema
                except BankCorruptError as e:  # (a further feature's rows that fail their check)
                    raise BankCorruptError(f"archive {archive} holds a damaged support bank ({e}); nothing was "
                                           f"imported into {target}. Export the bank again from its original folder",
                                           e.path) from e
            bank.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp / LOCK_FILE)
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


def _archive_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    raise ValueError(f"archive name must end in .zip, .tar.gz or .tgz, got {path.name!r}")


def _inside_archive_root(name: str) -> bool:
    """A relative POSIX name with no empty, '.' or '..' part, no backslash and no drive letter."""
    return (bool(name) and "\\" not in name and not name.startswith("/") and not re.match(r"^[A-Za-z]:", name)
            and all(part not in ("", ".", "..") for part in name.split("/")))


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
        for feature in state.features:  # at most twice the primary's width (cls+mean)
            wanted[feature_file(feature)] = (len(state.entries) + 4096) * max(dim, 1) * 8 + _ENTRY_SLACK_BYTES
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
