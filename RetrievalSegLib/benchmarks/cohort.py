"""`make bench-cohort`: volumes per minute of `rseg segment-cohort` with 1 and with N local workers.

Random weights (the real SAM 2.1 / DINOv2 architectures), a synthetic bank and cohort, in one run
on this machine; prints the machine (CPU model, cores, GPU). Each configuration runs on a fresh
output folder with the memory cache already warm (a first run fills it), so the figures compare
segmentation throughput, including each worker's model loading (a cohort pays it once per worker).
It also reports how many label voxels differ from the 1-worker run: CPU workers split the cores
(torch threads = cores / workers), and another thread count can change float results in their
last bits (`--threads` pins it; the tests check that equal thread counts give identical maps).

    python -m RetrievalSegLib.benchmarks.cohort [--volumes 6 --slices 4 --workers 1 2 --image-size 256]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001
        pass
    load = ", load average %.2f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} logical CPUs, {gpu}, {platform.system()} {platform.release()}{load}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=6)
    ap.add_argument("--slices", type=int, default=4, help="slices per volume")
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="worker counts to compare (default: 1 and the number of GPUs, else 1 and 2)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    from ..cli.main import main as rseg
    from ..cohort.run import visible_gpus
    from ..data.synthetic import make_synthetic_study
    from ..data.volume import write_volume

    gpus = visible_gpus()
    counts = args.workers or [1, max(2, gpus)]
    models = ["--random-weights", "--image-size", str(args.image_size), "--dinov2-input-size", "112",
              "--device", args.device]
    seg = ["--k", "2", "--extent-stop", "0"]
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="rseg-bench-cohort-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("RSEG_CACHE_DIR", str(root / "user-cache"))
        train = make_synthetic_study(2, shape=(6, 48, 48), spacing=(1.2, 1.2, 5.0), seed=1)
        bank = root / "bank"
        if rseg(["bank", "create", str(bank), "--labels", "1:RV,2:Myo,3:LV", *models]) != 0:
            return 1
        for c in train:
            write_volume(c.image, root / f"{c.case_id}_img.nii.gz")
            write_volume(c.labels, root / f"{c.case_id}_lab.nii.gz")
            if rseg(["bank", "add", str(bank), str(root / f"{c.case_id}_img.nii.gz"),
                     str(root / f"{c.case_id}_lab.nii.gz"), "--case", c.case_id, *models]) != 0:
                return 1
        vols = root / "volumes"
        vols.mkdir()
        for c in make_synthetic_study(args.volumes, shape=(args.slices, 48, 48), spacing=(1.2, 1.2, 5.0), seed=5):
            write_volume(c.image, vols / f"{c.case_id}.nii.gz")
        cache = root / "cache"

        def run(workers: int, out: Path) -> tuple[float, dict]:
            cmd = [sys.executable, "-m", "RetrievalSegLib.cli", "segment-cohort", str(vols), "--bank", str(bank),
                   "--out", str(out), "--cache-dir", str(cache), "--workers", str(workers), *models, *seg,
                   "--json", "--no-progress"]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if done.returncode != 0:
                raise SystemExit(f"segment-cohort failed ({done.returncode}): {done.stderr[-3000:]}")
            return seconds, json.loads(done.stdout[done.stdout.index("{"):])

        run(1, root / "warm")  # fills the memory cache (and the OS file cache) first
        rows = []
        outputs = {}
        for n in counts:
            seconds, summary = run(n, root / f"out{n}")
            outputs[n] = {p.name: p.read_bytes() for p in (root / f"out{n}").glob("*.nii.gz")}
            rows.append((n, seconds, 60.0 * args.volumes / seconds, summary["seconds"]))
        ref = outputs[counts[0]]
        from ..data.volume import read_volume

        differ = {}
        for n in counts[1:]:
            diff = total = 0
            for name in ref:
                a = read_volume(root / f"out{counts[0]}" / name).array
                b = read_volume(root / f"out{n}" / name).array
                diff += int((a != b).sum())
                total += a.size
            differ[n] = (diff, total)
    print(f"machine: {machine()}")
    print(f"cohort: {args.volumes} volumes of {args.slices} slices (48 x 48), SAM 2.1 tiny at {args.image_size} px, "
          f"k = 2, random weights, device {args.device}")
    print("| workers | wall s (with model loading) | volumes/min | cohort s (command's own timer) |")
    print("|---|---|---|---|")
    for n, seconds, vpm, own in rows:
        print(f"| {n} | {seconds:.1f} | {vpm:.2f} | {own:.1f} |")
    base = rows[0][2]
    for n, _, vpm, _ in rows[1:]:
        d, t = differ[n]
        same = "identical label maps" if d == 0 else f"{d} of {t} label voxels differ (other thread count)"
        print(f"{n} workers: {vpm / base:.2f}x the volumes per minute of {rows[0][0]} ({same})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
