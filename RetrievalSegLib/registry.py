"""Catalogue of the models RetrievalSeg knows: file names, download locations, architectures.

One place for every name a user may see in an error message, a command line or the Slicer panel.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SAM2_URL_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
HF_URL_BASE = "https://huggingface.co"

#: Environment variables (documented in the README).
ENV_WEIGHTS_DIR = "RSEG_WEIGHTS_DIR"  # folder holding the checkpoints (default: per-user cache)
ENV_MIRROR = "RSEG_WEIGHTS_MIRROR"  # base URL of a mirror laid out like the weights folder
ENV_OFFLINE = "RSEG_OFFLINE"  # "1": never touch the network
ENV_SAM2_CHECKPOINT = "RSEG_SAM2_CHECKPOINT"  # explicit SAM 2 checkpoint file
ENV_DINOV2_PATH = "RSEG_DINOV2_PATH"  # explicit DINOv2 folder (config.json + weights)


@dataclass(frozen=True)
class Sam2Spec:
    """One SAM 2.1 size: packaged hydra config and the official checkpoint file."""

    size: str
    config: str  # path inside the sam2 package's hydra search path
    filename: str
    approx_mb: int  # shown before a download is confirmed; the server's length is authoritative

    @property
    def url(self) -> str:
        return f"{SAM2_URL_BASE}/{self.filename}"


@dataclass(frozen=True)
class Dinov2Spec:
    """One DINOv2 size: Hugging Face repository and the architecture of its ViT-?/14."""

    size: str
    repo_id: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    approx_mb: int
    # SHA-256 of model.safetensors as published by the Hugging Face LFS pointer, where known.
    safetensors_sha256: str | None = None

    @property
    def folder_name(self) -> str:
        return self.repo_id.split("/")[-1]  # e.g. "dinov2-small"

    def url(self, filename: str) -> str:
        return f"{HF_URL_BASE}/{self.repo_id}/resolve/main/{filename}"


SAM2_MODELS: dict[str, Sam2Spec] = {
    "tiny": Sam2Spec("tiny", "configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt", 156),
    "small": Sam2Spec("small", "configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt", 184),
    "base_plus": Sam2Spec(
        "base_plus", "configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt", 324
    ),
    "large": Sam2Spec("large", "configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt", 898),
}

DINOV2_MODELS: dict[str, Dinov2Spec] = {
    "small": Dinov2Spec(
        "small", "facebook/dinov2-small", 384, 12, 6, 88,
        safetensors_sha256="ae1e99fcefd534ed978cdeb8326f08030c96e28b7a81ffcbc98a857c84d14be1",
    ),
    "base": Dinov2Spec("base", "facebook/dinov2-base", 768, 12, 12, 346),
    "large": Dinov2Spec("large", "facebook/dinov2-large", 1024, 24, 16, 1217),
}

DINOV2_FILES = ("config.json", "model.safetensors")


def sam2_spec(size: str) -> Sam2Spec:
    """The SAM 2.1 spec for `size`, or a ValueError listing the valid sizes."""
    try:
        return SAM2_MODELS[size]
    except KeyError:
        raise ValueError(
            f"unknown SAM 2.1 size {size!r}; choose one of {', '.join(SAM2_MODELS)}"
        ) from None


def dinov2_spec(size: str) -> Dinov2Spec:
    """The DINOv2 spec for `size`, or a ValueError listing the valid sizes."""
    try:
        return DINOV2_MODELS[size]
    except KeyError:
        raise ValueError(
            f"unknown DINOv2 size {size!r}; choose one of {', '.join(DINOV2_MODELS)}"
        ) from None


def weights_dir() -> Path:
    """Folder holding downloaded weights: $RSEG_WEIGHTS_DIR, else the per-user cache."""
    env = os.environ.get(ENV_WEIGHTS_DIR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "retrievalseg" / "weights"


def is_offline() -> bool:
    """True when RSEG_OFFLINE is set to a true value."""
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in ("1", "true", "yes", "on")
