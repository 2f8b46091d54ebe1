"""Ranges and axes (issue 31, class 6): where an extent walk starts respects the user's slice range
and the slice axis; the suggestion counts a case's bank entries only on the axis it suggests along.

The bank is real (HashEmbedder embeddings); the case has annotated slices on two axes.
"""
from __future__ import annotations

import numpy as np
import pytest

from _bank_helpers import LABELS, HashEmbedder
from RetrievalSegLib.bank.support_bank import SupportBank
from RetrievalSegLib.data.volume import Volume
from RetrievalSegLib.segmentation.slices import start_slices
from RetrievalSegLib.segmentation.suggest import suggest_slices

CASE = "patient007"


class _Embedder(HashEmbedder):
    """HashEmbedder as `suggest_slices` uses a SliceEmbedder: `dinov2` is the model whose device the
    slices go to (None here: they stay on the CPU)."""

    dinov2 = None
SHAPE = (8, 16, 16)  # array [k, j, i]: 8 slices along k, 16 along j


@pytest.fixture()
def bank(tmp_path):
    """patient007 annotated on k slices 1, 4 and 6, and on j slice 5 (another view); another case on k 3."""
    emb = HashEmbedder()
    bank = SupportBank.create(tmp_path / "bank", LABELS, emb.identity)
    rng = np.random.default_rng(3)
    for case, axis, index in [(CASE, "k", 1), (CASE, "k", 4), (CASE, "k", 6), (CASE, "j", 5), ("other", "k", 3)]:
        img = rng.integers(0, 256, (16, 16), dtype=np.uint8)
        bank.add_slice(img, {1: img > 128}, case, axis, index, (1.0, 1.0), emb)
    return bank


def test_start_slices_lie_in_the_user_range_and_on_the_axis(bank) -> None:
    # the whole volume: the case's k annotations (not the j one at 5)
    assert start_slices(None, bank, CASE, 2, 0, 8, False, []) == ([1, 4, 6], "annotated")
    # a user range 2..5: only the annotated slice inside it
    assert start_slices(None, bank, CASE, 2, 2, 6, True, []) == ([4], "annotated")
    # a range with none of the case's annotations: its middle, never an annotation outside it
    assert start_slices(None, bank, CASE, 2, 2, 4, True, []) == ([2], "middle of the slice range")
    # along j the case has only slice 5
    assert start_slices(None, bank, CASE, 1, 0, 16, False, []) == ([5], "annotated")
    # no annotation: the slice most similar to the bank, counted from the range's start
    hits = [[("a", 0.1)], [("b", 0.9)], [("c", 0.3)]]  # slices 5, 6, 7
    assert start_slices(None, bank, "unknown", 2, 5, 8, False, hits) == ([6], "most similar to the bank")
    with pytest.raises(ValueError, match="slice range 2..5"):
        start_slices(7, bank, CASE, 2, 2, 6, True, [])


def test_suggestion_counts_the_case_entries_on_the_suggested_axis_only(bank) -> None:
    volume = Volume(np.random.default_rng(0).normal(100, 30, SHAPE).astype(np.float32), spacing=(1.0, 1.0, 5.0))
    emb = _Embedder()
    along_k = suggest_slices(volume, bank, emb, n=3, axis="k", window=(0.0, 200.0), case_id=CASE)
    assert along_k.in_bank == [1, 4, 6]  # not 5: that is a j slice
    assert not set(p.index for p in along_k.picks) & {1, 4, 6}
    along_j = suggest_slices(volume, bank, emb, n=3, axis="j", window=(0.0, 200.0), case_id=CASE)
    assert along_j.in_bank == [5]
    assert 5 not in [p.index for p in along_j.picks]
