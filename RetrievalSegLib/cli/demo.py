"""`make demo`: a synthetic multi-label study segmented from a 3-slice support bank, real weights.

Builds two synthetic cardiac-like cases (anisotropic spacing, oblique direction), makes a bank from
three annotated slices of the first, segments the second with the real SAM 2.1 and DINOv2 weights
(Hugging Face cache or $RSEG_WEIGHTS_DIR), writes NIfTI and Slicer .seg.nrrd, and prints Dice per label.
Without weights it says how to get them and exits 3; it never runs on random weights.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from .common import PhaseProgress

EXIT_UNAVAILABLE = 3


def _ensure_weights(sam2: str, dinov2: str, assume_yes: bool) -> bool:
    """True when both checkpoints are present (downloading them if the user agrees)."""
    from ..models import weights as w
    from ..models.registry import is_offline

    items = w.plan_downloads(sam2, dinov2)
    missing = [it for it in items if not w.is_complete(it)]
    if not missing:
        return True
    names = ", ".join(f"{it.name} ({w._mb(it.approx_mb)})" for it in missing)
    how = (
        f"Get them with `.venv/bin/rseg weights download --sam2 {sam2} --dinov2 {dinov2}` "
        f"(into {w.weights_location()}), or copy the files into a folder and set RSEG_WEIGHTS_DIR "
        "to it, or set RSEG_WEIGHTS_MIRROR to your hospital's Hugging Face Hub mirror, or "
        "RSEG_SAM2_CHECKPOINT / RSEG_DINOV2_PATH to local copies. Then run `make demo` again."
    )
    if is_offline():
        print(f"demo: missing weights: {names}. RSEG_OFFLINE is set, so nothing is downloaded. {how}",
              file=sys.stderr)
        return False
    if not assume_yes:
        if not sys.stdin.isatty():
            print(f"demo: missing weights: {names}. {how} (or run `make demo DEMO_ARGS=--yes` to "
                  "download them now)", file=sys.stderr)
            return False
        answer = input(f"demo: download {names}? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print(f"demo: not downloading. {how}", file=sys.stderr)
            return False
    try:
        w.download(missing, progress=True)
    except w.WeightsError as e:
        print(f"demo: download failed: {e}\n{how}", file=sys.stderr)
        return False
    return True


def run(out: Path, sam2: str = "tiny", dinov2: str = "small", device: str = "auto", image_size: int = 1024,
        shape=(16, 96, 96), annotated: int = 3, k: int = 3, assume_yes: bool = False,
        check_weights: bool = True) -> int:
    """The demo; returns an exit code."""
    from ..bank.support_bank import LabelInfo, SupportBank
    from .main import write_outputs
    from ..evaluation.metrics import per_label_metrics
    from ..models.loaders import MissingWeightsError
    from ..engine.pipeline import RetrievalEngine
    from ..segmentation.segment import segment_volume
    from ..data.synthetic import LABELS, make_synthetic_study
    from ..data.volume import num_slices, slice_view, through_plane_axis, write_volume

    if check_weights and not _ensure_weights(sam2, dinov2, assume_yes):
        return EXIT_UNAVAILABLE
    print(f"demo: loading models (SAM 2.1 {sam2} at {image_size} px, DINOv2 {dinov2})", flush=True)
    try:
        engine = RetrievalEngine.load(sam2, dinov2, device=device, image_size=image_size)
    except MissingWeightsError as e:
        print(f"demo: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(f"demo: SAM 2.1 {sam2} ({engine.sam2_identity}), DINOv2 {dinov2} ({engine.dinov2_identity}), "
          f"device {engine.sam.device}")

    out.mkdir(parents=True, exist_ok=True)
    train, test = make_synthetic_study(2, shape=shape, spacing=(1.25, 1.25, 8.0), seed=0)
    for c in (train, test):
        write_volume(c.image, out / f"{c.case_id}_image.nii.gz")
        write_volume(c.labels, out / f"{c.case_id}_labels.nii.gz")
    axis = through_plane_axis(train.image.spacing)
    labelled = [i for i in range(num_slices(train.labels.array, axis)) if slice_view(train.labels.array, axis, i).any()]
    picks = sorted({labelled[round(j * (len(labelled) - 1) / max(1, annotated - 1))] for j in range(annotated)})
    bank_dir = out / "bank"
    if bank_dir.exists():
        shutil.rmtree(bank_dir)
    bank = SupportBank.create(bank_dir, [LabelInfo(v, n, c) for v, (n, c) in LABELS.items()], engine.dinov2_identity)
    bank.add_volume(train.image, train.labels, train.case_id, engine.embedder, axis=axis, slices=picks)
    print(f"demo: bank of {len(bank)} annotated slices of {train.case_id} (slices {picks} along {'ijk'[axis]})")

    from tqdm import tqdm

    bar = tqdm(total=0, desc=f"segmenting {test.case_id}", unit="slice", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    phases = PhaseProgress(True)  # embedding, the support memories' own bar and its estimate
    t = time.perf_counter()
    try:
        seg = segment_volume(test.image, bank, engine, k=min(k, len(bank)), progress=progress, phase=phases)
    finally:
        phases.close()
        bar.close()
    written = write_outputs(seg, out / f"{test.case_id}_pred.nii.gz", out / f"{test.case_id}_pred.seg.nrrd")
    print(f"demo: {len(seg.slices)} slices in {time.perf_counter() - t:.1f} s; wrote " + ", ".join(map(str, written)))
    metrics = per_label_metrics(seg.labelmap, test.labels.with_array(test.labels.array.astype(seg.labelmap.array.dtype)),
                                {v: n for v, (n, _) in LABELS.items()})
    print(f"{'label':<6} {'Dice':>6} {'HD95 mm':>8}")
    for name, m in metrics.items():
        print(f"{name:<6} {m['dice']:>6.3f} {m['hd95']:>8.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m RetrievalSegLib.cli.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--sam2", default="tiny")
    p.add_argument("--dinov2", default="small")
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--yes", action="store_true", help="download missing weights without asking")
    a = p.parse_args(argv)
    return run(a.out, a.sam2, a.dinov2, a.device, a.image_size, assume_yes=a.yes)


if __name__ == "__main__":
    sys.exit(main())

