"""Model loading: strict, pickle-free, explicit about random weights and missing files."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from RetrievalSegLib.models import loaders as models
from RetrievalSegLib.models.loaders import CheckpointError, MissingWeightsError


@pytest.fixture(scope="module")
def sam2_ckpt(tmp_path_factory) -> Path:
    with pytest.warns(UserWarning):
        sam = models.load_sam2("tiny", random_weights=True, seed=5, device="cpu", image_size=1024)
    path = tmp_path_factory.mktemp("ckpt") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": sam.model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory) -> Path:
    with pytest.warns(UserWarning):
        dino = models.load_dinov2("small", random_weights=True, seed=5, device="cpu")
    folder = tmp_path_factory.mktemp("dino") / "dinov2-small"
    dino.model.save_pretrained(folder)
    return folder


def test_sam2_checkpoint_loads_strictly_and_names_its_content(sam2_ckpt):
    loaded = models.load_sam2("tiny", sam2_ckpt, device="cpu")
    assert loaded.identity.startswith("sam2.1-tiny@1024:sha256-")
    assert loaded.checkpoint == sam2_ckpt
    ref = torch.load(sam2_ckpt, weights_only=True)["model"]
    for name, p in loaded.model.state_dict().items():
        torch.testing.assert_close(p, ref[name])


def test_1024_checkpoint_loads_into_a_512_model(sam2_ckpt):
    loaded = models.load_sam2("tiny", sam2_ckpt, device="cpu", image_size=512)
    assert loaded.model.image_size == 512
    assert loaded.identity.startswith("sam2.1-tiny@512:")


def test_checkpoint_of_another_size_is_refused(sam2_ckpt):
    with pytest.raises(CheckpointError, match="small"):
        models.load_sam2("small", sam2_ckpt, device="cpu")


def test_dinov2_file_given_as_sam2_checkpoint_is_refused(dinov2_folder, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(dinov2_folder / "model.safetensors")
    bad = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": sd}, bad)
    with pytest.raises(CheckpointError, match="looks like a DINOv2 checkpoint"):
        models.load_sam2("tiny", bad, device="cpu")
    # The raw safetensors file itself, as a user might pick it in a file dialog.
    with pytest.raises(CheckpointError, match="looks like a DINOv2 checkpoint"):
        models.load_sam2("tiny", dinov2_folder / "model.safetensors", device="cpu")


def test_checkpoint_that_needs_pickle_is_refused(sam2_ckpt, tmp_path):
    sd = torch.load(sam2_ckpt, weights_only=True)
    bad = tmp_path / "pickled.pt"
    torch.save({"model": sd["model"], "args": argparse.Namespace(evil=True)}, bad)
    with pytest.raises(CheckpointError, match="need pickle"):
        models.load_sam2("tiny", bad, device="cpu")


def test_missing_sam2_checkpoint_names_file_command_and_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("RSEG_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.delenv("RSEG_SAM2_CHECKPOINT", raising=False)
    with pytest.raises(MissingWeightsError) as e:
        models.load_sam2("base_plus", device="cpu")
    msg = str(e.value)
    assert str(tmp_path / "sam2.1_hiera_base_plus.pt") in msg
    assert "rseg weights download --sam2 sam2.1-base-plus" in msg
    assert "RSEG_SAM2_CHECKPOINT" in msg and "RSEG_WEIGHTS_DIR" in msg


def test_missing_dinov2_never_falls_back_to_random(tmp_path, monkeypatch):
    monkeypatch.setenv("RSEG_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("RSEG_DINOV2_PATH", raising=False)
    with pytest.raises(MissingWeightsError, match="rseg weights download --sam2 none --dinov2 small"):
        models.load_dinov2("small", device="cpu")


def test_dinov2_folder_loads_with_identity(dinov2_folder):
    loaded = models.load_dinov2("small", dinov2_folder, device="cpu")
    assert loaded.dim == 384 and loaded.identity.startswith("dinov2-small:sha256-")
    with pytest.raises(CheckpointError, match="not DINOv2 base"):
        models.load_dinov2("base", dinov2_folder, device="cpu")


def test_random_weights_warn_and_are_seeded():
    with pytest.warns(UserWarning, match="meaningless"):
        a = models.load_dinov2("small", random_weights=True, seed=1, device="cpu")
    with pytest.warns(UserWarning):
        b = models.load_dinov2("small", random_weights=True, seed=1, device="cpu")
    assert a.identity == b.identity == "dinov2-small:random-seed1"
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


def test_unknown_sizes_and_devices_are_clear_errors():
    with pytest.raises(ValueError, match="sam2.1-tiny, sam2.1-small, sam2.1-base-plus, sam2.1-large, medsam2"):
        models.load_sam2("huge", random_weights=True, device="cpu")
    with pytest.raises(ValueError, match="multiple of 32"):
        models.sam2_hydra_overrides(500)
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        models.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            models.resolve_device("cuda")
    assert models.resolve_device("cpu").type == "cpu"
    assert models.resolve_device("auto").type in ("cpu", "cuda", "mps")
