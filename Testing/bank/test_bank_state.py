"""State across calls on one `SupportBank` object (issue 31, class 1).

A bank object caches its embeddings and its search index per revision; every change made through
it (or through another object, or another process) must show in the next search, and an entry
retired, re-embedded and restored must come back usable. Embeddings: `HashEmbedder` (exact
nearest neighbours: a slice's own embedding scores 1).
"""
from __future__ import annotations

import numpy as np
import pytest

from _bank_helpers import LABELS, HashEmbedder
from RetrievalSegLib.bank.support_bank import SupportBank


def _slice(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)


def _add(bank: SupportBank, emb, seed: int, case: str, index: int) -> str:
    img = _slice(seed)
    return bank.add_slice(img, {1: img > 128}, case, "k", index, (1.0, 1.0), emb).id


def _top(bank: SupportBank, emb, seed: int, k: int = 1) -> list[str]:
    return [i for i, _ in bank.search(emb.embed([_slice(seed)]), k)[0]]


def test_add_search_add_search_on_one_object_and_on_a_reopened_one(tmp_path) -> None:
    emb = HashEmbedder()
    bank = SupportBank.create(tmp_path / "bank", LABELS, emb.identity)
    a = _add(bank, emb, 1, "case-a", 0)
    assert _top(bank, emb, 2) == [a]  # the only entry
    b = _add(bank, emb, 2, "case-b", 0)
    assert _top(bank, emb, 2) == [b]  # the entry just added, not the index of the first revision
    c = _add(bank, emb, 3, "case-c", 0)
    assert _top(bank, emb, 3) == [c] and sorted(_top(bank, emb, 3, k=3)) == sorted([a, b, c])
    reopened = SupportBank.open(bank.path)
    assert [_top(reopened, emb, s) for s in (1, 2, 3)] == [[a], [b], [c]]
    d = _add(reopened, emb, 4, "case-d", 0)  # written by the other object: seen by the first
    assert _top(bank, emb, 4) == [d] and len(bank) == 4
    assert _top(reopened, emb, 4) == [d]


def test_remove_reembed_restore_gives_a_usable_entry(tmp_path) -> None:
    emb = HashEmbedder()
    bank = SupportBank.create(tmp_path / "bank", LABELS, emb.identity)
    a = _add(bank, emb, 1, "case-a", 0)
    b = _add(bank, emb, 2, "case-b", 0)
    assert _top(bank, emb, 2) == [b]
    bank.remove(b)
    assert _top(bank, emb, 2) == [a]  # a retired entry is never returned
    with pytest.raises(ValueError, match="only 1 usable"):
        bank.search(emb.embed([_slice(2)]), 2)
    bank.reembed(emb)
    restored = bank.restore(b)
    assert restored.usable
    hit = bank.search(emb.embed([_slice(2)]), 1)[0][0]
    assert hit[0] == b and hit[1] == pytest.approx(1.0, abs=1e-5)  # its own, finite embedding
    assert [_top(SupportBank.open(bank.path), emb, s) for s in (1, 2)] == [[a], [b]]
