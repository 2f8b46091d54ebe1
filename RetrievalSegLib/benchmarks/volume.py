"""Whole-volume throughput: one slice per call in fp32 vs batches (and the device's precision), one run, one device.

A synthetic cardiac volume (`synthetic.py`) is segmented from a bank of the labelled slices of
other synthetic cases, k supports per slice, SAM 2.1 with random weights:

* baseline: `segment_volume(..., precision="fp32", batch_size=1)`: the per-slice reference case
  (image encoder in batches of 4, one memory-attention + decoder call per slice; the same query
  code as batches, `Sam2MemoryEngine.query_batch`);
* batched: `segment_volume(..., precision="auto", batch_size=None)`: the precision and batch size
  chosen for the device (bf16 autocast and batches on CUDA). On CPU the automatic batch size is 1
  (batching does not pay there), so the CPU run times batches of 4 (`--batch-size` to change) to
  show what batching does;
* propagation (`--propagate N`, default 6, 0 skips it): the per-slice fp32 path again with SAM 2's
  video memory along the slice axis (`segment_volume(..., propagate=N)`, walks from the default
  start slice; its mask agreement with the per-slice run is not a fidelity figure: the masks are
  meant to differ);
* optionally (`--compile`) the batched path again with the image encoder and memory attention
  compiled (compile time reported separately, not in slices/s).

Support memories are computed once per precision before timing (a warm cache, as in a second
volume from the same bank). Mask agreement is per label (each label's foreground mask), not of
the argmax label maps: with random weights the labels are near-tied and argmax flips.

    python -m RetrievalSegLib.benchmarks.volume [--device auto] [--image-size N] [--slices N] [--k 8]
                                           [--propagate 6] [--extent-slices 120]

Then, in the same run, the extent stop (`extent.py`) on a synthetic CT-like volume: 120 slices
(`--extent-slices`; 0 skips this part) of which the middle 20% hold the structure (a synthetic
cardiac case) and the rest the same body without it. The whole volume is segmented once (stop
off, timed), then again with the stop (timed). With random weights SAM 2's object scores are
positive everywhere, so SAM 2's own threshold (0) would never stop; the presence threshold is
set from the full run's recorded scores: the value that best separates the slices with the
structure from those without (an oracle on this volume, standing in for what trained weights
do; it says nothing about accuracy). Reported: slices segmented and seconds with and without
the stop, the structure slices covered, and whether every segmented slice equals the full run's.

On CUDA (or with `--memory-table`) it then prints the peak device memory of one encoder + query
call for image size 512/1024 x k 4/8/16 x batch 1/8/32 (`memory_table`); the per-row `peak MB`
column is the GPU allocator's peak on CUDA.

The last lines are `volume_speedup_<device> X`, `volume_agreement_<device> Y` and, with the
extent part, `extent_slices_<device> A/B` and `extent_speedup_<device> Z`.
The bank is an in-memory stand-in with exact inner-product search in numpy (the GPU machine has
no faiss); this module imports neither SimpleITK nor faiss.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import resource
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class _Label:
    value: int
    name: str
    color: tuple


@dataclass
class _Entry:
    id: str
    sha256: str
    case_id: str


@dataclass
class _Data:
    image: np.ndarray
    masks: dict


class InMemoryBank:
    """What `segment_volume` uses of a SupportBank, held in memory (exact top-k in numpy)."""

    def __init__(self, labels, embedder_identity: str, folder: Path) -> None:
        self.labels = [_Label(v, n, c) for v, (n, c) in labels.items()]
        self.embedder_identity = embedder_identity
        self.path = folder
        self._entries: list[_Entry] = []
        self._data: dict[str, _Data] = {}
        self._emb = np.zeros((0, 0), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, case_id: str, images_u8, label_slices, embedder) -> None:
        values = [lab.value for lab in self.labels]
        keep = [i for i, lab in enumerate(label_slices) if np.isin(lab, values).any()]
        emb = embedder.embed([images_u8[i] for i in keep])
        for n, i in enumerate(keep):
            eid = f"{case_id}_{i:03d}"
            digest = hashlib.sha256(images_u8[i].tobytes() + label_slices[i].tobytes()).hexdigest()
            self._entries.append(_Entry(eid, digest, case_id))
            self._data[eid] = _Data(images_u8[i], {v: label_slices[i] == v for v in values})
        self._emb = emb if len(self._emb) == 0 else np.concatenate([self._emb, emb])

    def check_models(self, embedder_identity: str) -> None:
        if embedder_identity != self.embedder_identity:
            raise ValueError("bank embedded with another DINOv2")

    def search(self, query_embeddings, k, case_id=None, case_policy="ignore", embedder_identity=None):
        if embedder_identity not in (None, self.embedder_identity):
            raise ValueError("bank embedded with another DINOv2 (or retrieval feature)")
        if k > len(self._entries):
            raise ValueError(f"k={k} supports requested but the bank has only {len(self._entries)} entries")
        scores = np.asarray(query_embeddings, dtype=np.float32) @ self._emb.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[(self._entries[j].id, float(scores[q, j])) for j in row] for q, row in enumerate(order)]

    def entries(self, include_retired: bool = False):
        return list(self._entries)

    def load_entry(self, entry_id: str) -> _Data:
        return self._data[entry_id]

    def memory_cache_dir(self, sam2_identity: str, create: bool = True) -> Path:
        d = self.path / "memories" / re.sub(r"[^A-Za-z0-9._-]+", "_", sam2_identity)[:160]
        d.mkdir(parents=True, exist_ok=True)
        return d


def _machine(device: torch.device) -> str:
    from .latency import _machine as machine

    return machine(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} (GPU, this run)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0:.0f} (process RSS peak so far)"


def _windowed(volume) -> list[np.ndarray]:
    from ..engine.preprocess import robust_window, to_uint8

    bounds = robust_window(volume.array)
    return [to_uint8(volume.array[z], bounds) for z in range(volume.array.shape[0])]


def _warm(bank, engine, precision: str) -> float:
    """Support memories of every bank entry for `precision`, as segment_volume keys them."""
    from ..engine.sam2_memory import autocast

    t = time.perf_counter()
    cache = engine.memory_cache(bank, precision=precision)
    labels = [lab.value for lab in bank.labels]
    for e in bank.entries():
        data = bank.load_entry(e.id)

        def compute(data=data):
            with autocast(precision, engine.sam.device):
                return engine.sam.encode_support(data.image, data.masks, labels)

        cache.get_or_compute(f"{e.id}-{e.sha256[:16]}", compute)
    return time.perf_counter() - t


def _run(volume, bank, engine, k: int, precision: str, batch_size, propagate: int = 0):
    from ..segmentation.segment import segment_volume

    dev = engine.sam.device
    _peak_reset(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    seg = segment_volume(volume, bank, engine, k=k, precision=precision, batch_size=batch_size,
                         keep_label_masks=True, propagate=propagate)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return seg, time.perf_counter() - t, _peak_mb(dev)


def _agreement(a, b) -> tuple[float, list[float], list[float]]:
    """(worst per-label foreground-mask agreement, per label, foreground fraction of `a`)."""
    per = [float((x == y).mean()) for x, y in zip(a.label_masks, b.label_masks)]
    fg = [float(x.mean()) for x in a.label_masks]
    return min(per), per, fg


def run(device: str = "auto", image_size: int | None = None, slices: int | None = None, k: int = 8,
        hw: int = 256, bank_cases: int | None = None, sam2: str = "tiny", compile: bool = False,
        batch_size: int | None = None, precision: str = "auto", seed: int = 0, extent_slices: int = 0,
        extent_stop: int | None = None, more_batch_sizes: tuple[int, ...] = (), propagate: int = 0) -> dict:
    """more_batch_sizes: further batch sizes timed after the batched path (rows only; the closing
    lines compare the batched path with the per-slice one). propagate: N > 0 adds a row timing the
    per-slice fp32 path with `--propagate N` (segment_volume's walk from its default start slice)."""
    from ..engine.sam2_memory import resolve_precision
    from ..models.loaders import resolve_device
    from ..engine.pipeline import RetrievalEngine
    from ..data.synthetic import LABELS, make_synthetic_study

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    image_size = image_size or (1024 if cuda else 512)
    slices = slices or (96 if cuda else 6)
    bank_cases = bank_cases or (3 if cuda else 1)
    bank_slices = max(12, min(slices, 24))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = RetrievalEngine.load(sam2, "small", device=str(dev), image_size=image_size,
                                      random_weights=True, seed=seed)
    cases = make_synthetic_study(bank_cases, shape=(bank_slices, hw, hw), spacing=(1.2, 1.2, 6.0), seed=seed)
    query = make_synthetic_study(1, shape=(slices, hw, hw), spacing=(1.2, 1.2, 6.0), seed=seed + 1000)[0]
    folder = Path(tempfile.mkdtemp(prefix="rseg-bench-volume-"))
    bank = InMemoryBank(LABELS, engine.embedder.identity, folder)
    t = time.perf_counter()
    for c in cases:
        bank.add(c.case_id, _windowed(c.image), list(c.labels.array), engine.embedder)
    bank_s = time.perf_counter() - t
    new_prec = resolve_precision(precision, dev)
    # CPU: auto is the per-slice path (segmentation.queries.CPU_BATCH_SIZE); time a batch anyway, to show its effect.
    batched = batch_size if batch_size is not None else (None if cuda else 4)
    print(f"bank: {len(bank)} labelled slices from {bank_cases} synthetic cases ({bank_s:.1f} s); "
          f"query volume {slices} x {hw} x {hw}; SAM 2.1 {sam2} at {image_size} px; k={k}; {dev}",
          file=sys.stderr, flush=True)
    warm = {p: _warm(bank, engine, p) for p in sorted({"fp32", new_prec})}
    print("support memories: " + ", ".join(f"{p} {s:.1f} s" for p, s in warm.items()), file=sys.stderr, flush=True)
    # Untimed warm-up of both paths on 2 slices (allocator, kernels, autotuning).
    from ..segmentation.segment import segment_volume

    head = dict(slice_range=(0, min(2, slices)), k=k)
    segment_volume(query.image, bank, engine, precision="fp32", batch_size=1, **head)
    segment_volume(query.image, bank, engine, precision=new_prec, batch_size=batched, **head)

    rows = []
    base, base_s, base_peak = _run(query.image, bank, engine, k, "fp32", 1)
    rows.append(dict(path="per-slice (today)", precision="fp32", batch=1, seconds=base_s, peak=base_peak, seg=base))
    print(f"  per-slice fp32: {base_s:.1f} s", file=sys.stderr, flush=True)
    new, new_s, new_peak = _run(query.image, bank, engine, k, new_prec, batched)
    rows.append(dict(path="batched", precision=new.precision, batch=new.batch_size, seconds=new_s, peak=new_peak,
                     seg=new))
    print(f"  batched {new.precision} B={new.batch_size}: {new_s:.1f} s", file=sys.stderr, flush=True)
    for b in more_batch_sizes:
        more, more_s, more_peak = _run(query.image, bank, engine, k, new_prec, b)
        rows.append(dict(path=f"batched (B={b})", precision=more.precision, batch=more.batch_size, seconds=more_s,
                         peak=more_peak, seg=more))
        print(f"  batched {more.precision} B={b}: {more_s:.1f} s", file=sys.stderr, flush=True)
    if propagate:
        prop, prop_s, prop_peak = _run(query.image, bank, engine, k, "fp32", 1, propagate=propagate)
        rows.append(dict(path=f"per-slice + propagate {propagate}", precision="fp32", batch=1, seconds=prop_s,
                         peak=prop_peak, seg=prop))
        print(f"  per-slice fp32 propagate {propagate}: {prop_s:.1f} s", file=sys.stderr, flush=True)
    compile_s = None
    if compile:
        t = time.perf_counter()
        engine.sam.compile()
        segment_volume(query.image, bank, engine, precision=new_prec, batch_size=new.batch_size, **head)
        compile_s = time.perf_counter() - t
        comp, comp_s, comp_peak = _run(query.image, bank, engine, k, new_prec, new.batch_size)
        rows.append(dict(path="batched + compile", precision=comp.precision, batch=comp.batch_size,
                         seconds=comp_s, peak=comp_peak, seg=comp))
    for r in rows:
        r["slices_per_s"] = slices / r["seconds"]
        r["ms_per_slice"] = 1000.0 * r["seconds"] / slices
        r["agreement"], r["per_label"], r["fg"] = _agreement(r["seg"], base)
    extent = None
    if extent_slices:
        from ..segmentation.extent import DEFAULT_EXTENT_STOP

        print(f"  extent stop: CT-like volume of {extent_slices} slices, full run then stop run...",
              file=sys.stderr, flush=True)
        extent = run_extent(engine, bank, extent_slices, hw, k, new_prec, batch_size,
                            DEFAULT_EXTENT_STOP if extent_stop is None else extent_stop, seed)
    return dict(device=dev.type, machine=_machine(dev), image_size=image_size, slices=slices, hw=hw, k=k,
                bank=len(bank), rows=rows, compile_s=compile_s, speedup=rows[1]["slices_per_s"] / rows[0]["slices_per_s"],
                agreement=rows[1]["agreement"], extent=extent)


def ct_like_volume(n_slices: int, hw: int, seed: int):
    """(Volume, structure slice flags): the middle 20% of `n_slices` is a synthetic cardiac case
    (every slice but its first and last labelled), the other slices repeat its unlabelled end
    slices with fresh noise: the same body without the structure."""
    from ..data.synthetic import make_synthetic_study

    m = max(4, round(0.2 * n_slices))
    case = make_synthetic_study(1, shape=(m, hw, hw), spacing=(1.2, 1.2, 5.0), seed=seed)[0]
    img, lab = case.image.array, case.labels.array
    rng = np.random.default_rng(seed)
    a0 = (n_slices - m) // 2
    out = np.empty((n_slices, hw, hw), dtype=img.dtype)
    truth = np.zeros(n_slices, dtype=bool)
    for z in range(n_slices):
        if a0 <= z < a0 + m:
            out[z] = img[z - a0]
            truth[z] = bool(lab[z - a0].any())
        else:
            base = img[0] if z < a0 else img[m - 1]
            noise = rng.normal(0.0, 8.0, size=base.shape)
            out[z] = np.clip(base + noise, np.iinfo(img.dtype).min, np.iinfo(img.dtype).max).astype(img.dtype)
    from ..data.volume import Volume

    return Volume(out, case.image.spacing, case.image.origin, case.image.direction), truth


def presence_threshold_from(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy): the midpoint between two sorted scores that best separates
    `truth` (present where score > threshold); ties go to the lowest threshold."""
    values = np.unique(scores)
    low = max(0.0, float(values[0]) - 1.0)  # a presence threshold is >= 0 (segment.check_presence_threshold)
    best = (low, float(((scores > low) == truth).mean()))
    for a, b in zip(values, values[1:]):
        t = float((a + b) / 2)
        acc = float(((scores > t) == truth).mean())
        if acc > best[1]:
            best = (t, acc)
    return best


def run_extent(engine, bank, n_slices: int, hw: int, k: int, precision: str, batch_size, stop: int,
               seed: int) -> dict:
    """Full run vs extent-stop run on `ct_like_volume`, same engine, bank and settings."""
    from ..segmentation.extent import extent_slices
    from ..segmentation.segment import segment_volume

    volume, truth = ct_like_volume(n_slices, hw, seed + 2000)
    dev = engine.sam.device
    kw = dict(k=k, precision=precision, batch_size=batch_size, keep_label_masks=True)
    full, full_s, _ = _run(volume, bank, engine, k, precision, batch_size)
    scores = np.array([max(full.slices[i].object_score.values()) for i in range(n_slices)])
    threshold, accuracy = presence_threshold_from(scores, truth)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    seg = segment_volume(volume, bank, engine, extent_stop=stop, presence_threshold=threshold, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    stop_s = time.perf_counter() - t
    done = sorted(seg.slices)
    expect = extent_slices(list(scores > threshold), seg.start_slices, stop)
    # The stop run empties the labels absent under its threshold; the full run (threshold 0) kept them.
    present = {i: np.array([full.slices[i].object_score[lab.value] > threshold for lab in full.labels]) for i in done}
    same = all(np.array_equal(full.label_masks[:, i] & present[i][:, None, None], seg.label_masks[:, i]) for i in done)
    return dict(
        slices=n_slices, structure=int(truth.sum()), stop=stop, threshold=threshold, accuracy=accuracy,
        score_range=(float(scores.min()), float(scores.max())), start=seg.start_slices, reason=seg.start_reason,
        full_slices=len(full.slices), full_s=full_s, stop_slices=len(done), stop_s=stop_s,
        covered=int(truth[done].sum()), rule_matches=done == expect, identical=same,
        beyond=len(seg.beyond_extent), speedup=full_s / stop_s,
    )


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers, e.g. 4 or 4,2,1 (got {text!r})") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1 (got {text!r})")
    return sizes


MEMORY_TABLE = dict(sizes=(512, 1024), ks=(4, 8, 16), batches=(1, 8, 32))


def memory_table(device, sam2: str = "tiny", sizes=MEMORY_TABLE["sizes"], ks=MEMORY_TABLE["ks"],
                 batches=MEMORY_TABLE["batches"], n_labels: int = 3, precision: str = "auto", seed: int = 0) -> list[dict]:
    """Peak device memory of one image-encoder + memory-attention + decoder call on `batch` slices
    x `n_labels` labels with k supports, for each image size x k x batch (random weights; the
    supports' memories are on the device first, as in a run). `peak` is the allocator's peak
    during the call (CUDA; None elsewhere), `over_model` that minus what was allocated before it;
    an out-of-memory error is a row with `oom` True."""
    from ..engine.device import is_out_of_memory, peak_memory, release_memory, reset_peak
    from ..engine.sam2_memory import Sam2MemoryEngine, autocast, resolve_precision
    from ..models.loaders import load_sam2, resolve_device

    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    rng = np.random.default_rng(seed)
    hw = 256
    img = rng.integers(0, 256, (hw, hw), dtype=np.uint8)
    yy, xx = np.mgrid[:hw, :hw]
    masks = {lab: np.hypot(yy - hw / 2, xx - hw / 2) < 20 * lab for lab in range(1, n_labels + 1)}
    rows = []
    for size in sizes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sam = Sam2MemoryEngine(load_sam2(sam2, device=str(dev), image_size=size, random_weights=True, seed=seed))
        with autocast(prec, dev):
            mem = sam.encode_support(img, masks)
        for k in ks:
            mems = [mem] * k
            for b in batches:
                release_memory(dev)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                base = reset_peak(dev)
                oom = False
                try:
                    with autocast(prec, dev):
                        feats = sam.encode_batch([img] * b)
                        out = sam.query_batch(feats, mems, [list(range(k))] * b, sorted(masks))
                    del feats, out
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                except Exception as e:  # noqa: BLE001 - only out of memory is a row; anything else is an error
                    if not is_out_of_memory(e):
                        raise
                    oom = True
                peak = peak_memory(dev)
                rows.append(dict(image_size=size, k=k, batch=b, precision=prec, oom=oom, peak=peak,
                                 over_model=None if peak is None or base is None else peak - base))
        del sam, mem
        release_memory(dev)
    return rows


def print_memory_table(rows: list[dict], n_labels: int = 3) -> None:
    """The memory table as Markdown."""
    print(f"peak device memory of one encoder + query call ({n_labels} labels; GiB, allocator peak; "
          "'over model': above what was allocated before the call)")
    print("| image size | k | batch | precision | peak GiB | over model GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["oom"]:
            peak = over = "out of memory"
        else:
            peak = "n/a" if r["peak"] is None else f"{r['peak'] / 2**30:.2f}"
            over = "n/a" if r["over_model"] is None else f"{r['over_model'] / 2**30:.2f}"
        print(f"| {r['image_size']} | {r['k']} | {r['batch']} | {r['precision']} | {peak} | {over} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m RetrievalSegLib.benchmarks.volume", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int, default=None, help="SAM 2 input size (default 1024 on CUDA, 512 on CPU)")
    p.add_argument("--slices", type=int, default=None, help="slices in the query volume (default 96 CUDA, 6 CPU)")
    p.add_argument("--hw", type=int, default=256, help="in-plane size of the synthetic slices (default 256)")
    p.add_argument("--k", type=int, default=8, help="supports per slice (default 8)")
    p.add_argument("--bank-cases", type=int, default=None,
                   help="synthetic cases of 12-24 slices in the bank (default 3 CUDA, 1 CPU)")
    p.add_argument("--batch-size", type=_batch_sizes, default=None, metavar="B[,B...]",
                   help="batched path: slices per call (default: auto on CUDA; 4 on CPU, where auto is 1); "
                        "further comma-separated sizes are timed too, as extra rows")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="batched path precision")
    p.add_argument("--compile", action="store_true", help="also time the batched path with torch.compile")
    p.add_argument("--sam2", default="tiny")
    p.add_argument("--propagate", type=int, default=6, choices=range(0, 7), metavar="N",
                   help="also time the per-slice fp32 path with --propagate N, 0..6 (default 6; 0 skips the row)")
    p.add_argument("--extent-slices", type=int, default=120,
                   help="slices of the CT-like volume for the extent-stop comparison (default 120; 0 skips it)")
    p.add_argument("--extent-stop", type=int, default=None, help="N for that comparison (default: rseg's default)")
    p.add_argument("--memory-table", action=argparse.BooleanOptionalAction, default=None,
                   help="also print the peak device memory of image size 512/1024 x k 4/8/16 x batch 1/8/32 "
                        "(default: on CUDA only; elsewhere there is no allocator peak to read)")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    sizes = a.batch_size or [None]
    r = run(a.device, a.image_size, a.slices, a.k, a.hw, a.bank_cases, a.sam2, a.compile, sizes[0], a.precision,
            extent_slices=a.extent_slices, extent_stop=a.extent_stop, more_batch_sizes=tuple(sizes[1:]),
            propagate=a.propagate)
    print(f"machine: {r['machine']}")
    print(f"volume {r['slices']} x {r['hw']} x {r['hw']}, SAM 2.1 {a.sam2} at {r['image_size']} px, k={r['k']}, "
          f"bank of {r['bank']} slices, random weights, support memories cached before timing")
    print("| path | precision | batch | slices/s | ms/slice | peak MB | per-label mask agreement vs per-slice fp32 (min; per label) |")
    print("|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        per = ", ".join(f"{x:.5f}" for x in row["per_label"])
        print(f"| {row['path']} | {row['precision']} | {row['batch']} | {row['slices_per_s']:.2f} | "
              f"{row['ms_per_slice']:.0f} | {row['peak']} | {row['agreement']:.5f} ({per}) |")
    fg = ", ".join(f"{x:.3f}" for x in r["rows"][0]["fg"])
    print(f"foreground fraction per label (per-slice fp32): {fg}")
    if r["compile_s"] is not None:
        print(f"compile + first batch: {r['compile_s']:.1f} s (not counted above)")
    # The two closing lines describe the default batched path (without --compile) vs today's path.
    x = r.get("extent")
    if x is not None:
        print(f"extent stop on a CT-like volume: {x['slices']} slices x {r['hw']} x {r['hw']}, structure on "
              f"{x['structure']} ({100.0 * x['structure'] / x['slices']:.0f}%); N = {x['stop']}; start slice {x['start']} "
              f"({x['reason']}); presence threshold {x['threshold']:.6f} (object scores of the full run "
              f"{x['score_range'][0]:.4f}..{x['score_range'][1]:.4f}, all > 0 with random weights; the threshold is "
              f"the one that best separates structure slices, {100.0 * x['accuracy']:.0f}% of slices agree)")
        print("| run | slices segmented | seconds | slices/s |")
        print("|---|---|---|---|")
        print(f"| every slice (--extent-stop 0) | {x['full_slices']} | {x['full_s']:.1f} | {x['full_slices'] / x['full_s']:.2f} |")
        print(f"| extent stop {x['stop']} | {x['stop_slices']} | {x['stop_s']:.1f} | {x['stop_slices'] / x['stop_s']:.2f} |")
        print(f"structure slices segmented: {x['covered']} of {x['structure']}; slices beyond the extent: {x['beyond']}; "
              f"segmented slices identical to the full run's: {x['identical']}; slices = the rule on the full run's "
              f"scores: {x['rule_matches']}")
    if a.memory_table or (a.memory_table is None and r["device"] == "cuda"):
        print_memory_table(memory_table(a.device, a.sam2, precision=a.precision))
    print(f"volume_speedup_{r['device']} {r['speedup']:.2f}")
    print(f"volume_agreement_{r['device']} {r['agreement']:.5f}")
    if x is not None:
        print(f"extent_slices_{r['device']} {x['stop_slices']}/{x['full_slices']}")
        print(f"extent_speedup_{r['device']} {x['speedup']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
