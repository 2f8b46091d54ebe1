"""Cache of SAM 2 support memories: in memory and on disk, keyed by the model's identity.

A support's memory depends only on the support (image + masks) and the SAM 2 model, never on the
query, so it is computed once. On disk each memory is one safetensors file (no pickle) written
atomically; a file that fails to read is recomputed, never trusted.
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Callable


from .engine import SupportMemory
from .fileio import atomic_write_bytes

FORMAT_VERSION = 1


def sanitize(name: str) -> str:
    """A file-system safe rendering of an identity or key."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:160]


class SupportMemoryCache:
    """Memories for one SAM 2 identity; LRU in memory (max_items), optional folder on disk."""

    def __init__(self, identity: str, directory: str | Path | None = None, max_items: int = 4096) -> None:
        self.identity = identity
        self.directory = Path(directory) if directory is not None else None
        self.max_items = int(max_items)
        self._items: OrderedDict[str, SupportMemory] = OrderedDict()
        self.hits = 0
        self.misses = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            marker = self.directory / "identity.json"
            if marker.exists():
                try:
                    found = json.loads(marker.read_text()).get("identity")
                except (OSError, ValueError):
                    found = None
                if found != identity:
                    raise ValueError(
                        f"memory cache at {self.directory} belongs to model {found!r}, not "
                        f"{identity!r}; use another folder or delete this one (it is rebuildable)"
                    )
            else:
                atomic_write_bytes(marker, json.dumps({"identity": identity, "format": FORMAT_VERSION}).encode())

    def __len__(self) -> int:
        return len(self._items)

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{sanitize(key)}.safetensors"

    def get(self, key: str) -> SupportMemory | None:
        """The cached memory for `key`, from memory or disk, or None."""
        mem = self._items.get(key)
        if mem is not None:
            self._items.move_to_end(key)
            return mem
        if self.directory is not None:
            path = self._path(key)
            if path.exists():
                mem = _load(path, key)
                if mem is not None:
                    self._remember(key, mem)
                    return mem
        return None

    def put(self, key: str, mem: SupportMemory) -> None:
        """Store a memory in memory and, when a folder is set, on disk (atomically)."""
        self._remember(key, mem)
        if self.directory is not None:
            _save(self._path(key), key, mem)

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
        self._items[key] = mem
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)


def _save(path: Path, key: str, mem: SupportMemory) -> None:
    from safetensors.torch import save

    tensors = {
        "maskmem_features": mem.maskmem_features.detach().cpu().contiguous(),
        "obj_ptr": mem.obj_ptr.detach().cpu().contiguous(),
    }
    meta = {
        "key": key,
        "labels": json.dumps(list(mem.labels)),
        "present": json.dumps(list(mem.present)),
        "format": str(FORMAT_VERSION),
    }
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _load(path: Path, key: str) -> SupportMemory | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or meta.get("format") != str(FORMAT_VERSION):
                return None
            feats = f.get_tensor("maskmem_features")
            ptr = f.get_tensor("obj_ptr")
        labels = tuple(int(x) for x in json.loads(meta["labels"]))
        present = tuple(bool(x) for x in json.loads(meta["present"]))
    except Exception:  # corrupt or foreign file: recompute instead of trusting it
        return None
    if feats.shape[0] != len(labels) or ptr.shape[0] != len(labels):
        return None
    return SupportMemory(labels, feats, ptr, present)
