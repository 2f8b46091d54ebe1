"""The models a set of model options describes (the `rseg` options --sam2, --dinov2, --device,
--image-size, --random-weights, ...; any object with those attributes, e.g. an argparse
Namespace): the DINOv2 slice embedder (loaded once per process) and the RetrievalEngine. The
command line and the cohort's worker processes build their models here.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any


class WeightsUnavailable(Exception):
    """Model weights are missing locally; the message says how to get them."""


class ImageSizeError(ValueError):
    """--image-size is not a size SAM 2 can take (a usage error)."""


def sam2_image_size(args) -> int:
    """The SAM 2 input size: --image-size, else the backbone's native one (a warning when they differ)."""
    from ..models.loaders import check_image_size, image_size_message
    from ..models.registry import sam2_spec

    spec = sam2_spec(args.sam2)
    if args.image_size is None:
        return spec.image_size
    try:
        check_image_size(args.image_size)
    except ValueError as e:
        raise ImageSizeError(str(e)) from None
    if args.image_size != spec.image_size:
        print(f"rseg: WARNING: --image-size {args.image_size}: {image_size_message(spec.name, args.image_size)}",
              file=sys.stderr)
    return int(args.image_size)


def warn_random(args) -> None:
    """A warning on stderr when the options ask for random weights (their output is meaningless)."""
    if getattr(args, "random_weights", False):
        print("rseg: WARNING: --random-weights: models have random weights, the output is meaningless",
              file=sys.stderr)


_loaded: dict[tuple, Any] = {}


@contextlib.contextmanager
def transformers_bars(enabled: bool):
    """transformers' own progress bars ("Loading weights") on or off while loading (--no-progress:
    off); their earlier setting is restored afterwards."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def make_embedder(args):
    """The DINOv2 slice embedder the options describe (loaded once per process)."""
    from ..models.loaders import MissingWeightsError, load_dinov2
    from .retrieval import SliceEmbedder

    key = ("dino", args.dinov2, str(args.dinov2_path), args.device, args.random_weights, args.seed,
           args.dinov2_input_size, getattr(args, "retrieval_feature", "cls"))
    if key not in _loaded:
        warn_random(args)
        try:
            with warnings.catch_warnings(), transformers_bars(not getattr(args, "no_progress", False)):
                warnings.simplefilter("ignore", UserWarning)
                dino = load_dinov2(args.dinov2, args.dinov2_path, device=args.device,
                                   random_weights=args.random_weights, seed=args.seed)
        except MissingWeightsError as e:
            raise WeightsUnavailable(str(e)) from None
        _loaded[key] = SliceEmbedder(dino, input_size=args.dinov2_input_size,
                                     feature=getattr(args, "retrieval_feature", "cls"))
    return _loaded[key]


def missing_weights(args, sam2: bool = True) -> list[str]:
    """What each model the options need lacks (one message per missing model; [] when none is
    missing or the weights are random): looked up before either model loads, so that a user
    learns of every download at once."""
    from ..models.loaders import (default_dinov2_folder, default_sam2_checkpoint, missing_dinov2_message,
                                  missing_sam2_message)
    from ..models.registry import sam2_spec

    if getattr(args, "random_weights", False):
        return []
    missing = []
    folder = Path(args.dinov2_path).expanduser() if args.dinov2_path else default_dinov2_folder(args.dinov2)
    if folder is None or not (folder / "config.json").is_file():
        missing.append(missing_dinov2_message(args.dinov2, folder))
    if sam2:
        spec = sam2_spec(args.sam2)
        path = (Path(args.sam2_checkpoint).expanduser() if args.sam2_checkpoint
                else default_sam2_checkpoint(spec.name))
        if path is None or not path.is_file():
            missing.append(missing_sam2_message(spec.name, path))
    return missing


def check_weights_present(args, sam2: bool = True) -> None:
    """WeightsUnavailable naming every missing model, with one command that downloads them all."""
    missing = missing_weights(args, sam2)
    if len(missing) == 1:
        raise WeightsUnavailable(missing[0])
    if missing:
        raise WeightsUnavailable(
            f"{len(missing)} models are missing:\n" + "\n".join(f"  - {m}" for m in missing)
            + f"\nDownload both at once with `rseg weights download --sam2 {args.sam2} --dinov2 {args.dinov2}`."
        )


def make_engine(args):
    """The RetrievalEngine (DINOv2 + SAM 2) the options describe."""
    from .sam2_memory import Sam2MemoryEngine
    from ..models.loaders import MissingWeightsError, load_sam2
    from .pipeline import RetrievalEngine

    check_weights_present(args)  # every missing model in one message, before either loads
    embedder = make_embedder(args)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sam = load_sam2(args.sam2, args.sam2_checkpoint, device=args.device,
                            image_size=sam2_image_size(args), random_weights=args.random_weights,
                            seed=args.seed)
    except MissingWeightsError as e:
        raise WeightsUnavailable(str(e)) from None
    engine = Sam2MemoryEngine(sam, fill_hole_area=args.fill_hole_area)
    if getattr(args, "compile", False):
        engine.compile()
    return RetrievalEngine(embedder, engine)
