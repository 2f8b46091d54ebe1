"""Retrieval and SAM 2 on a volume's slices: the k most similar bank entries per slice (DINOv2 +
the bank's search), their SAM 2 memories (from the memory cache, on the device once per volume),
and the image encoder + memory attention + mask decoder on batches of slices.

One query path: `Sam2MemoryEngine.query_batch` on B slices x L labels per call; B = 1 is the
per-slice case (what the fidelity tests compare with the official predictor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ..bank.cache import memory_key
from ..engine.sam2_memory import QueryResult, SupportMemory, autocast

#: A slice's retrieved supports: (entry id, similarity), most similar first.
Hits = Sequence[tuple[str, float]]


@dataclass
class Retrieval:
    """The supports retrieved for each slice, and the bank's revision they were retrieved from."""

    hits: list[list[tuple[str, float]]]
    bank_revision: int | None


def retrieve(embedder, bank, images: Sequence[np.ndarray], k: int, case_id: str | None = None,
             case_policy: str = "ignore") -> Retrieval:
    """DINOv2 embeddings of all slices at once (cheap next to SAM 2), then the bank's top-k of each."""
    emb = embedder.embed(images)
    revision = getattr(bank, "revision", None)  # read before the search: what the sidecar records
    hits = bank.search(emb, k, case_id=case_id, case_policy=case_policy)
    return Retrieval([list(h) for h in hits], None if revision is None else int(revision))


class SupportMemories:
    """The SAM 2 memories of the supports a volume retrieves.

    Each entry's memory comes from the bank's memory cache (computed once per entry and SAM 2
    identity, with every label of the bank, under `precision`: bf16 memories have their own
    cache), then is restricted to the labels segmented and moved to the device once per volume.
    """

    def __init__(self, engine, bank, labels: Sequence[int], precision: str,
                 on_computed: Callable[[int], None] | None = None) -> None:
        self.sam = engine.sam
        self.on_computed = on_computed  # called with the count so far after each memory computed
        self.computed = 0
        self.bank = bank
        self.labels = list(labels)
        self.bank_labels = [lab.value for lab in bank.labels]
        self.precision = precision
        # Memories computed under bf16 autocast differ from float32 ones: they get their own cache.
        self.cache = engine.memory_cache(bank) if precision == "fp32" else engine.memory_cache(bank, precision=precision)
        self.entries = {e.id: e for e in bank.entries(include_retired=True)}
        self._on_device: dict[str, SupportMemory] = {}

    def memory(self, entry_id: str) -> SupportMemory:
        """The cached memory of one entry (every bank label), computed on first use."""
        key = memory_key(self.entries[entry_id])  # the same key `rseg bank cache --warm` fills

        def compute() -> SupportMemory:
            data = self.bank.load_entry(entry_id)
            with autocast(self.precision, self.sam.device):
                mem = self.sam.encode_support(data.image, data.masks, self.bank_labels)
            self.computed += 1
            if self.on_computed is not None:
                self.on_computed(self.computed)
            return mem

        return self.cache.get_or_compute(key, compute)

    def to_compute(self, hits: Sequence[Hits]) -> int:
        """How many of the distinct entries in `hits` have no cached memory yet (each is computed
        on first use: with the extent stop, an upper bound)."""
        ids = {eid for h in hits for eid, _ in h}
        return sum(1 for eid in ids if not self.cache.contains(memory_key(self.entries[eid])))

    def on_device(self, entry_id: str) -> SupportMemory:
        """The entry's memory restricted to the labels segmented, on the device (moved once)."""
        mem = self._on_device.get(entry_id)
        if mem is None:
            mem = self._on_device[entry_id] = self.memory(entry_id).select(self.labels).to(self.sam.device)
        return mem

    def for_slices(self, hits: Sequence[Hits]) -> tuple[list[SupportMemory], list[list[int]]]:
        """The distinct memories a batch of slices needs and, per slice, the positions of its own k."""
        ids: dict[str, int] = {}
        index = [[ids.setdefault(eid, len(ids)) for eid, _ in h] for h in hits]
        return [self.on_device(eid) for eid in ids], index


#: Slices per memory-attention call when batch_size is None, by device type. On CPU batching does
#: not pay: on the quiet 2-core development machine (k=8, 3 labels, fp32) batches of 2 or 4 gave
#: 6-16% fewer slices/s than 1 at 512 px and equal within noise at 256 and 1024 px (README, Performance:
#: memory attention is arithmetic-bound there and a batch only makes its attention matrices larger).
#: So the CPU default is the per-slice path, which also makes a cancel take effect after one slice.
CPU_BATCH_SIZE = 1


CUDA_MAX_BATCH = 32


def auto_batch_size(device, image_size: int, k: int, n_labels: int) -> int:
    """Slices per memory-attention call for `device`: the measured-best on CPU; on CUDA up to 32
    (per-slice cost flat from 8 to 32 on an H100), fewer where free memory is short.

    The memory estimate is a deliberately generous bound on the activations of one (slice, label)
    item: float32 tokens x 256 channels x (k memories + query) x 8 live tensors.
    """
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return CPU_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(dev)
    tokens = (int(image_size) // 16) ** 2
    per_slice = 4 * 256 * tokens * (int(k) + 2) * 8 * max(1, int(n_labels))
    return int(max(1, min(CUDA_MAX_BATCH, (free // 2) // per_slice)))


def query_slices(sam, images: Sequence[np.ndarray], positions: Sequence[int], hits: Sequence[Hits],
                 memories: SupportMemories, batch_size: int, precision: str,
                 cancelled: Callable[[], bool]) -> Iterator[tuple[int, QueryResult]]:
    """(position, QueryResult) of each position in turn: the image encoder on all of `positions`
    at once, then memory attention + mask decoder on `batch_size` slices per call. Stops as soon as
    `cancelled()` says so (a result computed but cancelled is discarded)."""
    ctx = autocast(precision, sam.device)
    with ctx:
        feats = sam.encode_batch([images[j] for j in positions])
    for q0 in range(0, len(positions), batch_size):
        if cancelled():
            return
        sub = list(positions[q0 : q0 + batch_size])
        mems, index = memories.for_slices([hits[j] for j in sub])
        with ctx:
            batch = sam.query_batch(feats, mems, index, memories.labels, items=list(range(q0, q0 + len(sub))))
        for j, res in zip(sub, batch.to_numpy()):
            if cancelled():
                return
            yield j, res
