"""`rseg suggest`: which slices of a volume to annotate next (RetrievalSegLib.segmentation.suggest).

    rseg suggest IMAGE --bank BANK [--n 3] [--axis auto] [--seg LAST_SEG] [--case ID] [--json] [--worker ssh://...]

Only DINOv2 is loaded (no SAM 2). Exit codes as every rseg command: 0 ok, 1 failure (unreadable
input, a bank made with another DINOv2: the message carries the re-embed command), 2 usage
error, 3 weights unavailable, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .common import EXIT_OK, _positive_int, _window


def read_last_segmentation(path: Path, shape: tuple[int, ...]) -> Any:
    """The per-slice record of `rseg segment`'s output `path` (its sidecar `<path>.json`, and the
    label map itself when `path` is one: a slice without any label there 'found nothing')."""
    from ..segmentation.provenance import read_sidecar
    from ..segmentation.suggest import LastSegmentation

    doc = read_sidecar(path)
    labelmap = None
    if not path.name.endswith(".json"):
        if not path.is_file():
            raise ValueError(f"--seg {path}: no such label map (give rseg segment's --out, or its .json sidecar)")
        if path.name.endswith(".seg.nrrd"):
            from ..data.segnrrd import read_seg_nrrd

            labelmap = read_seg_nrrd(path, overlap="last")[0].array
        else:
            from ..data.volume import read_volume

            labelmap = read_volume(path).array
        if labelmap.shape != tuple(shape):
            raise ValueError(f"--seg {path} has shape {labelmap.shape}, the image {tuple(shape)}: "
                             "give the segmentation of this image")
    return LastSegmentation.from_sidecar(doc, labelmap)


def cmd_suggest(args: argparse.Namespace, make_embedder: Callable[[argparse.Namespace], Any]) -> int:
    from ..segmentation.suggest import suggest_slices
    from ..data.volume import read_volume

    window = _window(args)  # option errors before any file or model is loaded
    if args.worker:
        from .remote import remote_target

        remote_target(args)
    image = read_volume(args.image)
    last = read_last_segmentation(args.seg, image.array.shape) if args.seg is not None else None
    if args.worker:  # DINOv2 and the bank are on another host
        from .remote import suggest_remote

        result, identity = suggest_remote(args, image, window, last)
        return _print_suggestions(args, result, identity, args.bank is not None)
    bank = None
    if args.bank is not None:
        from ..bank.support_bank import SupportBank

        bank = SupportBank.open(args.bank)
    embedder = make_embedder(args)
    bar = None
    if not args.no_progress and not args.json:
        from tqdm import tqdm

        bar = tqdm(total=0, desc="embedding slices", unit="slice", file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total, bar.n = total, done
            bar.refresh()

    try:
        result = suggest_slices(image, bank, embedder, n=args.n, axis=args.axis, window=window, last=last,
                                case_id=args.case, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    return _print_suggestions(args, result, embedder.identity, bank is not None)


def _print_suggestions(args: argparse.Namespace, result: Any, identity: Any, with_bank: bool) -> int:
    from ..segmentation.suggest import ranges_text

    if args.json:
        doc = {"image": str(args.image), "bank": str(args.bank) if args.bank else None,
               **({"worker": args.worker} if args.worker else {}),
               "dinov2": identity, "random_weights": bool(args.random_weights), **result.to_json()}
        print(json.dumps(doc, indent=2, allow_nan=False))
        return EXIT_OK
    axis = "ijk"[result.axis]
    where = f"bank {args.bank}: {result.bank_entries} usable entries" if with_bank else "no bank"
    print(f"slices to annotate next along {axis} ({result.n_slices} slices; {where}), best first:")
    print(f"{'rank':>4}  {'slice':>5}  {'to bank':>7}  {'conf.':>5}  covers")
    for s in result.picks:
        dist = f"{s.distance_to_bank:.3f}" if s.distance_to_bank is not None else "-"
        conf = f"{s.confidence:.2f}" if s.confidence is not None else "-"
        flag = "  EMPTY" if s.empty else ""
        print(f"{s.rank:>4}  {s.index:>5}  {dist:>7}  {conf:>5}  {ranges_text(s.covers)}{flag}")
        for reason in s.reasons:
            print(f"{'':>13}- {reason}")
    before = f"{result.coverage_before:.4f}" if result.coverage_before is not None else "none (empty bank)"
    after = f"{result.coverage_after:.4f}" if result.coverage_after is not None else "-"
    print(f"coverage (mean cosine distance of the slices to the nearest bank entry, lower is better): "
          f"{before} now, {after} with these {len(result.picks)} slice(s) added")
    for note in result.notes:
        print(f"note: {note}")
    if args.random_weights:
        print("RANDOM WEIGHTS: these suggestions are meaningless (DINOv2 was not loaded from real weights)")
    return EXIT_OK


def add_suggest_parser(sub: Any, make_embedder: Callable[[argparse.Namespace], Any],
                       parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """`rseg suggest` (make_embedder builds DINOv2 from the model options)."""
    p = sub.add_parser(
        "suggest", parents=list(parents), help="which slices to annotate next",
        description="Rank the slices of IMAGE worth annotating next: far (in DINOv2 space) from every slice "
                    "of the support bank, or unsure in the last segmentation; diverse (greedy k-center), "
                    "empty slices last. Prints the picks with their reasons and the bank's coverage of the "
                    "volume before and after adding them.",
    )
    p.add_argument("image", type=Path, metavar="IMAGE", help="NIfTI/NRRD/MHA file or a DICOM series folder")
    p.add_argument("--bank", type=Path, default=None,
                   help="support bank folder (without it: the slices that best cover the volume)")
    p.add_argument("--n", type=_positive_int, default=3, help="how many slices (default 3)")
    p.add_argument("--axis", default="auto", help="slice axis: auto (the --seg run's, else largest spacing), i, j or k")
    p.add_argument("--seg", type=Path, default=None, metavar="LAST_SEG",
                   help="the last `rseg segment --out` of IMAGE: its sidecar LAST_SEG.json gives each slice's "
                        "confidence; slices it did not segment count as gaps")
    p.add_argument("--case", default=None, help="case id of IMAGE in the bank: its slices already there are skipped")
    p.add_argument("--window", type=float, default=None, help="intensity window width (with --level)")
    p.add_argument("--level", type=float, default=None, help="intensity window level (with --window)")
    p.add_argument("--json", action="store_true", help="print the suggestions as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .remote import add_worker_options

    add_worker_options(p)
    p.set_defaults(func=lambda args: cmd_suggest(args, make_embedder))

