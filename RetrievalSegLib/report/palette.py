"""Colours of the report: colour-blind-safe by default.

Labels get the Okabe-Ito palette (Okabe & Ito, "Color Universal Design", 2002/2008; the palette
Wong recommends in Nature Methods 8:441, 2011), which stays distinguishable under protanopia,
deuteranopia and tritanopia (Testing/report/test_report.py checks that with a simulation of each). The
bank's own label colours (the Slicer segment colours a user chose, often red and green) are used
only when asked (`rseg report --label-colors bank`). Errors in the evaluate report have their own
three colours, drawn on a panel of their own so that they never meet a label colour.
"""
from __future__ import annotations

from typing import Iterable

RGB = tuple[int, int, int]


def _hex(h: str) -> RGB:
    h = h.lstrip("#")
    return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))


#: Okabe-Ito without black (drawn on a grey image), in the order labels take them.
OKABE_ITO: tuple[tuple[str, RGB], ...] = (
    ("orange", _hex("E69F00")),
    ("sky blue", _hex("56B4E9")),
    ("bluish green", _hex("009E73")),
    ("yellow", _hex("F0E442")),
    ("reddish purple", _hex("CC79A7")),
    ("vermillion", _hex("D55E00")),
    ("blue", _hex("0072B2")),
)
LABEL_PALETTE: tuple[RGB, ...] = tuple(c for _, c in OKABE_ITO)

#: Prediction errors (evaluate report), on the "errors" panel only.
FALSE_POSITIVE: RGB = _hex("D55E00")  # vermillion: predicted, not in the ground truth
FALSE_NEGATIVE: RGB = _hex("0072B2")  # blue: in the ground truth, missed
WRONG_LABEL: RGB = _hex("F0E442")  # yellow: both say foreground, different labels
ERROR_COLORS: dict[str, RGB] = {"false positive": FALSE_POSITIVE, "false negative": FALSE_NEGATIVE,
                                "wrong label": WRONG_LABEL}
PALETTE_MODES = ("palette", "bank")


def label_colors(values: Iterable[int], mode: str = "palette", bank_labels=None) -> dict[int, RGB]:
    """{label value: RGB 0..255}: Okabe-Ito in label order, or the bank's colours (`mode="bank"`).

    With more labels than the palette has colours, colours repeat (the legend names each label).
    A label the bank lacks (or no bank) falls back to the palette.
    """
    if mode not in PALETTE_MODES:
        raise ValueError(f"label colours must be one of {PALETTE_MODES}, got {mode!r}")
    ordered = sorted({int(v) for v in values})
    out = {v: LABEL_PALETTE[n % len(LABEL_PALETTE)] for n, v in enumerate(ordered)}
    if mode == "bank" and bank_labels is not None:
        for lab in bank_labels:
            if int(lab.value) in out:
                out[int(lab.value)] = tuple(int(round(255 * float(c))) for c in lab.color)  # type: ignore[assignment]
    return out


def css(rgb: RGB) -> str:
    """'#rrggbb'."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)
