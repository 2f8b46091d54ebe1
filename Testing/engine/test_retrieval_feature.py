"""The retrieval feature switch (`--retrieval-feature cls|mean|cls+mean|gem`): each feature equals
its definition computed by hand from DINOv2's hidden states, the embedder identity names it, and a
bank made with one feature refuses an embedder of another (with the re-embed command)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from RetrievalSegLib.bank.format import BankModelMismatchError
from RetrievalSegLib.engine.preprocess import dinov2_batch
from RetrievalSegLib.engine.retrieval import RETRIEVAL_FEATURES, SliceEmbedder, feature_of_identity
from RetrievalSegLib.models.loaders import load_dinov2

from _bank_helpers import make_case, new_bank
from synthetic_slices import disc_slice


@pytest.fixture(scope="module")
def dino():
    with pytest.warns(UserWarning):
        return load_dinov2("small", random_weights=True, seed=0, device="cpu")


@pytest.fixture(scope="module")
def slices():
    rng = np.random.default_rng(3)
    return [disc_slice(40, 60, i, rng)[0] for i in range(3)]


def _by_hand(dino, images, size: int) -> dict[str, np.ndarray]:
    """Every feature from the encoder's last hidden state, in float64 numpy: the definitions."""
    with torch.inference_mode():
        out = dino.model(pixel_values=dinov2_batch(images, size), output_hidden_states=True)
        # transformers' Dinov2Model: the last encoder layer's output, then the final LayerNorm
        tokens = dino.model.layernorm(out.hidden_states[-1]).double().numpy()
    cls, patches = tokens[:, 0], tokens[:, 1:]
    assert patches.shape[1] == (size // 14) ** 2  # no register tokens: every other token is a patch
    mean = patches.mean(axis=1)
    gem = (np.clip(patches, 1e-6, None) ** 3).mean(axis=1) ** (1 / 3)

    def unit(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    return {"cls": unit(cls), "mean": unit(mean), "cls+mean": unit(np.concatenate([cls, mean], -1)), "gem": unit(gem)}


@pytest.mark.parametrize("feature", RETRIEVAL_FEATURES)
def test_each_feature_equals_its_hand_computation_from_the_hidden_states(dino, slices, feature):
    size = 56
    expect = _by_hand(dino, slices, size)
    emb = SliceEmbedder(dino, batch_size=2, input_size=size, feature=feature)
    got = emb.embed(slices)
    assert got.shape == (3, emb.dim) and got.dtype == np.float32
    assert emb.dim == (768 if feature == "cls+mean" else 384)
    np.testing.assert_allclose(got, expect[feature], atol=2e-5)
    # the features really differ from each other (the switch changes what is retrieved)
    for other in RETRIEVAL_FEATURES:
        if other != feature and expect[other].shape == got.shape:
            assert np.abs(got - expect[other]).max() > 1e-2


def test_identity_names_the_feature_and_cls_keeps_the_old_identity(dino):
    assert SliceEmbedder(dino, input_size=56).identity == "dinov2-small:random-seed0@56"  # banks made before
    for feature in RETRIEVAL_FEATURES:
        ident = SliceEmbedder(dino, input_size=56, feature=feature).identity
        assert (ident == "dinov2-small:random-seed0@56") == (feature == "cls")
        assert feature_of_identity(ident) == feature
    with pytest.raises(ValueError, match="cls, mean, cls\\+mean, gem"):
        SliceEmbedder(dino, feature="max")


def test_a_bank_of_one_feature_refuses_another_and_reembeds_to_it(tmp_path, dino):
    cls = SliceEmbedder(dino, input_size=56)
    gem = SliceEmbedder(dino, input_size=56, feature="gem")
    bank = new_bank(tmp_path, cls)
    bank.add_volume(*make_case(4), "p01", cls)
    with pytest.raises(BankModelMismatchError) as err:
        bank.check_models(gem.identity)
    msg = str(err.value)
    assert "retrieval feature cls in the bank, gem asked for" in msg
    assert f"rseg bank verify --reembed {bank.path} --dinov2 small --retrieval-feature gem --random-weights" in msg
    with pytest.raises(BankModelMismatchError):
        bank.add_volume(*make_case(5), "p02", gem)  # never a mixed bank

    bank.reembed(gem)
    bank.check_models(gem.identity)
    with pytest.raises(BankModelMismatchError, match="retrieval feature gem in the bank, cls asked for"):
        bank.check_models(cls.identity)
    entry = bank.entries()[1]
    np.testing.assert_allclose(bank.embeddings()[1], gem.embed([bank.load_entry(entry.id).image])[0], atol=1e-5)


def test_one_pass_gives_every_feature_as_the_single_feature_embedders_do(dino, slices):
    """`embed_features` (what a bank of several features and `--compare retrieval-feature` use) equals
    each feature's own embedder, from one DINOv2 forward pass per batch."""
    emb = SliceEmbedder(dino, batch_size=2, input_size=56)
    calls = []
    hook = dino.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = emb.embed_features(slices, RETRIEVAL_FEATURES)
    finally:
        hook.remove()
    assert len(calls) == 2  # 3 slices at batch 2: two passes for all four features
    assert list(got) == list(RETRIEVAL_FEATURES)
    for feature in RETRIEVAL_FEATURES:
        single = SliceEmbedder(dino, batch_size=2, input_size=56, feature=feature)
        np.testing.assert_array_equal(got[feature], single.embed(slices))
        assert emb.identity_of(feature) == single.identity
    with pytest.raises(ValueError, match="cls, mean, cls\\+mean, gem"):
        emb.embed_features(slices, ["max"])


def test_a_bank_of_two_features_answers_both_and_refuses_a_third_naming_bank_reembed(tmp_path, dino):
    cls = SliceEmbedder(dino, input_size=56)
    mean = SliceEmbedder(dino, input_size=56, feature="mean")
    bank = new_bank(tmp_path, cls)
    bank.add_volume(*make_case(4), "p01", cls)
    assert bank.add_feature(mean)
    bank.add_volume(*make_case(5), "p02", mean)  # one pass gives the new slices both rows
    images = [bank.load_entry(e.id).image for e in bank.entries(include_retired=True)]
    np.testing.assert_allclose(bank.embeddings(), cls.embed(images), atol=1e-6)
    np.testing.assert_allclose(bank._state_and_rows(mean.identity)[1], mean.embed(images), atol=1e-6)
    with pytest.raises(BankModelMismatchError) as err:
        bank.check_models(SliceEmbedder(dino, input_size=56, feature="gem").identity)
    assert (f"rseg bank reembed {bank.path} --retrieval-feature gem --dinov2 small --random-weights"
            in str(err.value))
