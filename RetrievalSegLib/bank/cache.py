"""The SAM 2 memory caches of a bank: where they are, how big, clearing and warming them
(`rseg bank cache --stats | --clear | --warm`).

Warming computes the memory of every usable entry once (e.g. before a cohort run on a read-only
bank) up to the cache cap: it stops before a memory would push the cache past the cap, so warming
never evicts what it just computed, and it reports how many memories did not fit.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable

from .format import BankEntry, BankError, valid_bank_id
from ..data.fileio import TMP_PREFIX, is_link
from ..engine.memory_cache import MEMORIES_DIR, memory_cache_cap


def memory_key(entry: BankEntry) -> str:
    """The cache key of an entry's memory: its id and content hash (a changed file is a new key)."""
    return f"{entry.id}-{entry.sha256[:16]}"


def check_cache_dir(bank_path: str | Path, cache_dir: str | Path) -> None:
    """ValueError when `cache_dir` is the bank folder or lies inside it: a cache of one's own (a cohort
    run, a read-only bank) must leave every file of the bank byte-identical.

    Compared by file identity (device and inode) of every folder above the resolved path, so a
    link, '..', a bind mount or another spelling on a case-insensitive disk cannot hide the bank.
    """
    try:
        bank = os.stat(bank_path)
    except OSError:
        return  # no bank there: opening it fails with its own message
    resolved = Path(os.path.realpath(os.path.abspath(cache_dir)))
    for folder in (resolved, *resolved.parents):
        try:
            st = os.stat(folder)
        except OSError:
            continue  # not made yet
        if (st.st_dev, st.st_ino) == (bank.st_dev, bank.st_ino):
            raise ValueError(
                f"cache folder {cache_dir} is inside the support bank {bank_path}: a cache folder of your own "
                "must leave the bank unchanged (it may be read-only or shared). Choose a folder outside the "
                "bank, or leave the option out to use the bank's own memory caches"
            )


def cache_root(bank: Any, cache_dir: str | Path) -> Path:
    """`<cache_dir>/<bank id>`: always a child of the folder named, never inside the bank."""
    check_cache_dir(bank.path, cache_dir)
    bank_id = bank.bank_id
    root = Path(cache_dir) / str(bank_id)
    if not valid_bank_id(bank_id) or root.parent != Path(cache_dir):
        raise BankError(
            f"support bank {bank.path} has the id {bank_id!r}, which is not a plain folder name, so it cannot "
            f"name its folder in {cache_dir}; restore the bank's bank.db from a backup or an export"
        )
    return root


def cache_folders(bank: Any, cache_dir: str | Path | None = None) -> list[Path]:
    """Memory cache folders of `bank`: the per-user ones for its id (and those older versions
    kept in the bank's `memories/` or per revision), or those under `cache_dir`."""
    from ..engine.memory_cache import _sanitise, user_cache_root

    roots: list[Path] = []
    if cache_dir is not None:
        roots.append(cache_root(bank, cache_dir))
    else:
        user = user_cache_root() / MEMORIES_DIR
        name = _sanitise(str(bank.bank_id), 64)
        roots += [user / name, bank.path / MEMORIES_DIR]
        with contextlib.suppress(OSError):
            roots += sorted(p for p in user.iterdir() if p.name.startswith(f"{name}-r"))
    found: list[Path] = []
    for root in roots:
        if is_link(root) or not root.is_dir():
            continue
        with contextlib.suppress(OSError):
            found += sorted(p for p in root.iterdir()
                            if p.is_dir() and not is_link(p) and not p.name.startswith(TMP_PREFIX))
    return found


def cache_stats(bank: Any, cache_dir: str | Path | None = None, cap_bytes: int | None = None) -> dict:
    """Files and bytes per cache folder, and the cap they are held to."""
    folders = []
    for f in cache_folders(bank, cache_dir):
        sizes = []
        with contextlib.suppress(OSError):
            sizes = [os.lstat(p).st_size for p in f.glob("*.safetensors")]
        folders.append({"folder": str(f), "files": len(sizes), "bytes": int(sum(sizes))})
    return {
        "bank": str(bank.path),
        "usable_entries": sum(1 for e in bank.entries() if e.usable),
        "cap_bytes": memory_cache_cap() if cap_bytes is None else int(cap_bytes),
        "folders": folders,
        "files": sum(f["files"] for f in folders),
        "bytes": sum(f["bytes"] for f in folders),
    }


def clear_caches(bank: Any, cache_dir: str | Path | None = None) -> int:
    """Delete every cached memory file of `bank` (rebuildable, never through a link); how many."""
    deleted = 0
    for f in cache_folders(bank, cache_dir):
        for p in sorted(f.glob("*.safetensors")):
            if not is_link(p):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
                    deleted += 1
    return deleted


def warm(
    bank: Any,
    engine: Any,
    precision: str = "fp32",
    cache_dir: str | Path | None = None,
    max_bytes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Compute every usable entry's memory once, up to the cap; what was done and what did not fit."""
    from ..engine.sam2_memory import autocast

    if cache_dir is not None:
        cache_root(bank, cache_dir)  # refuses a folder inside the bank and an id that is a path
    cache = engine.memory_cache(bank, precision=precision, cache_dir=cache_dir, max_bytes=max_bytes)
    labels = list(bank.label_values)
    todo = [e for e in bank.entries() if e.usable]
    ctx = autocast(precision, engine.sam.device)
    computed = present = 0
    per_memory = 0
    used = "disk_bytes" if cache.directory is not None else "memory_bytes"
    for n, e in enumerate(todo):
        key = memory_key(e)
        if cache.get(key) is not None:
            present += 1
        else:
            if per_memory and cache.stats()[used] + per_memory > cache.max_bytes:
                break  # the next one would evict one already warmed: stop at the cap
            data = bank.load_entry(e.id)
            with ctx:
                mem = engine.sam.encode_support(data.image, data.masks, labels)
            before = cache.stats()[used]
            cache.put(key, mem)
            grown = cache.stats()[used] - before
            if grown <= 0:
                break  # larger than the whole cap: nothing can be warmed
            per_memory = max(per_memory, grown)
            computed += 1
        if progress is not None:
            progress(n + 1, len(todo))
    stats = cache.stats()
    return {
        "entries": len(todo),
        "computed": computed,
        "already_cached": present,
        "did_not_fit": len(todo) - computed - present,
        "cap_bytes": cache.max_bytes,
        "bytes": stats["disk_bytes"] if cache.directory else stats["memory_bytes"],
        "folder": stats["directory"],
    }

