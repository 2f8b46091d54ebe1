"""`rseg evaluate` through the CLI on a small synthetic study in ACDC's layout (issue 10).

Patients have two frames each (`patientXXX/patientXXX_frameYY.nii.gz` + `_gt.nii.gz`); models
have seeded random weights (FAST). Model runs are few and tiny (4 slices of 32 x 32 per frame).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil

import pytest

import RetrievalSegLib.segmentation.segment as segment_module
from RetrievalSegLib.bank.support_bank import SupportBank, same_subject
from RetrievalSegLib.cli.main import main
from RetrievalSegLib.evaluation.evaluate import case_rows, summarize
from RetrievalSegLib.evaluation.study import scan_study
from RetrievalSegLib.segmentation.provenance import read_sidecar
from RetrievalSegLib.data.synthetic import make_synthetic_study
from RetrievalSegLib.data.volume import write_volume

FAST = ["--random-weights", "--image-size", "256", "--dinov2-input-size", "56", "--device", "cpu"]
SHAPE, SPACING = (4, 32, 32), (1.3, 1.3, 6.0)


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity, as strict parsers do."""
    def refuse(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=refuse)


def run(argv: list[str]) -> tuple[int, str, str]:
    """`rseg ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def write_acdc(folder, patients: dict[str, list]) -> None:
    """ACDC layout: folder/patientXXX/patientXXX_frameYY.nii.gz and ..._gt.nii.gz."""
    for pid, frames in patients.items():
        d = folder / pid
        d.mkdir(parents=True, exist_ok=True)
        for fno, case in zip(("01", "12"), frames):
            write_volume(case.image, d / f"{pid}_frame{fno}.nii.gz")
            write_volume(case.labels, d / f"{pid}_frame{fno}_gt.nii.gz")


@pytest.fixture(scope="module")
def cases():
    return make_synthetic_study(7, shape=SHAPE, spacing=SPACING)


# ----------------------------------------------------------------------------- 1 leakage (+2, 4, 5, 8)
@pytest.fixture(scope="module")
def leak_run(cases, tmp_path_factory):
    """A bank built per patient as the README shows (`bank add ... --case patientXXX`), then
    `evaluate --bank` on those same patients' frames: every frame's own patient is in the bank."""
    root = tmp_path_factory.mktemp("leak")
    study = root / "study"
    write_acdc(study, {"patient001": cases[0:2], "patient002": cases[2:4]})
    bank = root / "bank"
    # Label 4 is in the bank but in no ground truth: evaluating it must warn.
    assert run(["bank", "create", str(bank), "--labels", "1:RV,2:Myo,3:LV,4:Scar", *FAST])[0] == 0
    for pid in ("patient001", "patient002"):
        for fno in ("01", "12"):
            img, gt = study / pid / f"{pid}_frame{fno}.nii.gz", study / pid / f"{pid}_frame{fno}_gt.nii.gz"
            assert run(["bank", "add", str(bank), str(img), str(gt), "--case", pid, *FAST])[0] == 0
    # Another subject whose id starts like patient001's but is not it (no separator).
    write_volume(cases[4].image, root / "p10.nii.gz")
    write_volume(cases[4].labels, root / "p10_gt.nii.gz")
    assert run(["bank", "add", str(bank), str(root / "p10.nii.gz"), str(root / "p10_gt.nii.gz"),
                "--case", "patient0010", *FAST])[0] == 0
    out = root / "eval"
    rc, stdout, stderr = run(["evaluate", "--test", str(study), "--bank", str(bank), "--labels",
                              "1:RV,2:Myo,3:LV,4:Scar", "--k", "2", "--out", str(out), "--save-predictions",
                              "--json", *FAST])
    return dict(rc=rc, stdout=stdout, stderr=stderr, out=out, bank=SupportBank.open(bank))


def test_same_subject_respects_a_separator():
    assert same_subject("patient005", "patient005_frame01") and same_subject("patient005_frame01", "patient005")
    assert same_subject("patient005", "patient005") and same_subject("case-1", "case-1.2")
    assert not same_subject("patient01", "patient010") and not same_subject("patient010", "patient01")
    assert not same_subject("patient0010", "patient001")


def test_bank_search_excludes_the_whole_subject(tmp_path):
    """Library level: entries of `patient005` frames are excluded for subject `patient005` and the
    reverse; `patient0050` (another subject) is not."""
    from _bank_helpers import HashEmbedder, make_case, new_bank

    emb = HashEmbedder()
    bank = new_bank(tmp_path, emb)
    frame = bank.add_volume(*make_case(1, annotated=(1, 2)), "patient005_frame01", emb)
    other = bank.add_volume(*make_case(2, annotated=(1, 2)), "patient0050", emb)
    q = emb.embed([bank.load_entry(frame[0].id).image])
    hits = {i for i, _ in bank.search(q, 2, case_id="patient005")[0]}
    assert hits == {e.id for e in other}
    hits = {i for i, _ in bank.search(q, 2, case_id="patient0050_frame12")[0]}
    assert hits == {e.id for e in frame}


def test_acdc_subject_is_the_patient_folder(cases, tmp_path):
    write_acdc(tmp_path, {"patient001": cases[0:2]})
    study = scan_study(tmp_path)
    assert [(c.case_id, c.subject) for c in study.cases] == [("patient001_frame01", "patient001"),
                                                             ("patient001_frame12", "patient001")]


def test_no_support_of_the_test_patient_is_retrieved(leak_run):
    assert leak_run["rc"] == 0, leak_run["stderr"]
    case_of = {e.id: e.case_id for e in leak_run["bank"].entries(include_retired=True)}
    result = strict_json(leak_run["stdout"])
    assert len(result["per_case"]) == 4
    for case_id, info in result["per_case"].items():
        subject = case_id.split("_")[0]
        doc = read_sidecar(info["prediction"])
        retrieved = [eid for s in doc["slices"] if s["status"] == "segmented" for eid, _ in s["retrieved"]]
        assert len(retrieved) == 2 * len(doc["slices"])
        assert not [case_of[e] for e in retrieved if case_of[e] == subject], case_id
        # Exactly the patient's own entries are excluded (patient0010 is another subject).
        own = sum(1 for e in leak_run["bank"].entries() if e.case_id == subject)
        assert own > 0 and info["excluded_supports"] == own
    rows = list(csv.DictReader(open(leak_run["out"] / "metrics.csv")))
    assert {(r["case"], int(r["excluded_supports"])) for r in rows} == {
        (c, i["excluded_supports"]) for c, i in result["per_case"].items()}


def test_random_weight_results_are_marked_everywhere(leak_run):
    out = leak_run["out"]
    assert strict_json(leak_run["stdout"])["random_weights"] is True  # --json summary
    metrics = strict_json((out / "metrics.json").read_text())
    assert metrics["random_weights"] is True and metrics["complete"] is True
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert rows and all(r["random_weights"] == "True" for r in rows)
    for info in metrics["per_case"].values():
        prov = read_sidecar(info["prediction"])["provenance"]
        assert prov["random_weights"] is True and prov["k"] == 2 and prov["precision"] == "fp32"
        assert prov["bank"]["revision"] == leak_run["bank"].revision and prov["rseg_version"]
        assert prov["sam2"].startswith("sam2.1-tiny@256") and prov["dinov2"].startswith("dinov2-small")


def test_label_absent_from_every_ground_truth_warns(leak_run):
    metrics = strict_json((leak_run["out"] / "metrics.json").read_text())
    assert any("label 4 (Scar) is absent from every test ground truth" in w for w in metrics["warnings"])
    assert "label 4 (Scar) is absent" in leak_run["stderr"]


def test_progress_one_bar_on_stderr_with_json(leak_run):
    err = leak_run["stderr"]
    assert "evaluate case 4/4" in err and "16/16" in err  # 4 frames x 4 slices
    assert "0slice [" not in err  # no bar without a total (the stray `0slice [00:00, ?slice/s]`)
    strict_json(leak_run["stdout"])  # stdout stays pure JSON


def test_fewer_than_k_candidates_after_exclusion_is_a_usage_error(leak_run, tmp_path):
    # 8 entries: patient001 2, patient002 2, patient0010 2 ... k=5 leaves too few for every frame.
    usable = len(leak_run["bank"].entries())
    rc, _, err = run(["evaluate", "--test", str(leak_run["out"].parent / "study"), "--bank",
                      str(leak_run["bank"].path), "--labels", "1:RV", "--k", str(usable - 1),
                      "--out", str(tmp_path / "e"), "--no-progress", *FAST])
    assert rc == 2 and "excluding each test case's own subject" in err
    assert not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------- 3 stale banks, 7 resume
@pytest.fixture(scope="module")
def split(cases, tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    write_acdc(root / "training", {"patient001": cases[0:2], "patient002": cases[2:4]})
    write_acdc(root / "testing", {"patient003": cases[4:6]})
    # Inputs that are not evaluated: a frame without ground truth and a 4D cine file.
    (root / "testing" / "patient004").mkdir()
    write_volume(cases[6].image, root / "testing" / "patient004" / "patient004_frame01.nii.gz")
    write_volume(cases[6].image, root / "testing" / "patient004" / "patient004_4d.nii.gz")
    return root


def test_interrupted_build_leaves_no_bank_and_stale_banks_are_refused(split, tmp_path, monkeypatch):
    out = tmp_path / "ev"
    base = ["evaluate", "--train", str(split / "training"), "--test", str(split / "testing"),
            "--labels", "1:RV,2:Myo,3:LV", "--k", "1", "--out", str(out), "--no-progress", *FAST]
    real_add = SupportBank.add_volume
    calls = []

    def interrupted_add(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_add(self, *a, **kw)

    monkeypatch.setattr(SupportBank, "add_volume", interrupted_add)
    assert run([*base, "--pool", "3"])[0] == 130
    monkeypatch.setattr(SupportBank, "add_volume", real_add)
    assert not (out / "bank").exists() and not list(out.glob(".bank*"))  # nothing partial left
    # A bank without a build record (an older rseg's interrupted build) is refused, not reused.
    assert run(["bank", "create", str(out / "bank"), "--labels", "1:RV,2:Myo,3:LV", *FAST])[0] == 0
    rc, _, err = run([*base, "--pool", "3"])
    assert rc == 2 and f"rm -r '{out / 'bank'}'" in err
    shutil.rmtree(out / "bank")


def test_interrupt_keeps_finished_cases_and_resume_skips_them(split, tmp_path, monkeypatch):
    out = tmp_path / "ev"

    def cmd(pool: int = 3, k: int = 1) -> list[str]:
        return ["evaluate", "--train", str(split / "training"), "--test", str(split / "testing"),
                "--labels", "1:RV,2:Myo,3:LV", "--pool", str(pool), "--k", str(k), "--out", str(out), *FAST]

    real = segment_module.segment_volume
    calls = []

    def counting(*a, **kw):
        calls.append(kw["case_id"])
        if interrupt_on and len(calls) == interrupt_on:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(segment_module, "segment_volume", counting)
    interrupt_on = 2
    rc, _, err = run([*cmd(), "--no-progress"])
    assert rc == 130 and "--resume" in err
    assert strict_json((out / "bank" / "evaluate_build.json").read_text())["pool"] == 3
    assert len(SupportBank.open(out / "bank")) == 3  # the bank was complete before evaluation began
    assert (out / "cases" / "patient003_frame01.json").is_file()
    assert not (out / "cases" / "patient003_frame12.json").exists()
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert {r["case"] for r in rows} == {"patient003_frame01"} and len(rows) == 3
    partial = strict_json((out / "metrics.json").read_text())  # strict JSON: sd of one case is null
    assert partial["complete"] is False
    for s in partial["summary"].values():
        assert s["dice_sd"] is None and s["dice_sd_undefined"] == "fewer than 2 cases"
    # Skipped inputs are counted, not silent (3 images in patient003/4, 2 evaluated).
    assert partial["skipped_inputs"]["test"] == {"image without ground truth": 1, "4D image (not evaluated)": 1}
    # Resume: the same bank is reused (same parameters), the finished case is not segmented again.
    calls.clear()
    interrupt_on = 0
    rc, stdout, err = run([*cmd(), "--resume"])
    assert rc == 0, err
    assert calls == ["patient003"]  # one case left; retrieval excludes its subject
    assert "using the bank" in err and "evaluate case 2/2" in err and "0slice [" not in err
    result = strict_json((out / "metrics.json").read_text())
    assert result["complete"] is True and result["cases"] == ["patient003_frame01", "patient003_frame12"]
    assert len(result["rows"]) == 6 and all(s["dice_sd"] is not None for s in result["summary"].values())
    assert stdout.startswith("RANDOM WEIGHTS") and "1 image without ground truth" in stdout
    # Other build parameters: refused with the command to rebuild; other run settings: --resume refused.
    rc, _, err = run([*cmd(pool=2), "--overwrite", "--no-progress"])
    assert rc == 2 and "pool: 3 (bank) vs 2 (now)" in err and "rm -r" in err
    rc, _, err = run([*cmd(k=2), "--resume", "--no-progress"])
    assert rc == 2 and "k: 1 (then) vs 2 (now)" in err


def test_results_are_never_replaced_by_surprise_and_overwrite_replaces_case_by_case(split, tmp_path, monkeypatch):
    """Issue 32: an OUT with results needs --resume or --overwrite (exit 2 otherwise, nothing
    touched); --overwrite interrupted in the second case has replaced the first case's files and
    kept the second's byte for byte, and says so."""
    out = tmp_path / "ev"

    def cmd(k: int, *extra: str) -> list[str]:
        return ["evaluate", "--train", str(split / "training"), "--test", str(split / "testing"), "--labels",
                "1:RV,2:Myo,3:LV", "--pool", "3", "--k", str(k), "--out", str(out), "--no-progress", *FAST, *extra]

    def files() -> dict[str, bytes]:
        return {p.relative_to(out).as_posix(): p.read_bytes() for sub in ("cases", "predictions")
                for p in sorted((out / sub).iterdir())}

    first, second = "patient003_frame01", "patient003_frame12"
    assert run(cmd(1, "--save-predictions"))[0] == 0
    before, metrics = files(), (out / "metrics.csv").read_bytes()
    assert {f"cases/{first}.json", f"cases/{second}.json", f"predictions/{second}.nii.gz",
            f"predictions/{second}.nii.gz.json"} <= set(before)
    # The same command again: refused before anything is loaded or written, naming both ways.
    rc, _, err = run(cmd(1, "--save-predictions"))
    assert rc == 2 and "--resume" in err and "--overwrite" in err and "holds the results" in err
    assert files() == before and (out / "metrics.csv").read_bytes() == metrics
    with contextlib.redirect_stderr(io.StringIO()):
        assert run(cmd(1, "--resume", "--overwrite"))[0] == 2

    # --overwrite with k=2, interrupted while the second case is segmented.
    real, calls = segment_module.segment_volume, []

    def interrupted(*a, **kw):
        calls.append(kw["case_id"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(segment_module, "segment_volume", interrupted)
    rc, _, err = run(cmd(2, "--save-predictions", "--overwrite"))
    monkeypatch.setattr(segment_module, "segment_volume", real)
    assert rc == 130 and "--resume instead of --overwrite" in err
    assert "1 case(s) not evaluated again keep their earlier results" in err and second in err
    now = files()
    for name in (f"cases/{second}.json", f"predictions/{second}.nii.gz", f"predictions/{second}.nii.gz.json"):
        assert now[name] == before[name], f"{name} of the case not reached was changed"
    assert now[f"cases/{first}.json"] != before[f"cases/{first}.json"]  # replaced: k = 2 now
    assert strict_json(now[f"cases/{first}.json"])["run"]["k"] == 2
    assert strict_json(now[f"predictions/{first}.nii.gz.json"])["provenance"]["k"] == 2
    partial = strict_json((out / "metrics.json").read_text())
    assert partial["complete"] is False and partial["cases"] == [first]
    assert partial["earlier_results_kept"] == [second]
    # --resume cannot mix them (k differs); --overwrite finishes. Without --save-predictions the
    # earlier predictions no longer match the records and go, each once its case is replaced.
    rc, _, err = run(cmd(2, "--resume"))
    assert rc == 2 and "k: 1 (then) vs 2 (now)" in err and "--overwrite instead of --resume" in err
    assert run(cmd(2, "--overwrite"))[0] == 0
    done = strict_json((out / "metrics.json").read_text())
    assert done["complete"] is True and done["cases"] == [first, second] and "earlier_results_kept" not in done
    assert not list((out / "predictions").iterdir())
    assert all(strict_json((out / "cases" / f"{c}.json").read_text())["info"]["prediction"] is None
               for c in (first, second))


# ----------------------------------------------------------------------------- 4 strict JSON reasons
def test_undefined_hd95_is_null_with_a_reason(cases):
    from RetrievalSegLib.evaluation.evaluate import CaseFiles

    metrics = {"RV": {"label": 1, "dice": 0.0, "hd95": float("nan"), "pred_voxels": 0, "truth_voxels": 5},
               "LV": {"label": 3, "dice": 0.0, "hd95": float("nan"), "pred_voxels": 4, "truth_voxels": 0}}
    rows = case_rows(CaseFiles("c1", None, None), metrics, 1.0, 0, False)
    assert [(r["hd95_mm"], r["hd95_undefined"]) for r in rows] == [(None, "empty prediction"),
                                                                   (None, "empty ground truth")]
    s = summarize(rows, {1: "RV", 3: "LV"})["RV"]
    assert s["hd95_mean"] is None and s["hd95_mean_undefined"] == "HD95 undefined in every case"
    strict_json(json.dumps(s, allow_nan=False))


# ----------------------------------------------------------------------------- 5, 6 usage errors and messages
def test_option_errors_exit_2_before_anything_is_created(split, tmp_path):
    out = tmp_path / "never"
    base = ["--test", str(split / "testing"), "--out", str(out), "--no-progress", *FAST]
    train = ["--train", str(split / "training")]
    cases = {
        "missing train": (["--train", str(tmp_path / "nowhere"), "--labels", "1:RV"], "does not exist"),
        "duplicate values": ([*train, "--labels", "1:RV,1:LV"], "label value 1 is given twice"),
        "semicolons": ([*train, "--labels", "1:RV;2:Myo;3:LV"], "separate labels with commas"),
        "max cases 0": ([*train, "--labels", "1:RV", "--max-cases", "0"], "expected an integer >= 1"),
        "pool 0": ([*train, "--labels", "1:RV", "--pool", "0"], "expected an integer >= 1"),
        "k 0": ([*train, "--labels", "1:RV", "--k", "0"], "expected an integer >= 1"),
        "label 5": ([*train, "--labels", "1:RV,5:X"], "label 5 (X) is not in the training ground truth"),
        "pool without train": (["--bank", str(tmp_path / "b"), "--labels", "1:RV", "--pool", "3"],
                               "--pool caps a bank built from --train"),
    }
    for what, (argv, message) in cases.items():
        rc, _, err = run(["evaluate", *argv, *base])
        assert rc == 2 and message in err, (what, rc, err)
        assert "rseg bank add" not in err, what
        assert not out.exists(), what


def test_an_image_given_as_its_label_map_is_refused_briefly(cases, tmp_path):
    d = tmp_path / "train" / "patient001"
    d.mkdir(parents=True)
    write_volume(cases[0].image, d / "patient001_frame01.nii.gz")
    write_volume(cases[0].image, d / "patient001_frame01_gt.nii.gz")  # the image as its own truth
    write_acdc(tmp_path / "test", {"patient002": cases[2:3]})
    rc, _, err = run(["evaluate", "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
                      "--labels", "1:RV", "--out", str(tmp_path / "o"), "--no-progress", *FAST])
    assert rc == 1 and "distinct values" in err and len(err.splitlines()[-1]) < 400
    # `rseg bank add` with the image as labels: a few values and the count, not hundreds.
    bank = tmp_path / "bank"
    assert run(["bank", "create", str(bank), "--labels", "1:RV", *FAST])[0] == 0
    img = str(d / "patient001_frame01.nii.gz")
    rc, _, err = run(["bank", "add", str(bank), img, img, "--case", "p", *FAST])
    assert rc == 1 and "values (" in err and "is it an image" in err and len(err) < 600


def test_help_texts():
    rc, out, _ = run(["evaluate", "--help"])
    assert rc == 0
    text = " ".join(out.split())
    assert "--window WIDTH intensity window width" in text and "--level CENTER intensity window centre" in text
    assert "--no-progress no progress bars" in text and "--resume" in text and "subject" in text
