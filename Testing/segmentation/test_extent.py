"""The extent stop (issue 13): the rule on hand-made presence, then through the real engine.

With random weights SAM 2's object scores are positive on every slice, so at SAM 2's own
threshold (0) the stop never fires; the engine tests record the real scores of a full run and
set the presence threshold between two of them, so that the rule has something to stop on.
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from _small_world import bank_of_first_case

from RetrievalSegLib.bank.support_bank import LabelInfo
from RetrievalSegLib.segmentation.extent import ExtentWalker, extent_slices
from RetrievalSegLib.engine.pipeline import RetrievalEngine
from RetrievalSegLib.segmentation.provenance import BEYOND_EXTENT, SEGMENTED, slice_records
from RetrievalSegLib.segmentation.segment import segment_volume
from RetrievalSegLib.segmentation.slices import start_slices
from RetrievalSegLib.data.synthetic import LABELS, make_synthetic_study

N_SLICES = 10


def _presence(text: str) -> list[bool]:
    """'..###..' -> [F, F, T, T, T, F, F]."""
    return [c == "#" for c in text]


# ----------------------------------------------------------------------------- the rule alone
def test_extent_rule_middle_block_gives_the_block_plus_n_on_each_side():
    p = _presence("." * 10 + "#" * 6 + "." * 10)  # block 10..15
    for n in (1, 2, 3, 5):
        for start in (10, 12, 15):
            assert extent_slices(p, start, n) == list(range(10 - n, 16 + n)), (n, start)
    assert extent_slices(p, 12, 0) == list(range(26))  # 0: every slice


def test_extent_rule_crosses_gaps_shorter_than_n_and_stops_at_longer_ones():
    p = _presence("....###..###...." + "." * 6 + "##....")  # blocks 4-6, 9-11, 22-23
    assert extent_slices(p, 5, 3) == list(range(1, 15))  # gap of 2 crossed, the block at 22 is not reached
    assert extent_slices(p, 5, 2) == list(range(2, 9))  # gap of 2 = N stops the walk
    # A longer gap needs a second start slice on the far side (or N = 0).
    assert extent_slices(p, [5, 22], 3) == list(range(1, 15)) + list(range(19, 27))
    assert extent_slices(p, 5, 11) == list(range(28))


def test_extent_rule_start_at_the_volume_edge():
    p = _presence("####....##")
    assert extent_slices(p, 0, 2) == [0, 1, 2, 3, 4, 5]
    assert extent_slices(p, 9, 2) == [6, 7, 8, 9]  # the top edge ends the upward walk
    assert extent_slices(_presence(".........."), 0, 3) == [0, 1, 2]  # nothing there: N slices


def test_extent_rule_respects_a_user_slice_range():
    p = _presence("###...####....###")
    assert extent_slices(p, 8, 2, slice_range=(5, 12)) == [5, 6, 7, 8, 9, 10, 11]
    assert extent_slices(p, 7, 1, slice_range=(7, 11)) == [7, 8, 9, 10]
    assert extent_slices(p, 9, 1, slice_range=(4, 17)) == list(range(5, 11))
    with pytest.raises(ValueError, match="outside the slice range"):
        extent_slices(p, 3, 2, slice_range=(5, 12))


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 7, 32])
def test_extent_walker_batches_do_not_change_what_is_segmented(limit):
    """Speculative batches of any size accept exactly the rule's slices; the rest is 'beyond'."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        p = list(rng.random(30) < 0.4)
        starts = sorted(set(rng.integers(3, 27, size=rng.integers(1, 3)).tolist()))
        n = int(rng.integers(1, 4))
        walker = ExtentWalker(starts, n, (3, 27))
        computed = []
        while not walker.finished:
            batch = walker.next_slices(limit)
            assert batch and len(batch) <= limit and not set(batch) & set(computed)
            computed += batch
            for i in batch:
                walker.record(i, p[i])
        expect = extent_slices(p, starts, n, slice_range=(3, 27))
        assert sorted(walker.accepted) == expect
        assert walker.beyond() == set(range(3, 27)) - set(expect)


# ----------------------------------------------------------------------------- the real engine
@pytest.fixture(scope="module")
def engine() -> RetrievalEngine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RetrievalEngine.load(random_weights=True, image_size=256, device="cpu", dinov2_input_size=56)


@pytest.fixture(scope="module")
def study():
    return make_synthetic_study(2, shape=(N_SLICES, 40, 36), spacing=(1.2, 1.2, 5.0), seed=11)


@pytest.fixture(scope="module")
def bank(tmp_path_factory, engine, study):
    return bank_of_first_case(tmp_path_factory.mktemp("bank") / "bank", engine, study)


@pytest.fixture(scope="module")
def full_run(bank, engine, study):
    """The whole volume, per-slice reference path: every slice's real object scores."""
    return segment_volume(study[1].image, bank, engine, k=1, batch_size=1)


@pytest.fixture(scope="module")
def stop_rule(full_run):
    """(threshold t, N, the slices the rule segments, start slice) on the full run's scores."""
    scores = [max(full_run.slices[i].object_score.values()) for i in range(N_SLICES)]
    start = int(np.argmax([full_run.slices[i].retrieved[0][1] for i in range(N_SLICES)]))
    t, n, expect = _threshold(scores, start)
    return t, n, expect, start


@pytest.fixture(scope="module")
def full_run_at_t(bank, engine, study, stop_rule):
    """The whole volume at the stop's presence threshold: what the stop must give on its slices
    (labels whose object score is <= t are absent there: empty)."""
    return segment_volume(study[1].image, bank, engine, k=1, batch_size=1, presence_threshold=stop_rule[0])


def _threshold(scores: list[float], start: int) -> tuple[float, int, list[int]]:
    """A presence threshold between two recorded scores (>= 1e-4 from each, far above float
    noise) and an N for which the rule stops inside the volume: a proper, non-trivial subset."""
    values = sorted(set(scores))
    for a, b in zip(values, values[1:]):
        if b - a < 2e-4:
            continue
        t = (a + b) / 2
        for n in (1, 2):
            chosen = extent_slices([s > t for s in scores], start, n)
            if 2 < len(chosen) < len(scores):
                return t, n, chosen
    raise AssertionError(f"no threshold makes the rule stop on these scores: {scores}")


def test_extent_stop_through_the_engine_segments_what_the_rule_implies(bank, engine, study, full_run, stop_rule,
                                                                       full_run_at_t):
    full = full_run
    assert sorted(full.slices) == list(range(N_SLICES)) and not full.beyond_extent
    scores = [max(full.slices[i].object_score.values()) for i in range(N_SLICES)]
    assert min(scores) > 0  # random weights: SAM 2's own threshold would never stop
    t, n, expect, start = stop_rule

    seen = []
    seg = segment_volume(study[1].image, bank, engine, k=1, batch_size=1, extent_stop=n,
                         presence_threshold=t, progress=lambda d, tot: seen.append((d, tot)))
    assert seg.start_slices == [start] and seg.start_reason == "most similar to the bank"
    assert sorted(seg.slices) == expect
    skipped = set(range(N_SLICES)) - set(expect)
    assert seg.beyond_extent == skipped and skipped
    for i in expect:  # identical to the full run on the same slices (at the same presence threshold)
        assert seg.slices[i].object_score == full.slices[i].object_score
        assert seg.slices[i].iou == full.slices[i].iou
        assert seg.slices[i].retrieved == full.slices[i].retrieved
        assert seg.slices[i].present == full_run_at_t.slices[i].present
        np.testing.assert_array_equal(seg.labelmap.array[i], full_run_at_t.labelmap.array[i])
    assert not seg.labelmap.array[sorted(skipped)].any()  # skipped slices stay background
    assert np.isnan(seg.confidence[sorted(skipped)]).all()
    records = slice_records(seg)
    assert [r["status"] for r in records] == [SEGMENTED if i in expect else BEYOND_EXTENT for i in range(N_SLICES)]
    assert seen[-1] == (len(expect), len(expect))  # the progress bar completes at the stop

    # Batch size and speculation width change nothing: the slices computed past a stop are dropped.
    other = segment_volume(study[1].image, bank, engine, k=1, batch_size=2, encoder_batch=3,
                           extent_stop=n, presence_threshold=t)
    assert sorted(other.slices) == expect and other.beyond_extent == skipped
    np.testing.assert_array_equal(other.labelmap.array, seg.labelmap.array)


def test_extent_start_slice_precedence(bank, study, full_run):
    """Annotated slices of this volume, else the middle of the user's range, else the most similar."""
    hits = [full_run.slices[i].retrieved for i in range(N_SLICES)]
    own = sorted(e.index for e in bank.entries() if e.case_id == study[0].case_id)
    assert own
    assert start_slices(None, bank, study[0].case_id, 2, 0, N_SLICES, True, hits) == (own, "annotated")
    assert start_slices(None, bank, "another-case", 2, 2, 9, True, hits) == ([5], "middle of the slice range")
    best = int(np.argmax([h[0][1] for h in hits]))
    assert start_slices(None, bank, None, 2, 0, N_SLICES, False, hits) == ([best], "most similar to the bank")
    assert start_slices([7, 3, 7], bank, study[0].case_id, 2, 0, N_SLICES, False, hits) == ([3, 7], "given")
    with pytest.raises(ValueError, match="slice range"):
        start_slices(12, bank, None, 2, 0, N_SLICES, False, hits)


def test_extent_arguments_are_checked_before_any_work(bank, engine, study):
    with pytest.raises(ValueError, match="extent_stop must be an integer >= 0"):
        segment_volume(study[1].image, bank, engine, k=1, extent_stop=-1)
    for bad in (float("nan"), -0.5):
        with pytest.raises(ValueError, match="presence_threshold must be a finite number >= 0"):
            segment_volume(study[1].image, bank, engine, k=1, extent_stop=2, presence_threshold=bad)
    with pytest.raises(ValueError, match="start slice"):
        segment_volume(study[1].image, bank, engine, k=1, extent_stop=2, start_slice=0, slice_range=(2, 5))


def test_presence_threshold_empties_absent_labels_alike_on_both_paths(bank, engine, study, full_run):
    """Issue 32: a label whose object score is <= the threshold is absent on that slice: no voxel of
    it in the label map nor in its own mask, on the per-slice and the batched path alike, and
    `present` records the decision per slice and label."""
    per_label = sorted({v for i in range(2, 6) for v in full_run.slices[i].object_score.values()})
    gaps = [(b - a, (a + b) / 2) for a, b in zip(per_label, per_label[1:]) if b - a >= 2e-4]
    t = min(gaps, key=lambda g: abs(g[1] - per_label[len(per_label) // 2]))[1]  # near the median score
    kw = dict(k=1, slice_range=(2, 6), presence_threshold=t, keep_label_masks=True)
    per = segment_volume(study[1].image, bank, engine, batch_size=1, **kw)
    batched = segment_volume(study[1].image, bank, engine, batch_size=3, encoder_batch=3, **kw)
    np.testing.assert_array_equal(per.labelmap.array, batched.labelmap.array)
    decisions = []
    for i in range(2, 6):
        for li, lab in enumerate(sorted(LABELS)):
            present = full_run.slices[i].object_score[lab] > t
            assert per.slices[i].present[lab] is batched.slices[i].present[lab] is present
            decisions.append(present)
            if not present:
                for seg in (per, batched):
                    assert not (seg.labelmap.array[i] == lab).any() and not seg.label_masks[li, i].any()
    assert any(decisions) and not all(decisions)  # the threshold splits the labels: the test can fail
    records = slice_records(per)
    assert records[3]["present"] == {str(lab): per.slices[3].present[lab] for lab in sorted(LABELS)}


def test_presence_threshold_above_every_object_score_writes_an_empty_label_map(bank, study, full_run, tmp_path,
                                                                               capsys):
    """Issue 32: every label absent on every slice -> an empty label map, and the sidecar says absent."""
    import json

    from RetrievalSegLib.cli.main import main
    from RetrievalSegLib.segmentation.provenance import read_sidecar
    from RetrievalSegLib.data.volume import read_volume, write_volume

    image = write_volume(study[1].image, tmp_path / "ct.nii.gz")
    top = max(max(full_run.slices[i].object_score.values()) for i in range(N_SLICES))
    assert full_run.labelmap.array[2:5].any()  # at SAM 2's own threshold the labels are there
    t = repr(2 * top + 1)
    for batch in ("1", "3"):
        out = tmp_path / f"batch{batch}.nii.gz"
        assert main(["segment", str(image), "--bank", str(bank.path), "--out", str(out), "--extent-stop", "0",
                     "--slices", "2:5", "--presence-threshold", t, "--json", *FAST, "--batch-size", batch]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["slices_segmented"] == 3 and not any(summary["labels"].values())
        assert not read_volume(out).array.any()
        doc = read_sidecar(out)
        assert doc["provenance"]["presence_threshold"] == float(t)
        assert [s.get("present") for s in doc["slices"][2:5]] == [{str(v): False for v in sorted(LABELS)}] * 3
    assert main(["segment", str(image), "--bank", str(bank.path), "--out", str(tmp_path / "x.nii.gz"),
                 "--presence-threshold", "-0.5", *FAST]) == 2
    assert "expected a number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("extent_stop", [0, 2])
def test_extent_time_estimate_comes_from_the_first_batch_before_the_second(bank, engine, study, extent_stop,
                                                                          monkeypatch):
    """The estimate = first batch's measured seconds per slice x slices left, reported between
    the first and the second image-encoder batch (order of events, no timing bound)."""
    events = []
    real = engine.sam.encode_batch

    def encode_batch(images, *a, **kw):
        t0 = time.perf_counter()
        out = real(images, *a, **kw)
        events.append(("encode", len(images), t0, time.perf_counter()))
        return out

    monkeypatch.setattr(engine.sam, "encode_batch", encode_batch)
    seg = segment_volume(study[1].image, bank, engine, k=1, batch_size=2, encoder_batch=2, slice_range=(3, 7),
                         extent_stop=extent_stop, presence_threshold=0.0,  # random weights: all present
                         estimate=lambda e: events.append(("estimate", e)))
    kinds = [e[0] for e in events]
    assert kinds[:3] == ["encode", "estimate", "encode"] and kinds.count("estimate") == 1
    est = events[1][1]
    assert est is seg.estimate and est.first_batch_slices == 2 == events[0][1]
    # Measured on this run: at least the first batch's encoder call, at most until the second began.
    assert events[0][3] - events[0][2] <= est.first_batch_seconds <= events[2][2] - events[0][2]
    assert est.slices_left == 4 - 2 and est.upper_bound == bool(extent_stop)
    assert est.seconds_left == pytest.approx(est.first_batch_seconds / 2 * 2)
    assert "s/slice" in est.describe()


# ----------------------------------------------------------------------------- rseg segment
FAST = ["--random-weights", "--image-size", "256", "--dinov2-input-size", "56", "--device", "cpu",
        "--k", "1", "--batch-size", "1"]


def test_extent_cli_stop_0_equals_the_full_run_and_the_stop_reports_what_it_skipped(
        bank, study, full_run, stop_rule, full_run_at_t, tmp_path, capsys):
    import json

    from RetrievalSegLib.cli.main import main
    from RetrievalSegLib.segmentation.provenance import read_sidecar
    from RetrievalSegLib.data.volume import read_volume, write_volume

    image = write_volume(study[1].image, tmp_path / "ct.nii.gz")
    out0 = tmp_path / "all.nii.gz"
    assert main(["segment", str(image), "--bank", str(bank.path), "--out", str(out0), "--extent-stop", "0",
                 "--slices", "3:7", "--json", *FAST]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["slices_segmented"] == 4 and summary["slices_beyond_extent"] == 0
    np.testing.assert_array_equal(read_volume(out0).array[3:7], full_run.labelmap.array[3:7])  # today's output
    assert [s["status"] for s in read_sidecar(out0)["slices"]][3:7] == [SEGMENTED] * 4

    t, n, expect, start = stop_rule
    out = tmp_path / "stop.nii.gz"
    assert main(["segment", str(image), "--bank", str(bank.path), "--out", str(out), "--extent-stop", str(n),
                 "--presence-threshold", repr(t), *FAST]) == 0
    captured = capsys.readouterr()
    assert "rseg: estimate: first batch: 4 slices" in captured.err  # progress shows the estimate
    assert f"{N_SLICES - len(expect)} slices beyond the extent not segmented" in captured.out
    doc = read_sidecar(out)
    assert [s["status"] for s in doc["slices"]] == [SEGMENTED if i in expect else BEYOND_EXTENT
                                                    for i in range(N_SLICES)]
    assert doc["provenance"]["extent"]["stop"] == n and doc["provenance"]["extent"]["start_slices"] == [start]
    got = read_volume(out).array
    np.testing.assert_array_equal(got[expect], full_run_at_t.labelmap.array[expect])
    assert not got[sorted(set(range(N_SLICES)) - set(expect))].any()
    assert main(["segment", str(image), "--bank", str(bank.path), "--out", str(out), "--extent-stop", "-1",
                 *FAST]) == 2


# ----------------------------------------------------------------------------- worker and panel logic
@pytest.mark.slow  # a bank and a segmentation in the worker: ~1 min on 2 idle cores, 3.5 min under load
def test_extent_stop_and_estimate_through_the_worker(worker_client, study, tmp_path):
    """The segment job: the estimate arrives (a status event) after the first batch's slices and
    before the next batch's; the slices beyond the extent come back in the result.

    Presence threshold 1e9: every slice is 'absent', so from start slice 5 with N = 3 the rule
    segments exactly 3..7 (5 and two more each way), in two batches of the speculative walk."""
    from RetrievalSegLib.worker import protocol as wp
    from RetrievalSegLib.slicer_logic.logic import _segmentation_from_result
    from RetrievalSegLib.worker.client import labels_json, volume_spec

    settings = wp.EngineSettings(device="cpu", image_size=256, random_weights=True)
    bank_path = tmp_path / "bank"
    labels = [LabelInfo(v, name, rgb) for v, (name, rgb) in sorted(LABELS.items())]
    worker_client.run("create_bank", {"settings": settings.to_json(), "bank": str(bank_path),
                                      "labels": labels_json(labels)})
    folder = worker_client.new_job_folder()
    worker_client.run("add_volume", {
        "settings": settings.to_json(), "bank": str(bank_path), "volume": volume_spec(folder, "volume", study[0].image),
        "labelmap": wp.save_array(folder, "labels", study[0].labels.array), "case_id": study[0].case_id,
        "axis": None, "window": [0.0, 1000.0],
    }, folder=folder)
    folder = worker_client.new_job_folder()
    params = {
        "settings": settings.to_json(), "bank": str(bank_path), "volume": volume_spec(folder, "volume", study[1].image),
        "runs": [[0, N_SLICES]], "axis": 2, "k": 1, "window": None, "batch_size": 1,
        "extent_stop": 3, "presence_threshold": 1e9, "start_slice": [5],
    }
    job = worker_client.submit("segment", params, folder, on_result=_segmentation_from_result(study[1].image))
    events = job.wait(600)
    assert job.outcome == "finished", [(e.kind, e.message) for e in events]
    at = [i for i, e in enumerate(events) if e.kind == "status" and e.estimate]
    assert len(at) == 1
    est = events[at[0]].estimate
    assert est["first_batch_slices"] == 4 and est["upper_bound"] is True and est["device"] == "cpu"
    assert est["slices_left"] == 3  # 7, 8, 9: what the upward walk may still reach
    assert "s/slice" in events[at[0]].message
    before = [(e.done, e.total) for e in events[: at[0]] if e.kind == "progress"]
    after = [(e.done, e.total) for e in events[at[0]:] if e.kind == "progress"]
    assert before[-1] == (4, 7) and after and after[0][0] == 5  # between the first and the second batch
    assert after[-1] == (5, 5)  # the stop ended the run: the bar completes
    seg = job.result[0]
    assert sorted(seg.slices) == [3, 4, 5, 6, 7] and seg.beyond_extent == {0, 1, 2, 8, 9}
    assert seg.extent_stop == 3 and seg.start_slices == [5] and seg.start_reason == "given"
    assert not seg.labelmap.array[[0, 1, 2, 8, 9]].any()


def test_extent_estimate_advice_offers_512_px_only_for_a_long_measured_cpu_run():
    from RetrievalSegLib.slicer_logic.logic import LONG_CPU_ESTIMATE_S, estimate_advice
    from RetrievalSegLib.segmentation.results import TimeEstimate

    def est(seconds_per_slice, left, device="cpu", size=1024):
        return TimeEstimate(4, 4 * seconds_per_slice, 4, left, True, device, size, "fp32", 4).to_json()

    long_run = est(6.3, 296)  # the measurement: 6.3 s per slice at 1024 px on a 2-core CPU
    text = estimate_advice(long_run)
    assert text and "31 min" in text and "6.3 s per slice at 1024 px" in text and "512 px" in text
    assert "goes on unless you choose" in text  # never switches by itself
    assert estimate_advice(est(6.3, 10)) is None  # short: nothing to offer
    assert estimate_advice(est(6.3, 296, size=512)) is None  # already 512 px
    assert estimate_advice(est(6.3, 296, device="cuda:0")) is None  # GPU: no CPU advice
    assert estimate_advice(None) is None
    assert estimate_advice(est(LONG_CPU_ESTIMATE_S / 100 + 0.01, 100)) is not None


def test_extent_panel_shows_the_estimate_and_switches_to_512_px_only_when_asked(monkeypatch, slicer_scene):
    """RetrievalSeg.py's Widget (Slicer stand-ins, _slicer_fakes): the Extent stop setting reaches the logic; a long CPU
    estimate is shown with the offer; only the button cancels and segments again at 512 px."""
    from unittest.mock import MagicMock

    from RetrievalSegLib.segmentation.results import TimeEstimate
    from RetrievalSegLib.worker.protocol import JobEvent
    from _slicer_fakes import _module_with_fake_gui

    module, ui, errors = _module_with_fake_gui(monkeypatch, slicer_scene[1])
    widget = module.RetrievalSegWidget()
    widget.setup()
    params, core = widget._parameterNode, widget.logic.core
    assert params.extentStop == 5 == core.extent_stop  # the documented default
    params.extentStop = 0
    monkeypatch.setattr(widget, "_ensureDependencies", lambda: True)
    monkeypatch.setattr(widget, "_engineSettings", lambda: core.settings)
    monkeypatch.setattr(widget, "_ensureWeights", lambda settings, thenSegment=False: True)
    assert widget._prepareEngine() and core.extent_stop == 0

    job = MagicMock(kind="segment", running=True, outcome=None)
    core.job = job
    events: list = []
    monkeypatch.setattr(core, "poll", lambda: list(events))
    cancel = MagicMock()
    monkeypatch.setattr(core, "cancel", cancel)

    def estimate(per_slice: float, left: int) -> dict:
        return TimeEstimate(4, 4 * per_slice, 4, left, True, "cpu", 1024, "fp32", 4).to_json()

    events[:] = [JobEvent("status", "Estimate: short", estimate=estimate(6.3, 20))]
    widget._onPollTimer()
    assert ui.statusLabel.text == "Estimate: short"
    assert ui.tryLowerResolutionButton.calls_to("show") == []
    events[:] = [JobEvent("status", "Estimate: long", estimate=estimate(6.3, 296))]
    widget._onPollTimer()
    assert "about 31 min" in ui.statusLabel.text and "512 px" in ui.statusLabel.text
    assert len(ui.tryLowerResolutionButton.calls_to("show")) == 1
    assert params.imageSize == 1024 and not cancel.called  # offered, never switched by itself

    widget.onTryLowerResolution()  # the user chooses
    cancel.assert_called_once()
    assert params.imageSize == 512
    job.running, job.outcome = False, "cancelled"
    events[:] = [JobEvent("cancelled", "segmentation cancelled")]
    shots: list = []
    monkeypatch.setitem(module.qt.QTimer.statics, "singleShot", lambda msec, slot: shots.append((msec, slot)))
    widget._onPollTimer()
    assert shots == [(0, widget.onApplyButton)]  # segments again
    assert errors == []
