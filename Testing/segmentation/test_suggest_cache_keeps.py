"""Which volumes the suggestion's DINOv2 cache keeps (issue 31, class 4): the newest ones and the one
just reused; the least recently used goes first."""
from __future__ import annotations

import numpy as np

from RetrievalSegLib.data.volume import Volume
from RetrievalSegLib.segmentation.suggest import VolumeEmbeddingCache


def _volume(seed: int) -> Volume:
    return Volume(np.random.default_rng(seed).integers(0, 100, (3, 4, 4)).astype(np.int16))


def test_suggestion_cache_keeps_the_newest_volumes_and_the_one_reused() -> None:
    cache = VolumeEmbeddingCache(max_volumes=2)
    keys = [VolumeEmbeddingCache.key("dinov2-small:x@56", 0, (0.0, 1.0), _volume(s)) for s in range(4)]
    for n, key in enumerate(keys[:2]):
        cache.put(key, np.full((3, 2), n, np.float32), np.zeros(3, bool))
    cache.put(keys[2], np.full((3, 2), 2, np.float32), np.zeros(3, bool))  # the third volume: the first goes
    assert cache.get(keys[0]) is None
    assert cache.get(keys[2]) is not None and float(cache.get(keys[2])[0][0, 0]) == 2.0  # the newest stays
    assert cache.get(keys[1]) is not None  # reused: now the most recent
    cache.put(keys[3], np.full((3, 2), 3, np.float32), np.zeros(3, bool))
    assert cache.get(keys[2]) is None  # the least recently used went, not the one just reused
    assert float(cache.get(keys[1])[0][0, 0]) == 1.0 and float(cache.get(keys[3])[0][0, 0]) == 3.0
