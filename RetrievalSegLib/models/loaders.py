"""Loading the SAM 2 backbones (SAM 2.1, MedSAM2) and DINOv2: real checkpoints from local files, random weights only on request.

Nothing here downloads: `RetrievalSegLib.models.weights` (or `rseg weights download`) fetches files into
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

from ..data.fileio import file_sha256
from .registry import (
    DEFAULT_SAM2,
    DINOV2_FILES,
    ENV_DINOV2_PATH,
    ENV_SAM2_CHECKPOINT,
    ENV_WEIGHTS_DIR,
    SAM2_MODELS,
    Sam2Spec,
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
    if name.startswith("cuda"):
        try:
            index = torch.device(name).index
        except RuntimeError:
            raise ValueError(f"device must be auto, cpu, cuda[:N] or mps, got {device!r}") from None
        count = torch.cuda.device_count()
        if index is not None and index >= count:
            raise RuntimeError(
                f"device {device!r} requested but this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1}"
                f"{', as CUDA_VISIBLE_DEVICES shows them' if os.environ.get('CUDA_VISIBLE_DEVICES') else ''}); "
                "choose one of those or --device cpu"
            )
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise RuntimeError("device 'mps' requested but Metal (MPS) is not available; use cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu, cuda[:N] or mps, got {device!r}")
    return torch.device(name)


# ----------------------------------------------------------------------------- SAM 2
class ImageSizeWarning(UserWarning):
    """An explicit SAM 2 input size differs from the backbone's native one."""


@dataclass
class LoadedSam2:
    """A SAM 2 backbone ready for inference, with the identity its memories are cached under.

    The identity starts with the backbone's canonical name (`sam2.1-tiny@1024:...`,
    `medsam2@512:...`): memories of one backbone are never read for another, even where the two
    share an architecture, an input size or a weights file.
    """

    model: Any  # sam2.modeling.sam2_base.SAM2Base
    size: str  # the backbone's canonical name, e.g. "sam2.1-tiny" or "medsam2"
    image_size: int
    device: torch.device
    identity: str
    checkpoint: Path | None


# What the official video predictor adds on top of every YAML (build_sam2_video_predictor's
# apply_postprocessing): the memory encoder then sees binarised masks for prompted frames.
_VIDEO_PREDICTOR_OVERRIDES = [
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
    "++model.binarize_mask_from_pts_for_mem_enc=true",
]


def check_image_size(image_size: int) -> None:
    """Raise ValueError unless `image_size` is one SAM 2 can run at."""
    if image_size % 32 != 0 or image_size < 256:
        raise ValueError(f"SAM 2 image size must be a multiple of 32 and >= 256, got {image_size}")


def sam2_hydra_overrides(image_size: int | None = None, backbone: str = DEFAULT_SAM2) -> list[str]:
    """Hydra overrides for `backbone` as the official video predictor builds it, at `image_size`.

    The video predictor's post-processing settings, the backbone's own config differences
    (`Sam2Spec.config_overrides`), then the input-size change when `image_size` is not native.
    """
    spec = sam2_spec(backbone)
    size = spec.image_size if image_size is None else int(image_size)
    check_image_size(size)
    return list(_VIDEO_PREDICTOR_OVERRIDES) + spec.hydra_overrides(size)


def resolve_image_size(backbone: str, image_size: int | None) -> int:
    """The input size to use: the backbone's native one, or an explicit one (warned when it differs)."""
    spec = sam2_spec(backbone)
    if image_size is None:
        return spec.image_size
    image_size = int(image_size)
    check_image_size(image_size)
    if image_size != spec.image_size:
        warnings.warn(image_size_message(spec.name, image_size), ImageSizeWarning, stacklevel=3)
    return image_size


def image_size_message(backbone: str, image_size: int) -> str:
    """The warning shown when an explicit input size overrides the backbone's native one."""
    spec = sam2_spec(backbone)
    return (
        f"image size {image_size} px overrides {spec.display}'s native {spec.image_size} px "
        f"(it was trained at {spec.image_size}); leave the image size unset to use it"
    )


def build_sam2_architecture(backbone: str, image_size: int | None = None, device: str = "cpu") -> Any:
    """The backbone's real architecture from the packaged YAML + its overrides, parameters as initialised."""
    from sam2.build_sam import build_sam2

    spec = sam2_spec(backbone)
    return build_sam2(
        spec.config,
        ckpt_path=None,
        device=str(device),
        apply_postprocessing=False,
        hydra_overrides_extra=sam2_hydra_overrides(image_size, spec.name),
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
    # SAM 2.1 and MedSAM2 both save {"model": state_dict} (MedSAM2's build_sam reads ["model"]).
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no SAM 2 state dict (expected {{'model': state_dict}})")
    return obj


def trunk_signature(sd: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """(patch-embed channels, number of Hiera blocks) of a SAM 2 state dict, or None if not SAM 2."""
    w = sd.get("image_encoder.trunk.patch_embed.proj.weight")
    if not isinstance(w, torch.Tensor) or w.ndim != 4:
        return None
    blocks = {k.split(".")[3] for k in sd if k.startswith("image_encoder.trunk.blocks.")}
    return int(w.shape[0]), len(blocks)


def guess_backbones(sd: dict[str, torch.Tensor]) -> list[str]:
    """The backbones whose architecture a state dict has (several where they share one)."""
    sig = trunk_signature(sd)
    return [s.name for s in SAM2_MODELS.values() if sig is not None and s.trunk_signature == sig]


def _wrong_backbone_hint(sd: dict[str, torch.Tensor]) -> str:
    guessed = guess_backbones(sd)
    if not guessed:
        return ""
    names = " or ".join(sam2_spec(g).display for g in guessed)
    return f" It looks like a {names} checkpoint: use --sam2 {guessed[0]}" + (
        " (or the backbone of the same architecture it was fine-tuned from)." if len(guessed) > 1 else "."
    )


def _load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path, what: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        hint = _wrong_backbone_hint(sd)
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
            f"{tuple(sd[k].shape)} vs {tuple(own[k].shape)}.{_wrong_backbone_hint(sd) or ' (another SAM 2 size?)'}"
        )
    model.load_state_dict(sd, strict=True)


def check_backbone_digest(path: Path, backbone: str, digest: str | None = None) -> str:
    """Refuse the published file of another backbone; return the file's SHA-256.

    Backbones of one architecture (SAM 2.1 tiny and MedSAM2) have the same keys and shapes, and the
    input size is not stored in a checkpoint, so a strict load cannot tell them apart: only a
    file's digest can, and only for files whose digest the registry knows (`published_sha256`).
    A file of unknown digest (a fine-tune, another MedSAM2 release) is accepted for any backbone of
    its architecture; its memories are still cached under that backbone's own identity.
    """
    spec = sam2_spec(backbone)
    digest = digest or file_sha256(path)
    for other in SAM2_MODELS.values():
        if other.name != spec.name and digest in other.published_sha256:
            raise CheckpointError(
                f"{path} is the published {other.display} checkpoint ({other.filename}, SHA-256 "
                f"{digest[:16]}...), not {spec.display} ({spec.filename}): the two share the "
                f"{spec.architecture} architecture, so it would load, but as the wrong model. Use "
                f"--sam2 {other.name}, or give the {spec.display} file."
            )
    return digest


def default_sam2_checkpoint(backbone: str) -> Path | None:
    """The backbone's checkpoint when no path is given (None: not in the HF cache)."""
    env = os.environ.get(ENV_SAM2_CHECKPOINT)
    if env:
        return Path(env).expanduser()
    root = weights_dir()
    if root is not None:
        return root / sam2_spec(backbone).filename
    from .registry import cached_hub_file

    spec = sam2_spec(backbone)
    return cached_hub_file(spec.repo_id, spec.filename)


def missing_sam2_message(backbone: str, path: Path | None) -> str:
    """What to tell a user whose SAM 2 checkpoint is absent."""
    spec = sam2_spec(backbone)
    where = str(path) if path is not None else f"{weights_location()} ({spec.repo_id})"
    return (
        f"{spec.display} checkpoint not found in {where}. Download it with "
        f"`rseg weights download --sam2 {spec.name} --dinov2 none` (or from {spec.url}), or point "
        f"{ENV_SAM2_CHECKPOINT} to the file, or {ENV_WEIGHTS_DIR} to a folder holding "
        f"{spec.filename}."
    )


def _describe(spec: Sam2Spec, image_size: int) -> str:
    return f"{spec.display} ({spec.filename}, {spec.architecture} at {image_size} px)"


def load_sam2(
    size: str = DEFAULT_SAM2,
    checkpoint: str | Path | None = None,
    *,
    device: str | torch.device = "auto",
    image_size: int | None = None,
    random_weights: bool = False,
    seed: int = 0,
) -> LoadedSam2:
    """The SAM 2 backbone `size` (a name from registry.SAM2_MODELS or an alias) from a local
    checkpoint (strict), or random weights when asked explicitly.

    `image_size` None: the backbone's native size (1024 for SAM 2.1, 512 for MedSAM2); another
    value overrides it with an ImageSizeWarning.
    """
    spec = sam2_spec(size)
    image_size = resolve_image_size(spec.name, image_size)
    dev = resolve_device(device)
    if random_weights:
        if checkpoint is not None:
            raise ValueError("give either a checkpoint or random_weights=True, not both")
        warnings.warn(RANDOM_WEIGHTS_WARNING, stacklevel=2)
        torch.manual_seed(seed)
        model = build_sam2_architecture(spec.name, image_size, "cpu").to(dev).eval()
        identity = f"{spec.name}@{image_size}:random-seed{seed}"
        return LoadedSam2(model, spec.name, image_size, dev, identity, None)
    path = Path(checkpoint).expanduser() if checkpoint else default_sam2_checkpoint(spec.name)
    if path is None or not path.is_file():
        raise MissingWeightsError(missing_sam2_message(spec.name, path))
    sd = _read_sam2_state_dict(path)
    model = build_sam2_architecture(spec.name, image_size, "cpu")
    _load_strict(model, sd, path, _describe(spec, image_size))
    digest = check_backbone_digest(path, spec.name)
    identity = f"{spec.name}@{image_size}:sha256-{digest[:16]}"
    return LoadedSam2(model.to(dev).eval(), spec.name, image_size, dev, identity, path)


def check_sam2_checkpoint(path: Path, size: str) -> None:
    """Raise CheckpointError unless `path` loads strictly into backbone `size` and is not another's file."""
    path = Path(path)
    spec = sam2_spec(size)
    sd = _read_sam2_state_dict(path)
    model = build_sam2_architecture(spec.name, None, "cpu")
    _load_strict(model, sd, path, _describe(spec, spec.image_size))
    check_backbone_digest(path, spec.name)


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
