"""SAM 2 memory-attention segmentation of a query slice from k support slices.

This is the official `SAM2VideoPredictor` call path reduced to what retrieval needs, with each
support's memory computed once and cached:

* A support is an initial conditioning frame with a mask prompt: `track_step(is_init_cond_frame=
  True, mask_inputs=mask)` (mask resized as `add_new_mask` does), then the memory encoder on the
  re-upsampled low-res mask, binarised, as `propagate_in_video_preflight` does; memory features
  stored in bfloat16 like the predictor stores them.
* The query is a non-conditioning frame at index k after supports 0..k-1, with num_frames = k+1
  (the pseudo-video [support_1..support_k, query]); memories of all supports have temporal
  position 0, object pointers get the distance k - i to the query, exactly as in the predictor.
* Support order (`SUPPORT_ORDERS`): supports are given most similar first; 'nearest' (default)
  puts the most similar at frame k-1 (pointer distance 1, as an adjacent frame in SAM 2's
  training), 'farthest' at frame 0 (distance k, the only order before the option). Spatial memories are
  order-invariant (all t_pos 0); only the object pointers' temporal encoding sees the order.
* Labels are SAM 2 objects; the predictor runs each object as its own batch of 1, we batch the
  labels of one slice (same math, float reordering only).

Differences from the predictor, each deliberate: no JPEG round trip (callers give the uint8
slice; the fidelity test feeds the decoded JPEG pixels), and small-hole filling (`fill_hole_area`,
the predictor's post-processing that needs the optional CUDA extension `sam2._C`) is done with
SimpleITK on the CPU and is off unless asked for, which is what the predictor does wherever `sam2._C`
is absent.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..models.loaders import LoadedSam2
from .preprocess import (
    logits_to_grid,
    sam2_image_batch,
    sam2_image_tensor,
    sam2_mask_tensor,
    to_uint8,
    validate_image,
    validate_mask,
)

NO_OBJ_SCORE = -1024.0
PRECISIONS = ("auto", "fp32", "bf16")
#: Where the most similar support sits in the pseudo-video: 'nearest' = frame k-1 (pointer
#: distance 1 to the query), 'farthest' = frame 0 (distance k). Default 'nearest'.
SUPPORT_ORDERS = ("nearest", "farthest")


def check_support_order(order: str) -> str:
    """`order` if it is one of SUPPORT_ORDERS, else ValueError."""
    if order not in SUPPORT_ORDERS:
        raise ValueError(f"support_order must be one of {SUPPORT_ORDERS}, got {order!r}")
    return order


def frame_order(support_index: np.ndarray, order: str) -> np.ndarray:
    """[B, k] support positions by pseudo-video frame (column i = frame i) from [B, k] most similar
    first: 'nearest' reverses each row (most similar at frame k-1), 'farthest' keeps it."""
    check_support_order(order)
    return support_index[:, ::-1] if order == "nearest" else support_index


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'fp32' or 'bf16' for `precision` on `device`.

    auto = bfloat16 autocast on a CUDA device that supports it (`torch.cuda.is_bf16_supported()`),
    float32 on CPU and MPS. An explicit 'bf16' is honoured on any device torch can autocast on
    (on CPU it is slow; the tests use it to check the bf16 path).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dev = torch.device(device)
    if precision == "auto":
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "bf16" and dev.type not in ("cuda", "cpu"):
        raise ValueError(f"bf16 autocast is supported here on cuda and cpu, not {dev.type}; use fp32")
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"this GPU ({torch.cuda.get_device_name(dev)}) has no bfloat16 support; use fp32")
    return precision


def autocast(precision: str, device: torch.device | str):
    """Context for a resolved precision: bfloat16 autocast for 'bf16', nothing for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"resolve the precision first ('fp32' or 'bf16'), got {precision!r}")


@dataclass
class ImageFeatures:
    """Backbone output of one image, flattened as SAM 2's track_step consumes it (batch 1)."""

    vision_feats: list[torch.Tensor]  # per level [HW, 1, C]
    vision_pos_embeds: list[torch.Tensor]  # per level [HW, 1, C]
    feat_sizes: list[tuple[int, int]]

    def expand(self, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Features and positions repeated (as views) over `batch` objects."""
        return (
            [x.expand(-1, batch, -1) for x in self.vision_feats],
            [x.expand(-1, batch, -1) for x in self.vision_pos_embeds],
        )


@dataclass
class BatchFeatures:
    """Backbone output of N images, flattened as track_step consumes it (batch N, on the device)."""

    vision_feats: list[torch.Tensor]  # per level [HW, N, C]
    vision_pos_embeds: list[torch.Tensor]  # per level [HW, N, C]
    feat_sizes: list[tuple[int, int]]
    shapes: list[tuple[int, int]]  # each image's own (H, W)

    def __len__(self) -> int:
        return len(self.shapes)

    def image(self, b: int) -> ImageFeatures:
        """Features of image `b` as a batch of 1 (views)."""
        return ImageFeatures(
            [f[:, b : b + 1] for f in self.vision_feats],
            [p[:, b : b + 1] for p in self.vision_pos_embeds],
            list(self.feat_sizes),
        )


@dataclass
class BatchQueryResult:
    """Per-slice, per-label output of a batched query, still on the device."""

    labels: tuple[int, ...]
    logits: torch.Tensor  # [B, L, H, W] float32 on the slices' grid
    iou: torch.Tensor  # [B, L]
    object_score: torch.Tensor  # [B, L]
    memories: list["SliceMemory"] | None = None  # per slice, with encode_memory (propagation)

    def to_numpy(self) -> list[QueryResult]:
        """One QueryResult per slice (a single device-to-host copy per tensor)."""
        logits = self.logits.cpu().numpy().astype(np.float32, copy=False)
        iou = self.iou.float().cpu().numpy()
        score = self.object_score.float().cpu().numpy()
        return [QueryResult(self.labels, logits[b], iou[b], score[b]) for b in range(len(logits))]


@dataclass
class SupportMemory:
    """SAM 2 memory of one support slice: one memory per label (SAM 2 object)."""

    labels: tuple[int, ...]
    maskmem_features: torch.Tensor  # [L, C_mem, h, w], bfloat16 as the predictor stores it
    obj_ptr: torch.Tensor  # [L, C], float32
    present: tuple[bool, ...]  # label drawn on this support

    def select(self, labels: Sequence[int]) -> "SupportMemory":
        """The memory restricted (and ordered) to `labels`; a label never drawn is an error."""
        idx = []
        for lab in labels:
            if lab not in self.labels:
                raise KeyError(f"support memory has no label {lab} (it has {self.labels})")
            idx.append(self.labels.index(lab))
        if list(idx) == list(range(len(self.labels))):
            return self
        t = torch.tensor(idx, device=self.obj_ptr.device)
        return SupportMemory(
            tuple(labels),
            self.maskmem_features.index_select(0, t),
            self.obj_ptr.index_select(0, t),
            tuple(self.present[i] for i in idx),
        )

    def to(self, device: torch.device) -> "SupportMemory":
        return SupportMemory(
            self.labels, self.maskmem_features.to(device), self.obj_ptr.to(device), self.present
        )


@dataclass
class SliceMemory:
    """SAM 2 memory of a segmented slice (a tracked, non-conditioning frame), one row per label."""

    maskmem_features: torch.Tensor  # [L, C_mem, h, w], bfloat16 as the predictor stores it
    obj_ptr: torch.Tensor  # [L, C], float32


@dataclass
class QueryResult:
    """Per-label output for one query slice, on the slice's own grid."""

    labels: tuple[int, ...]
    logits: np.ndarray  # [L, H, W] float32 mask logits (NO_OBJ_SCORE where the object is absent)
    iou: np.ndarray  # [L] SAM 2's predicted IoU of the returned mask
    object_score: np.ndarray  # [L] object score logit (> 0: object predicted present)

    @property
    def probabilities(self) -> np.ndarray:
        """[L, H, W] sigmoid of the logits."""
        return 1.0 / (1.0 + np.exp(-np.clip(self.logits, -80.0, 80.0)))

    def masks(self) -> np.ndarray:
        """[L, H, W] boolean masks (logit > 0), as the official predictor thresholds."""
        return self.logits > 0


@dataclass
class Support:
    """An annotated slice: image plus one boolean mask per label (absent label = empty)."""

    image: np.ndarray
    masks: Mapping[int, np.ndarray]
    key: str | None = None  # cache key; None = never cached


def fill_holes(low_res_logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """Fill background components of area <= max_area with logit 0.1 (sam2's post-processing)."""
    import SimpleITK as sitk

    if max_area <= 0:
        return low_res_logits
    out = low_res_logits.clone()
    for b in range(out.shape[0]):
        bg = (out[b, 0] <= 0).cpu().numpy().astype(np.uint8)
        cc = sitk.ConnectedComponent(sitk.GetImageFromArray(bg), True)  # 8-connectivity
        labels = sitk.GetArrayFromImage(cc)
        if labels.max() == 0:
            continue
        areas = np.bincount(labels.ravel())
        small = np.flatnonzero(areas <= max_area)
        small = small[small > 0]
        if len(small):
            hole = torch.from_numpy(np.isin(labels, small)).to(out.device)
            out[b, 0] = torch.where(hole, torch.tensor(0.1, dtype=out.dtype, device=out.device), out[b, 0])
    return out


class Sam2MemoryEngine:
    """Support memories and memory-conditioned query segmentation with a SAM 2 model."""

    def __init__(self, sam2: LoadedSam2, fill_hole_area: int = 0, memory_dtype: torch.dtype = torch.bfloat16) -> None:
        self.sam2 = sam2
        self.model = sam2.model
        self.device = sam2.device
        self.image_size = sam2.image_size
        self.fill_hole_area = int(fill_hole_area)
        self.memory_dtype = memory_dtype
        self._maskmem_pos_enc: torch.Tensor | None = None  # constant across frames: [1, C, h, w]
        self._pos_enc_autocast: dict[str, torch.Tensor] = {}  # the same under autocast, by dtype

    @property
    def identity(self) -> str:
        return self.sam2.identity

    # ------------------------------------------------------------------ image encoder
    @torch.inference_mode()
    def encode_batch(self, images: Sequence[np.ndarray], device_preprocess: bool | None = None) -> BatchFeatures:
        """The image encoder on a batch of slices (uint8, or windowed here); the features stay
        batched on the device.

        Preprocessing is the official predictor's (resize, /255, ImageNet mean/std): on CUDA
        (device_preprocess None) one upload of the uint8 slices and tensor ops there, on CPU Pillow
        per image (faster there; both are bit-identical, see `preprocess.sam2_image_batch`).
        """
        if len(images) == 0:
            raise ValueError("encode_batch needs at least one image")
        u8 = [_as_uint8(im) for im in images]
        if device_preprocess is None:
            device_preprocess = self.device.type == "cuda"
        if device_preprocess:
            batch = sam2_image_batch(u8, self.image_size, self.device)
        else:
            batch = torch.stack([sam2_image_tensor(im, self.image_size) for im in u8]).to(self.device)
        backbone_out = self.model.forward_image(batch)
        _, feats, pos, sizes = self.model._prepare_backbone_features(backbone_out)
        return BatchFeatures(list(feats), list(pos), list(sizes), [tuple(im.shape[:2]) for im in u8])

    def compile(self, **kwargs) -> None:
        """torch.compile the image encoder and the memory attention in place (module names,
        state_dict keys and forward hooks stay as they are)."""
        self.model.image_encoder.compile(**kwargs)
        self.model.memory_attention.compile(**kwargs)

    # ------------------------------------------------------------------ supports
    @torch.inference_mode()
    def encode_support(
        self,
        image: np.ndarray,
        masks: Mapping[int, np.ndarray],
        labels: Sequence[int] | None = None,
        features: ImageFeatures | None = None,
    ) -> SupportMemory:
        """Memory of one annotated slice for each label (a label without a mask is empty)."""
        img = validate_image(image, "support image")
        labels = tuple(sorted(masks)) if labels is None else tuple(labels)
        if not labels:
            raise ValueError("a support needs at least one label")
        hw = img.shape[:2]
        mask_list = []
        for lab in labels:
            m = masks.get(lab)
            m = np.zeros(hw, dtype=bool) if m is None else validate_mask(m, hw, f"mask of label {lab}")
            mask_list.append(m)
        if features is None:
            features = self.encode_batch([img]).image(0)
        L = len(labels)
        feats, pos = features.expand(L)
        mask_inputs = torch.cat([sam2_mask_tensor(m, self.image_size, self.device) for m in mask_list])
        out = self.model.track_step(
            frame_idx=0,
            is_init_cond_frame=True,
            current_vision_feats=feats,
            current_vision_pos_embeds=pos,
            feat_sizes=features.feat_sizes,
            point_inputs=None,
            mask_inputs=mask_inputs,
            output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
            num_frames=2,
            run_mem_encoder=False,
        )
        low_res = out["pred_masks"]
        if self.fill_hole_area > 0:
            low_res = fill_holes(low_res, self.fill_hole_area)
        # propagate_in_video_preflight: re-upsample the stored low-res mask, encode it binarised
        high_res = torch.nn.functional.interpolate(
            low_res, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        maskmem_features, maskmem_pos_enc = self.model._encode_new_memory(
            current_vision_feats=feats,
            feat_sizes=features.feat_sizes,
            pred_masks_high_res=high_res,
            object_score_logits=out["object_score_logits"],
            is_mask_from_pts=True,
        )
        key = self._autocast_key()
        if key is not None:  # under autocast the memory encoder returns it in the autocast dtype
            self._pos_enc_autocast.setdefault(key, maskmem_pos_enc[-1][0:1].clone())
        elif self._maskmem_pos_enc is None:
            self._maskmem_pos_enc = maskmem_pos_enc[-1][0:1].clone()
        return SupportMemory(
            labels,
            maskmem_features.to(self.memory_dtype),
            out["obj_ptr"].float(),
            tuple(bool(m.any()) for m in mask_list),
        )

    def _autocast_key(self) -> str | None:
        """The autocast dtype in force on this engine's device type, or None."""
        dt = self.device.type
        if dt in ("cuda", "cpu") and torch.is_autocast_enabled(dt):
            return str(torch.get_autocast_dtype(dt))
        return None

    def _pos_enc(self) -> torch.Tensor:
        key = self._autocast_key()
        if key is not None:
            # The memory encoder casts its position encoding to the autocast dtype (as in the
            # official predictor under autocast); keep that one apart from the float32 one.
            if key not in self._pos_enc_autocast:
                s = self.image_size // 16
                dummy = torch.zeros(1, self.model.hidden_dim, s, s, device=self.device)
                mask = torch.zeros(1, 1, self.image_size, self.image_size, device=self.device)
                with torch.inference_mode():
                    enc = self.model.memory_encoder(dummy, mask, skip_mask_sigmoid=True)
                self._pos_enc_autocast[key] = enc["vision_pos_enc"][-1][0:1].clone()
            return self._pos_enc_autocast[key]
        if self._maskmem_pos_enc is None:
            # Position encoding of the memory grid; independent of content, so any input works.
            s = self.image_size // 16
            dummy = torch.zeros(1, self.model.hidden_dim, s, s, device=self.device)
            mask = torch.zeros(1, 1, self.image_size, self.image_size, device=self.device)
            with torch.inference_mode():
                enc = self.model.memory_encoder(dummy, mask, skip_mask_sigmoid=True)
            self._maskmem_pos_enc = enc["vision_pos_enc"][-1][0:1].clone()
        return self._maskmem_pos_enc

    # ------------------------------------------------------------------ query
    def query(
        self,
        image: np.ndarray,
        supports: Sequence[SupportMemory],
        labels: Sequence[int] | None = None,
        features: BatchFeatures | None = None,
        support_order: str = "nearest",
    ) -> QueryResult:
        """Segment one slice conditioned on the memories of `supports` (most similar first; no
        prompt on the query): `query_batch` on a batch of one. `features`: `encode_batch([image])`,
        if already computed. `support_order`: see `SUPPORT_ORDERS`."""
        img = validate_image(image, "query image")
        if len(supports) == 0:
            raise ValueError("at least one support is needed to segment a slice (the bank gave none)")
        labels = tuple(supports[0].labels) if labels is None else tuple(labels)
        if features is None:
            features = self.encode_batch([img])
        return self.query_batch(features, supports, [list(range(len(supports)))], labels,
                                support_order=support_order).to_numpy()[0]

    @torch.inference_mode()
    def _track_query(self, frame_idx: int, num_frames: int, feats: torch.Tensor, pos: list, feat_sizes: list,
                     cond: dict, non_cond: dict) -> tuple:
        """SAM 2's tracking step for the query at `frame_idx` of a `num_frames` frame pseudo-video.

        Returns (IoU predictions, low-resolution mask logits, object scores, high-resolution mask
        logits before hole filling, object pointers); holes are filled in the low-resolution
        logits as the official predictor fills its output when fill_hole_area > 0.
        """
        _, sam_outputs, _, _ = self.model._track_step(
            frame_idx,
            False,
            feats,
            pos,
            feat_sizes,
            None,
            None,
            {"cond_frame_outputs": cond, "non_cond_frame_outputs": non_cond},
            num_frames,
            False,
            None,
        )
        _, _, ious, low_res, high_res, obj_ptr, obj_scores = sam_outputs
        if self.fill_hole_area > 0:
            low_res = fill_holes(low_res, self.fill_hole_area)
        return ious, low_res, obj_scores, high_res, obj_ptr

    @torch.inference_mode()
    def query_batch(
        self,
        features: BatchFeatures,
        memories: Sequence[SupportMemory],
        support_index: Sequence[Sequence[int]] | np.ndarray,
        labels: Sequence[int],
        items: Sequence[int] | None = None,
        support_order: str = "nearest",
        neighbours: Sequence[Sequence["SliceMemory"]] | None = None,
        frame_idx: int | None = None,
        num_frames: int | None = None,
        encode_memory: bool = False,
        annotations: Sequence[SupportMemory] | None = None,
    ) -> BatchQueryResult:
        """Segment B slices x L labels in one memory-attention + mask-decoder call: the one query
        path (`query` is a batch of one; B = 1 is the per-slice case the fidelity tests compare
        with the official predictor).

        `memories` are the distinct support memories needed by the batch (each fetched and moved
        to the device once); `support_index[b]` lists, for slice b, the positions in `memories`
        of its own k supports, most similar first (every slice has k); `support_order` places
        them in the pseudo-video ('nearest': the first at frame k-1; 'farthest': at frame 0;
        `frame_order`). `items` picks which images of `features` are
        the B slices (default: all, in order). Like SAM 2 with several objects, slice b's memories
        are stacked at batch position b*L + l: the math of each (slice, label) pair is that of the
        slice alone in a batch of one; only the float reduction order may differ.

        Propagation (`segmentation.propagation`): the query sits at `frame_idx` (default k) of a
        `num_frames` frame pseudo-video (default frame_idx + 1); `neighbours[b]` are the memories
        of slices segmented before slice b in its walk, oldest first, as non-conditioning frames at
        frame_idx - W .. frame_idx - 1 (W = len(neighbours[b]), the same for every row, frames
        after the k supports). SAM 2's `_prepare_memory_conditioned_features` then gives them their
        temporal codes and pointer distances. `encode_memory`: also run the memory encoder on the
        predicted masks, as SAM 2 does for a tracked frame (`BatchQueryResult.memories`).

        `annotations[b]`: the memory of a slice of this volume the user annotated (its bank
        entry's support memory, which is what `add_new_mask` on that frame gives), as one more
        conditioning frame of slice b's pseudo-video at frame k, after its k supports (temporal code
        0 like them; object-pointer distance frame_idx - k). The neighbours then sit after it, at
        frames k+1 and later, and frame_idx defaults to k + 1. Every row has one or none does.
        """
        labels = tuple(labels)
        idx = np.asarray(support_index, dtype=np.int64)
        if idx.ndim != 2 or idx.shape[1] == 0:
            raise ValueError(f"support_index must be [B, k] with k >= 1, got shape {idx.shape}")
        idx = frame_order(idx, support_order).copy()  # column i = frame i (copy: no negative strides)
        items = list(range(len(features))) if items is None else [int(i) for i in items]
        B, k = idx.shape
        if len(items) != B:
            raise ValueError(f"{len(items)} slices but support_index has {B} rows")
        if len(memories) == 0 or idx.min() < 0 or idx.max() >= len(memories):
            raise ValueError("support_index refers to memories that were not given")
        shapes = {features.shapes[i] for i in items}
        if len(shapes) != 1:
            raise ValueError(f"slices of one batch must share a shape, got {sorted(shapes)}")
        L = len(labels)
        mems = [m.select(labels) for m in memories]
        mem_feats = torch.stack([m.maskmem_features for m in mems]).to(self.device)  # [U, L, C, h, w]
        mem_ptrs = torch.stack([m.obj_ptr for m in mems]).to(self.device)  # [U, L, C]
        # batch position b*L + l <- image items[b]
        if B == 1:  # one slice: its features repeated over the labels as views, as SAM 2 batches objects
            feats, pos = features.image(items[0]).expand(L)
        else:
            rows = torch.tensor(items, device=self.device).repeat_interleave(L)
            feats = [f.index_select(1, rows) for f in features.vision_feats]
            pos = [p.index_select(1, rows) for p in features.vision_pos_embeds]
        A = 0 if annotations is None else 1  # an annotated slice as conditioning frame k
        if annotations is not None and len(annotations) != B:
            raise ValueError(f"annotations must give one memory for each of the {B} slices, got {len(annotations)}")
        frame_idx = k + A if frame_idx is None else int(frame_idx)
        num_frames = frame_idx + 1 if num_frames is None else int(num_frames)
        W = 0 if neighbours is None else len(neighbours[0]) if len(neighbours) else 0
        if neighbours is not None and (len(neighbours) != B or any(len(n) != W for n in neighbours)):
            raise ValueError(f"neighbours must list the same number of memories for each of the {B} slices")
        if frame_idx - W < k + A or num_frames <= frame_idx:
            raise ValueError(f"query frame {frame_idx} with {W} neighbours after {k} supports"
                             f"{' and an annotated slice' if A else ''} in a {num_frames} frame video "
                             "is not a valid pseudo-video")
        pos_enc = self._pos_enc().expand(B * L, -1, -1, -1)
        sel = torch.from_numpy(idx).to(self.device)
        cond = {}
        for i in range(k):
            cond[i] = {
                "maskmem_features": mem_feats.index_select(0, sel[:, i]).flatten(0, 1),
                "maskmem_pos_enc": [pos_enc],
                "obj_ptr": mem_ptrs.index_select(0, sel[:, i]).flatten(0, 1),
            }
        if annotations is not None:  # as add_new_mask on frame k: a conditioning frame, t_pos 0
            ann = [a.select(labels) for a in annotations]
            cond[k] = {
                "maskmem_features": torch.cat([a.maskmem_features for a in ann]).to(self.device),
                "maskmem_pos_enc": [pos_enc],
                "obj_ptr": torch.cat([a.obj_ptr for a in ann]).to(self.device),
            }
        non_cond = {}
        for w in range(W):  # tracked slices: temporal position from their frame, not 0
            non_cond[frame_idx - W + w] = {
                "maskmem_features": torch.cat([n[w].maskmem_features for n in neighbours]).to(self.device),
                "maskmem_pos_enc": [pos_enc],
                "obj_ptr": torch.cat([n[w].obj_ptr for n in neighbours]).to(self.device),
            }
        ious, low_res, obj_scores, high_res, obj_ptr = self._track_query(
            frame_idx, num_frames, feats, pos, features.feat_sizes, cond, non_cond)
        (shape,) = shapes
        logits = logits_to_grid(low_res.float(), shape)[:, 0]
        result = BatchQueryResult(
            labels,
            logits.reshape(B, L, *logits.shape[-2:]),
            ious.max(dim=-1).values.reshape(B, L),
            obj_scores[:, 0].reshape(B, L),
        )
        if encode_memory:
            # as SAM 2's track_step for a tracked frame: the decoder's high-resolution logits,
            # not binarised (is_mask_from_pts False); stored as the predictor stores them
            maskmem, _ = self.model._encode_new_memory(
                current_vision_feats=feats,
                feat_sizes=features.feat_sizes,
                pred_masks_high_res=high_res,
                object_score_logits=obj_scores,
                is_mask_from_pts=False,
            )
            maskmem = maskmem.to(self.memory_dtype)
            result.memories = [SliceMemory(maskmem[b * L:(b + 1) * L], obj_ptr[b * L:(b + 1) * L].float())
                               for b in range(B)]
        return result

    # ------------------------------------------------------------------ convenience
    def segment(
        self,
        image: np.ndarray,
        supports: Sequence[Support],
        labels: Sequence[int] | None = None,
        cache: "SupportMemoryCacheLike | None" = None,
    ) -> QueryResult:
        """Encode (or fetch cached) support memories, then segment `image` from them."""
        if len(supports) == 0:
            raise ValueError("at least one support is needed to segment a slice (the bank gave none)")
        if labels is None:
            labels = tuple(sorted({lab for s in supports for lab in s.masks}))
        mems = []
        for s in supports:
            if cache is not None and s.key is not None:
                mems.append(cache.get_or_compute(s.key, lambda s=s: self.encode_support(s.image, s.masks, labels)))
            else:
                mems.append(self.encode_support(s.image, s.masks, labels))
        return self.query(image, mems, labels)


class SupportMemoryCacheLike:  # pragma: no cover - typing helper
    def get_or_compute(self, key: str, compute: Callable[[], SupportMemory]) -> SupportMemory: ...


def _as_uint8(image: np.ndarray) -> np.ndarray:
    img = validate_image(image)
    return img if img.dtype == np.uint8 else to_uint8(img)
