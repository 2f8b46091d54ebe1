"""`write_report`: a result (label map, evaluate folder, cohort folder) -> OUT/report.html + OUT/images/.

Where the report goes by default (`default_out_dir`): beside a label map, `<output>.report/`
(as its sidecar is `<output>.json`); inside an evaluate or cohort folder, `report/`.
"""
from __future__ import annotations

import time
from pathlib import Path

from .runs import COHORT, EVALUATE, SEGMENT, detect_kind

REPORT_DIR = "report"


def default_out_dir(result: str | Path, kind: str | None = None) -> Path:
    """Where `rseg report RESULT` writes when --out is not given."""
    p = Path(result)
    kind = kind or detect_kind(p)
    if kind == SEGMENT:
        if p.name.endswith(".json"):
            p = p.with_name(p.name[: -len(".json")])
        return p.with_name(p.name + ".report")
    return p / REPORT_DIR


def write_report(result: str | Path, out_dir: str | Path | None = None, *, label_colors: str = "palette",
                 even: int = 6, least: int = 4) -> Path:
    """Write the report of `result` (kind detected from its files); returns the path of report.html."""
    from .. import __version__
    from . import cohort_page, evaluate_page, page, segment_page
    from .runs import read_cohort_run, read_evaluate_run, read_segment_run

    kind = detect_kind(result)
    out = Path(out_dir) if out_dir is not None else default_out_dir(result, kind)
    if kind == SEGMENT:
        context, pictures = segment_page.build(read_segment_run(result), even=even, least=least,
                                               colors_mode=label_colors)
    elif kind == EVALUATE:
        context, pictures = evaluate_page.build(read_evaluate_run(result), colors_mode=label_colors)
    else:
        assert kind == COHORT
        context, pictures = cohort_page.build(read_cohort_run(result), colors_mode=label_colors)
    context.update(rseg_version=__version__, created=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    html = page.render(kind, context)
    return page.write_report(out, html, pictures)
