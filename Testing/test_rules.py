"""Documented rules pinned where they act, with inputs chosen so a one-line change flips them.

Each test here kills one or more mutants of `Testing/mutants.txt` (`make mutants`): the expected
values are computed independently of the code under test (by hand or by a formula written out
here), and the inputs sit between the rule and its mutation (a probability between 0.5 and 0.55,
an outlier that only the 0.5/99.5 percentiles clip, candidates with different IoUs, ...).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from RetrievalSegLib.bank.support_bank import BankCorruptError, SupportBank
from RetrievalSegLib.engine.sam2_memory import QueryResult
from RetrievalSegLib.engine.preprocess import robust_window, to_uint8
from RetrievalSegLib.segmentation.labelmap import fuse_labels, slice_confidence
from RetrievalSegLib.data.volume import through_plane_axis

from _bank_helpers import LABELS, HashEmbedder, make_case


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# ----------------------------------------------------------------------------- slice axis
@pytest.mark.parametrize(
    "spacing,axis",
    [
        ((1.0, 1.0, 1.0), 2),  # all equal: the highest axis (k)
        ((2.0, 2.0, 1.0), 1),  # i and j tie: j
        ((3.0, 1.0, 3.0), 2),  # i and k tie: k
        ((3.0, 1.0, 1.0), 0),  # a unique maximum wins wherever it is
        ((0.7, 0.7, 5.0), 2),
    ],
)
def test_through_plane_axis_is_the_largest_spacing_ties_to_the_highest_axis(spacing, axis):
    assert through_plane_axis(spacing) == axis


# ----------------------------------------------------------------------------- label fusion
def test_overlapping_labels_go_to_the_most_probable():
    lut = np.array([1, 2, 3], dtype=np.uint8)
    # Pixel 0: labels 1 and 2 both present (0.9 and 0.6): label 1. Pixel 1: 0.6 vs 0.95: label 2.
    # Pixel 2: only label 3 present (0.7). Pixel 3: nothing above 0.5.
    probs = np.array([[0.9, 0.6, 0.1, 0.4], [0.6, 0.95, 0.2, 0.3], [0.55, 0.1, 0.7, 0.45]])
    logits = np.vectorize(_logit)(probs).reshape(3, 1, 4).astype(np.float32)
    np.testing.assert_array_equal(fuse_labels(logits, lut)[0], [1, 2, 3, 0])


def test_foreground_is_probability_above_one_half():
    lut = np.array([5], dtype=np.uint8)
    probs = [0.49, 0.51, 0.53, 0.549, 0.56, 0.9]  # 0.51-0.549 lie between 0.5 and 0.55
    logits = np.array([[[_logit(p) for p in probs]]], dtype=np.float32)
    np.testing.assert_array_equal(fuse_labels(logits, lut)[0], [0, 5, 5, 5, 5, 5])


# ----------------------------------------------------------------------------- windowing
def test_window_clips_outliers_at_the_0_5_and_99_5_percentiles():
    # 1000 voxels 0..999 plus two extreme outliers: the percentiles ignore them, min/max would not.
    values = np.concatenate([np.arange(1000, dtype=np.float64), [-1e6, 1e6]])
    n = values.size
    srt = np.sort(values)

    def pct(q: float) -> float:  # numpy's default (linear) percentile, written out
        pos = (n - 1) * q / 100.0
        lo = int(math.floor(pos))
        return float(srt[lo] + (srt[min(lo + 1, n - 1)] - srt[lo]) * (pos - lo))

    lo, hi = robust_window(values)
    assert (lo, hi) == pytest.approx((pct(0.5), pct(99.5)))
    assert 0.0 < lo < 10.0 and 989.0 < hi < 1000.0  # far from the outliers
    u8 = to_uint8(values.reshape(6, 167).astype(np.float32), (lo, hi)).ravel()
    assert u8[-2] == 0 and u8[-1] == 255
    assert u8[500] == int(np.round((500 - lo) * 255.0 / (hi - lo)))  # mid-grey, not squashed


# ----------------------------------------------------------------------------- confidence
def test_slice_confidence_formula_is_pinned():
    def sig(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x))

    present = QueryResult((1, 2), np.zeros((2, 1, 1), np.float32), np.array([0.8, 0.6]), np.array([2.0, 1.5]))
    assert slice_confidence(present) == pytest.approx(min(sig(2.0) * 0.8, sig(1.5) * 0.6))
    absent = QueryResult((1,), np.zeros((1, 1, 1), np.float32), np.array([0.9]), np.array([-3.0]))
    assert slice_confidence(absent) == pytest.approx(1.0 - sig(-3.0))
    mixed = QueryResult((1, 2), np.zeros((2, 1, 1), np.float32), np.array([1.4, 0.2]), np.array([0.5, -0.2]))
    # IoU is clipped to 1; the weakest label decides.
    assert slice_confidence(mixed) == pytest.approx(min(sig(0.5) * 1.0, 1.0 - sig(-0.2)))


# ----------------------------------------------------------------------------- seeds
def test_random_weight_seeds_give_different_weights():
    from RetrievalSegLib.models.loaders import load_dinov2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = load_dinov2("small", random_weights=True, seed=1, device="cpu")
        b = load_dinov2("small", random_weights=True, seed=2, device="cpu")
    pa = dict(a.model.named_parameters())
    pb = dict(b.model.named_parameters())
    name = next(n for n, p in pa.items() if p.ndim == 2 and float(p.std()) > 0)
    assert not torch.equal(pa[name], pb[name])
    assert a.identity != b.identity


# ----------------------------------------------------------------------------- reported IoU
def test_reported_iou_is_the_iou_of_the_returned_mask():
    from RetrievalSegLib.engine.sam2_memory import Sam2MemoryEngine
    from RetrievalSegLib.models.loaders import load_sam2
    from synthetic_slices import disc_slice

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sam = load_sam2("tiny", random_weights=True, seed=0, device="cpu", image_size=256)
    engine = Sam2MemoryEngine(sam)
    rng = np.random.default_rng(0)
    support_img, support_mask = disc_slice(256, 256, 0.0, rng)
    query_img, _ = disc_slice(256, 256, 6.0, rng)
    mem = engine.encode_support(support_img, support_mask, [1, 2])
    seen = []
    hook = engine.model.sam_mask_decoder.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        res = engine.query(query_img, [mem], [1, 2])
    finally:
        hook.remove()
    low_res_multimasks, ious = seen[-1][0], seen[-1][1]  # the query's decoder call
    assert ious.shape == (2, 3)  # SAM 2.1 tracks with multimask output: three candidates
    assert (ious.max(-1).values - ious.min(-1).values).min() > 1e-4  # candidates differ: not vacuous
    # The returned mask is one of the candidates; its IoU is what must be reported.
    for li in range(2):
        want = engine.query(query_img, [mem], [[1, 2][li]])
        best = int(torch.argmax(ious[li]))
        assert res.iou[li] == pytest.approx(float(ious[li, best]), abs=1e-6)
        assert want.iou[0] == pytest.approx(float(ious[li, best]), abs=1e-5)
    assert low_res_multimasks.shape[1] == 3


# ----------------------------------------------------------------------------- bank integrity
def test_embeddings_replaced_behind_the_bank_are_detected(tmp_path):
    """Embedding rows overwritten in bank.db (another model's rows, checksums left as they were).
    Searching must refuse, not use the rows."""
    import contextlib
    import sqlite3

    emb = HashEmbedder()
    bank = SupportBank.create(tmp_path / "bank", LABELS, emb.identity)
    image, labels = make_case(0)
    bank.add_volume(image, labels, "p01", emb)
    rows = np.array(bank.embeddings())
    other = HashEmbedder(name="dinov2-small:other").embed([np.full((4, 4), i, np.uint8) for i in range(len(rows))])
    assert other.shape == rows.shape
    with contextlib.closing(sqlite3.connect(tmp_path / "bank" / "bank.db")) as con, con:
        con.executemany("UPDATE embeddings SET row = ? WHERE seq = ?",
                        [(r.astype("<f4").tobytes(), n) for n, r in enumerate(other)])
    reopened = SupportBank.open(tmp_path / "bank")
    with pytest.raises(BankCorruptError, match="do not match their recorded size or SHA-256"):
        reopened.search(rows[:1], 1)


# ----------------------------------------------------------------------------- evaluation pool
def test_pool_spreads_over_the_annotated_slices_of_every_case():
    from RetrievalSegLib.evaluation.study import choose_pool

    annotated = [(f"case{c}", i) for c in range(4) for i in range(10)]
    pool = choose_pool(annotated, 8)
    assert len(pool) == 8
    assert {c for c, _ in pool} == {"case0", "case1", "case2", "case3"}  # every case contributes
    assert pool[0] == ("case0", 0) and pool[-1] == ("case3", 9)  # first and last included
    # Evenly spaced positions over the 40 annotated slices: round(j * 39 / 7).
    assert [annotated.index(p) for p in pool] == [round(j * 39 / 7) for j in range(8)]
    assert choose_pool(annotated, None) == annotated and choose_pool(annotated, 100) == annotated
