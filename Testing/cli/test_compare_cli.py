"""`rseg evaluate --compare` end to end on a tiny synthetic study with random weights (issue 26):
two configurations on the same cases and bank, models loaded once, one DINOv2 pass per case,
compare.csv / compare.json consistent with each configuration's own results, resume per
configuration and case, and option errors exit 2 before any model loads."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil

import numpy as np
import pytest
from scipy.stats import wilcoxon

import RetrievalSegLib.engine.build as build
import RetrievalSegLib.segmentation.segment as segment_module
from RetrievalSegLib.cli.main import main
from RetrievalSegLib.data.synthetic import make_synthetic_study
from RetrievalSegLib.data.volume import write_volume

FAST = ["--random-weights", "--image-size", "256", "--dinov2-input-size", "56", "--device", "cpu"]


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmpstudy")
    cases = make_synthetic_study(4, shape=(4, 32, 32), spacing=(1.3, 1.3, 6.0))
    for c, split in zip(cases, ["train", "train", "test", "test"]):
        for sub in ("images", "labels"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        write_volume(c.image, root / split / "images" / f"{c.case_id}.nii.gz")
        write_volume(c.labels, root / split / "labels" / f"{c.case_id}.nii.gz")
    return root


def argv(study, out, *more):
    return ["evaluate", "--train", str(study / "train"), "--test", str(study / "test"), "--labels",
            "1:RV,2:Myo,3:LV", "--k", "1", "--out", str(out), *FAST, *more]


@pytest.fixture(scope="module")
def compared(study, tmp_path_factory):
    """One 2-configuration run (k = 1, the reference, and k = 2), with progress bars on."""
    out = tmp_path_factory.mktemp("cmp") / "out"
    engines = []
    real = build.make_engine
    mp = pytest.MonkeyPatch()
    mp.setattr(build, "make_engine", lambda a: engines.append(a) or real(a))
    try:
        rc, stdout, stderr = run(argv(study, out, "--compare", "k=2,1", "--report"))
    finally:
        mp.undo()
    assert rc == 0, stderr
    return out, stdout, stderr, engines


def test_two_configurations_on_the_same_cases_share_the_models(compared):
    out, stdout, stderr, engines = compared
    assert len(engines) == 1  # k does not change the models: SAM 2 loaded once
    assert "2 configurations, 1 model set(s) loaded, 2 DINOv2 pass(es)" in stderr  # once per test case
    assert "config 1/2 (k=1) case 2/2" in stderr and "config 2/2 (k=2) case 2/2" in stderr  # progress
    doc = json.loads((out / "compare.json").read_text())
    assert doc["complete"] and doc["reference"] == "k=1" and doc["options"] == ["k"]
    assert [(c["name"], c["folder"], c["finished"]) for c in doc["configurations"]] == [
        ("k=1", ".", True), ("k=2", "compare/k-2", True)]
    ref = json.loads((out / "metrics.json").read_text())
    other = json.loads((out / "compare/k-2/metrics.json").read_text())
    assert ref["k"] == 1 and other["k"] == 2 and other["configuration"] == "k=2"
    assert ref["cases"] == other["cases"] == doc["cases"] and len(doc["cases"]) == 2
    assert ref["bank_id"] == other["bank_id"]
    # compare.csv holds every (configuration, case, label) row of both folders' results.
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3
    for name, res in (("k=1", ref), ("k=2", other)):
        mine = {(r["case"], int(r["label"])): float(r["dice"]) for r in rows if r["configuration"] == name}
        assert mine == {(r["case"], r["label"]): pytest.approx(r["dice"]) for r in res["rows"]}
    # The statistics are those of the paired per-case values.
    for v, label in ref["labels"].items():
        a = {r["case"]: r["dice"] for r in ref["rows"] if r["name"] == label}
        b = {r["case"]: r["dice"] for r in other["rows"] if r["name"] == label}
        d = doc["differences"]["k=2"][label]["dice"]
        diffs = np.array([b[c] - a[c] for c in a])
        assert d["n"] == 2 and d["mean_difference"] == pytest.approx(diffs.mean())
        if np.any(diffs != 0):
            assert d["wilcoxon_p"] == pytest.approx(wilcoxon(diffs).pvalue)
        assert "too few to conclude" in d["note"]
        assert doc["summary"]["k=1"][label]["dice"]["mean"] == pytest.approx(np.mean(list(a.values())))
    assert any(r["dice"] > 0 for r in ref["rows"])  # not vacuous
    # Random weights are marked in every file and in the printed table.
    assert doc["random_weights"] is True and "RANDOM WEIGHTS" in doc["warning"]
    assert all(r["random_weights"] == "True" for r in rows)
    assert ref["random_weights"] and other["random_weights"]
    assert "RANDOM WEIGHTS" in stdout and "reference: k=1" in stdout and "too few to conclude" in stdout
    # --report: the reference's cases with their predictions, and the comparison section.
    page = (out / "report" / "report.html").read_text()
    assert "Configurations compared" in page and page.count('<tr class="reference">') == 3
    assert len(list((out / "predictions").glob("*.nii.gz"))) == 2
    assert not (out / "compare/k-2/predictions").exists()  # only the reference's are drawn


def test_resume_skips_every_finished_configuration_and_case(compared, study, monkeypatch):
    out, *_ = compared
    before = json.loads((out / "compare.json").read_text())
    rc, _, err = run(argv(study, out, "--compare", "k=2", "--no-progress"))
    assert rc == 2 and "--resume" in err  # results are never replaced by surprise

    def refuse(*a, **k):
        raise AssertionError("a finished case was segmented again")

    monkeypatch.setattr(segment_module, "segment_volume", refuse)
    rc, _, err = run(argv(study, out, "--compare", "k=2", "--resume", "--no-progress"))
    assert rc == 0, err
    after = json.loads((out / "compare.json").read_text())
    assert after["rows"] == before["rows"] and after["differences"] == before["differences"]


def test_resume_evaluates_only_the_missing_case_of_an_unfinished_configuration(compared, study, tmp_path,
                                                                                 monkeypatch):
    out, *_ = compared
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = json.loads((copy / "compare.json").read_text())
    missing = before["cases"][1]
    (copy / "compare/k-2/cases" / f"{missing}.json").unlink()  # as if interrupted in config 2's second case
    real, calls = segment_module.segment_volume, []

    def counted(image, bank, engine, **kw):
        calls.append((kw["k"], kw["case_id"]))
        return real(image, bank, engine, **kw)

    monkeypatch.setattr(segment_module, "segment_volume", counted)
    rc, _, err = run(argv(study, copy, "--compare", "k=2", "--resume", "--no-progress"))
    assert rc == 0, err
    assert len(calls) == 1 and calls[0][0] == 2  # only that case, only in that configuration
    after = json.loads((copy / "compare.json").read_text())
    key = lambda r: (r["configuration"], r["case"], r["label"])  # noqa: E731
    assert sorted(map(key, after["rows"])) == sorted(map(key, before["rows"]))
    for a, b in zip(sorted(after["rows"], key=key), sorted(before["rows"], key=key)):
        assert a["dice"] == pytest.approx(b["dice"], abs=1e-6)  # seeded random weights: the same result


def test_compare_option_errors_exit_2_before_any_model_loads(study, tmp_path, monkeypatch):
    def no_models(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(build, "make_embedder", no_models)
    monkeypatch.setattr(build, "make_engine", no_models)
    out = tmp_path / "never"
    cases = {
        "unknown": ("nothing=1,2", "not an option of rseg evaluate that can be compared"),
        "bad int": ("k=4,x", "invalid value 'x'"),
        "k 0": ("k=0,4", "expected an integer >= 1"),
        "bad choice": ("precision=fp32,fp8", "invalid value 'fp8' (choose from auto, fp32, bf16)"),
        "bank option": ("pool=10,50", "cannot be compared (the bank is the same for every configuration)"),
        "no values": ("k", "give NAME=VALUE1,VALUE2"),
        "image size": ("image-size=256,300", "multiple of 32"),
        "only the reference": ("k=1", "only the reference configuration"),
    }
    for what, (spec, message) in cases.items():
        rc, _, err = run(argv(study, out, "--compare", spec, "--no-progress"))
        assert rc == 2 and message in err, (what, err)
        assert not out.exists(), what
    rc, _, err = run(argv(study, out, "--compare", "nothing=1"))
    for name in ("k", "image-size", "precision", "batch-size"):  # the names that can be compared are listed
        assert name in err.split("options that can:")[1]
    rc, _, err = run(argv(study, out, "--compare", "k=2,4", "--compare", "k=8"))
    assert rc == 2 and "given twice" in err


def test_retrieval_features_are_compared_on_one_bank_with_one_dinov2_pass(compared, study, tmp_path, monkeypatch):
    """`--compare retrieval-feature=cls,mean`: evaluate's bank gets the mean embeddings beside cls, one
    DINOv2 pass per case gives both features, and each configuration searches its own feature's rows."""
    from RetrievalSegLib.bank.support_bank import SupportBank

    out = tmp_path / "out"
    shutil.copytree(compared[0] / "bank", out / "bank")  # evaluate's own bank (with its build record), reused
    engines, searched = [], []
    real_engine, real_search = build.make_engine, SupportBank.search
    monkeypatch.setattr(build, "make_engine", lambda a: engines.append(a) or real_engine(a))

    def spy(self, q, k, *a, embedder_identity=None, **kw):
        searched.append(embedder_identity)
        return real_search(self, q, k, *a, embedder_identity=embedder_identity, **kw)

    monkeypatch.setattr(SupportBank, "search", spy)
    rc, stdout, stderr = run(argv(study, out, "--compare", "retrieval-feature=cls,mean", "--no-progress",
                                  "--max-cases", "1"))  # (one case keeps it quick)
    assert rc == 0, stderr
    assert len(engines) == 1  # one DINOv2 and one SAM 2 for both features
    assert "2 configurations, 1 model set(s) loaded, 1 DINOv2 pass(es) over the test cases (each gives the 2" in stderr
    bank = SupportBank.open(out / "bank")
    assert bank.retrieval_features == ("cls", "mean") and bank.verify().ok
    ref = json.loads((out / "metrics.json").read_text())
    other = json.loads((out / "compare/retrieval_feature-mean/metrics.json").read_text())
    assert not ref["dinov2"].endswith("#mean") and other["dinov2"] == ref["dinov2"] + "#mean"
    assert set(searched) == {ref["dinov2"], other["dinov2"]}  # each configuration its own feature's rows
    doc = json.loads((out / "compare.json").read_text())
    assert doc["reference"] == "retrieval-feature=cls" and doc["complete"]
    assert [c["name"] for c in doc["configurations"]] == ["retrieval-feature=cls", "retrieval-feature=mean"]
    assert len(doc["rows"]) == 2 * 1 * 3
    # resumed: nothing is embedded into the bank again and no case is segmented again
    revision = bank.revision
    monkeypatch.setattr(segment_module, "segment_volume", lambda *a, **k: pytest.fail("segmented again"))
    rc, _, err = run(argv(study, out, "--compare", "retrieval-feature=cls,mean", "--resume", "--no-progress",
                          "--max-cases", "1"))
    assert rc == 0, err
    assert SupportBank.open(out / "bank").revision == revision


def test_a_users_bank_without_a_compared_feature_is_refused_with_bank_reembed(compared, study, tmp_path,
                                                                              monkeypatch):
    mine = tmp_path / "mine"
    shutil.copytree(compared[0] / "bank", mine)
    (mine / "evaluate_build.json").unlink()  # as a bank made with `rseg bank`: evaluate never changes it

    def no_models(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(build, "make_embedder", no_models)
    monkeypatch.setattr(build, "make_engine", no_models)
    args = [a for a in argv(study, tmp_path / "second", "--compare", "retrieval-feature=gem", "--no-progress")]
    i = args.index("--train")
    del args[i:i + 2]
    rc, _, err = run(args + ["--bank", str(mine)])
    assert rc == 2 and f"rseg bank reembed {mine} --retrieval-feature gem" in err, err
