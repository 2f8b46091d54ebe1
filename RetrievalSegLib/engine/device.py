"""Device memory as the engine sees it: free memory, peak use, releasing the allocator's cache, and
telling an out-of-memory error from any other error, for CUDA and Apple's MPS.

Every call checks the device type first, so a CPU or MPS device never reaches a `torch.cuda`
call (those initialise CUDA, or fail, on a machine without it) and a CUDA device never reaches a
`torch.mps` one. Nothing here allocates on the device.
"""
from __future__ import annotations

import gc

import torch


def device_of(device: torch.device | str) -> torch.device:
    """`device` as a torch.device ('cuda:1' -> device(type='cuda', index=1)); parsing only."""
    return device if isinstance(device, torch.device) else torch.device(device)


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA's `torch.cuda.OutOfMemoryError` and the MPS allocator's out-of-memory error.

    MPS raises a plain RuntimeError ("MPS backend out of memory ..."), so it is known by its text.
    """
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "MPS backend out of memory" in str(error)


def release_memory(device: torch.device | str) -> None:
    """Hand the allocator's unused cached blocks back after an out-of-memory error (the caller has
    dropped its references: the exception and its traceback hold the failed batch's tensors)."""
    dev = device_of(device)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    elif dev.type == "mps":
        torch.mps.empty_cache()


def free_memory(device: torch.device | str) -> int | None:
    """Bytes a new allocation can use on a CUDA `device`: the driver's free memory plus what torch's
    caching allocator holds but does not use; None on other devices (MPS shares the system's
    memory and has no free-memory call; the CPU is not sized here)."""
    dev = device_of(device)
    if dev.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(dev)
    cached_unused = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return int(free) + max(0, int(cached_unused))


def reset_peak(device: torch.device | str) -> int | None:
    """Start a peak measurement on a CUDA `device`; returns the bytes allocated now (None elsewhere)."""
    dev = device_of(device)
    if dev.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(dev)
    return int(torch.cuda.memory_allocated(dev))


def peak_memory(device: torch.device | str) -> int | None:
    """The most bytes allocated on a CUDA `device` since the last `reset_peak` (None elsewhere)."""
    dev = device_of(device)
    if dev.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(dev))


def format_bytes(n: int | None) -> str:
    """'3.2 GiB', '512 MiB'; 'n/a' for None."""
    if n is None:
        return "n/a"
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB"
