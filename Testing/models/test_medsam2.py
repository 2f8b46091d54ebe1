"""MedSAM2 as a second SAM 2 backbone: the registry entry, its configuration, its weights rules,
its own memory identity, and `rseg segment --sam2 medsam2` end to end (random weights, 512 px).

The engine-vs-official-predictor comparison on MedSAM2's published config is in
test_engine_fidelity.py (`test_fidelity_medsam2_*`).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json

import numpy as np
import pytest
import torch

from RetrievalSegLib.models import loaders as models
from RetrievalSegLib.models import registry
from RetrievalSegLib.engine.sam2_memory import Sam2MemoryEngine
from RetrievalSegLib.models.loaders import CheckpointError, ImageSizeWarning
from RetrievalSegLib.models.registry import SAM2_MODELS, canonical_sam2, sam2_spec

from _reference import MEDSAM2_PUBLISHED_BASE, MEDSAM2_PUBLISHED_DIFF


def _flat(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def _composed(config: str, overrides: list[str]) -> dict:
    import sam2  # noqa: F401 - initialises hydra on sam2's packaged configs
    from hydra import compose
    from omegaconf import OmegaConf

    return _flat(OmegaConf.to_container(compose(config_name=config, overrides=overrides), resolve=True))


# ----------------------------------------------------------------------------- registry
def test_backbone_names_old_names_and_unknown_ones():
    assert list(SAM2_MODELS) == ["sam2.1-tiny", "sam2.1-small", "sam2.1-base-plus", "sam2.1-large", "medsam2"]
    for old, new in [("tiny", "sam2.1-tiny"), ("small", "sam2.1-small"), ("base_plus", "sam2.1-base-plus"),
                     ("b+", "sam2.1-base-plus"), ("large", "sam2.1-large"), ("MedSAM2", "medsam2")]:
        assert canonical_sam2(old) == new
    with pytest.raises(ValueError, match="medsam2"):
        canonical_sam2("medsam3")
    assert registry.DEFAULT_SAM2 == "sam2.1-tiny"  # never the backbone whose weights terms are unknown
    med = sam2_spec("medsam2")
    assert (med.repo_id, med.filename, med.image_size) == ("wanglab/MedSAM2", "MedSAM2_latest.pt", 512)
    assert "Apache-2.0" in med.licence and "no licence" in med.weights_terms and "2504.03600" in med.citation
    assert all(s.weights_terms is None for n, s in SAM2_MODELS.items() if n != "medsam2")


def test_trunk_signatures_are_those_of_the_packaged_configs():
    """The (embed dim, blocks) that tell backbones apart in error messages match sam2's YAMLs."""
    from sam2.modeling.backbones.hieradet import Hiera

    default_stages = inspect.signature(Hiera).parameters["stages"].default
    for spec in SAM2_MODELS.values():
        cfg = _composed(spec.config, [])
        stages = cfg.get("model.image_encoder.trunk.stages", list(default_stages))
        assert spec.trunk_signature == (cfg["model.image_encoder.trunk.embed_dim"], sum(stages)), spec.name


def test_medsam2_entry_is_the_packaged_tiny_config_plus_exactly_the_published_differences():
    """Composed configs: the entry differs from sam2.1_hiera_t.yaml (as the video predictor builds
    it) in exactly MedSAM2's published differences, no more, no fewer."""
    spec = sam2_spec("medsam2")
    assert spec.config == MEDSAM2_PUBLISHED_BASE
    base = _composed(spec.config, models.sam2_hydra_overrides(None, "sam2.1-tiny"))
    entry = _composed(spec.config, models.sam2_hydra_overrides(None, "medsam2"))
    diff = {k: entry.get(k) for k in set(base) | set(entry) if base.get(k) != entry.get(k)}
    assert diff == MEDSAM2_PUBLISHED_DIFF


def test_native_image_size_and_an_explicit_one_warns(capsys):
    from RetrievalSegLib.engine.build import sam2_image_size

    ns = lambda name, size: argparse.Namespace(sam2=name, image_size=size)  # noqa: E731
    assert sam2_image_size(ns("medsam2", None)) == 512 and sam2_image_size(ns("tiny", None)) == 1024
    assert capsys.readouterr().err == ""
    assert sam2_image_size(ns("medsam2", 512)) == 512 and capsys.readouterr().err == ""
    assert sam2_image_size(ns("medsam2", 1024)) == 1024
    assert "WARNING: --image-size 1024" in capsys.readouterr().err
    assert models.resolve_image_size("medsam2", None) == 512
    with pytest.warns(ImageSizeWarning, match="overrides MedSAM2's native 512 px"):
        assert models.resolve_image_size("medsam2", 1024) == 1024


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{'model': state_dict} files as SAM 2.1 and MedSAM2 save them: tiny-architecture and small."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(1)
    tiny = models.build_sam2_architecture("sam2.1-tiny")
    torch.save({"model": tiny.state_dict()}, root / "tiny.pt")
    torch.manual_seed(1)
    small = models.build_sam2_architecture("sam2.1-small")
    torch.save({"model": small.state_dict()}, root / "small.pt")
    return {"tiny": root / "tiny.pt", "small": root / "small.pt"}


def test_a_checkpoint_of_another_architecture_is_refused_naming_both(checkpoints):
    with pytest.raises(CheckpointError) as e:
        models.load_sam2("medsam2", checkpoints["small"], device="cpu")
    msg = str(e.value)
    assert "MedSAM2 (MedSAM2_latest.pt, hiera-tiny at 512 px)" in msg
    assert "looks like a SAM 2.1 small checkpoint: use --sam2 sam2.1-small" in msg
    with pytest.raises(CheckpointError, match="does not match SAM 2.1 small .* looks like a SAM 2.1 tiny or MedSAM2"):
        models.check_sam2_checkpoint(checkpoints["tiny"], "small")


def test_same_architecture_files_are_told_apart_only_by_a_known_digest(checkpoints, monkeypatch):
    """SAM 2.1 tiny and MedSAM2 have identical keys and shapes: a tiny file loads strictly as
    MedSAM2 (and vice versa) unless its digest is a published one of the other backbone."""
    path = checkpoints["tiny"]
    as_med = models.load_sam2("medsam2", path, device="cpu")
    as_tiny = models.load_sam2("sam2.1-tiny", path, device="cpu", image_size=512)
    assert as_med.image_size == as_tiny.image_size == 512
    assert as_med.identity != as_tiny.identity  # same file, same size: still two cache identities
    assert as_med.identity.startswith("medsam2@512:sha256-") and as_tiny.identity.startswith("sam2.1-tiny@512:")
    digest = models.file_sha256(path)
    assert as_med.identity.endswith(digest[:16])
    # as if the registry knew this file as the published SAM 2.1 tiny checkpoint
    monkeypatch.setitem(SAM2_MODELS, "sam2.1-tiny", dataclasses.replace(sam2_spec("tiny"), published_sha256=(digest,)))
    with pytest.raises(CheckpointError) as e:
        models.load_sam2("medsam2", path, device="cpu")
    assert "is the published SAM 2.1 tiny checkpoint" in str(e.value) and "not MedSAM2" in str(e.value)
    assert "--sam2 sam2.1-tiny" in str(e.value)
    with pytest.raises(CheckpointError, match="published SAM 2.1 tiny"):
        models.check_sam2_checkpoint(path, "medsam2")  # the download / verify path too
    models.check_sam2_checkpoint(path, "tiny")  # its own backbone accepts it


# ----------------------------------------------------------------------------- memory identity
def test_medsam2_memories_are_never_used_for_sam21_tiny_and_back(tmp_path):
    """Same seed, same architecture, same 512 px: the weights are even identical, yet each
    backbone has its own cache folder and identity, and neither reads the other's memories."""
    from RetrievalSegLib.bank.support_bank import LabelInfo, SupportBank
    from RetrievalSegLib.engine.memory_cache import inspect_memory_file
    from RetrievalSegLib.engine.pipeline import RetrievalEngine

    bank = SupportBank.create(tmp_path / "bank", [LabelInfo(1, "a")], "dinov2-small:random-seed0")
    with pytest.warns(UserWarning):
        med = RetrievalEngine(None, Sam2MemoryEngine(models.load_sam2("medsam2", random_weights=True, device="cpu")))
        tiny = RetrievalEngine(None, Sam2MemoryEngine(models.load_sam2("tiny", random_weights=True, device="cpu",
                                                                         image_size=512)))
    assert med.sam.image_size == tiny.sam.image_size == 512
    med_cache, tiny_cache = med.memory_cache(bank), tiny.memory_cache(bank)
    assert med_cache.identity != tiny_cache.identity
    assert med_cache.directory != tiny_cache.directory
    img = np.zeros((48, 48, 3), np.uint8)
    img[12:36, 12:36] = 200
    mem = med.sam.encode_support(img, {1: img[..., 0] > 0}, (1,))
    med_cache.put("entry-1", mem)
    assert med_cache.get("entry-1") is not None
    assert tiny_cache.get("entry-1") is None  # a miss: computed anew for sam2.1-tiny
    fresh_tiny = tiny.memory_cache(bank)  # from disk too, not only the in-memory LRU
    assert fresh_tiny.get("entry-1") is None
    (written,) = [p for p in med_cache.directory.rglob("*") if p.is_file() and p.name != "identity.json"]
    assert inspect_memory_file(written.read_bytes(), tiny_cache.identity) is not None  # refused
    assert inspect_memory_file(written.read_bytes(), med_cache.identity) is None


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    from RetrievalSegLib.data.synthetic import make_synthetic_study
    from RetrievalSegLib.data.volume import write_volume

    root = tmp_path_factory.mktemp("study")
    cases = make_synthetic_study(2, shape=(4, 32, 32), spacing=(1.3, 1.3, 6.0))
    paths = []
    for c in cases:
        img, lab = root / f"{c.case_id}.nii.gz", root / f"{c.case_id}_labels.nii.gz"
        write_volume(c.image, img)
        write_volume(c.labels, lab)
        paths.append((c.case_id, img, lab))
    return paths


def test_rseg_segment_with_medsam2_end_to_end_at_512(tiny_study, tmp_path, capsys):
    from RetrievalSegLib.cli.main import main
    from RetrievalSegLib.segmentation.provenance import read_sidecar
    from RetrievalSegLib.data.volume import read_volume

    fast = ["--sam2", "medsam2", "--random-weights", "--dinov2-input-size", "56", "--device", "cpu"]
    (case, img, lab), (_, test_img, _) = tiny_study
    bank = tmp_path / "bank"
    assert main(["bank", "create", str(bank), "--labels", "1:RV,2:Myo,3:LV", *fast]) == 0
    assert main(["bank", "add", str(bank), str(img), str(lab), "--case", case, *fast]) == 0
    out = tmp_path / "seg.nii.gz"
    capsys.readouterr()
    assert main(["segment", str(test_img), "--bank", str(bank), "--out", str(out), "--k", "1", "--slices", "1:3",
                 "--json", *fast]) == 0
    captured = capsys.readouterr()
    assert "WARNING: --image-size" not in captured.err  # its native size, no override
    summary = json.loads(captured.out)
    assert summary["slices_segmented"] == 2
    prov = read_sidecar(out)["provenance"]
    assert prov["sam2"] == "medsam2@512:random-seed0" and prov["random_weights"] is True
    seg = read_volume(out)
    assert seg.array.shape == read_volume(test_img).array.shape
    from RetrievalSegLib.engine.memory_cache import user_cache_root

    bank_id = prov["bank"]["bank_id"]
    assert [p.name.split("_")[0] for p in (user_cache_root() / "memories" / bank_id).iterdir()] == ["medsam2"]


def test_rseg_rejects_an_unknown_backbone_with_usage_exit(capsys):
    from RetrievalSegLib.cli.main import main

    assert main(["segment", "x.nii.gz", "--bank", "b", "--out", "y.nii.gz", "--sam2", "medsam3"]) == 2
    assert "unknown SAM 2 backbone 'medsam3'" in capsys.readouterr().err


def test_weights_download_plans_medsam2_and_shows_its_terms_first(tmp_path, monkeypatch, capsys):
    from RetrievalSegLib.cli import weights as cli_weights
    from RetrievalSegLib.models import weights

    (item,) = weights.plan_downloads("medsam2", None, dest_dir=tmp_path)
    assert (item.repo_id, item.filename, item.model) == ("wanglab/MedSAM2", "MedSAM2_latest.pt", "medsam2")
    assert item.url.endswith("/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt")
    for var in ("RSEG_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cli_weights.sys.stdin, "isatty", lambda: True, raising=False)
    prompts: list[str] = []
    monkeypatch.setattr("builtins.input", lambda p: prompts.append(p) or "n")
    fetched: list = []
    monkeypatch.setattr(weights, "download", lambda *a, **k: fetched.append(a))
    rc = cli_weights.main(["weights", "download", "--sam2", "medsam2", "--dinov2", "none", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1 and fetched == [] and prompts == ["Download now? [y/N] "]
    assert "Licence of MedSAM2: Apache-2.0 (code" in out and "no licence for the MedSAM2 weights" in out
    assert out.index("no licence for the MedSAM2 weights") < out.index("Nothing downloaded")


def test_slicer_settings_offer_exactly_the_registry_backbones():
    import ast
    from pathlib import Path

    source = (Path(__file__).resolve().parents[2] / "RetrievalSeg" / "RetrievalSeg.py").read_text(encoding="utf-8")
    node = next(n for n in ast.walk(ast.parse(source))
                if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "sam2Size")
    choices = next(c for c in ast.walk(node.annotation) if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "Choice")
    assert ast.literal_eval(choices.args[0]) == list(SAM2_MODELS)
    assert ast.literal_eval(node.value) == registry.DEFAULT_SAM2
    assert "MedSAM2" in source and "no licence for its weights" in source.replace("\n", " ")
