"""Durable, link-safe file writes and reads shared by the bank, the memory cache and the downloader.

Rules (docs/BANK_FORMAT.md, "Links, permissions, read-only banks"):

* A write goes to a temp file in the same folder, is checked (every byte written, flushed, fsynced,
  size read back) and only then renamed over its name; on any failure the temp file is removed,
  the previous file is untouched and the error names the path and the cause.
* New files get the mode the user's umask gives (0666 & ~umask), like any other program's files,
  so a bank shared by a team stays readable (and writable, with umask 002) by the team.
* Inside a folder that RetrievalSeg owns (a support bank, a memory cache) no link is followed: every
  component below that folder is checked with lstat and files are opened with O_NOFOLLOW.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import threading
import uuid
from pathlib import Path

TMP_PREFIX = ".tmp-"  # leftovers of interrupted writes start with this; readers ignore them
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)
_umask_lock = threading.Lock()


class UnsafeLinkError(OSError):
    """A path inside a folder RetrievalSeg owns is a link: it is never followed."""


def current_umask() -> int:
    """The process umask (read without changing it where the OS allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """Mode of a new file under the current umask (0666 & ~umask)."""
    return 0o666 & ~current_umask()


def is_link(path: Path) -> bool:
    """True for a symbolic link (or a Windows junction), without following it."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISLNK(st.st_mode):
        return True
    isjunction = getattr(os.path, "isjunction", None)
    return bool(isjunction and isjunction(path))


def _link_error(link: Path, what: str) -> UnsafeLinkError:
    try:
        target = f" to {os.readlink(link)}"
    except OSError:
        target = ""
    return UnsafeLinkError(
        errno.ELOOP,
        f"{link} is a link{target}; RetrievalSeg never follows a link inside {what}, so that "
        "nothing outside it is read, overwritten or deleted. Replace the link with the real "
        "file or folder (copy its content in) and retry",
    )


def check_no_links(root: Path, path: Path, what: str = "a support bank") -> None:
    """Refuse (UnsafeLinkError) when a component of `path` below `root`, `path` included, is a link.

    `root` itself may be a link (the user chose where the folder lives); what lies inside it may
    not. Components that do not exist yet are fine (they will be created as real folders).
    """
    root, path = Path(root), Path(path)
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise ValueError(f"{path} is not inside {root}") from None
    cur = root
    for part in rel.parts:
        cur = cur / part
        try:
            os.lstat(cur)
        except FileNotFoundError:
            return
        except NotADirectoryError:
            return
        if is_link(cur):
            raise _link_error(cur, what)


def read_bytes(path: Path, root: Path | None = None, what: str = "a support bank") -> bytes:
    """Bytes of a file, never through a link (below `root`, and the file itself)."""
    path = Path(path)
    if root is not None:
        check_no_links(root, path, what)
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _BINARY)
    except OSError as e:
        if e.errno == errno.ELOOP or is_link(path):
            raise _link_error(path, what) from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        return f.read()


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entry list to disk (POSIX), so a rename inside it survives a crash."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_temp_path(path: Path) -> Path:
    """A fresh temp name beside `path` (same folder, so that os.replace is atomic)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).name)[-80:]
    return Path(path).parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}"


def atomic_write_bytes(path: Path, data: bytes, root: Path | None = None, what: str = "a support bank") -> None:
    """Write `data` to `path` atomically and checked: temp file, fsync, size check, os.replace.

    With `root`, no component of `path` below `root` may be a link. The temp file is created with
    O_EXCL | O_NOFOLLOW and mode 0666 (the umask applies). On failure (disk full, quota, file size
    limit, permissions) an OSError names `path` and the cause; the old file is untouched and the
    temp file removed.
    """
    path = Path(path)
    if root is not None:
        check_no_links(root, path, what)
    tmp = new_temp_path(path)
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, 0o666)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                size = os.fstat(f.fileno()).st_size
            if size != len(data):
                raise OSError(errno.EIO, f"only {size} of {len(data)} bytes reached the disk")
            os.replace(tmp, path)
        except OSError as e:
            raise OSError(
                e.errno, f"cannot write {path}: {e.strerror or e}; the previous file, if any, is unchanged"
            ) from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
