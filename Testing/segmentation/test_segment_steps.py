"""segment_volume's steps, each alone: plan the slices, embed and retrieve, load memories, encode
and query, assemble the label map (the whole run: test_segment_volume.py, test_extent.py).

Steps that need no SAM 2 run on small stand-ins built from the real types (a real SupportBank with
the hash embedder, real SupportMemory tensors, real QueryResults); encode-and-query uses the real
SAM 2.1 tiny architecture (random weights, 256 px).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from RetrievalSegLib.data.volume import Volume, slice_view
from RetrievalSegLib.engine.memory_cache import SupportMemoryCache
from RetrievalSegLib.engine.sam2_memory import NO_OBJ_SCORE, QueryResult, Sam2MemoryEngine, SupportMemory
from RetrievalSegLib.segmentation.labelmap import LabelMapAssembler
from RetrievalSegLib.segmentation.queries import SupportMemories, query_slices, retrieve
from RetrievalSegLib.segmentation.results import VolumeSegmentation
from RetrievalSegLib.segmentation.slices import plan_slices

from _bank_helpers import LABELS, HashEmbedder, make_case, new_bank


# ----------------------------------------------------------------------------- plan the slices
def test_plan_takes_the_through_plane_axis_the_bank_labels_and_a_robust_window(tmp_path):
    image, _ = make_case(0)  # spacing (0.8, 0.9, 3.0): k is the through-plane axis
    bank = new_bank(tmp_path, HashEmbedder())
    plan = plan_slices(image, bank)
    assert (plan.axis, plan.start, plan.stop, plan.n_slices) == (2, 0, 8, 8)
    assert plan.labels == [1, 2] and plan.label_lut.dtype == np.uint8
    lo, hi = np.percentile(image.array, (0.5, 99.5))
    assert plan.bounds == pytest.approx((lo, hi))


def test_plan_honours_and_checks_what_the_caller_gives(tmp_path):
    image, _ = make_case(0)
    bank = new_bank(tmp_path, HashEmbedder())
    plan = plan_slices(image, bank, labels=[2], axis="j", slice_range=(3, 9), window=(0, 500))
    assert (plan.axis, plan.indices, plan.labels, plan.bounds) == (1, [3, 4, 5, 6, 7, 8], [2], (0.0, 500.0))
    with pytest.raises(ValueError, match="outside 0..8 along axis k"):
        plan_slices(image, bank, slice_range=(2, 9))
    with pytest.raises(ValueError, match=r"labels \[7\] are not in the bank"):
        plan_slices(image, bank, labels=[7])
    with pytest.raises(ValueError, match="low < high"):
        plan_slices(image, bank, window=(5, 5))


# ----------------------------------------------------------------------------- embed and retrieve
class _RevisionBumpingBank:
    """Just the two members `retrieve` uses; a writer commits while the search runs."""

    def __init__(self) -> None:
        self.revision = 4

    def search(self, emb, k, case_id=None, case_policy="ignore", embedder_identity=None):
        self.revision += 1
        return [[(f"e{i}", 1.0 - 0.1 * j) for j in range(k)] for i in range(len(emb))]


def test_retrieve_gives_each_slice_its_k_and_the_revision_read_before_the_search():
    images = [np.full((16, 16), v, dtype=np.uint8) for v in (0, 50, 100)]
    found = retrieve(HashEmbedder(), _RevisionBumpingBank(), images, 2)
    assert [len(h) for h in found.hits] == [2, 2, 2] and found.hits[1][0] == ("e1", 1.0)
    assert found.bank_revision == 4


# ----------------------------------------------------------------------------- load memories
class _CountingSam:
    """The SAM 2 members SupportMemories uses, with memories built from the masks (no network)."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.encoded: list[int] = []

    def encode_support(self, image, masks, labels):
        self.encoded.append(len(self.encoded))
        feats = torch.stack([torch.full((2, 4, 4), float(np.asarray(masks[v]).sum())) for v in labels])
        return SupportMemory(tuple(labels), feats.to(torch.bfloat16), feats.mean(dim=(2, 3)), (True,) * len(labels))


class _Engine:
    def __init__(self, sam, folder) -> None:
        self.sam = sam
        self.folder = folder

    def memory_cache(self, bank, precision: str = "fp32") -> SupportMemoryCache:
        return SupportMemoryCache(f"counting@{precision}", self.folder / precision)


def test_memories_are_encoded_once_per_entry_and_restricted_to_the_labels_segmented(tmp_path):
    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    bank.add_volume(*make_case(0), "p01", emb)
    ids = [e.id for e in bank.entries()]
    sam = _CountingSam()
    memories = SupportMemories(_Engine(sam, tmp_path / "cache"), bank, [2], "fp32")
    mems, index = memories.for_slices([[(ids[0], 0.9), (ids[1], 0.8)], [(ids[1], 0.9), (ids[2], 0.7)]])
    assert index == [[0, 1], [1, 2]] and len(mems) == 3
    assert all(m.labels == (2,) for m in mems)  # every bank label cached, the segmented ones used
    assert memories.memory(ids[0]).labels == (1, 2)
    again, _ = memories.for_slices([[(ids[2], 0.5), (ids[0], 0.4)]])
    assert again[0] is mems[2] and again[1] is mems[0]  # on the device once per volume
    assert len(sam.encoded) == 3


# ----------------------------------------------------------------------------- encode and query
@pytest.fixture(scope="module")
def small_engine() -> Sam2MemoryEngine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from RetrievalSegLib.models.loaders import load_sam2

        sam = load_sam2("tiny", random_weights=True, seed=0, device="cpu", image_size=256)
    return Sam2MemoryEngine(sam)


class _FixedMemories:
    """SupportMemories' `for_slices` and `labels` over memories computed here."""

    def __init__(self, mems: dict[str, SupportMemory], labels) -> None:
        self.mems, self.labels = mems, list(labels)

    def for_slices(self, hits):
        ids: dict[str, int] = {}
        index = [[ids.setdefault(eid, len(ids)) for eid, _ in h] for h in hits]
        return [self.mems[e] for e in ids], index


def test_query_slices_gives_every_batch_size_the_same_results_and_stops_when_cancelled(small_engine):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :36]
    images = [np.clip(rng.normal(60, 10, (40, 36)) + 120 * (np.hypot(yy - 20 - d, xx - 18) < 9), 0, 255)
              .astype(np.uint8) for d in range(4)]
    mems = {f"s{i}": small_engine.encode_support(images[i], {1: np.hypot(yy - 20 - i, xx - 18) < 9}, [1])
            for i in range(2)}
    memories = _FixedMemories(mems, [1])
    hits = [[("s0", 1.0), ("s1", 0.9)], [("s1", 1.0), ("s0", 0.9)], [("s0", 1.0), ("s1", 0.9)]]
    never = lambda: False  # noqa: E731
    one = dict(query_slices(small_engine, images, [0, 1, 2], hits, memories, 1, "fp32", never))
    three = dict(query_slices(small_engine, images, [0, 1, 2], hits, memories, 3, "fp32", never))
    assert sorted(one) == sorted(three) == [0, 1, 2]
    for j in one:
        np.testing.assert_allclose(one[j].logits, three[j].logits, atol=1e-4, rtol=0)
    assert not np.allclose(one[0].logits, one[1].logits)  # slices 0 and 1 have other supports
    calls = []
    cancel_after_one = lambda: len(calls) > 0  # noqa: E731
    for j, _ in query_slices(small_engine, images, [0, 1, 2], hits, memories, 1, "fp32", cancel_after_one):
        calls.append(j)
    assert calls == [0]


# ----------------------------------------------------------------------------- assemble the label map
def _result(shape=(4, 2, 3)) -> VolumeSegmentation:
    """4 slices of 2 x 3 along k (IJK axis 2, the array's first axis)."""
    vol = Volume(np.zeros(shape, dtype=np.uint8), spacing=(1.0, 1.0, 2.0))
    return VolumeSegmentation(labelmap=vol, labels=list(LABELS), axis=2, confidence=np.full(4, np.nan, np.float32),
                              label_masks=np.zeros((2,) + shape, dtype=bool))


def test_assembler_fuses_labels_empties_absent_ones_and_counts_progress():
    result, seen = _result(), []
    out = LabelMapAssembler(result, np.array([1, 2], dtype=np.uint8), 0.5, lambda d, t: seen.append((d, t)), 2)
    logits = np.full((2, 2, 3), -5.0, dtype=np.float32)
    logits[0, 0, :] = 4.0   # label 1 on row 0
    logits[1, :, 0] = 6.0   # label 2 on column 0 (wins the overlap at (0, 0))
    out.record(1, [("a", 0.9)], QueryResult((1, 2), logits, np.array([0.8, 0.7]), np.array([2.0, 3.0])))
    np.testing.assert_array_equal(slice_view(result.labelmap.array, 2, 1), [[2, 1, 1], [2, 0, 0]])
    assert result.slices[1].present == {1: True, 2: True} and result.slices[1].retrieved == [("a", 0.9)]
    out.record(3, [("b", 0.5)], QueryResult((1, 2), logits, np.array([0.8, 0.7]), np.array([2.0, 0.2])))
    np.testing.assert_array_equal(slice_view(result.labelmap.array, 2, 3), [[1, 1, 1], [0, 0, 0]])  # 2 absent: empty
    assert not slice_view(result.label_masks[1], 2, 3).any() and result.slices[3].present == {1: True, 2: False}
    assert np.isnan(result.confidence[0]) and 0 < result.confidence[1] <= 1
    assert seen == [(1, 2), (2, 2)]
    assert NO_OBJ_SCORE < 0
