"""DINOv2 embeddings of whole slices and exact inner-product top-k."""
from __future__ import annotations

import numpy as np
import pytest

from RetrievalSegLib.models.loaders import load_dinov2
from RetrievalSegLib.engine.retrieval import InnerProductIndex, SliceEmbedder

from synthetic_slices import disc_slice


@pytest.fixture(scope="module")
def embedder() -> SliceEmbedder:
    with pytest.warns(UserWarning):
        dino = load_dinov2("small", random_weights=True, seed=0, device="cpu")
    return SliceEmbedder(dino, batch_size=3, input_size=112)


def test_embeddings_are_unit_vectors_and_batch_independent(embedder):
    rng = np.random.default_rng(0)
    imgs = [disc_slice(40, 60, i, rng)[0] for i in range(5)]
    e = embedder.embed(imgs)
    assert e.shape == (5, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    single = np.concatenate([embedder.embed([im]) for im in imgs])
    np.testing.assert_allclose(e, single, atol=1e-5)
    assert embedder.identity == "dinov2-small:random-seed0@112"


def test_whole_slice_is_seen_no_centre_crop(embedder):
    img = np.full((40, 120), 60, np.uint8)  # wide slice: a centre crop would drop the sides
    changed = img.copy()
    changed[:, :20] = 255  # anatomy at the far left edge
    a, b = embedder.embed([img, changed])
    assert float(a @ b) < 0.9999


def test_embedder_refuses_unwindowed_input(embedder):
    with pytest.raises(ValueError, match="uint8"):
        embedder.embed([np.zeros((20, 20), np.float32)])


def test_top_k_is_exact_and_sorted_with_scores():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((50, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = emb[[3, 7]] + 0.01
    index = InnerProductIndex(emb)
    scores, ids = index.search(q, 5)
    brute = q @ emb.T
    for r in range(2):
        expect = np.argsort(-brute[r])[:5]
        np.testing.assert_array_equal(ids[r], expect)
        np.testing.assert_allclose(scores[r], brute[r, expect], rtol=1e-5)
    s2, i2 = index.search(q, 3, exclude=[3, 7])
    assert 3 not in i2[0] and 7 not in i2[1]


def test_k_larger_than_the_bank_is_a_clear_error():
    index = InnerProductIndex(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="k=5 supports requested but the bank has only 4"):
        index.search(np.eye(4, dtype=np.float32)[:1], 5)
    with pytest.raises(ValueError, match="only 2 usable entries"):
        index.search(np.eye(4, dtype=np.float32)[:1], 3, exclude=[0, 1])
