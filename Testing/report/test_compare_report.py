"""The evaluate report's "Configurations compared" section (issues 26 and 28), in headless Chromium.

An evaluate folder is written as `rseg evaluate --compare` leaves it (metrics.json of the reference,
compare.json made by `evaluation.compare.compare_doc` from two configurations' per-case rows), with
no model run: 7 cases, 2 labels; a case id and a configuration value carrying HTML. The page must
show both tables with the paired statistics of compare.json, one paired plot per label and metric
(decoded, not blank), the untrusted text as text, and no console error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from RetrievalSegLib.cli.main import main
from RetrievalSegLib.evaluation.compare import Configuration, compare_doc

from _browser import INSTALL_HINT, PAGE_CHECKS, Browser, chromium_binary

SCRIPT_CASE = "<script>alert(1)"
HOSTILE = "<img src=x onerror=alert(2)>"
LABELS = {"1": "RV", "2": "LV"}


@pytest.fixture(scope="module")
def browser():
    binary = chromium_binary()
    if binary is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    b = Browser(binary)
    yield b
    b.close()


def _rows(dice: np.ndarray, cases: list[str]) -> list[dict]:
    return [{"case": c, "subject": c, "label": int(v), "name": n, "dice": float(dice[i, j]),
             "hd95_mm": None if (i, j) == (0, 1) else float(20 - 10 * dice[i, j]),
             "hd95_undefined": "empty prediction" if (i, j) == (0, 1) else None,
             "pred_voxels": 10, "truth_voxels": 12, "seconds": 1.0, "excluded_supports": 0, "random_weights": True}
            for i, c in enumerate(cases) for j, (v, n) in enumerate(LABELS.items())]


@pytest.fixture(scope="module")
def compare_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("report-compare") / "results"
    out.mkdir()
    cases = [SCRIPT_CASE] + [f"case{i}" for i in range(1, 7)]
    rng = np.random.default_rng(3)
    ref = rng.uniform(0.5, 0.9, (len(cases), len(LABELS)))
    other = np.clip(ref + rng.normal(0.05, 0.03, ref.shape), 0, 1)
    per_case = {c: {"subject": c, "image": None, "ground_truth": None, "prediction": None} for c in cases}
    results = {}
    configs = [Configuration((("k", 8), ("sam2", "sam2.1-tiny")), True),
               Configuration((("k", 4), ("sam2", HOSTILE)), False)]
    for cfg, dice in zip(configs, (ref, other)):
        results[cfg.name] = {"rows": _rows(dice, cases), "labels": LABELS, "random_weights": True, "complete": True}
    metrics = {"complete": True, "random_weights": True, "cases": cases, "k": 8, "labels": LABELS,
               "rows": results[configs[0].name]["rows"], "summary": {}, "per_case": per_case}
    (out / "metrics.json").write_text(json.dumps(metrics))
    doc = compare_doc(configs, results, complete=True)
    (out / "compare.json").write_text(json.dumps(doc))
    return out, doc, configs


def test_compare_section_in_a_browser(browser, compare_folder):
    out, doc, configs = compare_folder
    assert main(["report", str(out)]) == 0
    html = out / "report" / "report.html"
    r = browser.render(html, PAGE_CHECKS)
    v = r["value"]
    try:
        if os.environ.get("RSEG_REPORT_SCREENSHOTS"):  # as Testing/report/test_report.py keeps its own
            Path(os.environ["RSEG_REPORT_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
            browser.screenshot(r["session"], Path(os.environ["RSEG_REPORT_SCREENSHOTS"]) / "report-compare.png")
        assert r["console_errors"] == [] and r["dialogs"] == []
        assert all(u.startswith(("file://", "data:")) for u in r["requests"]), r["requests"][:3]
        assert v["scripts"] == 1  # nothing from compare.json became a script or an element
        plots = [i for i in v["images"] if i["cls"] == "plot"]
        assert len(plots) == 2 + 2 * len(LABELS)  # Dice and HD95 of the run, then paired plots per label
        assert len(v["images"]) == len(plots)  # no prediction saved: no slice pictures, and no injected <img>
        for img in plots:
            assert img["complete"] and img["w"] > 0 and not img["blank"], img["alt"]
        assert sum("paired" in i["alt"] or "each case a line" in i["alt"] for i in plots) == 2 * len(LABELS)
        text = v["text"]
        assert "Configurations compared" in text and f"Reference: {configs[0].name}" in text
        assert configs[1].name in text and HOSTILE in text  # shown as text
        assert SCRIPT_CASE in text
        d = doc["differences"][configs[1].name]["LV"]["dice"]
        assert f"{d['mean_difference']:+.4f}" in text and f"{d['wilcoxon_p']:.3g}" in text
        assert f"[{d['ci95_low']:+.4f}, {d['ci95_high']:+.4f}]" in text
        assert "every configuration ran with random weights" in text
    finally:
        browser.close_page(r["target"])
    page = html.read_text()
    assert page.count('<tr class="reference">') == len(LABELS)  # the reference's summary rows stand out
    assert page.count("<tr><td>") >= 2 * len(LABELS)  # a difference row per label and metric


def test_a_compare_json_of_another_program_is_only_noted(compare_folder, tmp_path):
    from RetrievalSegLib.report.evaluate_page import compare_section
    from RetrievalSegLib.report.runs import read_evaluate_run

    out, _, _ = compare_folder
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text((out / "metrics.json").read_text())
    (other / "compare.json").write_text(json.dumps({"configurations": "x"}))
    section = compare_section(read_evaluate_run(other))
    assert section["plots"] == [] and "not written by rseg evaluate --compare" in section["notes"][0]
