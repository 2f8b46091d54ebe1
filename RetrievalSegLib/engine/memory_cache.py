"""Cache of SAM 2 support memories: in memory and on disk, keyed by the model's identity.

A support's memory depends only on the support (image + masks) and the SAM 2 model, never on the
query, so it is computed once. On disk each memory is one safetensors file (no pickle) written
atomically. Each file records the model identity and the entry key it was computed for and a
SHA-256 of its tensors (format 2); a file that fails to read, belongs to another model or entry,
or whose tensors do not match the hash is recomputed and rewritten, never trusted. A folder that
cannot be written (no permission, full disk) degrades to memory only, with one warning.

Where the cache lives: never inside the bank (segmenting only reads a bank, so it never changes
its files or its revision). By default a per-user folder `user_memory_dir(bank id, identity)`:
`<user_cache_root()>/memories/<bank id>/<slug>-<hash8>/` (RSEG_CACHE_DIR moves the root), one
folder per bank and SAM 2 identity that every revision of the bank shares, since a memory file is
keyed by its entry's id and content hash; or a folder the caller names (`--cache-dir`).

Size: bounded by a cap in bytes (`RSEG_MEMORY_CACHE_GB`, default 4 GB, or the `max_bytes`
argument), applied separately to the memories held in RAM and to the files on disk; the least
recently used memory is evicted first (on disk: the file least recently read or written). An
evicted memory is recomputed on its next use, from the same support and model: results do not
depend on the cap.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..data.fileio import UnsafeLinkError, atomic_write_bytes, read_bytes

if TYPE_CHECKING:  # torch is imported only when a memory is actually loaded
    from .sam2_memory import SupportMemory

FORMAT_VERSION = 2
ENV_CACHE_DIR = "RSEG_CACHE_DIR"
#: The folder of memory caches under the per-user cache root (and inside banks of older versions).
MEMORIES_DIR = "memories"
ENV_CACHE_GB = "RSEG_MEMORY_CACHE_GB"
DEFAULT_CACHE_GB = 4.0


def memory_cache_cap(value: float | None = None) -> int:
    """The memory cache cap in bytes: `value` GB, else $RSEG_MEMORY_CACHE_GB, else 4 GB."""
    if value is None:
        env = os.environ.get(ENV_CACHE_GB)
        if env:
            try:
                value = float(env)
            except ValueError:
                raise ValueError(f"{ENV_CACHE_GB} must be a size in GB (e.g. 4 or 0.5), got {env!r}") from None
        else:
            value = DEFAULT_CACHE_GB
    if not value >= 0:
        raise ValueError(f"the memory cache cap must be >= 0 GB, got {value!r}")
    return int(float(value) * 2**30)


def memory_nbytes(mem: "SupportMemory") -> int:
    """Bytes a memory holds (its two tensors)."""
    return int(mem.maskmem_features.numel() * mem.maskmem_features.element_size()
               + mem.obj_ptr.numel() * mem.obj_ptr.element_size())
_WHAT = "a memory cache"


def sanitize(name: str) -> str:
    """A file-system safe rendering of an identity or key."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:160]


def user_cache_root() -> Path:
    """RetrievalSeg's per-user cache folder: $RSEG_CACHE_DIR, else $XDG_CACHE_HOME/retrievalseg
    (%LOCALAPPDATA%\\retrievalseg on Windows), else ~/.cache/retrievalseg."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or (os.environ.get("LOCALAPPDATA") if os.name == "nt" else None)
    return (Path(xdg) if xdg else Path.home() / ".cache") / "retrievalseg"


def _sanitise(text: str, limit: int) -> str:
    """A plain folder-name slug of `text` (letters, digits, '.', '_', '-'), at most `limit` long."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:limit]
    return slug or "x"


def memory_cache_name(sam2_identity: str) -> str:
    """Folder name under memories/ for a SAM 2 identity: readable slug plus a short hash."""
    digest = hashlib.sha256(sam2_identity.encode("utf-8")).hexdigest()[:8]
    return f"{_sanitise(sam2_identity, 80)}-{digest}"


def user_memory_dir(bank_id: str, identity: str, create: bool = True) -> Path:
    """The per-user memory cache folder of one bank and SAM 2 identity:
    `<user_cache_root()>/memories/<bank id>/<slug>-<hash8>/`.

    The identity is a key of this cache, never a row in the bank. With `create`, the folder's
    parent is made and the per-revision copies older versions made (`<bank id>-r<N>/`, one full
    copy per revision) are removed: this folder serves every revision.
    """
    if not isinstance(identity, str) or not identity:
        raise ValueError(f"the SAM 2 identity must be a non-empty string, got {identity!r}")
    root = user_cache_root() / MEMORIES_DIR
    bank = _sanitise(str(bank_id), 64)  # never '..' or a path: a bank id is read from the bank
    folder = root / bank / memory_cache_name(identity)
    if create:
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_revision_copies(root, bank)
    return folder


def remove_revision_copies(root: Path, bank: str) -> list[Path]:
    """Delete `<root>/<bank>-r<N>/` folders (older versions' per-revision caches); never a link."""
    import shutil

    removed = []
    pattern = re.compile(re.escape(bank) + r"-r[0-9]+")
    with contextlib.suppress(OSError):
        for old in root.iterdir():
            if pattern.fullmatch(old.name) and not old.is_symlink() and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
                removed.append(old)
    return removed


def _split(data: bytes) -> tuple[dict, bytes]:
    """(header, data section) of a safetensors file; ValueError when malformed."""
    if len(data) < 8:
        raise ValueError("too short to be a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header runs past the end of the file (truncated)")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, data[8 + n :]


def content_sha256(header: dict, body: bytes) -> str:
    """SHA-256 over the tensor descriptions (dtype, shape, offsets) and the tensor bytes."""
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    h = hashlib.sha256(json.dumps(tensors, sort_keys=True).encode("utf-8"))
    h.update(body)
    return h.hexdigest()


def inspect_memory_file(data: bytes, identity: str | None = None, key: str | None = None) -> str | None:
    """Why a cached memory file must not be trusted, or None when it is intact (no torch needed)."""
    try:
        header, body = _split(data)
    except (ValueError, UnicodeDecodeError) as e:
        return f"unreadable ({e})"
    meta = header.get("__metadata__") or {}
    if meta.get("format") != str(FORMAT_VERSION):
        return f"format {meta.get('format')!r}, not {FORMAT_VERSION} (written without a content hash)"
    if identity is not None and meta.get("model") != identity:
        return f"computed by model {meta.get('model')!r}, not {identity!r}"
    if key is not None and meta.get("key") != key:
        return f"computed for entry {meta.get('key')!r}, not {key!r}"
    if content_sha256(header, body) != meta.get("sha256"):
        return "its tensors do not match their recorded SHA-256 (altered or damaged)"
    return None


class SupportMemoryCache:
    """Memories for one SAM 2 identity: LRU in memory and on disk, each bounded by `max_bytes`
    (default `memory_cache_cap()`), and in memory also by `max_items`."""

    def __init__(
        self,
        identity: str,
        directory: str | Path | None = None,
        max_items: int = 1_000_000,
        max_bytes: int | None = None,
    ) -> None:
        self.identity = identity
        self.directory = Path(directory) if directory is not None else None
        self.max_items = int(max_items)
        self.max_bytes = memory_cache_cap() if max_bytes is None else int(max_bytes)
        self._items: OrderedDict[str, SupportMemory] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        self._files: OrderedDict[str, int] = OrderedDict()  # file name -> size, least recent first
        self._disk_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evicted = 0  # memories dropped from RAM to stay under the cap
        self.evicted_files = 0  # files deleted to stay under the cap
        self.rejected = 0  # files on disk that failed their integrity check and were recomputed
        self._writable = self.directory is not None
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except UnsafeLinkError:
                raise
            except OSError as e:
                self._read_only(e)
                if not self.directory.is_dir():
                    self.directory = None
                    return
            marker = self.directory / "identity.json"
            if marker.exists() or marker.is_symlink():
                try:
                    found = json.loads(read_bytes(marker, self.directory, _WHAT)).get("identity")
                except UnsafeLinkError:
                    raise
                except (OSError, ValueError, AttributeError):
                    found = None
                if found != identity:
                    raise ValueError(
                        f"memory cache at {self.directory} belongs to model {found!r}, not "
                        f"{identity!r}; use another folder or delete this one (it is rebuildable)"
                    )
            elif self._writable:
                try:
                    atomic_write_bytes(
                        marker, json.dumps({"identity": identity, "format": FORMAT_VERSION}).encode(),
                        self.directory, _WHAT,
                    )
                except UnsafeLinkError:
                    raise
                except OSError as e:
                    self._read_only(e)
            self._scan()

    def _scan(self) -> None:
        """Index the files on disk, least recently used (mtime) first."""
        found = []
        if self.directory is not None:
            with contextlib.suppress(OSError):
                for p in self.directory.glob("*.safetensors"):
                    with contextlib.suppress(OSError):
                        st = os.lstat(p)
                        found.append((st.st_mtime_ns, p.name, st.st_size))
        self._files = OrderedDict((name, size) for _, name, size in sorted(found))
        self._disk_bytes = sum(self._files.values())

    def stats(self) -> dict:
        """Counts and sizes: in RAM, on disk, the cap, hits, misses, evictions."""
        return {
            "identity": self.identity,
            "directory": None if self.directory is None else str(self.directory),
            "cap_bytes": self.max_bytes,
            "memory_items": len(self._items),
            "memory_bytes": self._bytes,
            "disk_files": len(self._files),
            "disk_bytes": self._disk_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evicted": self.evicted,
            "evicted_files": self.evicted_files,
            "rejected": self.rejected,
        }

    def clear(self) -> int:
        """Forget every memory (RAM and this folder's files); the number of files deleted."""
        self._items.clear()
        self._sizes.clear()
        self._bytes = 0
        self._scan()
        deleted = 0
        if self.directory is not None:
            for name in list(self._files):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
                    deleted += 1
        self._files.clear()
        self._disk_bytes = 0
        return deleted

    def _touch(self, name: str, size: int | None = None) -> None:
        """Mark a file as just used (and, with `size`, just written); evict the oldest over the cap."""
        if size is not None:
            self._disk_bytes += size - self._files.get(name, 0)
            self._files[name] = size
        if name in self._files:
            self._files.move_to_end(name)
        while self._disk_bytes > self.max_bytes and self._files:
            old, old_size = next(iter(self._files.items()))
            if old == name and len(self._files) == 1 and size is None:
                break
            self._files.pop(old)
            self._disk_bytes -= old_size
            assert self.directory is not None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / old)
            self.evicted_files += 1

    def _read_only(self, err: OSError) -> None:
        """Keep going with memories in memory only (the disk cache is an optimisation)."""
        if self._writable:
            warnings.warn(
                f"memory cache folder {self.directory} cannot be written ({err}); support memories "
                "are kept in memory only for this run",
                RuntimeWarning,
                stacklevel=3,
            )
        self._writable = False

    def __len__(self) -> int:
        return len(self._items)

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{sanitize(key)}.safetensors"

    def contains(self, key: str) -> bool:
        """Whether `key` is held in memory or has a file on disk (not loaded, not checked: a count
        for progress, never a promise that `get` returns it)."""
        if key in self._items:
            return True
        return self.directory is not None and self._path(key).exists()

    def get(self, key: str) -> SupportMemory | None:
        """The cached memory for `key`, from memory or disk (checked), or None."""
        mem = self._items.get(key)
        if mem is not None:
            self._items.move_to_end(key)
            return mem
        if self.directory is not None:
            path = self._path(key)
            if path.exists() or path.is_symlink():
                mem = _load(path, key, self.identity, self.directory)
                if mem is not None:
                    self._remember(key, mem)
                    if self._writable:
                        with contextlib.suppress(OSError):
                            os.utime(path)  # least recently used = oldest mtime, across runs
                        self._touch(path.name)
                    return mem
                self.rejected += 1
        return None

    def put(self, key: str, mem: SupportMemory) -> None:
        """Store a memory in memory and, when a writable folder is set, on disk (atomically)."""
        self._remember(key, mem)
        if self.directory is not None and self._writable and memory_nbytes(mem) <= self.max_bytes:
            path = self._path(key)
            try:
                _save(path, key, self.identity, mem, self.directory)
                self._touch(path.name, os.lstat(path).st_size)
            except UnsafeLinkError:
                raise
            except OSError as e:
                self._read_only(e)

    def get_or_compute(self, key: str, compute: Callable[[], SupportMemory]) -> SupportMemory:
        """Cached memory for `key`, computing and storing it on a miss."""
        mem = self.get(key)
        if mem is not None:
            self.hits += 1
            return mem
        self.misses += 1
        mem = compute()
        self.put(key, mem)
        return mem

    def _remember(self, key: str, mem: SupportMemory) -> None:
        size = memory_nbytes(mem)
        if size > self.max_bytes:
            return  # larger than the whole cap: used once, never held
        self._bytes += size - self._sizes.get(key, 0)
        self._sizes[key] = size
        self._items[key] = mem
        self._items.move_to_end(key)
        while len(self._items) > self.max_items or self._bytes > self.max_bytes:
            old, _ = self._items.popitem(last=False)
            self._bytes -= self._sizes.pop(old)
            self.evicted += 1


def _save(path: Path, key: str, identity: str, mem: SupportMemory, root: Path) -> None:
    from safetensors.torch import save

    tensors = {
        "maskmem_features": mem.maskmem_features.detach().cpu().contiguous(),
        "obj_ptr": mem.obj_ptr.detach().cpu().contiguous(),
    }
    meta = {
        "key": key,
        "model": identity,
        "labels": json.dumps(list(mem.labels)),
        "present": json.dumps(list(mem.present)),
        "format": str(FORMAT_VERSION),
    }
    header, body = _split(save(tensors, metadata=meta))
    meta["sha256"] = content_sha256(header, body)
    data = save(tensors, metadata=meta)
    if inspect_memory_file(data, identity, key) is not None:  # serialisation must be deterministic
        raise RuntimeError(f"safetensors wrote {path} differently twice; not caching it")
    atomic_write_bytes(path, data, root, _WHAT)


def _load(path: Path, key: str, identity: str, root: Path) -> SupportMemory | None:
    from safetensors.torch import load

    from .sam2_memory import SupportMemory

    try:
        data = read_bytes(path, root, _WHAT)
    except OSError:  # a link, unreadable: recompute (the rewrite replaces the name, not a target)
        return None
    if inspect_memory_file(data, identity, key) is not None:
        return None
    try:
        tensors = load(data)
        meta = _split(data)[0].get("__metadata__") or {}
        feats, ptr = tensors["maskmem_features"], tensors["obj_ptr"]
        labels = tuple(int(x) for x in json.loads(meta["labels"]))
        present = tuple(bool(x) for x in json.loads(meta["present"]))
    except Exception:  # corrupt or foreign file: recompute instead of trusting it
        return None
    if feats.shape[0] != len(labels) or ptr.shape[0] != len(labels) or len(present) != len(labels):
        return None
    return SupportMemory(labels, feats, ptr, present)
