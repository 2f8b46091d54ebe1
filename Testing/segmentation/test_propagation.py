"""Retrieval plus propagation (`propagate` N, issue 27): neighbour slices as SAM 2 memory.

Fidelity: with the same k supports for every slice (`FixedSupports`, retrieval off), one walk with
N = 6 equals the official SAM2VideoPredictor on the video [supports with add_new_mask, then the
walk's slices] propagated from frame k: masks identical, logits within fp32 noise (observed on the
2-core CPU, 256 px, seed 0, k = 2, 9 slices: max |logit diff| see MAX_LOGIT_DIFF). Nine slices make
the rules act: from the 8th slice on, SAM 2 keeps the spatial memories of the last 6 slices only
while object pointers of all previous slices (up to 15) still count; the pointer normaliser is
min(num_frames, 16) - 1 with num_frames the video's length.

An annotated start slice ("correct one slice, re-propagate"): one walk from it equals the
predictor on [supports, annotated slice, walk...] with add_new_mask on frames 0..k, propagated from
frame k; `segment_volume` keeps the annotation as that slice's result and pins frame k to its
memory. Mutants: the annotated frame dropped, at frame k+1, non-conditioning, counted among the
walk's tracked slices, or the start slice predicted anyway. At frame k+1 only its object pointer's
temporal code changes (conditioning frames' spatial memories all have t_pos 0): with random weights
that moves the logits by at most 2.4e-6 (measured), under the fidelity tolerance, so the
`segment_volume` test, which pins the conditioning frame to k, is the one that catches it.

Negative controls (Testing/mutants.txt): dropping the neighbour memories
(`propagation_neighbours_dropped`) or giving them temporal position 0 as conditioning frames
(`propagation_neighbours_t_pos_0`) must make the fidelity test fail.

With retrieval on (supports change per slice), the unit tests pin the frame positions,
neighbour frames and video length the engine hands to SAM 2's
`_prepare_memory_conditioned_features` for a given walk; that function then computes the temporal
codes and pointer distances from them (what the fidelity test checks against the predictor).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from RetrievalSegLib.engine.sam2_memory import Sam2MemoryEngine
from RetrievalSegLib.models.loaders import load_sam2
from RetrievalSegLib.segmentation.propagation import (
    FixedSupports,
    check_propagate,
    memory_window,
    next_steps,
    plan_walks,
    propagate,
)

from _reference import build_reference_predictor, write_pseudo_video
from synthetic_slices import disc_slice

LABELS = (1, 2)
K = 2
N_SLICES = 9
#: fp32 noise of engine vs predictor over a 9-slice walk (observed 3.0e-7 on the 2-core CPU, both
#: directions; labels batched: float order only), with 30x room.
MAX_LOGIT_DIFF = 1e-5


@pytest.fixture(scope="module")
def models():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sam = load_sam2("tiny", random_weights=True, seed=0, device="cpu", image_size=256)
    return Sam2MemoryEngine(sam), build_reference_predictor(sam.model, "tiny", 256)


def _frames(seed: int = 0):
    rng = np.random.default_rng(seed)
    sup = [disc_slice(64, 64, shift=1.5 * i, rng=rng) for i in range(K)]
    walk = [disc_slice(64, 64, shift=1.0 * i - 2.0, rng=rng)[0] for i in range(N_SLICES)]
    return [img for img, _ in sup], [m for _, m in sup], walk


@torch.inference_mode()
def _reference(predictor, video_dir, support_masks) -> dict[int, np.ndarray]:
    """Per frame >= k: [L, H, W] logits of the official predictor propagating from frame k."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = predictor.init_state(str(video_dir))
        for i, masks in enumerate(support_masks):
            for lab in LABELS:
                predictor.add_new_mask(state, frame_idx=i, obj_id=lab, mask=masks[lab])
        out = {}
        for frame_idx, obj_ids, masks in predictor.propagate_in_video(state, start_frame_idx=K):
            assert list(obj_ids) == list(LABELS)
            out[frame_idx] = masks[:, 0].float().cpu().numpy()
    return out


def _engine_walk(engine, decoded, support_masks, n, direction):
    """The engine's walk over the decoded walk frames (frames K..), as `segment_volume` runs it."""
    mems = [engine.encode_support(decoded[i], support_masks[i], LABELS) for i in range(K)]
    fixed = FixedSupports(mems[::-1], LABELS)  # most similar first: 'nearest' puts it at frame K-1
    walk = decoded[K:]
    n_sl = len(walk)
    # slice i of the volume <- walk position: up = i, down = n_sl - 1 - i
    images = walk if direction == "up" else walk[::-1]
    start = 0 if direction == "up" else n_sl - 1
    got = {}

    def record(i, res, neighbours):
        got[i] = (res, neighbours)

    propagate(engine, images, 0, [[] for _ in images], fixed, [start], (0, n_sl), n, K, 1, "fp32", "nearest",
              0, lambda r: True, record, lambda: False)
    pos = (lambda i: i) if direction == "up" else (lambda i: n_sl - 1 - i)
    return {K + pos(i): v for i, v in got.items()}


def _assert_equals_the_predictor(ours: dict, ref: dict) -> float:
    """Our result at each frame equals the official predictor's (`ref[frame]`): masks identical,
    logits within MAX_LOGIT_DIFF; non-vacuous on the last frame (objects present, masks neither
    empty nor full). Returns the largest |logit diff|."""
    worst = 0.0
    for f, res in ours.items():
        diff = float(np.abs(res.logits - ref[f]).max())
        worst = max(worst, diff)
        assert np.array_equal(res.logits > 0, ref[f] > 0), f"frame {f}: masks differ (max |diff| {diff:.3g})"
        assert diff <= MAX_LOGIT_DIFF, f"frame {f}: max |logit diff| {diff:.3g} > {MAX_LOGIT_DIFF}"
    last = K + N_SLICES - 1
    assert (ours[last].object_score > 0).all()
    for li in range(len(LABELS)):
        fg = (ref[last][li] > 0).mean()
        assert 0.001 < fg < 0.999
    return worst


@pytest.mark.parametrize("direction", ["up", pytest.param("down", marks=pytest.mark.slow)])
def test_propagate_6_equals_the_official_predictor(tmp_path, models, direction):
    engine, predictor = models
    sup_imgs, sup_masks, walk = _frames()
    decoded = write_pseudo_video(tmp_path / "video", sup_imgs + walk)
    ref = _reference(predictor, tmp_path / "video", sup_masks)
    ours = _engine_walk(engine, decoded, sup_masks, 6, direction)
    assert sorted(ours) == sorted(ref) == list(range(K, K + N_SLICES))
    for f in sorted(ref):
        assert len(ours[f][1]) == min(f - K, 15)
    worst = _assert_equals_the_predictor({f: ours[f][0] for f in sorted(ref)}, ref)
    print(f"propagate 6 ({direction}) vs predictor: max |logit diff| {worst:.3g}")


def test_propagate_and_window_are_checked():
    assert [memory_window(n) for n in range(7)] == [0, 1, 2, 3, 4, 5, 15]
    for bad in (-1, 7, 2.0, True, "3"):
        with pytest.raises(ValueError, match="propagate must be an integer in 0..6"):
            check_propagate(bad)


def test_walk_positions_neighbours_and_video_length():
    """Two start slices in 0..10: lock-step walks, each slice once, its previous N slices as memory."""
    walks = plan_walks([2, 7], (0, 10), k=3)
    # num_frames: k + the longer walk from the start to the range edge (start included)
    assert [(w.start, w.step, w.num_frames) for w in walks] == [(2, 1, 3 + 8), (2, -1, 3 + 8), (7, 1, 3 + 8), (7, -1, 3 + 8)]
    done: set[int] = set()
    seen = []
    for j in range(8):
        steps = next_steps(walks, j, (0, 10), done, window=2)
        for s in steps:
            seen.append((j, s.slice, s.neighbours))
            done.add(s.slice)
            for w in s.walks:
                w.slices.append(s.slice)
        if not steps:
            break
    assert seen == [
        (0, 2, []), (0, 7, []),
        (1, 1, [2]), (1, 3, [2]), (1, 6, [7]), (1, 8, [7]),
        (2, 0, [2, 1]), (2, 4, [2, 3]), (2, 5, [7, 6]), (2, 9, [7, 8]),
    ]  # the walks from 2 up and 7 down meet between 4 and 5; nothing is segmented twice


class _Spy:
    """Records what the engine hands to SAM 2's `_prepare_memory_conditioned_features` per query."""

    def __init__(self, monkeypatch, model):
        self.calls = []
        original = model._prepare_memory_conditioned_features

        def spy(frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds, feat_sizes,
                output_dict, num_frames, track_in_reverse=False):
            if not is_init_cond_frame:
                self.calls.append((frame_idx, num_frames, sorted(output_dict["cond_frame_outputs"]),
                                   sorted(output_dict["non_cond_frame_outputs"]), track_in_reverse))
            return original(frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds,
                            feat_sizes, output_dict, num_frames, track_in_reverse)

        monkeypatch.setattr(model, "_prepare_memory_conditioned_features", spy)


def test_segment_volume_with_retrieval_pins_frames_for_the_walk(monkeypatch, tmp_path):
    """segment_volume(propagate=2): per slice, supports at frames 0..k-1 (t_pos 0), the walk's last
    2 slices at frames k+j-2, k+j-1 (non-conditioning: temporal codes from their positions), the
    slice at k+j; the sidecar lists the neighbour slices; provenance records N and the start."""
    from RetrievalSegLib.bank.support_bank import LabelInfo, SupportBank
    from RetrievalSegLib.data.synthetic import LABELS as SYN_LABELS, make_synthetic_study
    from RetrievalSegLib.engine.pipeline import RetrievalEngine
    from RetrievalSegLib.segmentation.provenance import segmentation_provenance, slice_records
    from RetrievalSegLib.segmentation.segment import segment_volume

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = RetrievalEngine.load(random_weights=True, image_size=256, device="cpu", dinov2_input_size=56)
    study = make_synthetic_study(2, shape=(6, 40, 36), spacing=(1.2, 1.2, 5.0))
    bank = SupportBank.create(tmp_path / "bank", [LabelInfo(v, n, c) for v, (n, c) in SYN_LABELS.items()],
                              engine.embedder.identity)
    bank.add_volume(study[0].image, study[0].labels, study[0].case_id, engine.embedder)
    spy = _Spy(monkeypatch, engine.sam.model)
    k = 2
    seg = segment_volume(study[1].image, bank, engine, k=k, propagate=2, start_slice=1, batch_size=1)
    assert seg.propagate == 2 and seg.start_slices == [1] and sorted(seg.slices) == [0, 1, 2, 3, 4, 5]
    # walk order: j=0 slice 1; j=1 slices 0 (down) and 2 (up); j=2: 3; j=3: 4; j=4: 5.
    # num_frames: k + 5 (the up walk 1..5)
    assert spy.calls == [
        (k + 0, k + 5, [0, 1], [], False),
        (k + 1, k + 5, [0, 1], [k], False),
        (k + 1, k + 5, [0, 1], [k], False),
        (k + 2, k + 5, [0, 1], [k, k + 1], False),
        (k + 3, k + 5, [0, 1], [k + 1, k + 2], False),
        (k + 4, k + 5, [0, 1], [k + 2, k + 3], False),
    ]
    assert {i: seg.slices[i].neighbours for i in seg.slices} == {
        1: [], 0: [1], 2: [1], 3: [1, 2], 4: [2, 3], 5: [3, 4]}
    # supports still retrieved per slice
    assert len({tuple(e for e, _ in s.retrieved) for s in seg.slices.values()}) > 1
    records = slice_records(seg)
    assert [r["neighbours"] for r in records] == [[1], [], [1], [1, 2], [2, 3], [3, 4]]
    prov = segmentation_provenance(seg, engine, bank, k=k)
    assert prov["propagate"] == 2 and prov["propagation_start_slices"] == [1]
    off = segment_volume(study[1].image, bank, engine, k=k, slice_range=(0, 1))
    assert off.slices[0].neighbours is None and "neighbours" not in slice_records(off)[0]
    assert segmentation_provenance(off, engine, bank, k=k)["propagate"] == 0


# ---------------------------------------------------------------- an annotated start slice (issue 27)


def _frames_annotated(seed: int = 1):
    """K supports, then a walk whose first slice the user annotated (its own disc masks)."""
    rng = np.random.default_rng(seed)
    sup = [disc_slice(64, 64, shift=1.5 * i, rng=rng) for i in range(K)]
    walk = [disc_slice(64, 64, shift=1.0 * i - 2.0, rng=rng) for i in range(N_SLICES)]
    return [img for img, _ in sup], [m for _, m in sup], [img for img, _ in walk], walk[0][1]


def _engine_walk_annotated(engine, decoded, support_masks, annotation, n, direction):
    """The engine's walk from the annotated slice (decoded frame K) over frames K..: as
    `segment_volume` runs it, with the annotation's memory as the start slice's conditioning frame."""
    mems = [engine.encode_support(decoded[i], support_masks[i], LABELS) for i in range(K)]
    ann = engine.encode_support(decoded[K], annotation, LABELS)
    fixed = FixedSupports(mems[::-1], LABELS)
    walk = decoded[K:]
    n_sl = len(walk)
    images = walk if direction == "up" else walk[::-1]
    start = 0 if direction == "up" else n_sl - 1
    got = {}

    def record(i, res, neighbours, annotation=None):
        got[i] = (res, neighbours, annotation)

    propagate(engine, images, 0, [[] for _ in images], fixed, [start], (0, n_sl), n, K, 1, "fp32", "nearest",
              0, lambda r: True, record, lambda: False, annotated={start: ann})
    pos = (lambda i: i) if direction == "up" else (lambda i: n_sl - 1 - i)
    return {K + pos(i): v for i, v in got.items()}, start


@torch.inference_mode()
def _reference_annotated(predictor, video_dir, support_masks, annotation) -> dict[int, np.ndarray]:
    """The official predictor: add_new_mask on frames 0..K (K supports, then the annotated slice),
    propagate_in_video from frame K."""
    return _reference(predictor, video_dir, list(support_masks) + [annotation])


@pytest.mark.parametrize("direction", ["up", pytest.param("down", marks=pytest.mark.slow)])
def test_walk_from_an_annotated_slice_equals_the_official_predictor(tmp_path, models, direction):
    """Video [K supports, annotated slice, walk...]: the annotated slice is conditioning frame K
    (add_new_mask), the walk's slices frames K+1..; the engine's walk from the annotated start slice
    equals propagate_in_video(start_frame_idx=K) on every walk frame, and the start slice itself
    is not queried (its annotation is its result)."""
    engine, predictor = models
    sup_imgs, sup_masks, walk, annotation = _frames_annotated()
    decoded = write_pseudo_video(tmp_path / "video", sup_imgs + walk)
    ref = _reference_annotated(predictor, tmp_path / "video", sup_masks, annotation)
    ours, start = _engine_walk_annotated(engine, decoded, sup_masks, annotation, 6, direction)
    assert sorted(ours) == sorted(ref) == list(range(K, K + N_SLICES))
    res, neighbours, ann = ours[K]
    assert res is None and neighbours == [] and ann == start  # the annotation, not a prediction
    frames = range(K + 1, K + N_SLICES)
    for f in frames:
        _, neighbours, ann = ours[f]
        assert ann == start
        # the walk's tracked slices after the annotated one: frames K+1 .. f-1, at most 15
        assert len(neighbours) == min(f - K - 1, 15)
    worst = _assert_equals_the_predictor({f: ours[f][0] for f in frames}, ref)
    print(f"annotated start, propagate 6 ({direction}) vs predictor: max |logit diff| {worst:.3g}")


class _CondSpy:
    """Records, per query, the conditioning frames and tracked frames handed to SAM 2, and the object
    pointer of conditioning frame `k` (to check it is the annotation's)."""

    def __init__(self, monkeypatch, model, k):
        self.calls, self.frame_k_ptrs = [], []
        original = model._prepare_memory_conditioned_features

        def spy(frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds, feat_sizes,
                output_dict, num_frames, track_in_reverse=False):
            if not is_init_cond_frame:
                cond = output_dict["cond_frame_outputs"]
                self.calls.append((frame_idx, num_frames, sorted(cond), sorted(output_dict["non_cond_frame_outputs"])))
                self.frame_k_ptrs.append(cond[k]["obj_ptr"].clone() if k in cond else None)
            return original(frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds,
                            feat_sizes, output_dict, num_frames, track_in_reverse)

        monkeypatch.setattr(model, "_prepare_memory_conditioned_features", spy)


def test_segment_volume_keeps_an_annotated_start_slice_and_conditions_its_walks_on_it(monkeypatch, tmp_path):
    """'Correct one slice, re-propagate': a slice of this volume in the bank under its case id is
    the start slice; it is not queried (its annotation is its label map slice, the sidecar says
    source "annotation") and it is conditioning frame k of every other slice (frames 0..k-1 the
    retrieved supports, k the annotation, the walk's tracked slices from k+1)."""
    from RetrievalSegLib.bank.support_bank import LabelInfo, SupportBank
    from RetrievalSegLib.data.synthetic import LABELS as SYN_LABELS, make_synthetic_study
    from RetrievalSegLib.data.volume import slice_view
    from RetrievalSegLib.engine.pipeline import RetrievalEngine
    from RetrievalSegLib.segmentation.provenance import segmentation_provenance, slice_records
    from RetrievalSegLib.segmentation.segment import segment_volume
    from RetrievalSegLib.segmentation.slices import slice_to_uint8, window_for_volume

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = RetrievalEngine.load(random_weights=True, image_size=256, device="cpu", dinov2_input_size=56)
    study = make_synthetic_study(2, shape=(6, 40, 36), spacing=(1.2, 1.2, 5.0))
    bank = SupportBank.create(tmp_path / "bank", [LabelInfo(v, n, c) for v, (n, c) in SYN_LABELS.items()],
                              engine.embedder.identity)
    bank.add_volume(study[0].image, study[0].labels, study[0].case_id, engine.embedder)
    vol, lab, case = study[1].image, study[1].labels, study[1].case_id
    ax, s = 2, 2  # through-plane axis k; the user corrects slice 2
    drawn = slice_view(lab.array, ax, s)
    masks = {v: drawn == v for v in SYN_LABELS}
    assert all(m.any() for m in masks.values())
    image = slice_to_uint8(vol, ax, s, window_for_volume(vol))
    entry = bank.add_slice(image, masks, case, "k", s, (1.2, 1.2), engine.embedder)
    spy = _CondSpy(monkeypatch, engine.sam.model, k := 2)
    seg = segment_volume(vol, bank, engine, k=k, propagate=2, case_id=case, batch_size=1)
    assert seg.start_slices == [s] and seg.start_reason == "annotated" and sorted(seg.slices) == [0, 1, 2, 3, 4, 5]
    # the annotated slice: its annotation, exactly, not a prediction (5 queries for 6 slices)
    assert np.array_equal(slice_view(seg.labelmap.array, ax, s), np.where(np.isin(drawn, list(SYN_LABELS)), drawn, 0))
    r = seg.slices[s]
    assert (r.source, r.annotation_entry, r.neighbours, r.retrieved) == ("annotation", entry.id, [], [])
    assert all(r.present.values()) and r.confidence == 1.0
    # the time estimate is measured on the first step that ran SAM 2 (slices 1 and 3), not on the
    # annotation, which took no time
    assert seg.estimate.first_batch_slices == 2 and seg.estimate.slices_left == 3
    # walks from 2: j=1 slices 1 and 3 (frame k+1), j=2 slices 0 and 4, j=3 slice 5; num_frames k + 4
    assert spy.calls == [
        (k + 1, k + 4, [0, 1, k], []),
        (k + 1, k + 4, [0, 1, k], []),
        (k + 2, k + 4, [0, 1, k], [k + 1]),
        (k + 2, k + 4, [0, 1, k], [k + 1]),
        (k + 3, k + 4, [0, 1, k], [k + 1, k + 2]),
    ]
    # conditioning frame k is the annotation's own support memory (what add_new_mask on it gives)
    mem = engine.sam.encode_support(image, masks, [lab.value for lab in seg.labels])
    for ptr in spy.frame_k_ptrs:
        assert torch.allclose(ptr, mem.obj_ptr, atol=1e-5)
    assert {i: seg.slices[i].neighbours for i in seg.slices} == {2: [], 1: [], 3: [], 0: [1], 4: [3], 5: [3, 4]}
    assert {i: seg.slices[i].annotated_slice for i in seg.slices} == {2: None, 0: s, 1: s, 3: s, 4: s, 5: s}
    records = slice_records(seg)
    assert records[s]["source"] == "annotation" and records[s]["annotation_entry"] == entry.id
    assert [rec.get("annotated_slice") for rec in records] == [s, s, None, s, s, s]
    prov = segmentation_provenance(seg, engine, bank, k=k)
    assert prov["propagation_start_slices"] == [s] and prov["propagation_annotated_slices"] == [s]
    # case policy exclude (`rseg evaluate`): the volume's own entries are never used, its
    # annotation included: the slice is a start slice and predicted, with no annotation frame
    spy.calls.clear()
    excl = segment_volume(vol, bank, engine, k=k, propagate=2, case_id=case, case_policy="exclude",
                          slice_range=(1, 4), batch_size=1)
    assert excl.start_slices == [s] and excl.slices[s].source is None
    assert len(spy.calls) == 3 and all(c[2] == [0, 1] for c in spy.calls)
    assert "source" not in slice_records(excl)[s] and "annotated_slice" not in slice_records(excl)[s + 1]
    assert segmentation_provenance(excl, engine, bank, k=k)["propagation_annotated_slices"] == []


def test_walk_from_an_annotated_start_lists_only_its_tracked_slices_as_neighbours():
    """Start 5 annotated, start 1 not, in 0..8, window 2: the annotated slice is never a neighbour
    (it is a conditioning frame), so its walks' slices have one neighbour fewer at each step."""
    walks = plan_walks([1, 5], (0, 8), k=2)
    for w in walks:
        w.annotation = object() if w.start == 5 else None
    done: set[int] = set()
    seen = []
    for j in range(8):
        steps = next_steps(walks, j, (0, 8), done, window=2)
        if not steps:
            break
        for s in steps:
            seen.append((j, s.slice, s.neighbours, s.annotation))
            done.add(s.slice)
            for w in s.walks:
                w.slices.append(s.slice)
    assert seen == [
        (0, 1, [], None), (0, 5, [], 5),
        (1, 0, [1], None), (1, 2, [1], None), (1, 4, [], 5), (1, 6, [], 5),
        (2, 3, [1, 2], None), (2, 7, [6], 5),
    ]  # slice 3: the walk from 1 up gets there first (it is listed first); the walk from 5 down ends


def test_query_batch_checks_the_annotated_frame(models):
    engine, _ = models
    rng = np.random.default_rng(3)
    img, masks = disc_slice(64, 64, shift=0.0, rng=rng)
    mem = engine.encode_support(img, masks, LABELS)
    feats = engine.encode_batch([img])
    with pytest.raises(ValueError, match="annotations must give one memory for each of the 1 slices"):
        engine.query_batch(feats, [mem], [[0]], LABELS, annotations=[mem, mem])
    with pytest.raises(ValueError, match="after 1 supports and an annotated slice .* not a valid pseudo-video"):
        engine.query_batch(feats, [mem], [[0]], LABELS, annotations=[mem], frame_idx=1)
