"""segmentation.provenance.weights_official: results say whether the weights are the published files."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

from RetrievalSegLib.models import registry
from RetrievalSegLib.segmentation.provenance import weights_official


def _engine(tmp_path, dino_bytes: bytes):
    """The attributes weights_official reads of a RetrievalEngine: sam.sam2 (LoadedSam2: size, path),
    embedder.dinov2 (LoadedDinov2: size, path), random_weights."""
    ckpt = tmp_path / "sam2.1_hiera_tiny.pt"
    ckpt.write_bytes(b"a fine-tuned SAM 2 checkpoint")
    folder = tmp_path / "dinov2-small"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(dino_bytes)
    return SimpleNamespace(sam=SimpleNamespace(sam2=SimpleNamespace(size="sam2.1-tiny", path=ckpt)),
                           embedder=SimpleNamespace(dinov2=SimpleNamespace(size="small", path=folder)),
                           random_weights=False)


def test_a_dinov2_file_that_is_not_the_published_one_is_not_official(tmp_path):
    doc = weights_official(_engine(tmp_path, b"fine-tuned DINOv2"))
    assert doc["weights_official"] is False
    w = doc["weights"]["dinov2"]
    assert w["official"] is False and w["sha256"] == hashlib.sha256(b"fine-tuned DINOv2").hexdigest()
    assert w["published_sha256"] == registry.DINOV2_MODELS["small"].safetensors_sha256
    assert doc["weights"]["sam2"]["sha256"] == hashlib.sha256(b"a fine-tuned SAM 2 checkpoint").hexdigest()


def test_published_files_are_official_and_an_unknown_digest_is_unknown(tmp_path, monkeypatch):
    data = b"the published DINOv2"
    spec = registry.DINOV2_MODELS["small"]
    monkeypatch.setitem(registry.DINOV2_MODELS, "small",
                        spec.__class__(**{**spec.__dict__, "safetensors_sha256": hashlib.sha256(data).hexdigest()}))
    doc = weights_official(_engine(tmp_path, data))
    assert doc["weights"]["dinov2"]["official"] is True
    # No published digest is known for SAM 2.1 tiny: the run cannot say, and says so (None), not True.
    assert doc["weights"]["sam2"]["official"] is None and doc["weights_official"] is None
    sam = registry.SAM2_MODELS["sam2.1-tiny"]
    digest = hashlib.sha256(b"a fine-tuned SAM 2 checkpoint").hexdigest()
    monkeypatch.setitem(registry.SAM2_MODELS, "sam2.1-tiny",
                        sam.__class__(**{**sam.__dict__, "published_sha256": (digest,)}))
    (tmp_path / "again").mkdir()
    assert weights_official(_engine(tmp_path / "again", data))["weights_official"] is True


def test_random_weights_are_never_official():
    engine = SimpleNamespace(random_weights=True)
    assert weights_official(engine)["weights_official"] is False
