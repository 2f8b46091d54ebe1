"""`rseg evaluate --compare` (issue 26): the configurations, the paired statistics against scipy and
by hand, and the option's checks. The end-to-end run is in Testing/cli/test_compare_cli.py."""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon

from RetrievalSegLib.evaluation.compare import (
    MIN_PAIRS,
    Configuration,
    MemoEmbedder,
    bootstrap_ci,
    compare_doc,
    configurations,
    describe,
    paired,
    run_compare,
)

# Fixed numbers: per-case Dice of a reference and of another configuration (10 cases).
REF = [0.81, 0.74, 0.90, 0.62, 0.77, 0.85, 0.70, 0.93, 0.66, 0.79]
NEW = [0.84, 0.73, 0.92, 0.70, 0.80, 0.86, 0.78, 0.93, 0.69, 0.83]
CASES = [f"case{i:02d}" for i in range(len(REF))]


def test_summary_is_mean_sample_sd_and_median():
    s = describe(REF)
    assert s["n"] == 10
    assert s["mean"] == pytest.approx(statistics.fmean(REF))
    assert s["sd"] == pytest.approx(statistics.stdev(REF))  # ddof = 1, not the population sd
    assert s["sd"] != pytest.approx(statistics.pstdev(REF))
    assert s["median"] == pytest.approx(statistics.median(REF))
    one = describe([0.5])
    assert one["sd"] is None and one["mean"] == 0.5
    assert describe([])["mean"] is None


def test_paired_statistics_equal_scipy_on_fixed_numbers():
    # Pairing is by case id, not by position: the other configuration's dict is in another order.
    ref = dict(zip(CASES, REF))
    other = dict(reversed(list(zip(CASES, NEW))))
    s = paired(ref, other)
    diffs = np.array(NEW) - np.array(REF)
    assert s["n"] == 10 and s["unpaired_cases"] == 0
    assert s["mean_difference"] == pytest.approx(diffs.mean())  # sign: configuration - reference
    assert s["mean_difference"] > 0
    assert s["median_difference"] == pytest.approx(np.median(diffs))
    assert s["wilcoxon_p"] == pytest.approx(wilcoxon(NEW, REF).pvalue, rel=1e-12)
    assert s["wilcoxon_p"] < 0.05
    assert s["ci95_low"] <= diffs.mean() <= s["ci95_high"]
    assert "note" not in s


def test_wilcoxon_by_hand_and_the_small_n_note():
    # Six positive differences: exact two-sided p = 2 / 2^6 (every sign pattern equally likely).
    ref = {f"c{i}": 0.5 for i in range(6)}
    six = paired(ref, {f"c{i}": 0.5 + 0.01 * (i + 1) for i in range(6)})
    assert six["wilcoxon_p"] == pytest.approx(2 / 2 ** 6)
    assert "note" not in six
    five = paired({k: v for k, v in list(ref.items())[:5]}, {f"c{i}": 0.5 + 0.01 * (i + 1) for i in range(5)})
    assert five["wilcoxon_p"] == pytest.approx(2 / 2 ** 5) and five["wilcoxon_p"] > 0.05
    assert five["n"] == 5 and "too few to conclude" in five["note"] and str(MIN_PAIRS) in five["note"]


def test_missing_values_are_not_paired():
    ref = {"a": 1.0, "b": None, "c": 3.0, "d": 2.0}
    other = {"a": 2.0, "b": 5.0, "c": None, "e": 1.0}
    s = paired(ref, other)
    assert s["n"] == 1 and s["unpaired_cases"] == 4 and s["mean_difference"] == 1.0
    assert s["ci95_low"] is None and s["ci95_undefined"]
    same = paired({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0})
    assert same["wilcoxon_p"] is None and same["wilcoxon_p_undefined"] == "every difference is 0"


def test_bootstrap_ci_by_hand_and_fixed_seed():
    # Two differences 0 and 1: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so
    # the 2.5th and 97.5th percentiles of 10000 resampled means are 0 and 1.
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    # Constant differences: every resample has the same mean.
    assert bootstrap_ci([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2))
    d = np.array(NEW) - np.array(REF)
    lo, hi = bootstrap_ci(d)
    assert (lo, hi) == bootstrap_ci(d)  # fixed seed: the same interval every run
    assert d.min() <= lo < d.mean() < hi <= d.max()
    # Percentile bootstrap of the mean: close to the normal interval mean +- 1.96 sd / sqrt(n).
    half = 1.96 * d.std(ddof=0) / np.sqrt(d.size)
    assert lo == pytest.approx(d.mean() - half, abs=0.25 * half)
    assert hi == pytest.approx(d.mean() + half, abs=0.25 * half)
    assert bootstrap_ci([0.3]) is None


def test_reference_is_the_commands_values_first_and_added_when_not_listed():
    cfgs = configurations([("k", [4, 8, 16]), ("image_size", [512, None])], {"k": 8, "image_size": None})
    assert len(cfgs) == 6
    assert cfgs[0] == Configuration((("k", 8), ("image_size", None)), True)
    assert [c.reference for c in cfgs] == [True] + [False] * 5
    assert cfgs[0].folder == "." and cfgs[1].folder == "compare/k-4_image_size-512"
    assert cfgs[1].name == "k=4, image-size=512"
    # --k 8 --compare k=4,16: the reference (k=8) is not in the list and runs too, first.
    added = configurations([("k", [4, 16])], {"k": 8})
    assert [c.name for c in added] == ["k=8", "k=4", "k=16"] and added[0].reference


def _result(k: int, dice: list[float], random_weights: bool = True) -> dict:
    rows = [{"case": c, "label": 1, "name": "LV", "dice": d, "hd95_mm": 10.0 - 5 * d, "random_weights": random_weights}
            for c, d in zip(CASES, dice)]
    return {"rows": rows, "labels": {"1": "LV"}, "random_weights": random_weights, "complete": True, "k": k}


def test_compare_document_pairs_each_configuration_with_the_reference():
    cfgs = configurations([("k", [4, 8])], {"k": 8})
    doc = compare_doc(cfgs, {"k=8": _result(8, REF), "k=4": _result(4, NEW)}, complete=True)
    assert doc["reference"] == "k=8" and doc["random_weights"] is True and "RANDOM WEIGHTS" in doc["warning"]
    assert list(doc["differences"]) == ["k=4"]  # the reference is not compared with itself
    d = doc["differences"]["k=4"]["LV"]
    assert d["dice"]["wilcoxon_p"] == pytest.approx(wilcoxon(NEW, REF).pvalue)
    assert d["hd95"]["mean_difference"] == pytest.approx(-5 * (np.mean(NEW) - np.mean(REF)))
    assert doc["summary"]["k=8"]["LV"]["dice"]["sd"] == pytest.approx(statistics.stdev(REF))
    assert len(doc["rows"]) == 20 and {r["configuration"] for r in doc["rows"]} == {"k=8", "k=4"}
    assert all(r["random_weights"] for r in doc["rows"])


def test_run_compare_runs_the_reference_first_in_out_and_labels_progress(tmp_path):
    cfgs = configurations([("k", [4, 8])], {"k": 8})
    seen = []

    def run_one(c, folder: Path, label: str) -> dict:
        seen.append((c.name, folder, label))
        return _result(dict(c.values)["k"], REF if c.reference else NEW, random_weights=False)

    doc = run_compare(cfgs, run_one, tmp_path)
    assert seen == [("k=8", tmp_path, "config 1/2 (k=8) "), ("k=4", tmp_path / "compare/k-4", "config 2/2 (k=4) ")]
    assert doc["complete"] and "warning" not in doc
    assert (tmp_path / "compare.csv").read_text().splitlines()[0].startswith("configuration,reference,case")


class _Embedder:
    """The part of `engine.retrieval.SliceEmbedder` the memo uses: `identity` and `embed`."""

    identity = "dinov2-small@56"

    def __init__(self) -> None:
        self.calls = 0

    def embed(self, images):
        self.calls += 1
        return np.stack([np.full(3, float(im.mean())) for im in images])


def test_memo_embedder_embeds_the_same_slices_once():
    inner = _Embedder()
    memo = MemoEmbedder(inner)
    a = [np.zeros((4, 4), np.uint8), np.ones((4, 4), np.uint8)]
    first = memo.embed(a)
    first[:] = 7  # the caller's copy, not the memo's
    again = memo.embed([x.copy() for x in a])
    assert inner.calls == 1 and memo.identity == inner.identity
    assert again[1, 0] == 1.0
    memo.embed([a[1], a[0]])
    assert inner.calls == 2
    with pytest.raises(AttributeError):
        memo.not_an_embedder_method  # noqa: B018


def test_memo_embedder_gives_every_compared_feature_from_one_pass():
    """`--compare retrieval-feature=...`: the first configuration's pass over a case gives every
    compared feature; the others' embedders read the memo (no second DINOv2 pass)."""
    from _bank_helpers import FeatureHashEmbedder

    inner = FeatureHashEmbedder("cls")
    memo = MemoEmbedder(inner, ["mean", "cls+mean"])
    a = [np.zeros((4, 4), np.uint8), np.full((4, 4), 9, np.uint8)]
    cls_rows = memo.embed(a)
    mean = memo.for_feature("mean")
    both = memo.for_feature("cls+mean")
    assert memo.for_feature("cls") is memo
    assert mean.identity == "dinov2-small:hash@16#mean" and mean.dim == 16 and both.dim == 32
    np.testing.assert_array_equal(mean.embed([x.copy() for x in a]), FeatureHashEmbedder("mean").embed(a))
    np.testing.assert_array_equal(both.embed(a), FeatureHashEmbedder("cls+mean").embed(a))
    np.testing.assert_array_equal(cls_rows, inner.embed(a))
    assert memo.passes == 1 and inner.passes == 2  # (the second: this test's own check above)
    with pytest.raises(ValueError, match="not one of this comparison's"):
        memo.for_feature("gem")
