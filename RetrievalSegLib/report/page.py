"""The page: one self-contained report.html (Jinja2, autoescaped) and the PNGs it shows.

* Every text that comes from a run (case ids, file names, label names, messages) is untrusted:
  the template is rendered with autoescaping on for every name (the template's own file name
  ends in `.j2`, which `select_autoescape` would not recognise, so it is `autoescape=True`).
* Self-contained: images are embedded as `data:` URIs, the style and the one script (table
  sorting) are inline, and a Content-Security-Policy allows nothing else: no request leaves the
  page (`default-src 'none'`), images only from `data:`, and scripts only the one whose SHA-256
  the policy names, so even text that escaped escaping could not run.
* Files: `OUT/report.html` and `OUT/images/<name>.png`, each written atomically without following
  links below OUT; PNGs of an earlier report that this one does not show are removed.
"""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

from .overlay import Picture

TEMPLATE = "report.html.j2"
SCRIPT = "sort_table.js"
IMAGES_DIR = "images"
REPORT_FILE = "report.html"


def _templates() -> Path:
    return Path(__file__).resolve().parent / "templates"


def environment():
    """The Jinja2 environment of the report: the packaged templates, autoescaping on, undefined names errors."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_templates())),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["data_uri"] = data_uri
    return env


def data_uri(pic: Picture) -> str:
    """`data:image/png;base64,...` of a picture."""
    return "data:image/png;base64," + base64.b64encode(pic.png).decode("ascii")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def render(kind: str, context: dict[str, Any]) -> str:
    """report.html for `kind` (segment, evaluate, cohort) from its context."""
    import markupsafe

    script = (_templates() / SCRIPT).read_text(encoding="utf-8")
    csp = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src {_csp_hash(script)}; base-uri 'none'; form-action 'none'")
    # The script is our own packaged file: inserted as is (escaping would break it), hashed above.
    return environment().get_template(TEMPLATE).render(kind=kind, csp=csp, script=markupsafe.Markup(script), **context)


def _safe_png_name(name: str) -> str:
    if not name.endswith(".png") or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise ValueError(f"picture name {name!r} must be a plain .png file name")
    return name


def write_report(out_dir: str | Path, html: str, pictures: Sequence[Picture]) -> Path:
    """Write OUT/images/*.png and then OUT/report.html (atomic, link-safe); returns report.html's path."""
    from ..data.fileio import atomic_write_bytes, is_link

    out = Path(out_dir)
    if is_link(out / IMAGES_DIR):
        raise OSError(f"{out / IMAGES_DIR} is a link; rseg never writes through a link: remove it and retry")
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    names = [_safe_png_name(p.name) for p in pictures]
    if len(set(names)) != len(names):
        raise ValueError("two pictures of the report share a file name")
    for p in pictures:
        atomic_write_bytes(out / IMAGES_DIR / p.name, p.png, root=out, what="a report folder")
    keep = set(names)
    for old in (out / IMAGES_DIR).iterdir():  # an earlier report's pictures this one does not show
        if old.name.endswith(".png") and old.name not in keep and not is_link(old) and old.is_file():
            os.unlink(old)
    target = out / REPORT_FILE
    atomic_write_bytes(target, html.encode("utf-8"), root=out, what="a report folder")
    return target


def picture_name(prefix: str, key: str, n: int) -> str:
    """A file name for a picture about `key` (a case id: untrusted): a readable part and a number."""
    import re

    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:40].strip("._") or "x"
    return f"{prefix}-{n:04d}-{readable}.png"
