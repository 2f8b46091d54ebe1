"""`make bench-bank`: grow a support bank to 20,000 slices and time adds, searches and opens.

Each step adds one case of 200 tiny synthetic slices (16 x 16, one label) through the real add
path (`SupportBank.add_volume`: entry files, one SQLite transaction). The embeddings are random
unit vectors of DINOv2-small's size (384), precomputed per slice and returned by a table embedder
that `add_volume` calls like any other: at 56 px the random DINOv2 would cost ~1 s per step and
measure the model, not the bank. Searches are one query each, k=8, exact inner product (faiss
IndexFlatIP): no approximate index is used, so recall against exact search is 1 by construction.

The last two lines are exactly `bank_add_growth X` (mean time of the 3 adds ending at 20k
entries divided by that of the 3 adds ending at 1k) and `bank_search_ms_20k Y` (median of 200
single-query searches with case exclusion at 20k entries).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 384
STEP = 200


class TableEmbedder:
    """Random unit vectors keyed by the image bytes (what DINOv2 would return, minus its cost)."""

    identity = "dinov2-small:bench-random@384"
    dim = DIM

    def embed(self, images, progress=None) -> np.ndarray:
        out = np.empty((len(images), DIM), dtype=np.float32)
        for n, im in enumerate(images):
            seed = int.from_bytes(hashlib.sha256(np.ascontiguousarray(im).tobytes()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
            out[n] = v / np.linalg.norm(v)
        return out


def _written() -> int:
    """Bytes this process passed to write() so far (Linux /proc/self/io), or 0."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _case(step: int):
    from ..data.volume import Volume

    rng = np.random.default_rng(step)
    img = rng.integers(0, 255, size=(STEP, 16, 16)).astype(np.int16)
    lab = (img > 128).astype(np.uint8)
    geo = dict(spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    return Volume(img, **geo), Volume(lab, **geo)


def run(entries: int, folder: Path, out=sys.stdout) -> tuple[float, float]:
    from ..bank.support_bank import LabelInfo, SupportBank

    emb = TableEmbedder()
    bank = SupportBank.create(folder / "bank", [LabelInfo(1, "object")], emb.identity)
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((200, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    adds: dict[int, float] = {}
    cpu: dict[int, float] = {}
    checkpoints = {1000, 2000, 5000, 10000, 20000, 50000, 100000}
    print(f"{'entries':>8} {'add 200 s':>10} {'add CPU s':>10} {'search ms':>10} {'excl ms':>8} {'1st ms':>8} "
          f"{'open ms':>8} {'MB/add':>7}", file=out, flush=True)
    search_20k = float("nan")
    for step in range(entries // STEP):
        image, labels = _case(step)
        w0, c0, t0 = _written(), time.process_time(), time.perf_counter()
        bank.add_volume(image, labels, f"case{step:05d}", emb, axis="k", window=(0.0, 255.0))
        adds[(step + 1) * STEP] = time.perf_counter() - t0
        cpu[(step + 1) * STEP] = time.process_time() - c0
        wrote = _written() - w0
        n = (step + 1) * STEP
        if n not in checkpoints:
            continue
        t0 = time.perf_counter()
        bank.search(queries[:1], 8, case_policy="ignore")  # first search at this revision: builds the index
        first = (time.perf_counter() - t0) * 1e3
        plain, excl = [], []
        for i, q in enumerate(queries):
            t0 = time.perf_counter()
            bank.search(q[None], 8, case_policy="ignore")
            plain.append(time.perf_counter() - t0)
            case = f"case{int(i * 7919) % (step + 1):05d}"
            t0 = time.perf_counter()
            hits = bank.search(q[None], 8, case_id=case, case_policy="exclude")
            excl.append(time.perf_counter() - t0)
            assert not any(h.startswith(case + "-") for h, _ in hits[0]), "an excluded entry was returned"
        t0 = time.perf_counter()
        opened = SupportBank.open(bank.path)
        len(opened)
        open_ms = (time.perf_counter() - t0) * 1e3
        opened.close()
        add = statistics.mean(adds[n - j * STEP] for j in range(3) if n - j * STEP in adds)
        add_cpu = statistics.mean(cpu[n - j * STEP] for j in range(3) if n - j * STEP in cpu)
        ms, ms_x = statistics.median(plain) * 1e3, statistics.median(excl) * 1e3
        if n == 20000:
            search_20k = ms_x
        print(f"{n:>8} {add:>10.3f} {add_cpu:>10.3f} {ms:>10.2f} {ms_x:>8.2f} {first:>8.1f} {open_ms:>8.1f} "
              f"{wrote / 1e6:>7.2f}", file=out, flush=True)
    _approximate(bank, queries, out)
    small = statistics.mean(adds[n] for n in (600, 800, 1000))
    top = max(adds)
    large = statistics.mean(adds[n] for n in (top - 400, top - 200, top))
    growth = large / small
    cpu_growth = statistics.mean(cpu[n] for n in (top - 400, top - 200, top)) / statistics.mean(
        cpu[n] for n in (600, 800, 1000))
    print(f"(add time: mean of the 3 adds ending at {top} / at 1000 entries; search: median of "
          f"{len(queries)} single queries, k=8, exact; '1st' = first search after an add, which "
          "rebuilds the per-revision index; MB/add = bytes written by the add at that size; add CPU = "
          f"this process's CPU time, which the disk's fsync waits do not inflate: its growth is "
          f"{cpu_growth:.2f})", file=out)
    print(f"bank_add_growth {growth:.2f}", file=out)
    print(f"bank_search_ms_{top // 1000}k {search_20k if top == 20000 else ms_x:.2f}", file=out)
    return growth, search_20k


def _approximate(bank, queries: np.ndarray, out) -> None:
    """Would an approximate index pay at this size? HNSW (M=32, efSearch=64) against exact search:
    ms per single query and recall@8 (the share of exact top-8 ids it also returns)."""
    import faiss

    rows = np.ascontiguousarray(bank.embeddings(), dtype=np.float32)
    exact = faiss.IndexFlatIP(rows.shape[1])
    exact.add(rows)
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(rows.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efSearch = 64
    hnsw.add(rows)
    build = time.perf_counter() - t0
    timings: dict[str, list[float]] = {"exact": [], "hnsw": []}
    found = 0
    for q in queries:
        t0 = time.perf_counter()
        _, want = exact.search(q[None], 8)
        timings["exact"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, got = hnsw.search(q[None], 8)
        timings["hnsw"].append(time.perf_counter() - t0)
        found += len(set(want[0].tolist()) & set(got[0].tolist()))
    print(f"approximate index at {len(rows)} rows: HNSW {statistics.median(timings['hnsw']) * 1e3:.2f} ms/query, "
          f"recall@8 {found / (8 * len(queries)):.3f} (build {build:.1f} s) vs exact "
          f"{statistics.median(timings['exact']) * 1e3:.2f} ms/query, recall 1; the bank uses exact search",
          file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=20000, help="grow to this many slices (multiple of 200, >= 1000)")
    p.add_argument("--dir", type=Path, default=None, help="where to build the bank (default: a temp folder)")
    args = p.parse_args(argv)
    if args.entries < 1000 or args.entries % STEP:
        p.error("--entries must be a multiple of 200, at least 1000")
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        run(args.entries, args.dir)
    else:
        with tempfile.TemporaryDirectory(prefix="rseg-bench-bank-") as tmp:
            run(args.entries, Path(tmp))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
