"""Retrieval and SAM 2 on a volume's slices: the k most similar bank entries per slice (DINOv2 +
the bank's search), their SAM 2 memories (from the memory cache, on the device once per volume),
and the image encoder + memory attention + mask decoder on batches of slices.

One query path: `Sam2MemoryEngine.query_batch` on B slices x L labels per call; B = 1 is the
per-slice case (what the fidelity tests compare with the official predictor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence, Union

import numpy as np

from ..bank.cache import memory_key
from ..bank.format import same_subject
from ..engine.sam2_memory import QueryResult, SupportMemory, autocast

#: A slice's retrieved supports: (entry id, similarity), most similar first.
Hits = Sequence[tuple[str, float]]
#: What conditions one slice: the same k supports for every label, or k supports per label value.
SliceSupports = Union[Hits, Mapping[int, Hits]]

#: Which retrieved slices condition a label: `all` (the top k, for every label) or `foreground`
#: (per label, the top k among retrieved slices that contain it; FATE-SAM's rule).
SUPPORT_FILTERS = ("all", "foreground")


def check_support_filter(support_filter: object) -> str:
    """`support_filter` if it is one of SUPPORT_FILTERS, else ValueError naming the choices."""
    if support_filter not in SUPPORT_FILTERS:
        raise ValueError(f"support filter must be one of {', '.join(SUPPORT_FILTERS)}, got {support_filter!r}")
    return str(support_filter)


@dataclass
class Retrieval:
    """The supports retrieved for each slice, and the bank's revision they were retrieved from.

    With the `foreground` filter, `per_label[j]` holds slice j's k supports per label value and
    `fallback[j]` the labels that had fewer than k retrieved slices containing them, which are
    conditioned on the plain top k (`hits[j]`) instead."""

    hits: list[list[tuple[str, float]]]
    bank_revision: int | None
    per_label: list[dict[int, list[tuple[str, float]]]] | None = None
    fallback: list[list[int]] | None = None

    def supports(self) -> list[SliceSupports]:
        """What conditions each slice (what `query_slices` takes)."""
        return list(self.hits) if self.per_label is None else list(self.per_label)


def retrieve(embedder, bank, images: Sequence[np.ndarray], k: int, case_id: str | None = None,
             case_policy: str = "ignore", support_filter: str = "all",
             labels: Sequence[int] | None = None) -> Retrieval:
    """DINOv2 embeddings of all slices at once (cheap next to SAM 2), then the bank's top-k of each
    (and, with support_filter 'foreground', the top k containing each of `labels`)."""
    check_support_filter(support_filter)
    emb = embedder.embed(images)
    revision = getattr(bank, "revision", None)  # read before the search: what the sidecar records
    hits = bank.search(emb, k, case_id=case_id, case_policy=case_policy)
    found = Retrieval([list(h) for h in hits], None if revision is None else int(revision))
    if support_filter == "foreground":
        if labels is None:
            labels = [lab.value for lab in bank.labels]
        found.per_label, found.fallback = foreground_supports(bank, emb, found.hits, k, labels, case_id, case_policy)
    return found


def _searchable(bank, case_id: str | None, case_policy: str) -> int:
    """How many entries a search may return under the case policy (the deepest useful search)."""
    usable = [e for e in bank.entries() if e.usable]
    if case_policy == "exclude" and case_id is not None:
        usable = [e for e in usable if not same_subject(str(case_id), e.case_id)]
    return len(usable)


def foreground_supports(bank, emb: np.ndarray, hits: Sequence[Hits], k: int, labels: Sequence[int],
                        case_id: str | None, case_policy: str) -> tuple[list[dict[int, list]], list[list[int]]]:
    """Per slice and label, the k most similar retrieved entries that contain the label.

    The search goes deeper than k (x4 at a time, up to every searchable entry) for the slices where
    a label has fewer than k such candidates; where fewer exist in the whole bank, that label is
    conditioned on the plain top k (`all`) and listed in the slice's fallback."""
    present = {e.id: set(e.labels_present) for e in bank.entries(include_retired=True)}
    labels = [int(v) for v in labels]
    cands = [list(h) for h in hits]

    def short(j: int) -> bool:
        return any(sum(lab in present[eid] for eid, _ in cands[j]) < k for lab in labels)

    depth, cap = int(k), _searchable(bank, case_id, case_policy)
    todo = [j for j in range(len(cands)) if short(j)]
    while todo and depth < cap:
        depth = min(cap, depth * 4)
        try:
            deeper = bank.search(emb[todo], depth, case_id=case_id, case_policy=case_policy)
        except ValueError:  # fewer searchable entries than counted: keep what was found
            break
        for j, h in zip(todo, deeper):
            cands[j] = list(h)
        todo = [j for j in todo if short(j)]
    per_label, fallback = [], []
    for j, h in enumerate(cands):
        chosen, fell_back = {}, []
        for lab in labels:
            with_label = [(eid, s) for eid, s in h if lab in present[eid]][:k]
            if len(with_label) < k:
                chosen[lab] = list(hits[j])
                fell_back.append(lab)
            else:
                chosen[lab] = with_label
        per_label.append(chosen)
        fallback.append(fell_back)
    return per_label, fallback


class SupportMemories:
    """The SAM 2 memories of the supports a volume retrieves.

    Each entry's memory comes from the bank's memory cache (computed once per entry and SAM 2
    identity, with every label of the bank, under `precision`: bf16 memories have their own
    cache), then is restricted to the labels segmented and moved to the device once per volume.
    """

    def __init__(self, engine, bank, labels: Sequence[int], precision: str) -> None:
        self.sam = engine.sam
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
                return self.sam.encode_support(data.image, data.masks, self.bank_labels)

        return self.cache.get_or_compute(key, compute)

    def on_device(self, entry_id: str) -> SupportMemory:
        """The entry's memory restricted to the labels segmented, on the device (moved once)."""
        mem = self._on_device.get(entry_id)
        if mem is None:
            mem = self._on_device[entry_id] = self.memory(entry_id).select(self.labels).to(self.sam.device)
        return mem

    def for_slices(self, supports: Sequence[SliceSupports]) -> tuple[list[SupportMemory], list[list[int]]]:
        """The distinct memories a batch of slices needs and, per slice, the positions of its own k.

        A slice with supports per label (the `foreground` filter) gets, at rank i, a memory whose
        label l is the memory of its own i-th support for l (`combined`): SAM 2 keeps one memory
        per object, so each label is conditioned on exactly its own supports."""
        keys: dict[str | tuple[str, ...], int] = {}
        index = []
        for sup in supports:
            if isinstance(sup, Mapping):
                ranks = zip(*[[eid for eid, _ in sup[lab]] for lab in self.labels])
                index.append([keys.setdefault(r[0] if len(set(r)) == 1 else tuple(r), len(keys)) for r in ranks])
            else:
                index.append([keys.setdefault(eid, len(keys)) for eid, _ in sup])
        return [self.on_device(key) if isinstance(key, str) else self.combined(key) for key in keys], index

    def combined(self, entry_per_label: Sequence[str]) -> SupportMemory:
        """One memory whose label `self.labels[l]` comes from entry `entry_per_label[l]` (built per
        batch, not kept: the combinations of a volume could fill the device)."""
        import torch

        mems = [self.on_device(eid) for eid in entry_per_label]
        return SupportMemory(
            tuple(self.labels),
            torch.stack([m.maskmem_features[li] for li, m in enumerate(mems)]),
            torch.stack([m.obj_ptr[li] for li, m in enumerate(mems)]),
            tuple(m.present[li] for li, m in enumerate(mems)),
        )


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


def query_slices(sam, images: Sequence[np.ndarray], positions: Sequence[int], hits: Sequence[SliceSupports],
                 memories: SupportMemories, batch_size: int, precision: str,
                 cancelled: Callable[[], bool], support_order: str = "nearest") -> Iterator[tuple[int, QueryResult]]:
    """(position, QueryResult) of each position in turn: the image encoder on all of `positions`
    at once, then memory attention + mask decoder on `batch_size` slices per call. Stops as soon as
    `cancelled()` says so (a result computed but cancelled is discarded). `support_order`: where
    each slice's most similar support sits in its pseudo-video (`Sam2MemoryEngine.query_batch`)."""
    ctx = autocast(precision, sam.device)
    with ctx:
        feats = sam.encode_batch([images[j] for j in positions])
    for q0 in range(0, len(positions), batch_size):
        if cancelled():
            return
        sub = list(positions[q0 : q0 + batch_size])
        mems, index = memories.for_slices([hits[j] for j in sub])
        with ctx:
            batch = sam.query_batch(feats, mems, index, memories.labels, items=list(range(q0, q0 + len(sub))),
                                    support_order=support_order)
        for j, res in zip(sub, batch.to_numpy()):
            if cancelled():
                return
            yield j, res
