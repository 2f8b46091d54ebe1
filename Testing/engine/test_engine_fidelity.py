"""The engine reproduces the official SAM2VideoPredictor where each fidelity rule acts, not only at the output.

What is compared (``_fidelity.compare_paths``; forward pre-hooks on both paths, same frame):

* ``support.memory_encoder.{pix_feat, masks}``: what the memory encoder receives for each
  (support, label): pixel features and the mask as encoded (low-res prediction re-upsampled to
  image_size, binarised);
* ``memory_attention.{curr, curr_pos, memory[spatial], memory_pos[spatial], memory[obj_ptr],
  memory_pos[obj_ptr], num_obj_ptr_tokens}``: the memory tokens in the order attention receives
  them: spatial memories (bf16-stored, + temporal encoding of position 0) then object-pointer
  tokens (+ encoding of the signed distance k - i, normalised by min(num_frames, 16) - 1);
* ``support.decoder.*`` and ``query.decoder.*``: every input of the mask decoder;
* ``output.max_abs_logit_diff`` / ``output.pixel_disagreement``: the final logits (kept).

Tolerances. Intermediates: max |engine - predictor| / max |predictor| <= 1e-5 per tensor; counts,
shapes and flags exactly. Observed on the 2-core CPU, fp32 (256 px seeds 0, 2, 4 x k 1/3/8, non-square,
1024 px, and the slow 512/1024 px sweep): 0 (bit-identical) for the memory-encoder inputs, the
spatial memories and every positional encoding; <= 6.6e-7 for the object pointers, the query's
memory-conditioned features and the decoder's dense prompt (batching the labels reorders float
sums). 1e-5 leaves 15x for other BLAS kernels. Output: max |logit diff| <= 1e-3 (observed
<= 2.7e-7; random-weight logits span only about +/-0.2, so this bound is as large as several rules'
effects: it is kept as an end-to-end check, the intermediate comparison is what bites) and >= 99.9%
pixel agreement (observed 100%).

Negative controls (``test_fidelity_negative_control``): each rule of engine.py / ARCHITECTURE.md is
broken on purpose inside the test (monkeypatch of the engine's model instance or an explicit
parameter), and the same ``compare_paths`` + ``fidelity_failures`` must fail on the tensor where
the rule acts, by >= 100x its tolerance. Effect sizes measured at 256 px, seed 0 (relative error of
the named tensor; max |logit diff| at the output, whose tolerance is 1e-3):

  control (rule broken)                      tensor that fails             error     max |logit diff|
  obj_ptr_distance_not_k_minus_i (i+1)       memory_pos[obj_ptr]           0.13      1.1e-6
  query_frame_index_k_plus_1                 memory_pos[obj_ptr]           0.034     3.1e-6
  query_frame_index_0 (later pointers cut)   num_obj_ptr_tokens 4 vs 12    mismatch  7.6e-4
  frame_count_k_plus_2 (pointer normaliser)  memory_pos[obj_ptr]           0.047     5.5e-6
  cond_memory_temporal_position_not_0 (k=2)  memory_pos[spatial]           0.069     1.2e-5
  memory_mask_not_binarised (sigmoid)        memory_encoder.masks          1.0       7.5e-5
  memory_mask_not_reupsampled (prompt mask)  memory_encoder.masks          2.0       8.5e-5
  memory_stored_float32 (no bf16 rounding)   memory[spatial]               2.9e-3    3.3e-6
  label_masks_swapped_in_supports            memory_encoder.masks          2.0       1.9e-3
  label_memories_swapped_at_query            memory[spatial] / [obj_ptr]   0.55/1.1  1.9e-3

Every control but the two label swaps passes the output comparison (max |logit diff| <= 1e-3 and
>= 99.9% pixel agreement: at most 0.02% of pixels flip), and the test asserts so (``output_blind``):
the output alone would have missed them. The label swaps fail it only by 1.9x (and still agree on
99.96% of pixels). The smallest intermediate effect, bf16 storage at 2.9e-3, is
290x the 1e-5 tolerance and ~4000x the observed noise.

A control whose mutation no longer reaches the code (the engine stopped calling the patched
function) fails with "mutant not applied", so it is replaced rather than silently passing.
Non-vacuity: every case asserts the objects are predicted present, the reference masks are
neither empty nor full, and the hooks saw k x labels support rows and one query row per label.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

from RetrievalSegLib.engine.sam2_memory import Sam2MemoryEngine, SupportMemory
from RetrievalSegLib.models.loaders import load_sam2

from _fidelity import (
    canonical,
    compare_paths,
    fidelity_failures,
    recording,
    tolerance,
)
from _reference import build_reference_predictor, reference_query_logits, write_pseudo_video
from synthetic_slices import disc_slice

LABELS = (1, 2)

_models: dict = {}
_references: dict = {}


def _engine_and_reference(image_size: int, seed: int, backbone: str = "tiny"):
    key = (image_size, seed, backbone)
    if key not in _models:
        with pytest.warns(UserWarning, match="RANDOM weights"):
            size = None if backbone == "medsam2" else image_size  # MedSAM2: the entry's native size
            sam = load_sam2(backbone, random_weights=True, seed=seed, device="cpu", image_size=size)
        assert sam.image_size == image_size
        _models.clear()  # keep one pair alive: 2 cores, 24 GiB
        _models[key] = (Sam2MemoryEngine(sam), build_reference_predictor(sam.model, backbone, image_size))
    return _models[key]


def _slices(seed: int, k: int, hw):
    rng = np.random.default_rng(seed)
    slices = [disc_slice(*hw, shift=2.0 * i, rng=rng) for i in range(k + 1)]
    support_masks = [dict(m) for _, m in slices[:k]]
    if k > 1:  # one support where label 2 is not drawn: an empty mask for that object
        support_masks[0][2] = np.zeros(hw, dtype=bool)
    return [img for img, _ in slices], support_masks


@dataclass
class Case:
    errors: dict
    engine_inputs: dict
    reference_inputs: dict
    object_score: np.ndarray
    reference_logits: np.ndarray


def _run_case(
    tmp_path,
    image_size: int,
    seed: int,
    k: int,
    hw=(96, 80),
    engine: Sam2MemoryEngine | None = None,
    engine_masks: Callable[[dict], dict] = lambda m: m,
    backbone: str = "tiny",
    support_order: str = "nearest",
) -> Case:
    """Engine and predictor on the pseudo-video [support_1..support_k, query]; per-tensor errors.

    The engine gets the supports most similar first, as retrieval gives them, and `support_order`:
    for 'nearest' the most similar is the predictor's frame k-1 (so the engine's list is the
    frames reversed), for 'farthest' frame 0 (the frames in order). The predictor's video is the
    same for both; the engine must place each support on its frame.

    `engine` and `engine_masks` exist for the negative controls (another engine configuration, or
    the masks the engine is given); the predictor always gets the true masks. The predictor's side
    is computed once per case and reused.
    """
    images, support_masks = _slices(seed, k, hw)
    decoded = write_pseudo_video(tmp_path / "video", images)
    base_engine, predictor = _engine_and_reference(image_size, seed, backbone)
    engine = base_engine if engine is None else engine
    key = (image_size, seed, k, tuple(hw), backbone)
    if key not in _references:
        with recording(predictor) as rec:
            ref_logits = reference_query_logits(predictor, tmp_path / "video", support_masks, LABELS)
        _references.clear()
        _references[key] = (canonical(rec, "reference", k, len(LABELS)), ref_logits)
    ref_inputs, ref_logits = _references[key]
    with recording(engine.model) as rec:
        mems = [engine.encode_support(decoded[i], engine_masks(support_masks[i]), LABELS) for i in range(k)]
        ranked = mems[::-1] if support_order == "nearest" else mems  # most similar first
        ours = engine.query(decoded[k], ranked, LABELS, support_order=support_order)
    eng_inputs = canonical(rec, "engine", k, len(LABELS))
    errors = compare_paths(eng_inputs, ref_inputs, ours.logits, ref_logits)
    return Case(errors, eng_inputs, ref_inputs, ours.object_score, ref_logits)


#: "Object present" must hold with a margin, not by a hair: SAM 2 gates the memory and pointer on
#: object score > 0, so a case at +0.005 (seeds 1, 3 and 5 of the random weights give 0.005-0.02 on
#: these slices; seeds 0, 2 and 4 give 0.10-0.17 at 256, 512 and 1024 px) says little about the
#: present-object path. 0.05 is far above the engine-vs-predictor noise (< 1e-6).
OBJECT_SCORE_MARGIN = 0.05


def _assert_not_vacuous(case: Case, k: int) -> None:
    ref = case.reference_inputs
    n = len(LABELS)
    assert ref["#support.memory_encoder_rows"] == k * n, "hooks saw no support memory encodings"
    assert ref["#support.decoder_rows"] == k * n
    assert ref["#query.memory_attention_rows"] == n and ref["#query.decoder_rows"] == n
    assert ref["memory_attention.num_obj_ptr_tokens"] == (4 * k,)  # 256-d pointer = 4 tokens of 64
    assert (case.object_score > OBJECT_SCORE_MARGIN).all(), (
        f"object scores {case.object_score} not clearly present (> {OBJECT_SCORE_MARGIN}): vacuous case"
    )
    for li in range(n):
        fg = (case.reference_logits[li] > 0).mean()
        assert 0.001 < fg < 0.999, f"reference mask of label {LABELS[li]} is empty or full ({fg:.4f})"


def _assert_same(case: Case, k: int) -> None:
    _assert_not_vacuous(case, k)
    bad = fidelity_failures(case.errors)
    report = ", ".join(f"{key}: {v:.3g} > {tolerance(key):.0e}" for key, v in sorted(bad.items()))
    assert not bad, f"engine differs from the official predictor at: {report}"


# Every k and every seed in the default suite (one diagonal: k=1/seed 4, k=3/seed 0, k=8/seed 2);
# the other six pairs of the 3 x 3 grid are slow (`make test-all`), to keep `make test` short.
_DEFAULT_256 = {(1, 4), (3, 0), (8, 2)}


@pytest.mark.parametrize("k,seed", [
    pytest.param(k, seed, id=f"{k}-{seed}", marks=() if (k, seed) in _DEFAULT_256 else pytest.mark.slow)
    for k in (1, 3, 8) for seed in (0, 2, 4)
])
def test_fidelity_matches_official_predictor_256(tmp_path, seed, k):
    _assert_same(_run_case(tmp_path, 256, seed, k), k)


@pytest.mark.parametrize("support_order", ["nearest", "farthest"])
def test_fidelity_both_support_orders_match_official_predictor(tmp_path, support_order):
    """Each order, fed to the predictor as the frame order it stands for, matches it exactly."""
    _assert_same(_run_case(tmp_path, 256, 0, 3, support_order=support_order), 3)


def test_fidelity_matches_official_predictor_non_square(tmp_path):
    _assert_same(_run_case(tmp_path, 256, 4, 3, hw=(72, 120)), 3)


def test_fidelity_matches_official_predictor_1024(tmp_path):
    _assert_same(_run_case(tmp_path, 1024, 2, 1), 1)


@pytest.mark.slow
@pytest.mark.parametrize("image_size,seed,k", [(512, 0, 8), (512, 4, 1), (512, 2, 3), (1024, 0, 3), (1024, 4, 8)])
def test_fidelity_matches_official_predictor_full_sweep(tmp_path, image_size, seed, k):
    _assert_same(_run_case(tmp_path, image_size, seed, k), k)


# ----------------------------------------------------------------------------- MedSAM2 backbone
def _assert_medsam2_published_configuration(engine: Sam2MemoryEngine, predictor) -> None:
    """The registry entry built exactly MedSAM2's published configuration, as the predictor did."""
    from _reference import MEDSAM2_PUBLISHED_DIFF

    assert engine.sam2.size == "medsam2" and engine.image_size == 512
    feat = MEDSAM2_PUBLISHED_DIFF["model.memory_attention.layer.self_attention.feat_sizes"]
    for model in (engine.model, predictor):
        assert model.image_size == MEDSAM2_PUBLISHED_DIFF["model.image_size"]
        assert model.sam_image_embedding_size == 32 and model.sam_prompt_encoder.image_embedding_size == (32, 32)
        for layer in model.memory_attention.layers:
            # RoPE tables are built from feat_sizes (sam2 rebuilds a wrong one silently at run time,
            # so only the built table shows whether the config said [32, 32])
            assert layer.self_attn.freqs_cis.shape[0] == feat[0] * feat[1]
            assert layer.cross_attn_image.freqs_cis.shape[0] == feat[0] * feat[1]
    assert engine.model.state_dict().keys() == predictor.state_dict().keys()


@pytest.mark.parametrize("seed,k", [pytest.param(4, 1), pytest.param(0, 8, marks=pytest.mark.slow)])
def test_fidelity_medsam2_matches_official_predictor_on_its_published_config(tmp_path, seed, k):
    """MedSAM2 entry (random weights in its architecture) vs the official predictor built from
    MedSAM2's published sam2.1_hiera_t512.yaml, at its native 512 px."""
    # before running: sam2 replaces a RoPE table of the wrong size during the first forward
    _assert_medsam2_published_configuration(*_engine_and_reference(512, seed, "medsam2"))
    _assert_same(_run_case(tmp_path, 512, seed, k, backbone="medsam2"), k)


# ----------------------------------------------------------------------------- negative controls
class Applied:
    """How many times a mutant changed what the engine did (0: the mutant no longer applies)."""

    def __init__(self) -> None:
        self.applied = 0


class Mutant(Applied):
    """Wraps a method of an object (monkeypatched for one test) and counts the calls it changed."""

    def __init__(self, monkeypatch, obj, name: str, change: Callable[[dict], bool]) -> None:
        super().__init__()
        original = getattr(obj, name)
        sig = inspect.signature(original)

        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            if change(bound.arguments):
                self.applied += 1
            return original(*bound.args, **bound.kwargs)

        monkeypatch.setattr(obj, name, wrapper)


def _query_side(mutate: Callable[[dict], None]) -> Callable[[dict], bool]:
    """A change of `_prepare_memory_conditioned_features`' arguments for the query only."""

    def change(a: dict) -> bool:
        if a["is_init_cond_frame"]:
            return False
        mutate(a)
        return True

    return change


def _renumber_pointer_distances(a: dict) -> None:
    # support i recorded at frame k-1-i (insertion order kept): pointer distance i+1 instead of k-i
    cond = a["output_dict"]["cond_frame_outputs"]
    n = len(cond)
    a["output_dict"] = dict(a["output_dict"], cond_frame_outputs={n - 1 - i: v for i, v in enumerate(cond.values())})


def _last_support_not_conditioning(a: dict) -> None:
    # the last support as an ordinary previous frame: temporal position != 0 for its memory
    cond = dict(a["output_dict"]["cond_frame_outputs"])
    last = max(cond)
    moved = {last: cond.pop(last)}
    a["output_dict"] = {"cond_frame_outputs": cond, "non_cond_frame_outputs": moved}


def _shift_query(a: dict) -> None:
    a["frame_idx"] += 1
    a["num_frames"] += 1


def _more_frames(a: dict) -> None:
    a["num_frames"] += 1


def _query_at_zero(a: dict) -> None:
    a["frame_idx"] = 0


def _not_binarised(a: dict) -> bool:
    a["is_mask_from_pts"] = False
    return True


def _reversed_select(self, labels):
    rows = torch.arange(len(self.labels) - 1, -1, -1, device=self.obj_ptr.device)
    return SupportMemory(
        tuple(labels), self.maskmem_features.index_select(0, rows), self.obj_ptr.index_select(0, rows), self.present[::-1]
    )


def _swap_labels(masks: dict) -> dict:
    return {1: masks[2], 2: masks[1]}


def _control(name: str, monkeypatch, engine: Sam2MemoryEngine):
    """Break one rule on `engine`; returns (engine to run, mask transform, list of applied mutants)."""
    model = engine.model
    masks = lambda m: m  # noqa: E731
    mutants: list[Applied] = []
    prep = "_prepare_memory_conditioned_features"
    if name == "obj_ptr_distance_not_k_minus_i":
        mutants.append(Mutant(monkeypatch, model, prep, _query_side(_renumber_pointer_distances)))
    elif name == "cond_memory_temporal_position_not_0":
        mutants.append(Mutant(monkeypatch, model, prep, _query_side(_last_support_not_conditioning)))
    elif name == "query_frame_index_k_plus_1":
        mutants.append(Mutant(monkeypatch, model, prep, _query_side(_shift_query)))
    elif name == "query_frame_index_0":
        mutants.append(Mutant(monkeypatch, model, prep, _query_side(_query_at_zero)))
    elif name == "frame_count_k_plus_2":
        mutants.append(Mutant(monkeypatch, model, prep, _query_side(_more_frames)))
    elif name == "memory_mask_not_binarised":
        mutants.append(Mutant(monkeypatch, model, "_encode_new_memory", _not_binarised))
    elif name == "memory_mask_not_reupsampled":
        # encode the prompt mask itself (as +/-10 logits) instead of the re-upsampled prediction
        prompt: list[torch.Tensor] = []

        def stash(a: dict) -> bool:
            prompt.append(a["mask_inputs"])
            return False

        def use_prompt(a: dict) -> bool:
            a["pred_masks_high_res"] = prompt.pop(0).float() * 20.0 - 10.0
            return True

        Mutant(monkeypatch, model, "_use_mask_as_output", stash)
        mutants.append(Mutant(monkeypatch, model, "_encode_new_memory", use_prompt))
    elif name == "memory_stored_float32":
        engine = Sam2MemoryEngine(engine.sam2, memory_dtype=torch.float32)
        mutants = []  # an explicit parameter: nothing to count
    elif name == "label_masks_swapped_in_supports":
        masks = _swap_labels
    elif name == "label_memories_swapped_at_query":
        hit = Applied()

        def select(self, labels):
            hit.applied += 1
            return _reversed_select(self, labels)

        monkeypatch.setattr(SupportMemory, "select", select)
        mutants.append(hit)
    else:
        raise ValueError(name)
    return engine, masks, mutants


# (control, k, tensors where the rule acts and the comparison must fail, output comparison blind to it)
CONTROLS = [
    ("obj_ptr_distance_not_k_minus_i", 3, ["memory_attention.memory_pos[obj_ptr]"], True),
    ("query_frame_index_k_plus_1", 3, ["memory_attention.memory_pos[obj_ptr]"], True),
    ("query_frame_index_0", 3, ["memory_attention.num_obj_ptr_tokens"], True),
    ("frame_count_k_plus_2", 3, ["memory_attention.memory_pos[obj_ptr]"], True),
    ("memory_mask_not_binarised", 3, ["support.memory_encoder.masks"], True),
    ("memory_mask_not_reupsampled", 3, ["support.memory_encoder.masks"], True),
    ("memory_stored_float32", 3, ["memory_attention.memory[spatial]"], True),
    ("label_masks_swapped_in_supports", 3, ["support.memory_encoder.masks", "support.decoder.dense_prompt_embeddings"], False),
    ("label_memories_swapped_at_query", 3, ["memory_attention.memory[spatial]", "memory_attention.memory[obj_ptr]"], False),
    ("cond_memory_temporal_position_not_0", 2, ["memory_attention.memory_pos[spatial]"], True),  # last: another reference
]
MIN_EFFECT = 100.0  # a broken rule must exceed the tolerance of its tensor by this factor


@pytest.mark.parametrize("control,k,where,output_blind", CONTROLS, ids=[c[0] for c in CONTROLS])
def test_fidelity_negative_control(tmp_path, monkeypatch, control, k, where, output_blind):
    """Break one fidelity rule on purpose: the real comparison must fail where the rule acts."""
    base, _ = _engine_and_reference(256, 0)
    engine, masks, mutants = _control(control, monkeypatch, base)
    case = _run_case(tmp_path, 256, 0, k, engine=engine, engine_masks=masks)
    for m in mutants:
        assert m.applied > 0, f"mutant not applied: {control} no longer reaches the engine's code path; replace it"
    failures = fidelity_failures(case.errors)
    output = case.errors["output.max_abs_logit_diff"]
    for key in where:
        assert key in failures, (
            f"{control}: the fidelity comparison still passes at {key} "
            f"({case.errors[key]:.3g} <= {tolerance(key):.0e}; output diff {output:.3g})"
        )
        assert case.errors[key] >= MIN_EFFECT * tolerance(key), f"{control}: effect at {key} only {case.errors[key]:.3g}"
    if output_blind:  # what the intermediate comparison adds: the output check alone passes
        missed = fidelity_failures(case.errors, outputs_only=True)
        assert not missed, f"{control} now fails the output comparison too ({missed}): set output_blind=False"


def test_fidelity_matches_official_predictor_k2_control_case(tmp_path):
    """The unbroken case behind the k = 2 control passes (the k = 3 one is a case above)."""
    _assert_same(_run_case(tmp_path, 256, 0, 2), 2)
