"""Which item a cache keeps, not only how many (issue 31, class 4).

* the SAM 2 support-memory cache evicts the least recently *used* memory (a read counts as use),
  so a support retrieved on every slice stays while one used once goes;
* the suggestion's DINOv2 cache: Testing/segmentation/test_suggest_cache_keeps.py.
"""
from __future__ import annotations

import torch

from RetrievalSegLib.engine.memory_cache import SupportMemoryCache, memory_nbytes
from RetrievalSegLib.engine.sam2_memory import SupportMemory


def _memory(value: float) -> SupportMemory:
    return SupportMemory((1,), torch.full((1, 4, 2, 2), float(value), dtype=torch.bfloat16),
                         torch.full((1, 8), float(value), dtype=torch.float32), (True,))


def test_memory_cache_evicts_the_least_recently_used_not_the_oldest() -> None:
    cap = 3 * memory_nbytes(_memory(0.0))
    cache = SupportMemoryCache("sam2.1-tiny@256:test", directory=None, max_bytes=cap)
    for key in "abc":
        cache.put(key, _memory(ord(key)))
    assert cache.get("a") is not None  # a is now the most recently used; b the least
    cache.put("d", _memory(4.0))
    assert cache.get("b") is None and cache.evicted == 1
    assert [cache.get(k) is not None for k in "acd"] == [True, True, True]
    assert float(cache.get("a").obj_ptr[0, 0]) == ord("a")  # and it is a's memory
    # get_or_compute counts a hit as use too
    cache.get_or_compute("c", lambda: _memory(-1.0))
    cache.get_or_compute("a", lambda: _memory(-1.0))
    cache.put("e", _memory(5.0))  # d is the least recently used now
    assert cache.get("d") is None and cache.get("c") is not None and cache.get("a") is not None

