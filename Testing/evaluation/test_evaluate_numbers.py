"""`rseg evaluate`'s numbers against values computed by hand (issue 31, class 3).

* `summarize`: the sample standard deviation (ddof 1) of known Dice and HD95 values;
* HD95 through `evaluate()` on an anisotropic volume whose prediction is the ground truth moved by
  one slice: the through-plane spacing in mm, not an in-plane one (array vs ITK axis order);
* the excluded-support count when the bank holds frame-level case ids (`patient001_frame12`) and
  the test case's subject is the patient (`patient001`).

`evaluate()` runs with its segmentation replaced by the known prediction (no model), so the test
checks the evaluation's arithmetic, not SAM 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from _bank_helpers import LABELS, HashEmbedder
from RetrievalSegLib.bank.support_bank import SupportBank
from RetrievalSegLib.data.volume import Volume, write_volume
from RetrievalSegLib.evaluation.evaluate import evaluate, excluded_supports, summarize
from RetrievalSegLib.evaluation.study import CaseFiles


def test_summary_sd_is_the_sample_sd_of_known_values() -> None:
    rows = [{"label": 1, "dice": d, "hd95_mm": h} for d, h in [(0.5, 2.0), (0.7, 4.0), (0.9, None)]]
    rows += [{"label": 2, "dice": 0.8, "hd95_mm": 3.0}]
    s = summarize(rows, {1: "RV", 2: "Myo"})
    # Dice 0.5, 0.7, 0.9: mean 0.7, squared deviations 0.04 + 0 + 0.04 over n - 1 = 2 -> sd 0.2
    assert s["RV"]["dice_mean"] == pytest.approx(0.7) and s["RV"]["dice_sd"] == pytest.approx(0.2)
    # HD95 2 and 4 (the third undefined): mean 3, sd sqrt((1 + 1) / 1)
    assert s["RV"]["hd95_mean"] == pytest.approx(3.0) and s["RV"]["hd95_sd"] == pytest.approx(np.sqrt(2.0))
    assert (s["RV"]["cases"], s["RV"]["hd95_cases"], s["RV"]["hd95_undefined_cases"]) == (3, 2, 1)
    assert s["Myo"]["dice_sd"] is None and s["Myo"]["dice_sd_undefined"] == "fewer than 2 cases"


# ----------------------------------------------------------------------------- evaluate() by hand
SPACING = (0.7, 0.9, 4.0)  # ITK (i, j, k): x, y and the slice spacing; the array is [k, j, i]
SHAPE = (6, 12, 10)


@dataclass(frozen=True)
class _Segmentation:
    """The fields of `segmentation.results.Segmentation` that `evaluate()` reads."""

    labelmap: Volume
    seconds: float
    batch_size: int
    slices: tuple


class _Sam:
    device = "cpu"


class _Engine:
    """What `evaluate()` reads of a `RetrievalEngine` when segmentation is replaced."""

    sam = _Sam()
    sam2_identity = "sam2.1-tiny@256:hand"
    dinov2_identity = HashEmbedder().identity
    random_weights = False


@pytest.fixture()
def study(tmp_path):
    """A bank with frame-level case ids (3 entries of patient001's frame 12, 2 of patient002) and one
    test case of subject patient001 whose ground truth is a box over slices 1..3."""
    emb = HashEmbedder()
    bank = SupportBank.create(tmp_path / "bank", LABELS, emb.identity)
    rng = np.random.default_rng(0)
    for case, n in (("patient001_frame12", 3), ("patient002_frame01", 2), ("patient0010", 1)):
        for i in range(n):
            img = rng.integers(0, 256, (16, 16), dtype=np.uint8)
            bank.add_slice(img, {1: img > 128}, case, "k", i, (1.0, 1.0), emb)
    truth = np.zeros(SHAPE, dtype=np.uint8)
    truth[1:4, 3:8, 3:7] = 1
    geo = dict(spacing=SPACING, origin=(3.0, -2.0, 10.0))
    image = write_volume(Volume(truth.astype(np.int16) * 100, **geo), tmp_path / "patient001_frame01.nii.gz")
    labels = write_volume(Volume(truth, **geo), tmp_path / "patient001_frame01_gt.nii.gz")
    case = CaseFiles("patient001_frame01", image, labels, subject="patient001")
    return bank, case, truth, geo


def test_hd95_through_evaluate_is_the_slice_spacing_for_a_one_slice_shift(study, tmp_path, monkeypatch) -> None:
    import RetrievalSegLib.segmentation.segment as segment_module

    bank, case, truth, geo = study
    shifted = np.zeros_like(truth)
    shifted[2:5] = truth[1:4]  # the same box, one slice further along k

    def segment_volume(image, bank_, engine, **kw):  # the call evaluate() makes, answered by hand
        assert kw["case_id"] == "patient001" and kw["case_policy"] == "exclude"
        return _Segmentation(image.with_array(shifted), 0.0, 1, ())

    monkeypatch.setattr(segment_module, "segment_volume", segment_volume)
    result = evaluate([case], bank, _Engine(), labels=[1], k=1, out=tmp_path / "eval", progress=False)
    row = next(r for r in result["rows"] if r["label"] == 1)
    assert row["dice"] == pytest.approx(2 * 40 / (60 + 60))  # 2 of 3 slices of 20 voxels overlap
    assert row["hd95_mm"] == pytest.approx(SPACING[2])  # 4 mm: the slice spacing, not 0.7 or 0.9
    # The bank's frame-level ids of the test case's patient are all excluded (3), not 0.
    assert result["per_case"]["patient001_frame01"]["excluded_supports"] == 3
    assert result["per_case"]["patient001_frame01"]["candidate_supports"] == 3


def test_excluded_supports_count_frame_level_case_ids_of_the_subject(study) -> None:
    bank = study[0]
    assert excluded_supports(bank, "patient001") == (3, 6)  # patient001_frame12, not patient0010
    assert excluded_supports(bank, "patient002") == (2, 6)
    assert excluded_supports(bank, "patient003") == (0, 6)
