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
    # the bank searches the rows of the embedder's own retrieval feature (it may hold several)
    hits = bank.search(emb, k, case_id=case_id, case_policy=case_policy, embedder_identity=embedder.identity)
    found = Retrieval([list(h) for h in hits], None if revision is None else int(revision))
    if support_filter == "foreground":
        if labels is None:
            labels = [lab.value for lab in bank.labels]
        found.per_label, found.fallback = foreground_supports(bank, emb, found.hits, k, labels, case_id, case_policy,
                                                              embedder.identity)
    return found


def _searchable(bank, case_id: str | None, case_policy: str) -> int:
    """How many entries a search may return under the case policy (the deepest useful search)."""
    usable = [e for e in bank.entries() if e.usable]
    if case_policy == "exclude" and case_id is not None:
        usable = [e for e in usable if not same_subject(str(case_id), e.case_id)]
    return len(usable)


def foreground_supports(bank, emb: np.ndarray, hits: Sequence[Hits], k: int, labels: Sequence[int],
                        case_id: str | None, case_policy: str, embedder_identity: str | None = None,
                        ) -> tuple[list[dict[int, list]], list[list[int]]]:
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
            deeper = bank.search(emb[todo], depth, case_id=case_id, case_policy=case_policy,
                                 embedder_identity=embedder_identity)
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


#: The most slices per memory-attention call on CUDA: per-slice cost is flat from 8 to 32 on an H100
#: (README, GPU memory), so larger batches only take memory.
CUDA_MAX_BATCH = 32

#: Share of the device's free memory (driver free + torch's unused cache) a batch may take; the
#: rest is left to other processes on the GPU (a viewer, another job) and to fragmentation.
MEMORY_SHARE = 0.6

#: What to try when one slice does not fit: the end of the out-of-memory message.
OOM_ADVICE = ("try --image-size 512 (or smaller), a smaller k (--k), fewer labels (--labels), or --device cpu; "
              "close other programs that use the GPU")


class OutOfDeviceMemory(RuntimeError):
    """SAM 2 ran out of device memory on one slice alone (nothing left to halve); says what to try."""


def estimated_slice_bytes(image_size: int, k: int, n_labels: int) -> int:
    """A deliberately generous bound on the memory-attention activations of one slice (all its
    labels): float32 tokens x 256 channels x (k memories + query + 1) x 8 live tensors per label.
    Used only until the first batch has measured the real footprint."""
    tokens = (int(image_size) // 16) ** 2
    return 4 * 256 * tokens * (int(k) + 2) * 8 * max(1, int(n_labels))


def batch_from_free_memory(free_bytes: int, slice_bytes: int, cap: int = CUDA_MAX_BATCH) -> int:
    """Slices per call that fit in `MEMORY_SHARE` of `free_bytes` at `slice_bytes` each, within 1..cap."""
    fit = int(free_bytes * MEMORY_SHARE) // max(1, int(slice_bytes))
    return int(max(1, min(int(cap), fit)))


def auto_batch_size(device, image_size: int, k: int, n_labels: int) -> int:
    """Slices per memory-attention call for `device` before any batch ran: the measured-best on CPU
    (and on MPS, which has no free-memory call and no measurement here); on CUDA up to
    CUDA_MAX_BATCH, fewer where free memory is short (`estimated_slice_bytes`). `BatchSizer`
    replaces the estimate by the footprint the first batch measures."""
    from ..engine.device import free_memory

    free = free_memory(device)
    if free is None:
        return CPU_BATCH_SIZE
    return batch_from_free_memory(free, estimated_slice_bytes(image_size, k, n_labels))


class BatchSizer:
    """The batch size of one run, and how it came about.

    Starts at `size`. With `auto` on CUDA, the first query batch measures its own footprint (peak
    bytes allocated during the call over the slices it held) and the size becomes what fits in
    `MEMORY_SHARE` of the free memory at that footprint (`measure`). An out-of-memory error halves
    the size (`halve`); the batch is then retried, so the output is the one an uninterrupted run
    gives. `notes` is what happened, in words (the log and the provenance say it).
    """

    def __init__(self, size: int, device, auto: bool = False, log: Callable[[str], None] | None = None) -> None:
        from ..engine.device import device_of

        self.size = int(size)
        self.start = int(size)
        self.device = device_of(device)
        self.auto = bool(auto)
        self.log = log
        self.slice_bytes: int | None = None  # measured memory-attention footprint of one slice
        self.peak_bytes: int | None = None  # CUDA: most bytes allocated from the run's start to the end of the first query
        self.free_bytes: int | None = None
        self.halvings = 0
        self.encoder_size: int | None = None  # image-encoder slices per call once one ran out of memory
        self.notes: list[str] = []
        self._measured = False

    def note(self, text: str) -> None:
        self.notes.append(text)
        if self.log is not None:
            self.log(text)

    def measure(self, n_slices: int, call: Callable[[], object]):
        """`call()` (a query on `n_slices` slices); the first time, on CUDA, its footprint sizes the batch."""
        from ..engine.device import free_memory, peak_memory, reset_peak

        if self._measured or self.device.type != "cuda":
            return call()
        before = peak_memory(self.device)  # the run's peak so far (the image encoder's included)
        base = reset_peak(self.device)
        out = call()
        peak = peak_memory(self.device)
        self._measured = True
        if base is None or peak is None:
            return out
        self.peak_bytes = max(int(before or 0), peak)
        self.slice_bytes = max(1, (peak - base) // max(1, int(n_slices)))
        self.free_bytes = free_memory(self.device)
        if self.auto and self.free_bytes is not None:
            size = batch_from_free_memory(self.free_bytes, self.slice_bytes)
            if size != self.size:
                self.note(f"batch size {self.size} -> {size}: {self.slice_bytes / 2**20:.0f} MiB per slice measured, "
                          f"{self.free_bytes / 2**30:.1f} GiB free on {self.device}")
                self.size = size
        return out

    def halve(self, what: str, n: int) -> int:
        """The size after an out-of-memory error in a call on `n` slices (`what`: 'image encoder' or
        'memory attention'), kept for the rest of the run."""
        new = max(1, n // 2)
        self.halvings += 1
        if what == "image encoder":
            self.encoder_size = new
        else:
            self.size = new
        self.note(f"out of memory on {self.device} in the {what} at {n} slices: retrying with {new}")
        return new

    def to_json(self) -> dict:
        return {
            "start": self.start, "end": self.size, "auto": self.auto, "device": str(self.device),
            "slice_bytes": self.slice_bytes, "peak_bytes": self.peak_bytes, "free_bytes": self.free_bytes,
            "encoder_size": self.encoder_size, "out_of_memory_halvings": self.halvings, "notes": list(self.notes),
        }


def _out_of_memory(sam, what: str, k: int, n_labels: int) -> OutOfDeviceMemory:
    return OutOfDeviceMemory(
        f"SAM 2 ran out of memory on {sam.device} in the {what} with one slice per call "
        f"(image size {sam.image_size}, k = {k}, {n_labels} label(s)): {OOM_ADVICE}"
    )


def query_slices(sam, images: Sequence[np.ndarray], positions: Sequence[int], hits: Sequence[SliceSupports],
                 memories: SupportMemories, batch_size: int | BatchSizer, precision: str,
                 cancelled: Callable[[], bool], support_order: str = "nearest") -> Iterator[tuple[int, QueryResult]]:
    """(position, QueryResult) of each position in turn: the image encoder on all of `positions`
    at once, then memory attention + mask decoder on `batch_size` slices per call. Stops as soon as
    `cancelled()` says so (a result computed but cancelled is discarded). `support_order`: where
    each slice's most similar support sits in its pseudo-video (`Sam2MemoryEngine.query_batch`).

    `batch_size` is a number or the run's `BatchSizer`. An out-of-memory error (CUDA or MPS) frees
    what it can and retries the same slices in halves (the image encoder in halves of its group,
    memory attention at half the batch size, kept for the rest of the run); one slice that does
    not fit raises `OutOfDeviceMemory`, which says what to try.
    """
    from ..engine.device import is_out_of_memory, release_memory

    sizer = batch_size if isinstance(batch_size, BatchSizer) else BatchSizer(int(batch_size), sam.device)
    ctx = autocast(precision, sam.device)
    k = max((len(next(iter(hits[j].values()), ())) if isinstance(hits[j], Mapping) else len(hits[j])
             for j in positions), default=0)
    n_labels = len(memories.labels)
    todo = list(positions)
    while todo:
        group = todo[: sizer.encoder_size or len(todo)]
        feats = None  # the previous group's features are freed before this group is encoded
        try:
            with ctx:
                feats = sam.encode_batch([images[j] for j in group])
        except Exception as e:  # noqa: BLE001 - only out of memory is retried; anything else goes on
            if not is_out_of_memory(e):
                raise
            feats = None
        if feats is None:
            release_memory(sam.device)  # the exception and its frames are gone here
            if len(group) == 1:
                raise _out_of_memory(sam, "image encoder", k, n_labels) from None
            sizer.halve("image encoder", len(group))
            continue
        q0 = 0
        while q0 < len(group):
            if cancelled():
                return
            sub = group[q0 : q0 + sizer.size]
            mems, index = memories.for_slices([hits[j] for j in sub])
            items = list(range(q0, q0 + len(sub)))
            try:
                with ctx:
                    batch = sizer.measure(len(sub), lambda: sam.query_batch(feats, mems, index, memories.labels,
                                                                            items=items,
                                                                            support_order=support_order))
            except Exception as e:  # noqa: BLE001 - as above
                if not is_out_of_memory(e):
                    raise
                batch = None
            if batch is None:
                del mems
                release_memory(sam.device)
                if len(sub) == 1:
                    raise _out_of_memory(sam, "memory attention", k, n_labels) from None
                sizer.halve("memory attention", len(sub))
                continue
            for j, res in zip(sub, batch.to_numpy()):
                if cancelled():
                    return
                yield j, res
            q0 += len(sub)
        todo = todo[len(group):]
