"""What every `rseg` command shares: exit codes, the model options (the models they describe are
built by `engine.build`), the --window/--level rule, usage errors and the progress bar. Every
module of `cli` may import it; it imports none of them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: `rseg bank list | head` (issue "What a new user met", item 8)


def model_options() -> argparse.ArgumentParser:
    """Options shared by every command that loads a model."""
    from ..models.registry import DEFAULT_SAM2, DINOV2_MODELS, SAM2_MODELS

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("models")
    g.add_argument("--sam2", default=DEFAULT_SAM2, type=_sam2_backbone, metavar="BACKBONE",
                   help=f"SAM 2 backbone: {', '.join(SAM2_MODELS)} (default: {DEFAULT_SAM2}; the old "
                        "names tiny, small, base_plus, large still work). Each sets its native --image-size")
    g.add_argument("--dinov2", default="small", choices=list(DINOV2_MODELS), help="DINOv2 size (default: small)")
    g.add_argument("--sam2-checkpoint", type=Path, default=None, metavar="FILE",
                   help="checkpoint of the --sam2 backbone, e.g. another MedSAM2 release for medsam2 "
                        "(default: $RSEG_SAM2_CHECKPOINT, $RSEG_WEIGHTS_DIR or the HF cache)")
    g.add_argument("--dinov2-path", type=Path, default=None, metavar="DIR",
                   help="DINOv2 folder with config.json + model.safetensors (default: $RSEG_DINOV2_PATH, $RSEG_WEIGHTS_DIR or the HF cache)")
    g.add_argument("--device", default="auto",
                   help="auto (default: the first CUDA GPU, then mps, then cpu), cpu, cuda, cuda:N (that GPU, for "
                        "SAM 2 and DINOv2 alike) or mps")
    g.add_argument("--image-size", type=int, default=None,
                   help="SAM 2 input size, a multiple of 32 (default: the backbone's native size, "
                        "1024 for SAM 2.1, 512 for MedSAM2; another value is used with a warning)")
    g.add_argument("--dinov2-input-size", type=int, default=224, help="DINOv2 input size (default 224)")
    g.add_argument("--retrieval-feature", dest="retrieval_feature", default="cls",
                   choices=["cls", "mean", "cls+mean", "gem"],
                   help="DINOv2 feature slices are retrieved by: cls (default: the CLS token, DINOv2's kNN "
                        "protocol), mean (mean of the patch tokens), cls+mean (both, DINOv2's linear-probe "
                        "input; twice the size), gem (GeM p=3 over the patch tokens). Part of the embedder "
                        "identity: a bank answers the features it holds embeddings of (add one with "
                        "`rseg bank reembed BANK --retrieval-feature F`)")
    g.add_argument("--support-filter", dest="support_filter", default="all", choices=["all", "foreground"],
                   help="which retrieved slices condition each label when segmenting: all (default: the "
                        "top k, for every label) or foreground (per label the top k among retrieved slices "
                        "that contain it, searching deeper; the top k where fewer exist, recorded per slice)")
    g.add_argument("--fill-hole-area", type=int, default=0, metavar="PX",
                   help="fill background holes up to PX low-res pixels, SAM 2's optional post-processing "
                        "(default 0: off)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="SAM 2 arithmetic: auto (default: bf16 autocast on a CUDA GPU that supports it, "
                        "fp32 on CPU and MPS), fp32, or bf16 (autocast)")
    g.add_argument("--batch-size", type=_positive_int, default=None, metavar="B",
                   help="query slices per SAM 2 memory-attention + decoder call (default: chosen for the "
                        "device: 1 on CPU and MPS, where batching does not pay or is unmeasured; on CUDA up to 32, "
                        "sized from the free GPU memory and the first batch's measured footprint; 1 = one "
                        "slice per call, the per-slice reference case). Out of GPU memory, a batch is halved "
                        "and retried (same output)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the SAM 2 image encoder and memory attention (slow first batch)")
    g.add_argument("--random-weights", action="store_true",
                   help="use seeded RANDOM weights (tests/benchmarks only: the output is meaningless)")
    g.add_argument("--seed", type=int, default=0, help="seed for --random-weights")
    return p


#: --k's help where it matters: SAM 2.1 normalises pointer distances by max_obj_ptrs_in_encoder - 1.
K_HELP = ("supports retrieved per slice (default 8). k > 15 puts the farthest support's object pointer "
          "past SAM 2.1's normalised temporal range (max_obj_ptrs_in_encoder 16): it still attends, with "
          "an encoding SAM 2 never saw in training")


def add_accuracy_options(p: argparse.ArgumentParser) -> None:
    """The accuracy switches of `segment`, `segment-cohort` and `evaluate` (issue 26/27)."""
    from ..engine.sam2_memory import SUPPORT_ORDERS

    p.add_argument("--support-order", default=SUPPORT_ORDERS[0], choices=list(SUPPORT_ORDERS),
                   help="where the most similar support sits in each slice's SAM 2 pseudo-video: nearest "
                        "(default: last, object-pointer distance 1, as an adjacent frame in SAM 2's "
                        "training) or farthest (first, distance k: the order before this option, so "
                        "today's default output differs from earlier versions'). Only the object "
                        "pointers see the order: every support's spatial memory has temporal code 0")
    p.add_argument("--propagate", type=_propagate, default=0, metavar="N",
                   help="retrieval plus propagation: walk outwards from the start slice(s) (as the extent "
                        "stop does) and give each slice the SAM 2 memories of the N slices segmented before "
                        "it in its walk, as SAM 2 tracks a video (N in 0..6; default 0 = off, every slice "
                        "alone; 6 = SAM 2's own memory rule). A start slice that --case has in the bank "
                        "(a slice you annotated or corrected) keeps its annotation and conditions every "
                        "slice of its walks, as add_new_mask on that frame of a SAM 2 video. Costs a memory "
                        "encoding per slice and walks step by step (see README, Propagation)")


def _propagate(text: str) -> int:
    """An argparse type: --propagate, an integer in 0..6."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 6:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..6 (0 = off), got {text!r}")
    return value


def _sam2_backbone(text: str) -> str:
    """An argparse type: a SAM 2 backbone name or alias -> its canonical name."""
    from ..models.registry import canonical_sam2

    try:
        return canonical_sam2(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`, else a usage error saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _presence_threshold(text: str) -> float:
    """An argparse type: --presence-threshold, a finite number >= 0 (`segment.check_presence_threshold`)."""
    from ..segmentation.labelmap import check_presence_threshold

    try:
        return check_presence_threshold(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number >= 0, got {text!r} (SAM 2 itself empties the mask of a label whose object "
            "score is <= 0, so a lower threshold cannot make it present)") from None


def _progress_bar(enabled: bool, desc: str, bars: list | None = None):
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="slice", file=sys.stderr, dynamic_ncols=True)
    if bars is not None:
        bars.append(bar)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar.close


class _UsageError(Exception):
    """Wrong combination of options: reported with exit code 2."""


def _window(args: argparse.Namespace) -> tuple[float, float] | None:
    if (args.window is None) != (args.level is None):
        raise _UsageError("give --window and --level together (or neither for a robust automatic window)")
    if args.window is None:
        return None
    from ..engine.preprocess import window_from_level

    return window_from_level(args.window, args.level)


def _parse_labels_arg(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--labels takes label values like 1,3, got {text!r}") from None


def _parse_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        a, b = text.split(":")
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--slices takes START:STOP (stop exclusive), got {text!r}") from None


# ----------------------------------------------------------------------------- phases of a run
class PhaseProgress:
    """What a run is doing, on stderr, from its first second (issue "What a new user met", item 5):
    loading the models, embedding the slices, computing the support memories (its own bar, and an
    estimate as soon as the first memory is done), then the slices' own bar. Off: says nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.started = 0.0

    def say(self, text: str) -> None:
        """One line on stderr (above any bar)."""
        if self.enabled:
            print(f"rseg: {text}", file=sys.stderr, flush=True)

    def __call__(self, name: str, done: int, total: int) -> None:
        """`segment_volume`'s phase callback."""
        if not self.enabled:
            return
        if name == "embedding":
            if done == 0:
                self.say(f"embedding {total} slices with DINOv2 and retrieving their supports")
            return
        if name != "support memories":
            return
        import time

        if self.bar is None:
            if done >= total:
                return
            from tqdm import tqdm

            self.say(f"computing {total} SAM 2 support memories (once per bank entry and model; cached for "
                     "later runs)")
            self.bar = tqdm(total=total, desc="support memories", unit="memory", file=sys.stderr,
                            dynamic_ncols=True)
            self.started = time.perf_counter()
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()
        if done == 1:
            took = time.perf_counter() - self.started
            self.bar.write(f"rseg: estimate: the first support memory took {took:.1f} s: about "
                           f"{took * (total - 1):.0f} s for the {total - 1} left, then the slices", file=sys.stderr)
        if done >= total:
            self.close()

    def close(self) -> None:
        """Ends the memories' bar if it is still open."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
