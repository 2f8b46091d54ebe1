"""Per-slice latency: RetrievalSeg engine (support memories cached) vs the official predictor path.

The official path is what a retrieval method without caching does for every query slice: a
pseudo-video [support_1..support_k, query] through `SAM2VideoPredictor` (init_state,
add_new_mask per support, propagate_in_video), re-encoding every support. The engine encodes
the query once and attends to cached memories. Both run the same random weights on the same
inputs in the same process; the masks are compared so a speedup never hides a different result.

    python -m RetrievalSegLib.benchmarks.latency [--image-size 512] [--ks 1,4,16] [--device auto]

Random weights: the timings are real, the masks are not meaningful.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def _machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)}"
    return desc


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slices(n: int, hw: tuple[int, int], seed: int):
    rng = np.random.default_rng(seed)
    h, w = hw
    yy, xx = np.mgrid[:h, :w]
    out = []
    for i in range(n):
        img = 40 + 10 * rng.standard_normal((h, w))
        disc = (yy - h * 0.45 - i % 5) ** 2 + (xx - w * 0.5) ** 2 < (0.2 * min(h, w)) ** 2
        img[disc] += 120
        out.append((np.clip(img, 0, 255).astype(np.uint8), {1: disc}))
    return out


def run(image_size: int = 512, ks=(1, 4, 16), device: str = "auto", queries: int = 5, ref_queries: int = 2,
        size: str = "tiny", seed: int = 0, hw=(256, 256)) -> dict:
    """Measure both paths; return a dict with one row per k."""
    from PIL import Image
    from sam2.build_sam import build_sam2_video_predictor

    from ..engine.sam2_memory import Sam2MemoryEngine
    from ..models.loaders import load_sam2, resolve_device, sam2_hydra_overrides
    from ..models.registry import sam2_spec

    dev = resolve_device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sam = load_sam2(size, random_weights=True, seed=seed, device=dev, image_size=image_size)
        extra = [o for o in sam2_hydra_overrides(image_size, size) if "image_size" in o or "feat_sizes" in o]
        pred = build_sam2_video_predictor(sam2_spec(size).config, None, device=str(dev), hydra_overrides_extra=extra)
    pred.load_state_dict(sam.model.state_dict())
    pred.eval()
    engine = Sam2MemoryEngine(sam)
    kmax = max(ks)
    nq = max(queries, ref_queries)
    data = _slices(kmax + nq, hw, seed)
    tmp = Path(tempfile.mkdtemp(prefix="rseg-bench-"))
    rows = []
    for k in ks:
        supports = data[:k]
        qs = data[kmax : kmax + nq]
        # Write pseudo-videos first (not timed); feed both paths the decoded JPEG pixels.
        videos, decoded = [], []
        for qi, (qimg, _) in enumerate(qs):
            d = tmp / f"k{k}_q{qi}"
            d.mkdir()
            for i, (img, _) in enumerate(supports + [(qimg, None)]):
                Image.fromarray(np.repeat(img[:, :, None], 3, 2)).save(d / f"{i:05d}.jpg")
            videos.append(d)
            decoded.append([np.array(Image.open(d / f"{i:05d}.jpg").convert("RGB")) for i in range(k + 1)])
        # Engine: support memories computed once (the cache), then per-slice query latency.
        mems = [engine.encode_support(decoded[0][i], supports[i][1], (1,)) for i in range(k)]
        engine.query(decoded[0][k], mems, (1,))  # warm-up
        _sync(dev)
        times, eng_logits = [], []
        for qi in range(queries):
            t = time.perf_counter()
            res = engine.query(decoded[qi][k], mems, (1,))
            _sync(dev)
            times.append(time.perf_counter() - t)
            eng_logits.append(res.logits)
        eng_ms, eng_med = 1000 * float(np.min(times)), 1000 * float(np.median(times))
        eng_peak = _peak_mb(dev)
        # Official predictor: everything per query slice.
        rtimes, ref_logits = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for qi in range(-1 if k == ks[0] else 0, ref_queries):  # qi = -1: warm-up, untimed
                warm = qi < 0
                qi = max(qi, 0)
                t = time.perf_counter()
                with torch.inference_mode():
                    st = pred.init_state(str(videos[qi]))
                    for i in range(k):
                        pred.add_new_mask(st, i, 1, supports[i][1][1])
                    last = None
                    for fi, _, m in pred.propagate_in_video(st):
                        last = m
                _sync(dev)
                if not warm:
                    rtimes.append(time.perf_counter() - t)
                    ref_logits.append(last[:, 0].float().cpu().numpy())
        ref_ms, ref_med = 1000 * float(np.min(rtimes)), 1000 * float(np.median(rtimes))
        ref_peak = _peak_mb(dev)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(eng_logits, ref_logits))
        agree = min(float(((a > 0) == (b > 0)).mean()) for a, b in zip(eng_logits, ref_logits))
        rows.append(dict(k=k, engine_ms=eng_ms, official_ms=ref_ms, speedup=ref_ms / eng_ms,
                         engine_median_ms=eng_med, official_median_ms=ref_med,
                         max_logit_diff=diff, mask_agreement=agree,
                         engine_peak_mb=eng_peak, official_peak_mb=ref_peak))
        print(f"  k={k:>2}: engine {eng_ms:8.1f} ms  official {ref_ms:9.1f} ms  "
              f"x{ref_ms / eng_ms:5.1f}  agreement {agree:.5f}", file=sys.stderr, flush=True)
    return dict(image_size=image_size, device=str(dev), machine=_machine(dev), size=size, rows=rows,
                queries=queries, ref_queries=ref_queries)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m RetrievalSegLib.benchmarks.latency", description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=512, help="SAM 2 input size (512 default; 1024 = official)")
    p.add_argument("--ks", default="1,4,16", help="numbers of supports, comma separated")
    p.add_argument("--device", default="auto")
    p.add_argument("--sam2", default="sam2.1-tiny", help="SAM 2 backbone (sam2.1-tiny ... medsam2; old size names work)")
    p.add_argument("--queries", type=int, default=5, help="query slices timed on the engine path")
    p.add_argument("--ref-queries", type=int, default=2, help="query slices timed on the official path")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = p.parse_args(argv)
    ks = tuple(int(x) for x in a.ks.split(","))
    from ..models.registry import sam2_spec

    name = sam2_spec(a.sam2).display
    print(f"RetrievalSeg benchmark: {name}, {a.image_size} px, random weights, k={ks}", file=sys.stderr)
    r = run(a.image_size, ks, a.device, a.queries, a.ref_queries, a.sam2)
    print(f"machine: {r['machine']}; device: {r['device']}")
    print(f"per-slice latency, {name} at {a.image_size} px, 1 label: best of {a.queries} query "
          f"slices for the engine, of {a.ref_queries} for the official path (median in brackets)")
    print("| k | engine (cached supports) ms | official predictor ms | speedup | mask agreement | max logit diff | peak MB engine / official |")
    print("|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        print(f"| {row['k']} | {row['engine_ms']:.0f} ({row['engine_median_ms']:.0f}) | "
              f"{row['official_ms']:.0f} ({row['official_median_ms']:.0f}) | {row['speedup']:.1f}x | "
              f"{row['mask_agreement']:.5f} | {row['max_logit_diff']:.1e} | "
              f"{row['engine_peak_mb']:.0f} / {row['official_peak_mb']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    last = {row["k"]: row for row in r["rows"]}
    kk = max(last)
    print(f"speedup_k{kk}_{a.image_size} {last[kk]['speedup']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
