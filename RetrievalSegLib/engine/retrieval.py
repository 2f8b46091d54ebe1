"""Retrieval: DINOv2 slice embeddings and exact inner-product top-k with faiss."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..models.loaders import LoadedDinov2
from .preprocess import dinov2_batch, dinov2_batch_on_device, validate_image


#: The retrieval features a SliceEmbedder computes from DINOv2's last layer (layer-normed tokens):
#: `cls` the CLS token (`pooler_output`; DINOv2's own kNN protocol, the default), `mean` the mean of
#: the patch tokens, `cls+mean` both concatenated (DINOv2's linear-probe input), `gem` generalised
#: mean pooling (p = 3) over the patch tokens. Every one is L2-normalised (cosine = inner product).
RETRIEVAL_FEATURES = ("cls", "mean", "cls+mean", "gem")
DEFAULT_RETRIEVAL_FEATURE = "cls"
#: GeM's exponent and the floor its tokens are clamped to (GeM is defined on non-negative values).
GEM_P, GEM_EPS = 3.0, 1e-6


def check_retrieval_feature(feature: object) -> str:
    """`feature` if it is one of RETRIEVAL_FEATURES, else ValueError naming the choices."""
    if feature not in RETRIEVAL_FEATURES:
        raise ValueError(f"retrieval feature must be one of {', '.join(RETRIEVAL_FEATURES)}, got {feature!r}")
    return str(feature)


def pool_feature(last_hidden_state: torch.Tensor, pooler_output: torch.Tensor, feature: str) -> torch.Tensor:
    """[N, D or 2D] L2-normalised retrieval feature from DINOv2's outputs (float32).

    last_hidden_state: [N, 1 + patches, D] (layer-normed, CLS first); pooler_output: [N, D] (the CLS).
    """
    cls = pooler_output.float()
    patches = last_hidden_state[:, 1:].float()
    if feature == "cls":
        feats = cls
    elif feature == "mean":
        feats = patches.mean(dim=1)
    elif feature == "cls+mean":
        feats = torch.cat([cls, patches.mean(dim=1)], dim=-1)
    elif feature == "gem":
        feats = patches.clamp(min=GEM_EPS).pow(GEM_P).mean(dim=1).pow(1.0 / GEM_P)
    else:
        raise ValueError(f"retrieval feature must be one of {', '.join(RETRIEVAL_FEATURES)}, got {feature!r}")
    return torch.nn.functional.normalize(feats, dim=-1)


def feature_of_identity(identity: str) -> str:
    """The retrieval feature an embedder identity names (`cls` when it names none, as before the switch)."""
    _, sep, feature = str(identity).rpartition("#")
    return feature if sep and feature in RETRIEVAL_FEATURES else DEFAULT_RETRIEVAL_FEATURE


class SliceEmbedder:
    """L2-normalised DINOv2 retrieval features of uint8 slices, batched (`RETRIEVAL_FEATURES`;
    default the CLS token, `pooler_output`)."""

    def __init__(self, dinov2: LoadedDinov2, batch_size: int = 16, input_size: int = 224,
                 feature: str = DEFAULT_RETRIEVAL_FEATURE) -> None:
        self.dinov2 = dinov2
        self.batch_size = int(batch_size)
        self.input_size = int(input_size)
        self.feature = check_retrieval_feature(feature)

    @property
    def identity(self) -> str:
        """Model identity, input size and feature: embeddings are only comparable when these agree.
        The default feature (cls) adds nothing, so banks made before the switch keep their identity."""
        return self.identity_of(self.feature)

    @property
    def dim(self) -> int:
        return self.dim_of(self.feature)

    def dim_of(self, feature: str) -> int:
        """The width of `feature`'s embeddings (cls+mean concatenates two of DINOv2's width)."""
        return self.dinov2.dim * (2 if feature == "cls+mean" else 1)

    def identity_of(self, feature: str) -> str:
        """The identity of `feature`'s embeddings from this embedder's model and input size."""
        base = f"{self.dinov2.identity}@{(self.input_size // 14) * 14}"
        return base if check_retrieval_feature(feature) == DEFAULT_RETRIEVAL_FEATURE else f"{base}#{feature}"

    def embed(
        self,
        images_u8: Sequence[np.ndarray],
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """[N, dim] float32 unit vectors for uint8 grey or RGB slices."""
        return self.embed_features(images_u8, (self.feature,), progress)[self.feature]

    @torch.inference_mode()
    def embed_features(
        self,
        images_u8: Sequence[np.ndarray],
        features: Sequence[str],
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Several retrieval features of the same slices from one DINOv2 pass (feature -> [N, dim_f]
        float32 unit vectors): cls, mean, cls+mean and gem all pool the same last-layer tokens, so a
        bank that holds several features, or a comparison of them, pays for the model once."""
        features = [check_retrieval_feature(f) for f in dict.fromkeys(features)]
        n = len(images_u8)
        outs = {f: np.empty((n, self.dim_of(f)), dtype=np.float32) for f in features}
        for start in range(0, n, self.batch_size):
            chunk = images_u8[start : start + self.batch_size]
            for img in chunk:
                validate_image(img)
                if img.dtype != np.uint8:
                    raise ValueError(f"embed expects uint8 slices (windowed), got {img.dtype}")
            if self.dinov2.device.type == "cuda":  # one upload, resize on the GPU (same pixels as Pillow)
                x = dinov2_batch_on_device(chunk, self.input_size, self.dinov2.device)
            else:
                x = dinov2_batch(chunk, self.input_size).to(self.dinov2.device)
            o = self.dinov2.model(pixel_values=x)
            for feature, out in outs.items():
                out[start : start + len(chunk)] = pool_feature(o.last_hidden_state, o.pooler_output, feature).cpu().numpy()
            if progress is not None:
                progress(min(start + len(chunk), n), n)
        return outs


class InnerProductIndex:
    """Exact cosine (inner product of unit vectors) search over a fixed set of embeddings."""

    def __init__(self, embeddings: np.ndarray) -> None:
        import faiss

        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2:
            raise ValueError(f"embeddings must be [N, dim], got shape {emb.shape}")
        self.dim = emb.shape[1]
        self.index = faiss.IndexFlatIP(self.dim)
        if len(emb):
            self.index.add(emb)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Iterable[int] | Callable[[int], bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], ids [Q, k]) best first; ids of excluded entries never returned.

        Raises ValueError when fewer than k entries remain after exclusion.
        """
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query embeddings have dim {q.shape[1]}, the index has {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = len(self)
        if callable(exclude):
            excluded = {i for i in range(n) if exclude(i)}
        else:
            excluded = set(exclude or ())
        available = n - len(excluded & set(range(n)))
        if k > available:
            raise ValueError(
                f"k={k} supports requested but the bank has only {available} usable entries"
                + (f" ({len(excluded)} excluded)" if excluded else "")
                + "; lower k or add annotated slices"
            )
        scores, ids = self.index.search(q, min(n, k + len(excluded)))
        out_s = np.empty((len(q), k), dtype=np.float32)
        out_i = np.empty((len(q), k), dtype=np.int64)
        for r in range(len(q)):
            keep = [(s, i) for s, i in zip(scores[r], ids[r]) if i >= 0 and int(i) not in excluded][:k]
            out_s[r] = [s for s, _ in keep]
            out_i[r] = [i for _, i in keep]
        return out_s, out_i
