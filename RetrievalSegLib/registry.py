"""Catalogue of the models RetrievalSeg knows: Hub repositories, file names, architectures.

One place for every name a user may see in an error message, a command line or the Slicer panel,
and for the project's environment switches. Both model families are published on the Hugging Face
Hub (SAM 2.1 as `facebook/sam2.1-hiera-<size>`, the repositories sam2's own `build_sam2_hf` reads;
DINOv2 as `facebook/dinov2-<size>`) and are fetched with `huggingface_hub` into its shared cache
(`$HF_HOME/hub`), unless a plain weights folder is configured ($RSEG_WEIGHTS_DIR).

`RSEG_OFFLINE` and `RSEG_WEIGHTS_MIRROR` stay the project's switches; `apply_hub_environment()`
(run when `RetrievalSegLib` is imported) maps them onto `HF_HUB_OFFLINE` and `HF_ENDPOINT`, which
`huggingface_hub` reads once, when it is first imported.
"""
from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

HF_URL_BASE = "https://huggingface.co"
#: Branch of the Hub repositories we download (the files are also checked by a strict load).
HUB_REVISION = "main"

#: Environment variables (documented in the README).
ENV_WEIGHTS_DIR = "RSEG_WEIGHTS_DIR"  # plain weights folder (air-gapped sites); default: HF cache
ENV_MIRROR = "RSEG_WEIGHTS_MIRROR"  # URL of a Hugging Face Hub mirror (becomes HF_ENDPOINT)
ENV_OFFLINE = "RSEG_OFFLINE"  # "1": never touch the network (becomes HF_HUB_OFFLINE=1)
ENV_SAM2_CHECKPOINT = "RSEG_SAM2_CHECKPOINT"  # explicit SAM 2 checkpoint file
ENV_DINOV2_PATH = "RSEG_DINOV2_PATH"  # explicit DINOv2 folder (config.json + weights)
#: huggingface_hub's own variables that we set or honour.
HF_ENV_OFFLINE = "HF_HUB_OFFLINE"
HF_ENV_ENDPOINT = "HF_ENDPOINT"
_TRUE = ("1", "true", "yes", "on")


def hub_url(repo_id: str, filename: str, endpoint: str | None = None) -> str:
    """The Hub's resolve URL of `filename` in `repo_id` (what `hf_hub_download` asks for)."""
    base = (endpoint or HF_URL_BASE).rstrip("/")
    return f"{base}/{repo_id}/resolve/{HUB_REVISION}/{urllib.parse.quote(filename)}"


def cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """The file in the Hugging Face cache (revision `main`), or None; never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # Slicer before its dependencies are installed: nothing can be cached
        return None

    found = try_to_load_from_cache(repo_id, filename, revision=HUB_REVISION)
    return Path(found) if isinstance(found, str) else None


@dataclass(frozen=True)
class Sam2Spec:
    """One SAM 2.1 size: packaged hydra config, Hub repository and checkpoint file in it."""

    size: str
    config: str  # path inside the sam2 package's hydra search path
    filename: str
    approx_mb: int  # shown before a download is confirmed; the server's length is authoritative

    @property
    def repo_id(self) -> str:
        """The Hub repository (as in sam2's HF_MODEL_ID_TO_FILENAMES), e.g. facebook/sam2.1-hiera-tiny."""
        return "facebook/sam2.1-hiera-" + self.size.replace("_", "-")

    @property
    def url(self) -> str:
        return hub_url(self.repo_id, self.filename)


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
        return hub_url(self.repo_id, filename)


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


def weights_dir() -> Path | None:
    """The plain weights folder $RSEG_WEIGHTS_DIR, or None: the Hugging Face cache is used."""
    env = os.environ.get(ENV_WEIGHTS_DIR, "").strip()
    return Path(env).expanduser() if env else None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    try:
        from huggingface_hub import constants  # reads the environment once, at its first import
    except ImportError:  # Slicer before its dependencies are installed: the library's rule
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "huggingface")
        return Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")).expanduser()
    return Path(constants.HF_HUB_CACHE)


def weights_location(folder: str | Path | None = None) -> str:
    """Where weights go, in words: the given folder, $RSEG_WEIGHTS_DIR, or the Hugging Face cache."""
    root = Path(folder).expanduser() if folder else weights_dir()
    if root is not None:
        return str(root)
    return f"the Hugging Face cache ({hub_cache_dir()})"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def offline_reason() -> str | None:
    """Which variable turns offline mode on (RSEG_OFFLINE, HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE)."""
    for name in (ENV_OFFLINE, HF_ENV_OFFLINE, "TRANSFORMERS_OFFLINE"):
        if _env_true(name):
            return f"{name}={os.environ[name].strip()}"
    return None


def is_offline() -> bool:
    """True when RSEG_OFFLINE (or huggingface_hub's own HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) is on."""
    return offline_reason() is not None


def resolve_mirror(mirror: str | None = None) -> str | None:
    """The Hub mirror URL to use: `mirror`, else $RSEG_WEIGHTS_MIRROR, else None (HF_ENDPOINT/official).

    A mirror is a Hugging Face Hub compatible endpoint (it answers `/<repo>/resolve/<rev>/<file>`
    with the Hub's headers: an intranet hub proxy, hf-mirror, Artifactory/Nexus "huggingface"
    remotes). A folder of files is not a mirror: point $RSEG_WEIGHTS_DIR to it instead.
    """
    raw = (mirror if mirror is not None else os.environ.get(ENV_MIRROR, "")).strip()
    if not raw:
        return None
    if "://" not in raw:
        raise ValueError(
            f"weights mirror {raw!r} is not a URL: a mirror must be a Hugging Face Hub compatible "
            f"http(s) endpoint; for a folder of weight files set {ENV_WEIGHTS_DIR} to it instead "
            f"(fix {ENV_MIRROR} or the --mirror option)"
        )
    scheme = urllib.parse.urlsplit(raw).scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"weights mirror {raw!r} must be an http or https URL of a Hub mirror")
    return raw.rstrip("/")


def hub_endpoint(mirror: str | None = None) -> str:
    """The Hub endpoint downloads use: the mirror, else $HF_ENDPOINT, else https://huggingface.co."""
    return resolve_mirror(mirror) or os.environ.get(HF_ENV_ENDPOINT, "").strip().rstrip("/") or HF_URL_BASE


def apply_hub_environment() -> None:
    """Map RSEG_OFFLINE -> HF_HUB_OFFLINE=1 and RSEG_WEIGHTS_MIRROR -> HF_ENDPOINT.

    huggingface_hub (and transformers through it) read these once, when first imported, so this
    runs when RetrievalSegLib is imported. Our own calls also pass the endpoint and offline state
    explicitly, so they are right even where huggingface_hub was imported first. A malformed
    mirror is left alone here (importing must not fail); planning a download reports it.
    """
    if _env_true(ENV_OFFLINE):
        os.environ[HF_ENV_OFFLINE] = "1"
    try:
        mirror = resolve_mirror()
    except ValueError:
        mirror = None
    if mirror:
        os.environ[HF_ENV_ENDPOINT] = mirror
