"""Engine behaviour: cached memories, multi-label, dtypes, shapes, and clear errors on bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from RetrievalSegLib.engine.sam2_memory import Sam2MemoryEngine, Support, fill_holes
from RetrievalSegLib.engine.memory_cache import SupportMemoryCache
from RetrievalSegLib.models.loaders import load_sam2
from RetrievalSegLib.engine.preprocess import robust_window, to_uint8

from synthetic_slices import disc_slice

LABELS = (1, 2)


@pytest.fixture(scope="module")
def engine() -> Sam2MemoryEngine:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        sam = load_sam2("tiny", random_weights=True, seed=0, device="cpu", image_size=256)
    return Sam2MemoryEngine(sam)


@pytest.fixture(scope="module")
def slices():
    rng = np.random.default_rng(7)
    return [disc_slice(64, 56, 2.0 * i, rng) for i in range(4)]


class EncoderCalls:
    """Counts forward calls of the real SAM 2 image encoder."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n = 0
        self.handle = model.image_encoder.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def close(self) -> None:
        self.handle.remove()


def test_cached_query_runs_image_encoder_once_and_matches_uncached(engine, slices, tmp_path):
    supports = [Support(img, m, key=f"s{i}") for i, (img, m) in enumerate(slices[:3])]
    query = slices[3][0]
    uncached = engine.segment(query, supports, LABELS)

    cache = SupportMemoryCache(engine.identity, tmp_path / "mem")
    engine.segment(query, supports, LABELS, cache=cache)  # fills the cache
    assert cache.misses == 3

    calls = EncoderCalls(engine.model)
    try:
        cached = engine.segment(query, supports, LABELS, cache=cache)
    finally:
        calls.close()
    assert calls.n == 1, "a query with cached supports must encode only the query image"
    assert cache.hits == 3
    np.testing.assert_array_equal(cached.logits, uncached.logits)
    np.testing.assert_array_equal(cached.iou, uncached.iou)

    # A fresh cache on the same folder reads the memories from disk: still one encoder call.
    disk = SupportMemoryCache(engine.identity, tmp_path / "mem")
    calls = EncoderCalls(engine.model)
    try:
        from_disk = engine.segment(query, supports, LABELS, cache=disk)
    finally:
        calls.close()
    assert calls.n == 1 and disk.misses == 0
    np.testing.assert_array_equal(from_disk.logits, uncached.logits)


def test_corrupt_cache_file_is_recomputed_not_trusted(engine, slices, tmp_path):
    img, masks = slices[0]
    cache = SupportMemoryCache(engine.identity, tmp_path / "mem")
    mem = cache.get_or_compute("a", lambda: engine.encode_support(img, masks, LABELS))
    for f in (tmp_path / "mem").glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    again = SupportMemoryCache(engine.identity, tmp_path / "mem")
    assert again.get("a") is None
    mem2 = again.get_or_compute("a", lambda: engine.encode_support(img, masks, LABELS))
    assert again.misses == 1
    torch.testing.assert_close(mem2.maskmem_features, mem.maskmem_features)


def test_cache_of_another_model_is_refused(engine, tmp_path):
    SupportMemoryCache(engine.identity, tmp_path / "mem")
    with pytest.raises(ValueError, match="belongs to model"):
        SupportMemoryCache("sam2.1-large@1024:other", tmp_path / "mem")


def test_multi_label_output_shapes_and_scores(engine, slices):
    img, _ = slices[3]
    res = engine.segment(img, [Support(i, m) for i, m in slices[:2]], LABELS)
    assert res.labels == LABELS
    assert res.logits.shape == (2, 64, 56) and res.logits.dtype == np.float32
    assert res.iou.shape == (2,) and res.object_score.shape == (2,)
    p = res.probabilities
    assert ((p >= 0) & (p <= 1)).all()
    np.testing.assert_array_equal(res.masks(), res.logits > 0)


def test_label_absent_from_every_support_is_an_empty_object(engine, slices):
    img, masks = slices[0]
    mem = engine.encode_support(img, {1: masks[1]}, (1, 2, 3))
    assert mem.labels == (1, 2, 3) and mem.present == (True, False, False)
    # An empty mask encodes SAM 2's "no object" pointer, so labels 2 and 3 share it and differ from 1.
    torch.testing.assert_close(mem.obj_ptr[1], mem.obj_ptr[2])
    assert not torch.allclose(mem.obj_ptr[0], mem.obj_ptr[1])


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float16])
def test_other_dtypes_are_windowed_like_their_uint8_version(engine, dtype):
    rng = np.random.default_rng(3)
    s = [disc_slice(48, 48, 2.0 * i, rng, dtype=dtype) for i in range(3)]
    res = engine.segment(s[2][0], [Support(i, m) for i, m in s[:2]], LABELS)
    as_u8 = [to_uint8(i, robust_window(i)) for i, _ in s]
    ref = engine.segment(as_u8[2], [Support(u, m) for u, (_, m) in zip(as_u8[:2], s[:2])], LABELS)
    np.testing.assert_array_equal(res.logits, ref.logits)
    assert np.isfinite(res.logits).all()


def test_memory_is_bfloat16_like_the_official_predictor(engine, slices):
    img, masks = slices[0]
    mem = engine.encode_support(img, masks, LABELS)
    assert mem.maskmem_features.dtype == torch.bfloat16
    assert mem.maskmem_features.shape == (2, 64, 16, 16)  # 256 px / 16, mem_dim 64
    assert mem.obj_ptr.shape == (2, 256)


# ----------------------------------------------------------------------------- bad input
def test_empty_support_set_is_a_clear_error(engine, slices):
    with pytest.raises(ValueError, match="at least one support"):
        engine.segment(slices[0][0], [], LABELS)
    with pytest.raises(ValueError, match="at least one support"):
        engine.query(slices[0][0], [], LABELS)


def test_mask_shape_mismatch_names_both_shapes(engine, slices):
    img, masks = slices[0]
    with pytest.raises(ValueError, match=r"mask of label 1 has shape \(10, 10\).*\(64, 56\)"):
        engine.encode_support(img, {1: np.ones((10, 10), bool)}, LABELS)


@pytest.mark.parametrize("bad", [np.zeros((4, 5, 6)), np.zeros(10), np.zeros((1, 1))])
def test_non_2d_input_is_refused(engine, bad):
    with pytest.raises(ValueError, match="2D|too small"):
        engine.encode_batch([bad])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused(engine, slices, value):
    img = slices[0][0].astype(np.float32)
    img[3, 4] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        engine.segment(img, [Support(slices[1][0], slices[1][1])], LABELS)


def test_support_without_labels_is_refused(engine, slices):
    with pytest.raises(ValueError, match="at least one label"):
        engine.encode_support(slices[0][0], {})


def test_fill_holes_fills_only_small_background_components():
    logits = torch.full((1, 1, 32, 32), 5.0)
    logits[0, 0, 0:10, 0:32] = -5.0  # a large background region (border)
    logits[0, 0, 20, 20] = -5.0  # a 1-pixel hole
    logits[0, 0, 25:28, 5:8] = -5.0  # a 9-pixel hole
    out = fill_holes(logits, 8)
    assert out[0, 0, 20, 20] == pytest.approx(0.1)
    assert (out[0, 0, 25:28, 5:8] == -5.0).all()
    assert (out[0, 0, 0:10] == -5.0).all()
