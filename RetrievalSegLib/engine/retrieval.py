"""Retrieval: DINOv2 slice embeddings and exact inner-product top-k with faiss."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..models.loaders import LoadedDinov2
from .preprocess import dinov2_batch, dinov2_batch_on_device, validate_image


class SliceEmbedder:
    """L2-normalised DINOv2 CLS embeddings (`pooler_output`) of uint8 slices, batched."""

    def __init__(self, dinov2: LoadedDinov2, batch_size: int = 16, input_size: int = 224) -> None:
        self.dinov2 = dinov2
        self.batch_size = int(batch_size)
        self.input_size = int(input_size)

    @property
    def identity(self) -> str:
        """Model identity plus input size: embeddings are only comparable when these agree."""
        return f"{self.dinov2.identity}@{(self.input_size // 14) * 14}"

    @property
    def dim(self) -> int:
        return self.dinov2.dim

    @torch.inference_mode()
    def embed(
        self,
        images_u8: Sequence[np.ndarray],
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """[N, dim] float32 unit vectors for uint8 grey or RGB slices."""
        n = len(images_u8)
        out = np.empty((n, self.dim), dtype=np.float32)
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
            feats = self.dinov2.model(pixel_values=x).pooler_output.float()
            feats = torch.nn.functional.normalize(feats, dim=-1)
            out[start : start + len(chunk)] = feats.cpu().numpy()
            if progress is not None:
                progress(min(start + len(chunk), n), n)
        return out


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
