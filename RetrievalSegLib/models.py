"""Loading SAM 2.1 and DINOv2: real checkpoints from local files, random weights only on request.

Nothing here downloads: `RetrievalSegLib.weights` (or `rseg weights download`) fetches files into
the Hugging Face cache or a plain weights folder; these functions only read local files
(`torch.load(weights_only=True)`, safetensors), load strictly, and name the file, the download
command and the environment variable when something is missing. Where a model is looked for: the
explicit file ($RSEG_SAM2_CHECKPOINT, $RSEG_DINOV2_PATH or an argument), else the plain weights
folder when one is set ($RSEG_WEIGHTS_DIR), else the Hugging Face cache (offline lookup).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .fileio import file_sha256
from .registry import (
    DINOV2_FILES,
    ENV_DINOV2_PATH,
    ENV_SAM2_CHECKPOINT,
    ENV_WEIGHTS_DIR,
    dinov2_spec,
    sam2_spec,
    weights_dir,
    weights_location,
)

RANDOM_WEIGHTS_WARNING = (
    "RetrievalSeg is running with RANDOM weights: the output is meaningless and only useful "
    "for tests and benchmarks."
)


class MissingWeightsError(FileNotFoundError):
    """A checkpoint that the user must download or point to is not where we looked."""


class CheckpointError(ValueError):
    """A checkpoint file exists but is not a valid checkpoint for the requested model."""


# ----------------------------------------------------------------------------- device
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} requested but this torch ({torch.__version__}) sees no CUDA GPU; "
            "use --device cpu or auto, or install a CUDA build of torch"
        )
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise RuntimeError("device 'mps' requested but Metal (MPS) is not available; use cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu, cuda[:N] or mps, got {device!r}")
    return torch.device(name)


# ----------------------------------------------------------------------------- SAM 2
@dataclass
class LoadedSam2:
    """A SAM 2.1 model ready for inference, with the identity its memories are cached under."""

    model: Any  # sam2.modeling.sam2_base.SAM2Base
    size: str
    image_size: int
    device: torch.device
    identity: str
    checkpoint: Path | None


def sam2_hydra_overrides(image_size: int) -> list[str]:
    """Hydra overrides for the model as the official video predictor builds it, at `image_size`.

    The video predictor adds these post-processing settings on top of the YAML; the memory
    encoder then sees binarised masks for prompted frames, exactly what a user drew.
    """
    if image_size % 32 != 0 or image_size < 256:
        raise ValueError(f"SAM 2 image size must be a multiple of 32 and >= 256, got {image_size}")
    overrides = [
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
        "++model.binarize_mask_from_pts_for_mem_enc=true",
    ]
    if image_size != 1024:
        feat = image_size // 16  # stride-16 top-level feature map that RoPE attention runs on
        overrides += [
            f"++model.image_size={image_size}",
            f"++model.memory_attention.layer.self_attention.feat_sizes=[{feat},{feat}]",
            f"++model.memory_attention.layer.cross_attention.feat_sizes=[{feat},{feat}]",
        ]
    return overrides


def build_sam2_architecture(size: str, image_size: int = 1024, device: str = "cpu") -> Any:
    """The real SAM 2.1 architecture from the packaged YAML, parameters as initialised (random)."""
    from sam2.build_sam import build_sam2

    spec = sam2_spec(size)
    return build_sam2(
        spec.config,
        ckpt_path=None,
        device=str(device),
        apply_postprocessing=False,
        hydra_overrides_extra=sam2_hydra_overrides(image_size),
    )


def _read_sam2_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle-only objects, truncated zip, not a torch file at all
        raise CheckpointError(
            f"{path} cannot be read as a safe SAM 2 checkpoint (torch.load with "
            f"weights_only=True failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}). "
            "Files that need pickle to load are refused; re-download the official file with "
            "`rseg weights download`."
        ) from e
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no SAM 2 state dict (expected {{'model': state_dict}})")
    return obj


def _load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path, what: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        hint = ""
        if any(k.startswith(("embeddings.", "encoder.layer.")) for k in unexpected):
            hint = " It looks like a DINOv2 checkpoint, not a SAM 2 one."
        raise CheckpointError(
            f"{path} does not match {what}: {len(missing)} missing keys "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.{hint}"
        )
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{path} does not match {what}: {len(bad)} tensors have the wrong shape, e.g. {k} "
            f"{tuple(sd[k].shape)} vs {tuple(own[k].shape)} (another SAM 2 size?)"
        )
    model.load_state_dict(sd, strict=True)


def default_sam2_checkpoint(size: str) -> Path | None:
    """The SAM 2.1 checkpoint of `size` when no path is given (None: not in the HF cache)."""
    env = os.environ.get(ENV_SAM2_CHECKPOINT)
    if env:
        return Path(env).expanduser()
    root = weights_dir()
    if root is not None:
        return root / sam2_spec(size).filename
    from .registry import cached_hub_file

    spec = sam2_spec(size)
    return cached_hub_file(spec.repo_id, spec.filename)


def missing_sam2_message(size: str, path: Path | None) -> str:
    """What to tell a user whose SAM 2 checkpoint is absent."""
    spec = sam2_spec(size)
    where = str(path) if path is not None else f"{weights_location()} ({spec.repo_id})"
    return (
        f"SAM 2.1 {size} checkpoint not found in {where}. Download it with "
        f"`rseg weights download --sam2 {size} --dinov2 none` (or from {spec.url}), or point "
        f"{ENV_SAM2_CHECKPOINT} to the file, or {ENV_WEIGHTS_DIR} to a folder holding "
        f"{spec.filename}."
    )


def load_sam2(
    size: str = "tiny",
    checkpoint: str | Path | None = None,
    *,
    device: str | torch.device = "auto",
    image_size: int = 1024,
    random_weights: bool = False,
    seed: int = 0,
) -> LoadedSam2:
    """SAM 2.1 `size` from a local checkpoint (strict), or random weights when asked explicitly."""
    spec = sam2_spec(size)
    dev = resolve_device(device)
    if random_weights:
        if checkpoint is not None:
            raise ValueError("give either a checkpoint or random_weights=True, not both")
        warnings.warn(RANDOM_WEIGHTS_WARNING, stacklevel=2)
        torch.manual_seed(seed)
        model = build_sam2_architecture(size, image_size, "cpu").to(dev).eval()
        identity = f"sam2.1-{size}@{image_size}:random-seed{seed}"
        return LoadedSam2(model, size, image_size, dev, identity, None)
    path = Path(checkpoint).expanduser() if checkpoint else default_sam2_checkpoint(size)
    if path is None or not path.is_file():
        raise MissingWeightsError(missing_sam2_message(size, path))
    sd = _read_sam2_state_dict(path)
    model = build_sam2_architecture(size, image_size, "cpu")
    _load_strict(model, sd, path, f"SAM 2.1 {size} ({spec.filename})")
    identity = f"sam2.1-{size}@{image_size}:sha256-{file_sha256(path)[:16]}"
    return LoadedSam2(model.to(dev).eval(), size, image_size, dev, identity, path)


def check_sam2_checkpoint(path: Path, size: str) -> None:
    """Raise CheckpointError unless `path` loads strictly into SAM 2.1 `size`."""
    path = Path(path)
    sd = _read_sam2_state_dict(path)
    model = build_sam2_architecture(size, 1024, "cpu")
    _load_strict(model, sd, path, f"SAM 2.1 {size} ({sam2_spec(size).filename})")


# ----------------------------------------------------------------------------- DINOv2
@dataclass
class LoadedDinov2:
    """A DINOv2 backbone (transformers Dinov2Model) with its identity and embedding size."""

    model: Any  # transformers.Dinov2Model
    size: str
    device: torch.device
    identity: str
    dim: int
    path: Path | None


def dinov2_config(size: str) -> Any:
    """transformers Dinov2Config of the official ViT-?/14 of `size`."""
    from transformers import Dinov2Config

    spec = dinov2_spec(size)
    return Dinov2Config(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        patch_size=14,
        image_size=518,
    )


def default_dinov2_folder(size: str) -> Path | None:
    """The DINOv2 `size` folder when no path is given (None: not in the HF cache)."""
    env = os.environ.get(ENV_DINOV2_PATH)
    if env:
        return Path(env).expanduser()
    root = weights_dir()
    if root is not None:
        return root / dinov2_spec(size).folder_name
    from .registry import cached_hub_file

    spec = dinov2_spec(size)
    files = [cached_hub_file(spec.repo_id, f) for f in DINOV2_FILES]
    if all(f is not None for f in files) and len({f.parent for f in files}) == 1:  # type: ignore[union-attr]
        return files[0].parent  # type: ignore[union-attr]  # the cache snapshot holding both
    return None


def missing_dinov2_message(size: str, path: Path | None) -> str:
    """What to tell a user whose DINOv2 weights are absent."""
    spec = dinov2_spec(size)
    where = str(path) if path is not None else f"{weights_location()} ({spec.repo_id})"
    return (
        f"DINOv2 {size} weights not found in {where} (expected {', '.join(DINOV2_FILES)}). "
        f"Download them with `rseg weights download --sam2 none --dinov2 {size}`, or point "
        f"{ENV_DINOV2_PATH} to a folder holding them, or {ENV_WEIGHTS_DIR} to a folder holding "
        f"{spec.folder_name}/."
    )


def _load_dinov2_checked(source: str | Path, size: str, local_only: bool = True) -> Any:
    from transformers import Dinov2Model

    spec = dinov2_spec(size)
    try:
        model, info = Dinov2Model.from_pretrained(
            str(source), local_files_only=local_only, output_loading_info=True
        )
    except OSError:
        raise
    except Exception as e:
        raise CheckpointError(f"{source} cannot be loaded as DINOv2 {size}: {e}") from e
    if model.config.hidden_size != spec.hidden_size or (
        model.config.num_hidden_layers != spec.num_hidden_layers
    ):
        raise CheckpointError(
            f"{source} holds a DINOv2 with hidden size {model.config.hidden_size} and "
            f"{model.config.num_hidden_layers} layers, not DINOv2 {size} "
            f"({spec.hidden_size}, {spec.num_hidden_layers})"
        )
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    # mask_token is only used for masked image modelling and may legitimately be absent.
    if "missing_keys" in problems:
        rest = [k for k in problems["missing_keys"] if "mask_token" not in k]
        problems["missing_keys"] = rest
        if not rest:
            del problems["missing_keys"]
    if problems:
        raise CheckpointError(f"{source} does not load strictly into DINOv2 {size}: {problems}")
    return model


def load_dinov2(
    size: str = "small",
    path: str | Path | None = None,
    *,
    device: str | torch.device = "auto",
    random_weights: bool = False,
    seed: int = 0,
) -> LoadedDinov2:
    """DINOv2 `size` from a local folder or the HF cache (offline), or random weights on request."""
    from transformers import Dinov2Model

    spec = dinov2_spec(size)
    dev = resolve_device(device)
    if random_weights:
        if path is not None:
            raise ValueError("give either a DINOv2 path or random_weights=True, not both")
        warnings.warn(RANDOM_WEIGHTS_WARNING, stacklevel=2)
        torch.manual_seed(seed)
        model = Dinov2Model(dinov2_config(size)).eval().to(dev)
        return LoadedDinov2(model, size, dev, f"dinov2-{size}:random-seed{seed}", spec.hidden_size, None)
    folder = Path(path).expanduser() if path else default_dinov2_folder(size)
    if folder is not None and (folder / "config.json").is_file():
        model = _load_dinov2_checked(folder, size)
        weights = folder / "model.safetensors"
        digest = file_sha256(weights)[:16] if weights.is_file() else "unknown"
        identity = f"dinov2-{size}:sha256-{digest}"
        return LoadedDinov2(model.eval().to(dev), size, dev, identity, spec.hidden_size, folder)
    raise MissingWeightsError(missing_dinov2_message(size, folder))


def check_dinov2_folder(path: Path, size: str) -> None:
    """Raise CheckpointError unless the folder loads strictly into DINOv2 `size`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; it is not a DINOv2 folder")
    try:
        _load_dinov2_checked(path, size)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be loaded as DINOv2 {size}: {e}") from e
