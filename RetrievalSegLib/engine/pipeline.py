"""RetrievalEngine: the two models together (DINOv2 retrieval + SAM 2 memories) and their caches."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .sam2_memory import Sam2MemoryEngine
from .memory_cache import SupportMemoryCache
from ..models.loaders import load_dinov2, load_sam2
from ..models.registry import DEFAULT_SAM2
from .retrieval import SliceEmbedder


class RetrievalEngine:
    """Everything needed to segment slices from a support bank, loaded once and reused."""

    def __init__(self, embedder: SliceEmbedder, sam: Sam2MemoryEngine) -> None:
        self.embedder = embedder
        self.sam = sam
        self._caches: dict[tuple[str, str], SupportMemoryCache] = {}

    @classmethod
    def load(
        cls,
        sam2_size: str = DEFAULT_SAM2,
        dinov2_size: str = "small",
        *,
        sam2_checkpoint: str | Path | None = None,
        dinov2_path: str | Path | None = None,
        device: str = "auto",
        image_size: int | None = None,
        random_weights: bool = False,
        seed: int = 0,
        fill_hole_area: int = 0,
        dinov2_input_size: int = 224,
        compile: bool = False,
        retrieval_feature: str = "cls",
    ) -> "RetrievalEngine":
        """Load both models from local weights (or random weights when explicitly asked).

        `sam2_size` is a SAM 2 backbone (registry.SAM2_MODELS, e.g. "sam2.1-tiny", "medsam2", or an
        old size name); `image_size` None uses its native input size; `retrieval_feature` is one of
        `retrieval.RETRIEVAL_FEATURES` (part of the embedder identity a bank is checked against).
        """
        sam = load_sam2(
            sam2_size, sam2_checkpoint, device=device, image_size=image_size,
            random_weights=random_weights, seed=seed,
        )
        dino = load_dinov2(
            dinov2_size, dinov2_path, device=device, random_weights=random_weights, seed=seed
        )
        engine = Sam2MemoryEngine(sam, fill_hole_area)
        if compile:
            engine.compile()
        return cls(SliceEmbedder(dino, input_size=dinov2_input_size, feature=retrieval_feature), engine)

    def with_embedder(self, embedder: Any) -> "RetrievalEngine":
        """The same SAM 2 engine and memory caches with another slice embedder (a compared retrieval
        feature: SAM 2 memories do not depend on how the supports were retrieved)."""
        other = RetrievalEngine(embedder, self.sam)
        other._caches = self._caches
        return other

    @property
    def sam2_identity(self) -> str:
        return self.sam.identity

    @property
    def dinov2_identity(self) -> str:
        return self.embedder.identity

    @property
    def random_weights(self) -> bool:
        return "random-seed" in self.sam.identity or "random-seed" in self.embedder.identity

    def memory_cache(
        self,
        bank: Any | None = None,
        precision: str = "fp32",
        cache_dir: str | Path | None = None,
        max_bytes: int | None = None,
    ) -> SupportMemoryCache:
        """The memory cache for `bank` (on disk in the per-user cache), or an in-memory one for None.

        The bank is only read: the files go to `bank.memory_cache_dir(identity)`, for a
        `SupportBank` the per-user folder `<user cache>/memories/<bank id>/<model>/`
        (`memory.user_memory_dir`), never into the bank, which keeps its files and revision.
        precision 'bf16' (memories computed under bfloat16 autocast) has its own cache, under the
        model identity plus '+autocast-bf16', so a float32 run never reads bf16 memories.
        `cache_dir` puts the files in `<cache_dir>/<bank id>/<model>/` instead (e.g. a cohort
        run's shared folder); `max_bytes` caps RAM and disk use (default
        `memory.memory_cache_cap()`: $RSEG_MEMORY_CACHE_GB or 4 GB; a later call with `max_bytes`
        changes the cap of the cache it returns).
        """
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16' here, got {precision!r}")
        identity = self.sam.identity if precision == "fp32" else f"{self.sam.identity}+autocast-bf16"
        if bank is None:
            directory = None
        elif cache_dir is not None:
            from .memory_cache import memory_cache_name

            directory = Path(cache_dir) / str(bank.bank_id) / memory_cache_name(identity)
        else:
            directory = Path(bank.memory_cache_dir(identity))
        key = ("" if directory is None else str(directory.resolve()), identity)
        if key not in self._caches:
            self._caches[key] = SupportMemoryCache(identity, directory, max_bytes=max_bytes)
        elif max_bytes is not None:
            self._caches[key].max_bytes = int(max_bytes)  # applies from the next store on
        return self._caches[key]
