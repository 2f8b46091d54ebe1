"""Catalogue of the models RetrievalSeg knows: Hub repositories, file names, architectures.

One place for every name a user may see in an error message, a command line or the Slicer panel,
and for the project's environment switches. Every model is published on the Hugging Face Hub
(SAM 2.1 as `facebook/sam2.1-hiera-<size>`, the repositories sam2's own `build_sam2_hf` reads;
MedSAM2 as `wanglab/MedSAM2`; DINOv2 as `facebook/dinov2-<size>`) and are fetched with `huggingface_hub` into its shared cache
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


#: Licence texts shown in `rseg weights download`, the README and the Slicer acknowledgement.
SAM2_LICENCE = "Apache-2.0 (code and weights; facebookresearch/sam2)"
MEDSAM2_CODE_LICENCE = "Apache-2.0 (code; github.com/bowang-lab/MedSAM2, LICENSE)"
MEDSAM2_WEIGHTS_TERMS = (
    "no licence for the MedSAM2 weights was found: the repository's LICENSE (Apache-2.0) is the "
    "code's, and its README and checkpoints/README.md state no terms for the checkpoints (checked "
    "at github.com/bowang-lab/MedSAM2, commit 332f30d, 2026-11-27; the Hugging Face model card "
    "wanglab/MedSAM2 could not be read from here). The weights are a fine-tune of SAM 2.1 "
    "hiera-tiny (Apache-2.0). Check the terms with the authors before clinical or commercial use."
)
SAM2_CITATION = (
    "Ravi N. et al. SAM 2: Segment Anything in Images and Videos. ICLR 2025, arXiv:2408.00714"
)
MEDSAM2_CITATION = (
    "Ma J., Yang Z., Kim S., Chen B., Baharoon M., Fallahpour A., Asakereh R., Lyu H., Wang B. "
    "MedSAM2: Segment Anything in 3D Medical Images and Videos. arXiv:2504.03600, 2025"
)


@dataclass(frozen=True)
class Sam2Spec:
    """One SAM 2 backbone: packaged sam2 config + its differences, native size, Hub file, terms.

    `config` is a YAML packaged with the official `sam2` package; `config_overrides` are the only
    differences the backbone applies to it (hydra `++key=value`), each stated against the published
    config it reproduces. Backbones of one `architecture` have identical state-dict keys and shapes
    (a file of one loads strictly into the other); only a file's digest can tell them apart.
    """

    name: str  # canonical name, e.g. "sam2.1-tiny", "medsam2"
    config: str  # path inside the sam2 package's hydra search path
    filename: str
    approx_mb: int  # shown before a download is confirmed; the server's length is authoritative
    repo_id: str  # Hugging Face Hub repository of `filename`
    image_size: int = 1024  # native input size: the default unless --image-size says otherwise
    config_overrides: tuple[tuple[str, str], ...] = ()  # (hydra key under model., value)
    architecture: str = ""  # e.g. "hiera-tiny": trunk embed dim x blocks (see trunk_signature)
    trunk_signature: tuple[int, int] = (0, 0)  # (patch-embed channels, number of Hiera blocks)
    licence: str = SAM2_LICENCE
    weights_terms: str | None = None  # shown before download; None: the licence above covers them
    citation: str = SAM2_CITATION
    trained_on: str = "SA-V videos and SA-1B images (natural images)"
    published_sha256: tuple[str, ...] = ()  # SHA-256 of the published file(s), where known
    aliases: tuple[str, ...] = ()

    @property
    def size(self) -> str:
        """The canonical name (kept for callers that knew backbones as SAM 2.1 sizes)."""
        return self.name

    @property
    def display(self) -> str:
        """How messages name it, e.g. 'SAM 2.1 tiny' or 'MedSAM2'."""
        if self.name.startswith("sam2.1-"):
            return "SAM 2.1 " + self.name[len("sam2.1-"):]
        return "MedSAM2" if self.name == "medsam2" else self.name

    @property
    def url(self) -> str:
        return hub_url(self.repo_id, self.filename)

    def hydra_overrides(self, image_size: int | None = None) -> list[str]:
        """The backbone's config differences, then the input-size change when `image_size` is not native."""
        values = dict(self.config_overrides)
        if image_size is not None and image_size != self.image_size:
            feat = image_size // 16  # stride-16 top-level feature map that RoPE attention runs on
            values["image_size"] = str(image_size)
            values["memory_attention.layer.self_attention.feat_sizes"] = f"[{feat},{feat}]"
            values["memory_attention.layer.cross_attention.feat_sizes"] = f"[{feat},{feat}]"
        out = [f"++model.{key}={value}" for key, value in values.items()]
        return out


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


def _sam21(size: str, yaml: str, approx_mb: int, signature: tuple[int, int], aliases: tuple[str, ...]) -> Sam2Spec:
    hub = size.replace("_", "-")
    return Sam2Spec(
        name=f"sam2.1-{hub}", config=f"configs/sam2.1/sam2.1_hiera_{yaml}.yaml",
        filename=f"sam2.1_hiera_{size}.pt", approx_mb=approx_mb,
        repo_id=f"facebook/sam2.1-hiera-{hub}", architecture=f"hiera-{hub}",
        trunk_signature=signature, aliases=aliases,
    )


#: MedSAM2's published sam2.1_hiera_t512.yaml (github.com/bowang-lab/MedSAM2, sam2/configs/,
#: commit 332f30d) differs from sam2 1.1.0's packaged configs/sam2.1/sam2.1_hiera_t.yaml in exactly
#: these three lines (diffed line by line; everything else, the post-processing included, is equal):
MEDSAM2_CONFIG_OVERRIDES: tuple[tuple[str, str], ...] = (
    ("image_size", "512"),  # 1024 in sam2.1_hiera_t.yaml
    ("memory_attention.layer.self_attention.feat_sizes", "[32,32]"),  # [64, 64]
    ("memory_attention.layer.cross_attention.feat_sizes", "[32,32]"),  # [64, 64]
)

SAM2_MODELS: dict[str, Sam2Spec] = {
    spec.name: spec
    for spec in (
        _sam21("tiny", "t", 156, (96, 12), ("tiny",)),
        _sam21("small", "s", 184, (96, 16), ("small",)),
        _sam21("base_plus", "b+", 324, (112, 24), ("base_plus", "base-plus", "base+", "b+")),
        _sam21("large", "l", 898, (144, 48), ("large",)),
        Sam2Spec(
            name="medsam2", config="configs/sam2.1/sam2.1_hiera_t.yaml",
            filename="MedSAM2_latest.pt", approx_mb=156, repo_id="wanglab/MedSAM2",
            image_size=512, config_overrides=MEDSAM2_CONFIG_OVERRIDES,
            architecture="hiera-tiny", trunk_signature=(96, 12),
            licence=MEDSAM2_CODE_LICENCE, weights_terms=MEDSAM2_WEIGHTS_TERMS,
            citation=MEDSAM2_CITATION,
            trained_on="SAM 2.1 tiny fully fine-tuned on 455k 3D medical image-mask pairs and 76k "
            "video frames (CT, MRI, PET, ultrasound, endoscopy)",
            aliases=("medsam2_latest",),
        ),
    )
}
#: The backbone used when none is named (never one whose weights terms are unknown).
DEFAULT_SAM2 = "sam2.1-tiny"

DINOV2_MODELS: dict[str, Dinov2Spec] = {
    "small": Dinov2Spec(
        "small", "facebook/dinov2-small", 384, 12, 6, 88,
        safetensors_sha256="ae1e99fcefd534ed978cdeb8326f08030c96e28b7a81ffcbc98a857c84d14be1",
    ),
    "base": Dinov2Spec("base", "facebook/dinov2-base", 768, 12, 12, 346),
    "large": Dinov2Spec("large", "facebook/dinov2-large", 1024, 24, 16, 1217),
}

DINOV2_FILES = ("config.json", "model.safetensors")


def canonical_sam2(name: str) -> str:
    """The canonical backbone name for `name` or one of its aliases ('tiny' -> 'sam2.1-tiny')."""
    key = str(name).strip().lower().replace("_", "-") if name is not None else ""
    for spec in SAM2_MODELS.values():
        if key == spec.name or key in {a.lower().replace("_", "-") for a in spec.aliases}:
            return spec.name
    names = ", ".join(SAM2_MODELS)
    old = ", ".join(a for s in SAM2_MODELS.values() for a in s.aliases)
    raise ValueError(f"unknown SAM 2 backbone {name!r}; choose one of {names} (or the old names {old})")


def sam2_spec(name: str) -> Sam2Spec:
    """The backbone spec for `name` (canonical or alias), or a ValueError listing the valid names."""
    return SAM2_MODELS[canonical_sam2(name)]


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
