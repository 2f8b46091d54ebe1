"""The engine gives the official SAM2VideoPredictor's masks on the same weights and inputs.

Tolerance: the engine runs the predictor's own modules in the same order; what differs is that
it batches the labels of a slice (the predictor runs each object as a batch of 1) and reuses cached
memories, so float32 results differ only by operation reordering (observed max |logit diff| ~2e-7
on this CPU). Both sides store memories in bfloat16 the same way. We assert max |diff| <= 1e-3
(three orders of magnitude above what we see, leaving room for other BLAS kernels, and far below
any logit that changes a pixel's side of 0 except within 1e-3 of the boundary) and >= 99.9% pixel
agreement of the thresholded masks.

Random weights can make the comparison vacuous (object score < 0 gives all -1024 on both sides,
or logits ~0), so each case asserts the object is predicted present and the mask is neither empty
nor full, and compares raw logits.
"""
from __future__ import annotations

import numpy as np
import pytest

from RetrievalSegLib.engine import Sam2MemoryEngine
from RetrievalSegLib.models import load_sam2

from _reference import build_reference_predictor, reference_query_logits, write_pseudo_video
from synthetic_slices import disc_slice

LABELS = (1, 2)
MAX_LOGIT_DIFF = 1e-3
MIN_AGREEMENT = 0.999

_models: dict = {}


def _engine_and_reference(image_size: int, seed: int):
    key = (image_size, seed)
    if key not in _models:
        with pytest.warns(UserWarning, match="RANDOM weights"):
            sam = load_sam2("tiny", random_weights=True, seed=seed, device="cpu", image_size=image_size)
        _models.clear()  # keep one pair alive: 2 cores, 24 GiB
        _models[key] = (Sam2MemoryEngine(sam), build_reference_predictor(sam.model, "tiny", image_size))
    return _models[key]


def _case(tmp_path, image_size: int, seed: int, k: int, hw=(96, 80)):
    rng = np.random.default_rng(seed)
    slices = [disc_slice(*hw, shift=2.0 * i, rng=rng) for i in range(k + 1)]
    support_masks = [dict(m) for _, m in slices[:k]]
    if k > 1:  # one support where label 2 is not drawn: an empty mask for that object
        support_masks[0][2] = np.zeros(hw, dtype=bool)
    decoded = write_pseudo_video(tmp_path / "video", [img for img, _ in slices])
    engine, predictor = _engine_and_reference(image_size, seed)
    mems = [engine.encode_support(decoded[i], support_masks[i], LABELS) for i in range(k)]
    ours = engine.query(decoded[k], mems, LABELS)
    ref = reference_query_logits(predictor, tmp_path / "video", support_masks, LABELS)
    return ours, ref


def _assert_same(ours, ref):
    assert ours.logits.shape == ref.shape
    assert (ours.object_score > 0).all(), f"object predicted absent ({ours.object_score}): vacuous case"
    for li in range(len(LABELS)):
        fg = (ref[li] > 0).mean()
        assert 0.001 < fg < 0.999, f"reference mask of label {LABELS[li]} is empty or full ({fg:.4f})"
    diff = np.abs(ours.logits - ref).max()
    agreement = ((ours.logits > 0) == (ref > 0)).mean()
    assert diff <= MAX_LOGIT_DIFF, f"max |logit diff| {diff:.3g}"
    assert agreement >= MIN_AGREEMENT, f"pixel agreement {agreement:.5f}"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_matches_official_predictor_256(tmp_path, seed, k):
    ours, ref = _case(tmp_path, 256, seed, k)
    _assert_same(ours, ref)


def test_matches_official_predictor_non_square(tmp_path):
    ours, ref = _case(tmp_path, 256, 3, 3, hw=(72, 120))
    _assert_same(ours, ref)


def test_matches_official_predictor_1024(tmp_path):
    ours, ref = _case(tmp_path, 1024, 2, 1)
    _assert_same(ours, ref)


@pytest.mark.slow
@pytest.mark.parametrize("image_size,seed,k", [(512, 0, 8), (512, 1, 1), (512, 3, 3), (1024, 0, 3), (1024, 1, 8)])
def test_matches_official_predictor_full_sweep(tmp_path, image_size, seed, k):
    ours, ref = _case(tmp_path, image_size, seed, k)
    _assert_same(ours, ref)
