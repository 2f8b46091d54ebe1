"""What a prediction file is: its provenance and per-slice diagnostics, in a sidecar JSON.

NIfTI keeps no custom metadata, so every label map rseg writes (`rseg segment`, `rseg evaluate`)
gets a sidecar `<output>.json` beside it: the output's full file name plus `.json`
(`case01.nii.gz` -> `case01.nii.gz.json`), so outputs in different formats never share one.

The sidecar is strict JSON (no NaN: undefined numbers are null) and holds

- `format`: "rseg-prediction", `format_version`: 1;
- `provenance`: rseg version, the models' identities, `random_weights`, precision, batch size,
  image size, k, `support_order`, `propagate` (N), `propagation_start_slices` and
  `propagation_annotated_slices`, the bank's id,
  revision and path, labels, axis, slice range, time; the intensity
  `window` [low, high] the slices were windowed with, the `annotated_slices` of this case in the
  bank along the axis, and the `working_dir` relative paths (image, bank) are relative to (what
  `rseg report` needs to draw the run);
- `slices`: one record per slice of the volume along the axis, in order: `index`, `status`
  (one of `SLICE_STATUSES`), and for segmented slices `confidence`, `object_score` and `iou` per
  label value, `present` per label value (true: object score > the presence threshold, recorded
  in the provenance as `presence_threshold`; false: the label is absent and its mask on the slice
  is empty), the `retrieved` supports as [entry id, score], and with propagation the
  `neighbours`: the slices whose memories its pseudo-video held, oldest first (a start slice this
  volume has an annotation of in the bank: `source` "annotation" and its `annotation_entry`, its
  annotation is the result; the slices of its walks: `annotated_slice`, the slice whose annotation
  was a conditioning frame of their pseudo-video; provenance `propagation_annotated_slices`); with the support
  filter `foreground` (provenance `support_filter`) also `supports_per_label` (each label's own k
  supports) and `filter_fallback` (labels with fewer than k retrieved slices containing them,
  conditioned on `retrieved` instead). The provenance names the `retrieval_feature` (also part of
  the `dinov2` identity unless it is the default cls).

`rseg suggest --seg` reads `slices` back (`read_sidecar`); a slice that was not segmented is a
gap to rank, not an empty slice.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ..data.fileio import atomic_write_bytes

FORMAT = "rseg-prediction"
FORMAT_VERSION = 1

#: Per-slice status: segmented; outside the user's slice range; beyond the structure's extent
#: (the extent stop); not reached because the run was cancelled.
SEGMENTED = "segmented"
OUTSIDE_RANGE = "not segmented (outside slice range)"
BEYOND_EXTENT = "not segmented (beyond extent)"
CANCELLED = "not segmented (cancelled)"
SLICE_STATUSES = (SEGMENTED, OUTSIDE_RANGE, BEYOND_EXTENT, CANCELLED)


def sidecar_path(output: str | Path) -> Path:
    """`case.nii.gz` -> `case.nii.gz.json` (same folder)."""
    output = Path(output)
    return output.with_name(output.name + ".json")


def finite_or_none(x: Any) -> float | None:
    """float -> float or None (NaN/inf are not JSON)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def engine_provenance(engine) -> dict:
    """Model part of the provenance (works for a RetrievalEngine)."""
    from .. import __version__

    return {
        "rseg_version": __version__,
        "sam2": engine.sam2_identity,
        "dinov2": engine.dinov2_identity,
        "retrieval_feature": str(getattr(getattr(engine, "embedder", None), "feature", "cls")),
        "random_weights": bool(engine.random_weights),
        "image_size": int(engine.sam.image_size),
    }


def weights_official(engine) -> dict:
    """Whether the weights are the published files, by SHA-256 (as `rseg weights verify` checks):
    {"weights_official": True (every model's file is its published one) | False (random weights, or
    a file whose digest is not the published one: a fine-tune, a copy changed by hand) | None (no
    published digest is known for some model), "weights": per model its file, SHA-256 and the
    published SHA-256 (None where unknown)}."""
    from ..data.fileio import file_sha256
    from ..models.registry import DINOV2_MODELS, SAM2_MODELS

    if engine.random_weights:
        return {"weights_official": False, "weights": {"random_weights": True}}
    sam = getattr(engine.sam, "sam2", None)
    dino = getattr(engine.embedder, "dinov2", None)
    found: dict[str, dict] = {}
    for kind, loaded in (("sam2", sam), ("dinov2", dino)):
        path = getattr(loaded, "path", None)
        if path is None:
            found[kind] = {"file": None, "sha256": None, "published_sha256": None, "official": None}
            continue
        path = Path(path)
        if kind == "sam2":
            spec = SAM2_MODELS.get(str(loaded.size))
            published = sorted(spec.published_sha256) if spec is not None else []
            target = path
        else:
            spec = DINOV2_MODELS.get(str(loaded.size))
            known = getattr(spec, "safetensors_sha256", None)
            published = [known.lower()] if known else []
            target = path / "model.safetensors"
        digest = file_sha256(target) if target.is_file() else None
        official = None if not published or digest is None else digest in published
        found[kind] = {"file": str(target), "sha256": digest,
                       "published_sha256": (published[0] if len(published) == 1 else published) or None,
                       "official": official}
    verdicts = [w["official"] for w in found.values()]
    overall = False if False in verdicts else (True if all(v is True for v in verdicts) else None)
    return {"weights_official": overall, "weights": found}


def segmentation_provenance(seg, engine, bank, *, k: int, extra: dict | None = None) -> dict:
    """Provenance of one `VolumeSegmentation` made with `engine` from `bank`."""
    prov = engine_provenance(engine)
    prov.update({
        "precision": seg.precision,
        "batch_size": int(seg.batch_size),
        "batch_sizing": getattr(seg, "batch_sizing", None),  # start/end size, measured footprint, OOM halvings
        "k": int(k),
        # pseudo-video layout: 'nearest' = most similar support at frame k-1 (the default since the
        # option exists; before it, and in sidecars without this key, the order was 'farthest')
        "support_order": str(getattr(seg, "support_order", "nearest")),
        "presence_threshold": float(getattr(seg, "presence_threshold", 0.0)),
        # propagation: N (0 = off) and where its walks started
        "propagate": int(getattr(seg, "propagate", 0)),
        "propagation_start_slices": ([int(i) for i in seg.start_slices]
                                     if getattr(seg, "propagate", 0) else None),
        # the start slices that kept this volume's annotation and conditioned their walks on it
        "propagation_annotated_slices": ([int(i) for i, r in sorted(seg.slices.items())
                                          if getattr(r, "source", None) == "annotation"]
                                         if getattr(seg, "propagate", 0) else None),
        "support_filter": str(getattr(seg, "support_filter", "all")),
        # the revision retrieval used (read when the segmentation began), not the bank's now
        "bank": {"path": str(bank.path), "bank_id": bank.bank_id,
                 "revision": int(seg.bank_revision if getattr(seg, "bank_revision", None) is not None
                                 else bank.revision)},
        "labels": {str(lab.value): lab.name for lab in seg.labels},
        "axis": "ijk"[seg.axis],
        "seconds": finite_or_none(round(seg.seconds, 3)),
        "cancelled": bool(seg.cancelled),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "window": None if seg.window is None else [finite_or_none(v) for v in seg.window],
        "annotated_slices": [int(i) for i in seg.annotated_slices],
        "working_dir": os.getcwd(),
    })
    if extra:
        prov.update(extra)
    return prov


def slice_records(seg, slice_range: tuple[int, int] | None = None) -> list[dict]:
    """One record per slice along the segmentation's axis (see the module docstring).

    A slice without a result is outside `slice_range` if given and outside it, else 'beyond
    extent' when the segmentation says so (`seg.beyond_extent`, a set of indices, if present),
    else 'cancelled'.
    """
    n = len(seg.confidence)
    beyond = set(getattr(seg, "beyond_extent", ()) or ())
    records = []
    for i in range(n):
        r = seg.slices.get(i)
        if r is not None:
            records.append({
                "index": i,
                "status": SEGMENTED,
                "confidence": finite_or_none(r.confidence),
                "object_score": {str(k): finite_or_none(v) for k, v in r.object_score.items()},
                "iou": {str(k): finite_or_none(v) for k, v in r.iou.items()},
                "present": {str(k): bool(v) for k, v in (getattr(r, "present", None) or {}).items()},
                "retrieved": [[str(eid), finite_or_none(s)] for eid, s in r.retrieved],
            })
            if getattr(r, "neighbours", None) is not None:  # propagation: slices used as memory
                records[-1]["neighbours"] = [int(x) for x in r.neighbours]
            if getattr(r, "source", None) is not None:  # an annotated start slice: not predicted
                records[-1]["source"] = str(r.source)
                records[-1]["annotation_entry"] = str(r.annotation_entry)
            if getattr(r, "annotated_slice", None) is not None:  # conditioned on that slice's annotation
                records[-1]["annotated_slice"] = int(r.annotated_slice)
            per_label = getattr(r, "supports_per_label", None)
            if per_label is not None:  # support filter `foreground`
                records[-1]["supports_per_label"] = {
                    str(lab): [[str(eid), finite_or_none(s)] for eid, s in h] for lab, h in per_label.items()}
                records[-1]["filter_fallback"] = [int(v) for v in getattr(r, "filter_fallback", [])]
            continue
        if slice_range is not None and not (slice_range[0] <= i < slice_range[1]):
            status = OUTSIDE_RANGE
        elif i in beyond:
            status = BEYOND_EXTENT
        else:
            status = CANCELLED
        records.append({"index": i, "status": status})
    return records


def write_sidecar(output: str | Path, provenance: dict, slices: list[dict] | None = None) -> Path:
    """Write `<output>.json` atomically (refusing links, as every rseg write); returns its path."""
    path = sidecar_path(output)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "provenance": provenance,
           "slices": slices if slices is not None else []}
    data = json.dumps(doc, indent=1, allow_nan=False).encode("utf-8") + b"\n"
    atomic_write_bytes(path, data, root=path.parent, what="an output folder")
    return path


def read_sidecar(path: str | Path) -> dict:
    """Read a sidecar (give the sidecar or the prediction it describes); ValueError if not one."""
    path = Path(path)
    if not path.name.endswith(".json"):
        path = sidecar_path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"),
                         parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not JSON")))
    except FileNotFoundError:
        raise ValueError(f"{path}: no sidecar; it is written by `rseg segment` beside its --out") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable rseg sidecar ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not an rseg prediction sidecar (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: sidecar format version {doc.get('format_version')} is newer than this rseg reads ({FORMAT_VERSION})")
    slices = doc.get("slices")
    if not isinstance(slices, list) or any(not isinstance(s, dict) or s.get("status") not in SLICE_STATUSES for s in slices):
        raise ValueError(f"{path}: malformed 'slices' list")
    return doc
