"""`make bench-report`: how long `rseg report` takes for a 300-slice volume and a 200-volume cohort.

No model runs (a report never runs one): the bench writes run outputs in rseg's own formats with
the library's own writers: a synthetic CT-like volume, its label map (three labels on the middle
third of the slices, the rest "beyond extent") and sidecar (confidences, k = 8 retrieved supports
per slice from a real bank of synthetic entries), and a cohort folder (a summary, one label map and
sidecar per volume, 2% failed). Then it times `write_report` on each, reading everything back from
disk as `rseg report` does. The last lines are `report_segment_s X` and `report_cohort_s Y`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _volume(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int):
    """An int16 CT-like volume (body ellipse, noise) and a label map of 3 nested blobs on the middle third."""
    from ..data.volume import Volume

    rng = np.random.default_rng(seed)
    n, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    body = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 < 1
    img = np.where(body, 40, -1000).astype(np.int16)[None].repeat(n, 0)
    img += rng.normal(0, 20, size=img.shape).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    for k in range(n // 3, 2 * n // 3):
        r = 0.18 * h * np.sin(np.pi * (k - n // 3) / (n // 3))
        d = (yy - h / 2) ** 2 + (xx - w / 2) ** 2
        lab[k][d < r ** 2] = 1
        lab[k][d < (0.7 * r) ** 2] = 2
        lab[k][d < (0.35 * r) ** 2] = 3
    img[lab > 0] += 60
    geo = dict(spacing=spacing, origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    return Volume(img, **geo), Volume(lab, **geo)


def _bank(folder: Path):
    from ..bank.support_bank import LabelInfo, SupportBank
    from .bank import TableEmbedder

    bank = SupportBank.create(folder / "bank", [LabelInfo(1, "organ"), LabelInfo(2, "core"), LabelInfo(3, "lesion")],
                              TableEmbedder.identity)
    for c in range(2):
        img, lab = _volume((30, 256, 256), (0.8, 0.8, 2.5), 100 + c)
        bank.add_volume(img, lab, f"support{c}", TableEmbedder())
    return bank


def _prov(bank, image: Path, labelmap, window, extra: dict | None = None) -> dict:
    from .. import __version__

    return {"rseg_version": __version__, "sam2": "sam2.1-tiny@1024:bench", "dinov2": "dinov2-small:bench",
            "random_weights": True, "image_size": 1024, "precision": "fp32", "batch_size": 1, "k": 8,
            "bank": {"path": str(bank.path), "bank_id": bank.bank_id, "revision": int(bank.revision)},
            "labels": {"1": "organ", "2": "core", "3": "lesion"}, "axis": "k", "seconds": 1.0, "cancelled": False,
            "created": "bench", "window": list(window), "annotated_slices": [], "working_dir": str(image.parent),
            "image": str(image), **(extra or {})}


def _slices(n: int, segmented: range, entries: list[str], rng) -> list[dict]:
    out = []
    for i in range(n):
        if i in segmented:
            picks = rng.choice(len(entries), size=8, replace=False)
            scores = np.sort(rng.uniform(0.5, 1.0, 8))[::-1]  # most similar first, as retrieval returns them
            out.append({"index": i, "status": "segmented", "confidence": float(rng.uniform(0.3, 1.0)),
                        "object_score": {"1": 1.0}, "iou": {"1": 0.9},
                        "retrieved": [[entries[j], float(s)] for j, s in zip(picks, scores)]})
        else:
            out.append({"index": i, "status": "not segmented (beyond extent)"})
    return out


def make_segment_run(folder: Path, bank, slices: int, size: int) -> Path:
    """A 300-slice run: image, label map, sidecar."""
    from ..segmentation.provenance import write_sidecar
    from ..data.volume import write_volume

    img, lab = _volume((slices, size, size), (0.7, 0.7, 1.5), 1)
    image = write_volume(img, folder / "ct.nii.gz")
    out = write_volume(lab, folder / "seg.nii.gz")
    entries = [e.id for e in bank.entries()]
    rng = np.random.default_rng(0)
    segmented = range(slices // 3 - 5, 2 * slices // 3 + 5)
    write_sidecar(out, _prov(bank, image, lab, (-160.0, 240.0), {"extent": {"stop": 5, "start_slices": [slices // 2]}}),
                  _slices(slices, segmented, entries, rng))
    return out


def make_cohort_run(folder: Path, bank, volumes: int, shape: tuple[int, int, int]) -> Path:
    """A cohort folder of `volumes` volumes (one image file shared by all, each its own label map and sidecar)."""
    from ..data.fileio import atomic_write_bytes
    from ..segmentation.provenance import write_sidecar
    from ..data.volume import write_volume

    out = folder / "cohort"
    out.mkdir()
    img, lab = _volume(shape, (0.8, 0.8, 3.0), 2)
    image = write_volume(img, folder / "mr.nii.gz")
    entries = [e.id for e in bank.entries()]
    rng = np.random.default_rng(1)
    results = []
    for v in range(volumes):
        case = f"case{v:04d}"
        if v % 50 == 7:
            results.append({"case_id": case, "image": str(image), "output": str(out / f"{case}.nii.gz"),
                            "status": "failed", "seconds": 0.5, "message": "ValueError: bench failure"})
            continue
        path = write_volume(lab, out / f"{case}.nii.gz")
        write_sidecar(path, _prov(bank, image, lab, (-50.0, 250.0)),
                      _slices(shape[0], range(shape[0] // 3, 2 * shape[0] // 3), entries, rng))
        results.append({"case_id": case, "image": str(image), "output": str(path), "status": "segmented",
                        "seconds": float(rng.uniform(20, 60)), "message": ""})
    summary = {"manifest": "bench", "bank": str(bank.path), "bank_id": bank.bank_id, "bank_revision": bank.revision,
               "out": str(out), "volumes": volumes, "random_weights": True, "results": results}
    atomic_write_bytes(out / "cohort-summary.json", json.dumps(summary).encode(), root=out, what="a cohort folder")
    return out


def main(argv: list[str] | None = None) -> int:
    """Write both runs, time both reports, print the figures."""
    import os

    from ..report.write import write_report

    p = argparse.ArgumentParser(prog="python -m RetrievalSegLib.benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=300, help="slices of the segment run's volume (default 300)")
    p.add_argument("--size", type=int, default=512, help="rows and columns of its slices (default 512)")
    p.add_argument("--volumes", type=int, default=200, help="volumes of the cohort (default 200)")
    p.add_argument("--cohort-shape", default="64,256,256", help="slices,rows,columns of each cohort volume")
    args = p.parse_args(argv)
    shape = tuple(int(x) for x in args.cohort_shape.split(","))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    with tempfile.TemporaryDirectory(prefix="rseg-bench-report-") as tmp:
        folder = Path(tmp)
        bank = _bank(folder)
        seg = make_segment_run(folder, bank, args.slices, args.size)
        cohort = make_cohort_run(folder, bank, args.volumes, shape)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        html = write_report(seg)
        t_seg = time.perf_counter() - t0
        print(f"segment report: {args.slices} slices of {args.size} x {args.size}, 10 shown with 8 supports each: "
              f"{t_seg:.1f} s, {html.stat().st_size / 1e6:.1f} MB", flush=True)
        t0 = time.perf_counter()
        html = write_report(cohort)
        t_coh = time.perf_counter() - t0
        print(f"cohort report: {args.volumes} volumes of {shape[0]} x {shape[1]} x {shape[2]}: {t_coh:.1f} s "
              f"({1000 * t_coh / args.volumes:.0f} ms per volume), {html.stat().st_size / 1e6:.1f} MB", flush=True)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"report_segment_s {t_seg:.2f}")
    print(f"report_cohort_s {t_coh:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
