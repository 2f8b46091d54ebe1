"""`rseg report` and `--report`: each report kind rendered in headless Chromium, as a person opens it.

Scenario (module fixtures, random weights, tiny sizes): a synthetic study whose slices are
anisotropic in plane (0.8 mm columns, 1.6 mm rows) and whose test case is named `<script>alert(1)`;
a bank of two training cases plus one annotated slice of the test case. Real runs write the
results: `rseg segment --report` (with an explicit window), `rseg evaluate --report`, and `rseg
segment-cohort --report` (its workers replaced by the same code run in this process, to keep the
test fast: the executors have their own tests) on a cohort with a broken file and a case id
containing `<script>`. Each page is opened from its file:// URL in Chromium: no console error,
no request but the file and its data: images, every image decoded and not blank, the expected
slices / cases / rows, untrusted text shown as text, the physical aspect of every slice picture,
the run's window in the pixels, colour-blind-safe colours.

Chromium missing is a failure that says how to install it (`apt-get install -y chromium`), not a
skip: a report nobody has looked at is not tested. (`browser` comes first in each test's fixtures,
so that this failure comes before any run is made.) Set RSEG_REPORT_SCREENSHOTS=DIR to keep the
screenshots (docs/ holds one per kind).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import zipfile
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from RetrievalSegLib.cli.main import main
from RetrievalSegLib.segmentation.provenance import read_sidecar, write_sidecar
from RetrievalSegLib.data.synthetic import make_synthetic_study
from RetrievalSegLib.data.volume import Volume, read_volume, write_volume

from _browser import INSTALL_HINT, PAGE_CHECKS, Browser, chromium_binary

FAST = ["--random-weights", "--image-size", "256", "--dinov2-input-size", "56", "--device", "cpu"]
SCRIPT_CASE = "<script>alert(1)"  # a file stem: no '/' possible
SHAPE, SPACING = (5, 40, 36), (0.8, 1.6, 6.0)  # slices along k: 40 rows of 1.6 mm x 36 columns of 0.8 mm
ASPECT = (36 * 0.8) / (40 * 1.6)  # physical width / height of a slice: 0.45 (pixels: 0.9)
WINDOW = (100.0, 400.0)  # --window 300 --level 250


@pytest.fixture(scope="module")
def browser():
    binary = chromium_binary()
    if binary is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    b = Browser(binary)
    yield b
    b.close()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-study")
    cases = make_synthetic_study(3, shape=SHAPE, spacing=SPACING)
    names = [cases[0].case_id, cases[1].case_id, SCRIPT_CASE]
    for c, name, split in zip(cases, names, ["train", "train", "test"]):
        for sub in ("images", "labels"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        write_volume(c.image, root / split / "images" / f"{name}.nii.gz")
        write_volume(c.labels, root / split / "labels" / f"{name}.nii.gz")
    bank = root / "bank"
    assert main(["bank", "create", str(bank), "--labels", "1:RV,2:Myo,3:LV", *FAST]) == 0
    for name in names[:2]:
        assert main(["bank", "add", str(bank), str(root / "train/images" / f"{name}.nii.gz"),
                     str(root / "train/labels" / f"{name}.nii.gz"), "--case", name, *FAST]) == 0
    test_img = root / "test/images" / f"{SCRIPT_CASE}.nii.gz"
    # The user annotated slice 2 of the test volume: the report marks it, the extent walk starts there.
    assert main(["bank", "add-slice", str(bank), str(test_img), str(root / "test/labels" / f"{SCRIPT_CASE}.nii.gz"),
                 "--case", "annotated-test", "--axis", "k", "--index", "2", *FAST]) == 0
    return {"root": root, "bank": bank, "test_img": test_img, "cases": cases}


def _shots() -> Path | None:
    d = os.environ.get("RSEG_REPORT_SCREENSHOTS")
    return Path(d) if d else None


def render(browser, html: Path, name: str) -> dict:
    """Open a report, run the page checks, keep a screenshot; the checks every report must pass."""
    r = browser.render(html, PAGE_CHECKS)
    v = r["value"]
    try:
        if _shots():
            _shots().mkdir(parents=True, exist_ok=True)
            browser.screenshot(r["session"], _shots() / f"report-{name}.png")
        assert r["console_errors"] == [], r["console_errors"]
        assert r["dialogs"] == []
        assert r["requests"] and all(u.startswith(("file://", "data:")) for u in r["requests"]), r["requests"][:3]
        assert r["requests"][0] == html.resolve().as_uri()
        assert v["scripts"] == 1  # ours only: nothing from a run became a script element
        assert v["images"], "a report without pictures"
        for img in v["images"]:
            assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
            assert not img["blank"], f"blank picture: {img['alt']}"
    finally:
        browser.close_page(r["target"])
    return v


def _cvd(rgb: np.ndarray, kind: str) -> np.ndarray:
    """Colours as seen with a colour-vision deficiency (Machado, Oliveira & Fernandes 2009, severity 1)."""
    m = {"protan": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
         "deutan": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
         "tritan": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]]}
    lin = np.where(rgb / 255 <= 0.04045, rgb / 255 / 12.92, ((rgb / 255 + 0.055) / 1.055) ** 2.4)
    out = np.clip(lin @ np.array(m[kind]).T, 0, 1)
    return 255 * np.where(out <= 0.0031308, 12.92 * out, 1.055 * out ** (1 / 2.4) - 0.055)


def _hex(c: str) -> tuple[int, int, int]:
    return (int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16))


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB 0..255 -> CIELAB (D65)."""
    c = np.clip(rgb, 0, 255) / 255
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


#: Smallest CIELAB difference (Delta E 1976) between two colours of a legend, for every kind of
#: vision. Okabe-Ito's closest pair is 16 (sky blue / bluish green for tritanopes); the bank's old
#: defaults (tab10 red / green) are 7 apart for deuteranopes.
MIN_DELTA_E = 12.0


def assert_colour_blind_safe(colors: list[str]) -> None:
    """Every pair of colours stays apart (Delta E >= MIN_DELTA_E) for normal, protan, deutan and tritan vision."""
    rgb = np.array([_hex(c) for c in colors], dtype=float)
    for kind in ("normal", "protan", "deutan", "tritan"):
        seen = _lab(rgb if kind == "normal" else _cvd(rgb, kind))
        for a in range(len(colors)):
            for b in range(a + 1, len(colors)):
                d = float(np.linalg.norm(seen[a] - seen[b]))
                assert d >= MIN_DELTA_E, f"{colors[a]} and {colors[b]} are Delta E {d:.1f} apart for {kind} vision"


def assert_aspect(img: dict) -> None:
    """A slice picture keeps the physical aspect (not the voxel grid's): width / height = 0.45."""
    assert abs(img["w"] / img["h"] - ASPECT) < 0.02, (img["alt"], img["w"], img["h"], ASPECT)


def test_colour_check_bites():
    """The colour-blind check refuses a red/green palette (negative control) and accepts ours."""
    from RetrievalSegLib.report.palette import LABEL_PALETTE, css

    assert_colour_blind_safe([css(c) for c in LABEL_PALETTE])
    with pytest.raises(AssertionError, match="deutan"):
        assert_colour_blind_safe(["#d62728", "#2ca02c", "#1f77b4"])  # the bank's old default colours


# ----------------------------------------------------------------------------- segment
@pytest.fixture(scope="module")
def segment_run(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-seg") / "seg.nii.gz"
    rc = main(["segment", str(study["test_img"]), "--bank", str(study["bank"]), "--out", str(out), "--k", "2",
               "--window", "300", "--level", "250", "--case", "annotated-test", "--report", "--no-progress", *FAST])
    assert rc == 0
    return out


def test_segment_sidecar_records_what_the_report_draws(segment_run):
    """The provenance added for the report: the window used, the annotated slices, the working folder."""
    prov = read_sidecar(segment_run)["provenance"]
    assert prov["window"] == list(WINDOW)
    assert prov["annotated_slices"] == [2]
    assert prov["extent"]["start_slices"] == [2] and prov["extent"]["start_reason"] == "annotated"
    assert prov["working_dir"] == os.getcwd()


def test_segment_report_in_a_browser(browser, segment_run):
    from RetrievalSegLib.engine.preprocess import to_uint8
    from RetrievalSegLib.report.overlay import display_size, resample_gray
    from RetrievalSegLib.data.volume import slice_view

    html = segment_run.with_name(segment_run.name + ".report") / "report.html"
    v = render(browser, html, "segment")
    assert v["kind"] == "segment" and v["banner"] and v["banner_color"] == "rgb(176, 0, 32)"  # random weights, red
    doc = read_sidecar(segment_run)
    segmented = [s["index"] for s in doc["slices"] if s["status"] == "segmented"]
    assert [s["index"] for s in v["slices"]] == segmented  # 5 slices <= 6 evenly spaced: every one
    assert all(s["supports"] == 2 and s["support_images"] == 2 for s in v["slices"])  # k = 2, thumbnails drawn
    assert SCRIPT_CASE in v["text"]  # the image's file name, as text
    assert "100 to 400" in v["text"]  # the window, said
    assert_colour_blind_safe(v["legend"])
    slices = [i for i in v["images"] if i["cls"] == "slice"]
    assert len(slices) == len(v["slices"])
    for img in slices + [i for i in v["images"] if i["support"]]:
        assert_aspect(img)
        legend = {_hex(c) for c in v["legend"]}
        drawn = {((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in img["colors"]}
        assert drawn and drawn <= legend, (img["alt"], drawn - legend)  # contours: exactly the legend's colours
    # The pixels under the contours are the image in the run's window (not another window).
    image = read_volume(_test_image(segment_run))
    png = segment_run.with_name(segment_run.name + ".report") / "images" / "slice-0002.png"
    from PIL import Image

    shown = np.asarray(Image.open(png).convert("RGB")).astype(int)
    want = resample_gray(to_uint8(slice_view(image.array, 2, 2), WINDOW), display_size((40, 36), (1.6, 0.8), 320))
    gray = (shown[..., 0] == shown[..., 1]) & (shown[..., 1] == shown[..., 2])
    assert gray.mean() > 0.3
    np.testing.assert_array_equal(shown[..., 0][gray], want[gray])


def _test_image(segment_run: Path) -> Path:
    return Path(read_sidecar(segment_run)["provenance"]["image"])


def test_least_confident_slices_are_shown_and_tagged(browser, segment_run, tmp_path):
    """With 2 evenly spaced slices and 2 least confident asked for, the page shows exactly the ends
    and the two slices of lowest confidence, tagged so."""
    out = tmp_path / "seg.nii.gz"
    shutil.copy(segment_run, out)
    doc = read_sidecar(segment_run)
    confidences = [0.9, 0.2, 0.8, 0.1, 0.7]
    slices = [{**s, "status": "segmented", "confidence": c} for s, c in zip(doc["slices"], confidences)]
    write_sidecar(out, doc["provenance"], slices)
    assert main(["report", str(out), "--slices", "2", "--least-confident", "2", "--json"]) == 0
    v = render(browser, tmp_path / "seg.nii.gz.report" / "report.html", "segment-least")
    tags = {s["index"]: s["tags"] for s in v["slices"]}
    assert tags == {0: "even", 1: "least", 3: "least", 4: "even"}, tags


def test_segment_report_of_an_anisotropic_axis_and_without_image_or_bank(segment_run, study, tmp_path):
    """Slices along i (6 mm x 1.6 mm pixels) keep their aspect; a moved image and bank leave notes, not errors."""
    from RetrievalSegLib.report.runs import read_segment_run
    from RetrievalSegLib.report.segment_page import build

    run = read_segment_run(segment_run)
    run.image, run.image_missing, run.bank, run.bank_missing = None, "image gone", None, "bank gone"
    context, pictures = build(run)
    assert "image gone" in context["notes"] and any("bank gone" in n for n in context["notes"])
    for s in context["slices"]:
        assert s["supports"] and all(sup["picture"] is None for sup in s["supports"])
    # along i: rows are k (6 mm), columns j (1.6 mm): 5 x 40 voxels are 30 mm x 64 mm
    run.axis = 0
    run.slices = [{"index": i, "status": "segmented", "confidence": 0.5, "retrieved": []} for i in range(36)]
    context, pictures = build(run, even=3, least=0)
    pic = context["slices"][0]["picture"]
    assert abs(pic.width / pic.height - (40 * 1.6) / (5 * 6.0)) < 0.02, (pic.width, pic.height)


# ----------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def evaluate_run(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-eval") / "results"
    rc = main(["evaluate", "--test", str(study["root"] / "test"), "--bank", str(study["bank"]),
               "--labels", "1:RV,2:Myo,3:LV", "--k", "2", "--window", "300", "--level", "250",
               "--out", str(out), "--report", "--no-progress", *FAST])
    assert rc == 0
    return out


def test_evaluate_report_in_a_browser(browser, evaluate_run):
    v = render(browser, evaluate_run / "report" / "report.html", "evaluate")
    metrics = json.loads((evaluate_run / "metrics.json").read_text())
    assert (evaluate_run / "predictions" / f"{SCRIPT_CASE}.nii.gz").is_file()  # --report saved them
    assert [c["case"] for c in v["cases"]] == metrics["cases"] == [SCRIPT_CASE]
    assert v["cases"][0]["h3"] == SCRIPT_CASE and v["cases"][0]["panels"] == 3  # truth, prediction, errors
    assert_colour_blind_safe(v["legend"][:3])  # labels
    assert_colour_blind_safe(v["legend"][3:])  # false positive, false negative, wrong label
    plots = [i for i in v["images"] if i["cls"] == "plot"]
    assert len(plots) == 2  # Dice and HD95
    for img in [i for i in v["images"] if i["cls"] == "slice"]:
        assert_aspect(img)
    for name in ("RV", "Myo", "LV"):
        assert name in v["text"]


def test_worst_slice_is_the_slice_of_lowest_dice():
    from RetrievalSegLib.report.overlay import worst_slice

    truth = np.zeros((4, 6, 6), np.uint8)
    truth[:, 1:5, 1:5] = 1
    pred = truth.copy()
    pred[2, 1:5, 1:3] = 0  # half of slice 2 missed: Dice 2/3
    pred[1, 1:5, 1:4] = 0  # three quarters of slice 1 missed: Dice 0.4
    assert worst_slice(pred, truth, 2, [1]) == (1, pytest.approx(0.4))
    assert worst_slice(np.zeros_like(truth), np.zeros_like(truth), 2, [1])[0] is None


# ----------------------------------------------------------------------------- cohort
@pytest.fixture(scope="module")
def cohort_run(study, tmp_path_factory):
    """segment-cohort --report with the workers' own code (`_Models.run`) in this process."""
    import RetrievalSegLib.cohort.run as cohort_run
    from RetrievalSegLib.cohort.run import _Models

    root = tmp_path_factory.mktemp("report-cohort")
    vols = root / "volumes"
    vols.mkdir()
    for c in study["cases"][:2]:
        two = Volume(c.image.array[1:3].copy(), c.image.spacing, c.image.origin, c.image.direction)  # cheap
        write_volume(two, vols / f"{c.case_id}.nii.gz")
    (vols / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    manifest = root / "cohort.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("image", "case_id", "output"),
                                 (f"volumes/{study['cases'][0].case_id}.nii.gz", "<script>alert(2)</script>", "a.nii.gz"),
                                 (f"volumes/{study['cases'][1].case_id}.nii.gz", "plain", ""),
                                 ("volumes/broken.nii.gz", "broken", "")])

    def in_process(volumes, model_args, settings, workers, on_event, devices=None, threads=None):
        models = _Models(model_args, settings)
        return [models.run(v) for v in volumes]

    mp = pytest.MonkeyPatch()
    mp.setattr(cohort_run, "run_local", in_process)
    try:
        rc = main(["segment-cohort", str(manifest), "--bank", str(study["bank"]), "--out", str(root / "out"),
                   "--k", "2", "--extent-stop", "0", "--report", "--no-progress", *FAST])
    finally:
        mp.undo()
    assert rc == 1  # one volume failed
    return root / "out"


def test_cohort_report_in_a_browser(browser, cohort_run):
    v = render(browser, cohort_run / "report" / "report.html", "cohort")
    summary = json.loads((cohort_run / "cohort-summary.json").read_text())
    assert len(v["rows"]) == len(summary["results"]) == 3
    assert v["rows"][0]["case"] == "broken" and v["rows"][0]["flags"].startswith("failed")  # failed first
    assert v["rows"][0]["images"] == 0 and all(r["images"] == 1 for r in v["rows"][1:])
    script_row = [r for r in v["rows"] if r["case"] == "<script>alert(2)</script>"]
    assert script_row and script_row[0]["caseText"] == "<script>alert(2)</script>"  # text, not markup
    assert_colour_blind_safe(v["legend"])
    for img in v["images"]:
        assert_aspect(img)


def test_cohort_table_sorts_when_a_header_is_clicked(browser, cohort_run):
    r = browser.render(cohort_run / "report" / "report.html", """(() => {
        const order = () => Array.from(document.querySelectorAll('#volumes tbody tr')).map(r => r.dataset.case);
        const before = order();
        document.querySelector('th[data-col="3"]').click();
        const up = order();
        document.querySelector('th[data-col="3"]').click();
        return [before, up, order()];
    })()""")
    browser.close_page(r["target"])
    before, up, down = r["value"]
    assert up == sorted(before, key=str) or up == sorted(before)
    assert down == list(reversed(up)) and before[0] == "broken"
    assert r["console_errors"] == []


def test_cohort_flags_and_order():
    """Failed, then interrupted, then an empty label, then the least confident, then the rest by case id."""
    from RetrievalSegLib.report.cohort_page import flags_and_order

    def vol(case, status="segmented", conf=0.8, voxels=(5, 5)):
        out = {"case": case, "status": status, "result": {}, "message": ""}
        if status == "segmented":
            out.update(confidence=conf, voxels=dict(zip((1, 2), voxels)))
        return out

    infos = [vol("a"), vol("b", conf=0.1), vol("c", voxels=(5, 0)), vol("d", status="failed"),
             vol("e", status="interrupted"), vol("f"), vol("g"), vol("h"), vol("i"), vol("j"), vol("k"), vol("l")]
    ordered = flags_and_order(infos, [1, 2])
    assert [i["case"] for i in ordered] == ["d", "e", "c", "b", "a", "f", "g", "h", "i", "j", "k", "l"]
    assert ordered[3]["flags"] == ["least"] and ordered[2]["flags"] == ["empty"]  # 10% of 10 with results: 1


# ----------------------------------------------------------------------------- files and packaging
def _tree_digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def test_report_command_errors_and_rewrite(segment_run, study, tmp_path, capsys):
    """A path that is no result is a usage error; a second report replaces the first's pictures;
    the bank read for the thumbnails stays byte-identical."""
    bank_before = _tree_digest(study["bank"])
    assert main(["report", str(tmp_path)]) == 2
    assert "neither an rseg evaluate folder" in capsys.readouterr().err
    out = tmp_path / "rep"
    assert main(["report", str(segment_run), "--out", str(out), "--slices", "5", "--least-confident", "0"]) == 0
    first = sorted(p.name for p in (out / "images").iterdir())
    assert main(["report", str(segment_run), "--out", str(out), "--slices", "1", "--least-confident", "0"]) == 0
    second = sorted(p.name for p in (out / "images").iterdir())
    assert len(second) < len(first) and set(second) <= set(first)
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert _tree_digest(study["bank"]) == bank_before


def test_template_and_script_are_package_data(tmp_path):
    """The wheel setuptools builds holds the report's template and script beside its modules."""
    src = Path(__file__).resolve().parents[2]
    copy = tmp_path / "src"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(src / name, copy / name)
    shutil.copytree(src / "RetrievalSegLib", copy / "RetrievalSegLib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; b.build_wheel('dist')"],
                   cwd=copy, check=True, capture_output=True, timeout=300)
    (wheel,) = (copy / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("RetrievalSegLib/report/templates/report.html.j2", "RetrievalSegLib/report/templates/sort_table.js",
              "RetrievalSegLib/report/page.py", "RetrievalSegLib/report/__init__.py"):
        assert f in names, f


def test_extent_boundaries_lie_between_segmented_and_beyond_extent_slices():
    from RetrievalSegLib.segmentation.provenance import BEYOND_EXTENT, OUTSIDE_RANGE, SEGMENTED
    from RetrievalSegLib.report.segment_page import extent_boundaries

    statuses = [OUTSIDE_RANGE, BEYOND_EXTENT, SEGMENTED, SEGMENTED, BEYOND_EXTENT, SEGMENTED, OUTSIDE_RANGE]
    assert extent_boundaries(statuses) == [1.5, 3.5, 4.5]  # never at the user's slice range


def test_error_overlay_colours_false_positives_negatives_and_wrong_labels():
    from RetrievalSegLib.report.overlay import ERROR_ALPHA, error_overlay
    from RetrievalSegLib.report.palette import FALSE_NEGATIVE, FALSE_POSITIVE, WRONG_LABEL

    truth = np.zeros((6, 9), np.uint8)
    pred = np.zeros((6, 9), np.uint8)
    pred[:, 0:3] = 1  # false positive
    truth[:, 3:6] = 1  # false negative
    pred[:, 6:9], truth[:, 6:9] = 1, 2  # wrong label
    gray = np.full((6, 9), 100, np.uint8)
    rgb = error_overlay(gray, pred, truth, (1.0, 1.0), 9).astype(float)
    for col, color in ((1, FALSE_POSITIVE), (4, FALSE_NEGATIVE), (7, WRONG_LABEL)):
        want = (1 - ERROR_ALPHA) * 100 + ERROR_ALPHA * np.array(color)
        np.testing.assert_allclose(rgb[2, col], np.round(want), atol=1)
