"""`rseg report RESULT`, and the `--report` hook of segment, evaluate and segment-cohort."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..report.palette import PALETTE_MODES

REPORT_HELP = ("also write an HTML report of the run (report.html and the PNGs it shows; see `rseg report`)")


def add_report_parser(sub) -> None:
    """The `rseg report` sub-command."""
    p = sub.add_parser(
        "report", help="an HTML report of a run: segment, evaluate or segment-cohort",
        description="Write report.html (one self-contained file: images embedded, no network) and the PNGs it "
                    "shows, from what a run wrote; no model runs. RESULT is a label map written by rseg segment "
                    "(with its sidecar <output>.json), an rseg evaluate --out folder (metrics.json) or an rseg "
                    "segment-cohort --out folder (cohort-summary.json). Segment: slices evenly spaced plus the "
                    "least confident, each with its retrieved supports, and the confidence along the slice axis. "
                    "Evaluate: Dice and HD95 per label over cases, each case's worst slice with its errors. "
                    "Cohort: every volume with a thumbnail, failed, empty-label and least-confident volumes first.",
    )
    p.add_argument("result", type=Path, metavar="RESULT", help="label map, evaluate folder or cohort folder")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="folder for report.html and images/ (default: <label map>.report/ beside a label map, "
                        "RESULT/report/ for a folder)")
    p.add_argument("--label-colors", choices=PALETTE_MODES, default="palette",
                   help="palette: colour-blind-safe Okabe-Ito colours (default); bank: the bank's label colours")
    p.add_argument("--slices", type=int, default=6, metavar="N",
                   help="segment report: evenly spaced slices shown (default 6)")
    p.add_argument("--least-confident", type=int, default=4, metavar="N",
                   help="segment report: least confident slices shown besides (default 4)")
    p.add_argument("--json", action="store_true", help="print {\"report\": path} as JSON")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """Handler of `rseg report`."""
    from .common import EXIT_OK, _UsageError
    from ..report.runs import ReportError, detect_kind
    from ..report.write import write_report

    if args.slices < 0 or args.least_confident < 0:
        raise _UsageError(f"--slices and --least-confident must be >= 0, got {args.slices} and {args.least_confident}")
    try:
        detect_kind(args.result)
    except ReportError as e:
        raise _UsageError(str(e)) from None
    path = write_report(args.result, args.out, label_colors=args.label_colors, even=args.slices,
                        least=args.least_confident)
    print(json.dumps({"report": str(path)}) if args.json else f"wrote {path}")
    return EXIT_OK


def report_after_run(result: str | Path, quiet: bool = False) -> Path:
    """`--report` of a run: write the run's report where `rseg report RESULT` would; say where on stderr."""
    from ..report.write import write_report

    path = write_report(result)
    if not quiet:
        print(f"rseg: report: {path}", file=sys.stderr)
    return path
