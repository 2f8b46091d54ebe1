"""Compare the engine with the official SAM2VideoPredictor where the fidelity rules act.

Forward pre-hooks on the three SAM 2 modules whose inputs carry the rules record every call on
each path:

* ``memory_encoder(pix_feat, masks)``: the support's pixel features and the mask as encoded
  (re-upsampled from the low-res prediction, binarised);
* ``memory_attention(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens)``: the query's
  features and the memory tokens with their encodings: spatial memories (+ temporal encoding of
  position 0) first, then the object-pointer tokens (+ encoding of the distance k - i);
* ``sam_mask_decoder(...)``: every decoder call (supports: the pointer from the mask prompt;
  query: the memory-conditioned prediction).

Both paths run the same sam2 code on the same weights, so the recorded calls pair up one to one
after a documented canonical reordering of the batch (no reordering of memory tokens):

* the predictor runs each object as a batch of 1; the engine batches the labels of a slice. Calls
  are split into rows and stacked in (support, label) order for support-side tensors and in label
  order for the query.
* predictor call order: ``add_new_mask`` per (support, label) (decoder), then
  ``propagate_in_video_preflight`` encodes memories object-major (label, support), then the query
  frame per label: memory attention, decoder, memory encoder (the query's own memory, which the
  engine never needs: calls after the first memory-attention call are ignored).
* engine call order: ``encode_support`` per support (decoder, memory encoder, batch = labels), then
  ``query`` (memory attention, decoder, batch = labels).

``compare_paths`` returns one error per tensor (max |a - b| / max |b|, i.e. relative to the
tensor's magnitude; ``inf`` for a shape, count or flag mismatch) plus the output's absolute max
logit difference; ``fidelity_failures`` applies ``TOLERANCES``. The real fidelity test and every
negative control use exactly these two functions.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

# Tolerances (relative to each tensor's max magnitude). Observed on the 2-core CPU in fp32 (256, 512
# and 1024 px, seeds 0-3, k in {1, 2, 3, 8}): 0 or <= 6.6e-7 for every tensor, so one tolerance fits
# all; TOLERANCES holds per-tensor overrides should another platform need one (none today).
REL_TOL_DEFAULT = 1e-5
TOLERANCES: dict[str, float] = {}
# Output: absolute max |logit difference| (random weights: logits span about +/-0.2 at 256 px).
MAX_LOGIT_DIFF = 1e-3
MIN_AGREEMENT = 0.999

MODULES = ("memory_encoder", "memory_attention", "sam_mask_decoder")


class Recorder:
    """Inputs of every forward call of the three modules, in call order, bound to parameter names."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    return x


@contextmanager
def recording(model: torch.nn.Module) -> Iterator[Recorder]:
    """Record the inputs of `model`'s memory encoder, memory attention and mask decoder."""
    rec = Recorder()
    handles = []
    for name in MODULES:
        module = getattr(model, name)
        sig = inspect.signature(module.forward)

        def hook(mod, args, kwargs, name=name, sig=sig):  # type: ignore[no-untyped-def]
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            rec.calls.append((name, {k: _detach(v) for k, v in bound.arguments.items()}))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- canonical form
def _rows(x: Any, dim: int) -> list[Any]:
    """Split a call's argument into per-object rows along the batch dimension."""
    if isinstance(x, torch.Tensor):
        return list(x.float().split(1, dim=dim))
    if isinstance(x, (list, tuple)):
        per = [_rows(v, dim) for v in x]
        return [list(r) for r in zip(*per)]
    raise TypeError(type(x))


def _stack(rows: list[Any], dim: int) -> Any:
    if isinstance(rows[0], torch.Tensor):
        return torch.cat(rows, dim=dim)
    return [_stack([r[j] for r in rows], dim) for j in range(len(rows[0]))]


def _phases(rec: Recorder) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(support decoder calls, support memory-encoder calls, query attention calls, query decoder calls)."""
    names = rec.names()
    first = names.index("memory_attention") if "memory_attention" in names else len(names)
    before, after = rec.calls[:first], rec.calls[first:]
    sup_dec = [a for n, a in before if n == "sam_mask_decoder"]
    sup_enc = [a for n, a in before if n == "memory_encoder"]
    q_att = [a for n, a in after if n == "memory_attention"]
    q_dec = [a for n, a in after if n == "sam_mask_decoder"]
    return sup_dec, sup_enc, q_att, q_dec


# Batch dimension of each recorded argument ((HW)BC for memory attention, BCHW elsewhere).
_DEC_TENSORS = {
    "image_embeddings": 0,
    "sparse_prompt_embeddings": 0,
    "dense_prompt_embeddings": 0,
    "high_res_features": 0,
}
_DEC_FLAGS = ("multimask_output", "repeat_image")
_ENC_TENSORS = {"pix_feat": 0, "masks": 0}
_ATT_TENSORS = {"curr": 1, "curr_pos": 1, "memory": 1, "memory_pos": 1}


def _unwrap_curr(args: dict) -> dict:
    out = dict(args)
    for key in ("curr", "curr_pos"):
        v = out[key]
        if isinstance(v, (list, tuple)):
            assert len(v) == 1, f"memory attention got {len(v)} levels of {key}"
            out[key] = v[0]
    return out


def canonical(rec: Recorder, path: str, k: int, n_labels: int) -> dict[str, Any]:
    """The recorded inputs of one path as named tensors in (support, label) / label order."""
    sup_dec, sup_enc, q_att, q_dec = _phases(rec)
    out: dict[str, Any] = {}

    def rows_of(calls: list[dict], keys: dict[str, int]) -> dict[str, list]:
        got: dict[str, list] = {key: [] for key in keys}
        for a in calls:
            for key, dim in keys.items():
                got[key].extend(_rows(a[key], dim))
        return got

    if path == "reference":
        # add_new_mask: (support, label); preflight memory encoder: (label, support).
        dec_rows = rows_of(sup_dec, _DEC_TENSORS)
        enc_rows = rows_of(sup_enc, _ENC_TENSORS)
        order = [li * k + i for i in range(k) for li in range(n_labels)]  # (label, support) -> (support, label)
        enc_rows = {key: [r[j] for j in order] if len(r) == len(order) else r for key, r in enc_rows.items()}
        q_att = q_att[:n_labels]
        q_dec = q_dec[:n_labels]
    elif path == "engine":
        dec_rows = rows_of(sup_dec, _DEC_TENSORS)
        enc_rows = rows_of(sup_enc, _ENC_TENSORS)
    else:
        raise ValueError(path)

    out["#support.decoder_rows"] = len(dec_rows["image_embeddings"])
    out["#support.memory_encoder_rows"] = len(enc_rows["masks"])
    if dec_rows["image_embeddings"]:
        for key, dim in _DEC_TENSORS.items():
            out[f"support.decoder.{key}"] = _stack(dec_rows[key], dim)
        out["support.decoder.image_pe"] = sup_dec[0]["image_pe"].float()
    for key in _DEC_FLAGS:
        out[f"support.decoder.{key}"] = tuple(sorted({bool(a[key]) for a in sup_dec}))
    if enc_rows["masks"]:
        for key, dim in _ENC_TENSORS.items():
            out[f"support.memory_encoder.{key}"] = _stack(enc_rows[key], dim)
    out["support.memory_encoder.skip_mask_sigmoid"] = tuple(sorted({bool(a["skip_mask_sigmoid"]) for a in sup_enc}))

    att = [_unwrap_curr(a) for a in q_att]
    out["#query.memory_attention_rows"] = sum(a["memory"].shape[1] for a in att)
    n_ptr = tuple(sorted({int(a["num_obj_ptr_tokens"]) for a in att}))
    out["memory_attention.num_obj_ptr_tokens"] = n_ptr
    if att:
        rows = rows_of(att, _ATT_TENSORS)
        for key, dim in _ATT_TENSORS.items():
            out[f"memory_attention.{key}"] = _stack(rows[key], dim)
        if len(n_ptr) == 1:
            # memory tokens: [spatial memories of the supports..., object-pointer tokens...]
            p = n_ptr[0]
            n = out["memory_attention.memory"].shape[0]
            for key in ("memory", "memory_pos"):
                t = out.pop(f"memory_attention.{key}")
                out[f"memory_attention.{key}[spatial]"] = t[: n - p]
                out[f"memory_attention.{key}[obj_ptr]"] = t[n - p :]
    out["#query.decoder_rows"] = sum(a["image_embeddings"].shape[0] for a in q_dec)
    if q_dec:
        rows = rows_of(q_dec, _DEC_TENSORS)
        for key, dim in _DEC_TENSORS.items():
            out[f"query.decoder.{key}"] = _stack(rows[key], dim)
        out["query.decoder.image_pe"] = q_dec[0]["image_pe"].float()
    for key in _DEC_FLAGS:
        out[f"query.decoder.{key}"] = tuple(sorted({bool(a[key]) for a in q_dec}))
    return out


def _rel_err(a: Any, b: Any) -> float:
    if isinstance(a, list) or isinstance(b, list):
        if not (isinstance(a, list) and isinstance(b, list)) or len(a) != len(b):
            return float("inf")
        return max((_rel_err(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return float("inf")
        a64, b64 = a.double(), b.double()
        scale = b64.abs().max().item()
        diff = (a64 - b64).abs().max().item()
        if scale == 0.0:
            return 0.0 if diff == 0.0 else float("inf")
        return diff / scale
    return 0.0 if a == b else float("inf")


def compare_paths(
    engine_inputs: dict[str, Any],
    reference_inputs: dict[str, Any],
    engine_logits: np.ndarray | None = None,
    reference_logits: np.ndarray | None = None,
) -> dict[str, float]:
    """Per-tensor error of the engine against the predictor (see module docstring)."""
    errors: dict[str, float] = {}
    for key in sorted(set(engine_inputs) | set(reference_inputs)):
        if key not in engine_inputs or key not in reference_inputs:
            errors[key] = float("inf")
        else:
            errors[key] = _rel_err(engine_inputs[key], reference_inputs[key])
    if engine_logits is not None and reference_logits is not None:
        if engine_logits.shape != reference_logits.shape:
            errors["output.max_abs_logit_diff"] = float("inf")
            errors["output.pixel_disagreement"] = 1.0
        else:
            errors["output.max_abs_logit_diff"] = float(np.abs(engine_logits - reference_logits).max())
            errors["output.pixel_disagreement"] = float(((engine_logits > 0) != (reference_logits > 0)).mean())
    return errors


def tolerance(key: str) -> float:
    if key == "output.max_abs_logit_diff":
        return MAX_LOGIT_DIFF
    if key == "output.pixel_disagreement":
        return 1.0 - MIN_AGREEMENT
    if key.startswith("#"):
        return 0.0
    return TOLERANCES.get(key, REL_TOL_DEFAULT)


def fidelity_failures(errors: dict[str, float], outputs_only: bool = False) -> dict[str, float]:
    """The entries of `errors` above their tolerance (all of them, or only the output's)."""
    return {
        k: v
        for k, v in errors.items()
        if (not outputs_only or k.startswith("output.")) and not v <= tolerance(k)
    }
