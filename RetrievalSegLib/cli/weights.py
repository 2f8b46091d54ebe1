"""`rseg weights ...`: download, list and verify the SAM 2 (SAM 2.1, MedSAM2) / DINOv2 weights.

Downloads go through huggingface_hub into its cache ($HF_HOME/hub), or into a plain weights folder
(`--dir`, $RSEG_WEIGHTS_DIR). Exit codes: 0 ok, 1 failure (corrupt file, cancelled, declined),
2 usage error (also: consent needed but standard input is not a terminal and --yes not given),
3 offline or the source is unavailable, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from ..models.registry import (
    DINOV2_MODELS,
    ENV_MIRROR,
    ENV_WEIGHTS_DIR,
    SAM2_MODELS,
    canonical_sam2,
    sam2_spec,
    weights_dir,
    weights_location,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130


def _size_list(
    catalogue: dict[str, Any], what: str, resolve: Callable[[str], str] | None = None
) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names from `catalogue` ("none" for none); `resolve` maps
    an alias to its catalogue name (SAM 2: 'tiny' -> 'sam2.1-tiny')."""

    def parse(text: str) -> list[str]:
        sizes: list[str] = []
        for raw in text.split(","):
            s = raw.strip().lower() if raw.strip() else ""
            if s in ("", "none"):
                continue
            if resolve is not None:
                try:
                    s = resolve(s)
                except ValueError:
                    pass
            if s not in catalogue:
                raise argparse.ArgumentTypeError(
                    f"unknown {what} {raw.strip()!r}; choose from {', '.join(catalogue)} "
                    "(comma-separated) or none"
                )
            if s not in sizes:
                sizes.append(s)
        return sizes

    parse.__name__ = f"{what} sizes"
    return parse


def add_weights_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `weights` command (download / list / verify) to an argparse subparsers object."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir", type=Path, default=None,
        help=f"plain weights folder (default: ${ENV_WEIGHTS_DIR}, else the Hugging Face cache, "
        "$HF_HOME/hub)",
    )
    weights = subparsers.add_parser(
        "weights", help="download, list or verify model weights",
        description="Download, list or verify the SAM 2 (SAM 2.1, MedSAM2) and DINOv2 weights RetrievalSeg uses.",
    )
    sub = weights.add_subparsers(dest="weights_command", metavar="{download,list,verify}")
    sub.required = True

    dl = sub.add_parser(
        "download", parents=[common], help="fetch checkpoints (checked) with huggingface_hub",
        description="Fetch checkpoints from the Hugging Face Hub (or a mirror) into its cache or "
        "a plain weights folder. A dropped connection resumes within the download; every file is "
        "checked (length, SHA-256 where the Hub announces it, strict load) and removed if bad.",
    )
    dl.add_argument(
        "--sam2", type=_size_list(SAM2_MODELS, "SAM 2 backbone", canonical_sam2),
        default=["sam2.1-tiny"], metavar="NAMES",
        help=f"SAM 2 backbones, comma-separated ({', '.join(SAM2_MODELS)}, none; the old names "
        "tiny, small, base_plus, large still work); default sam2.1-tiny. MedSAM2's weights "
        "have no licence we could find: its terms are shown before the download",
    )
    dl.add_argument(
        "--dinov2", type=_size_list(DINOV2_MODELS, "DINOv2"), default=["small"], metavar="SIZES",
        help=f"DINOv2 sizes, comma-separated ({', '.join(DINOV2_MODELS)}, none); default small",
    )
    dl.add_argument(
        "--mirror", default=None, metavar="URL",
        help=f"URL of a Hugging Face Hub mirror (default: ${ENV_MIRROR}, else $HF_ENDPOINT, "
        "else https://huggingface.co)",
    )
    dl.add_argument("--yes", "-y", action="store_true",
                    help="download without asking (needed when standard input is not a terminal)")
    dl.add_argument("--force", action="store_true", help="download again files already present.")
    dl.set_defaults(func=cmd_download)

    ls = sub.add_parser("list", parents=[common], help="show which weights are present")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)

    vf = sub.add_parser(
        "verify", parents=[common], help="strictly load the weights that are present",
    )
    vf.add_argument("--sam2", type=_size_list(SAM2_MODELS, "SAM 2 backbone", canonical_sam2),
                    default=None, metavar="NAMES", help="only these SAM 2 backbones (absent ones fail)")
    vf.add_argument("--dinov2", type=_size_list(DINOV2_MODELS, "DINOv2"), default=None,
                    metavar="SIZES", help="only these DINOv2 sizes (absent ones fail)")
    vf.add_argument("--json", action="store_true", help="machine-readable output")
    vf.set_defaults(func=cmd_verify)
    return weights


def _err(msg: str) -> None:
    print(f"rseg weights: {msg}", file=sys.stderr)


def _confirm(prompt: str) -> bool:
    try:
        answer = input(prompt)
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _print_terms(items: list[Any]) -> None:
    """The licence of each model to download, and any terms notice, before consent is asked."""
    shown: set[str] = set()
    for it in items:
        if it.model in shown:
            continue
        shown.add(it.model)
        if it.kind != "sam2":
            print(f"Licence of DINOv2 {it.model}: Apache-2.0 (code and weights; facebookresearch/dinov2)")
            continue
        spec = sam2_spec(it.model)
        print(f"Licence of {spec.display}: {spec.licence}")
        if spec.weights_terms:
            print(f"  NOTE on the {spec.display} weights: {spec.weights_terms}")
        print(f"  Cite: {spec.citation}")


def cmd_download(args: argparse.Namespace) -> int:
    """Handle `rseg weights download`."""
    from ..models import weights as w

    root = args.dir.expanduser() if args.dir is not None else weights_dir()
    if not args.sam2 and not args.dinov2:
        _err("nothing to download: both --sam2 and --dinov2 are none")
        return EXIT_USAGE
    try:
        items = w.plan_downloads(args.sam2, args.dinov2, mirror=args.mirror, dest_dir=root)
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    todo = [it for it in items if args.force or not w.is_complete(it)]
    try:
        w.check_offline(todo)  # before showing a plan that cannot run
    except w.OfflineError as e:
        _err(str(e))
        return EXIT_UNAVAILABLE
    print(f"Weights go to: {weights_location(root)}")
    for it in items:
        state = "to download" if it in todo else "already present"
        size = "<1 MB" if it.approx_mb < 1 else f"~{it.approx_mb:.0f} MB"
        print(f"  {it.name:<36} {size:>9}  {state}")
        if it in todo:
            print(f"      from {it.url}")
    if not todo:
        print("Everything is already present (use --force to download again).")
        return EXIT_OK
    _print_terms(todo)
    total = sum(it.approx_mb for it in todo)
    print(f"{len(todo)} file(s), about {total:.0f} MB in all.")
    if not args.yes:
        # Consent is asked on a terminal; with standard input not a terminal (a pipe, a script, a
        # scheduler) nobody can answer, so nothing is downloaded without --yes (as `make demo`).
        if not sys.stdin.isatty():
            _err("standard input is not a terminal, so consent cannot be asked: nothing downloaded. "
                 "Run it in a terminal to be asked, or add --yes to download the files listed above")
            return EXIT_USAGE
        if not _confirm("Download now? [y/N] "):
            print("Nothing downloaded.")
            return EXIT_FAILURE
    try:
        w.download(todo, progress=True, force=args.force)
    except w.OfflineError as e:
        _err(str(e))
        return EXIT_UNAVAILABLE
    except w.DownloadError as e:
        _err(str(e))
        return EXIT_UNAVAILABLE if e.unavailable else EXIT_FAILURE
    except w.WeightsError as e:
        _err(str(e))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _err("interrupted; nothing partial was kept, run the download again")
        return EXIT_INTERRUPTED
    print(f"Done: {len(todo)} file(s) downloaded and checked into {weights_location(root)}.")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """Handle `rseg weights list`."""
    from ..models import weights as w

    root = args.dir.expanduser() if args.dir is not None else weights_dir()
    entries = w.list_weights(root)
    where = weights_location(root)
    if args.json:
        print(json.dumps({"dir": where, "weights": [e.to_json() for e in entries]}, indent=2))
        return EXIT_OK
    print(f"Weights in: {where}")
    for e in entries:
        state = f"present  {e.size / 2**20:8.1f} MB" if e.present else "missing"
        print(f"  {e.kind:<6} {e.model:<16} {e.name:<28} {state}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Handle `rseg weights verify`."""
    from ..models import weights as w

    root = args.dir.expanduser() if args.dir is not None else weights_dir()
    explicit = args.sam2 is not None or args.dinov2 is not None
    results = w.verify(
        root,
        (args.sam2 or []) if explicit else None,
        (args.dinov2 or []) if explicit else None,
    )
    ok = bool(results) and all(r.ok for r in results)
    where = weights_location(root)
    if args.json:
        print(json.dumps(
            {"dir": where, "ok": ok, "results": [r.to_json() for r in results]}, indent=2
        ))
    else:
        print(f"Weights in: {where}")
        if not results:
            print("  no weights found; run `rseg weights download`")
        for r in results:
            print(f"  {r.status.upper():<7} {r.name}: {r.message}")
    return EXIT_OK if ok else EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    """Run `weights ...` on its own (the `rseg` entry point adds the same parser)."""
    parser = argparse.ArgumentParser(prog="rseg")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    add_weights_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
