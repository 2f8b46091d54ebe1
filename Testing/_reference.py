"""The reference for fidelity: the official SAM2VideoPredictor on a JPEG pseudo-video.

[support_1 .. support_k, query] are written as JPEG frames, each support gets `add_new_mask` per
label, and `propagate_in_video` yields the query's mask logits at the video resolution. The engine
is fed the exact uint8 arrays the predictor saw (the JPEGs decoded with PIL, as sam2 decodes them).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from RetrievalSegLib.models.loaders import sam2_hydra_overrides
from RetrievalSegLib.models.registry import sam2_spec


def write_pseudo_video(folder: Path, frames_u8: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Write frames as 00000.jpg... and return them decoded exactly as the predictor reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames_u8):
        rgb = f if f.ndim == 3 else np.repeat(f[:, :, None], 3, axis=2)
        Image.fromarray(rgb).save(folder / f"{i:05d}.jpg")
    return [np.array(Image.open(folder / f"{i:05d}.jpg").convert("RGB")) for i in range(len(frames_u8))]


#: MedSAM2's published config (github.com/bowang-lab/MedSAM2, sam2/configs/sam2.1_hiera_t512.yaml,
#: commit 332f30d), written down here from that file as its differences from sam2 1.1.0's packaged
#: sam2.1_hiera_t.yaml (a line-by-line diff: exactly these three lines) and deliberately NOT taken
#: from the registry, so that the fidelity test checks the registry's MedSAM2 entry against it.
MEDSAM2_PUBLISHED_BASE = "configs/sam2.1/sam2.1_hiera_t.yaml"
MEDSAM2_PUBLISHED_DIFF = {
    "model.image_size": 512,
    "model.memory_attention.layer.self_attention.feat_sizes": [32, 32],
    "model.memory_attention.layer.cross_attention.feat_sizes": [32, 32],
}


def reference_config(size: str, image_size: int) -> tuple[str, list[str]]:
    """(packaged YAML, hydra overrides) the official predictor is built from for this case."""
    if sam2_spec(size).name == "medsam2":
        assert image_size == 512, "the MedSAM2 reference is its published 512 px config"
        return MEDSAM2_PUBLISHED_BASE, [
            f"++{k}={str(v).replace(' ', '')}" for k, v in MEDSAM2_PUBLISHED_DIFF.items()
        ]
    extra = [o for o in sam2_hydra_overrides(image_size) if "image_size" in o or "feat_sizes" in o]
    return sam2_spec(size).config, extra


def build_reference_predictor(sam2_model: torch.nn.Module, size: str, image_size: int):
    """The official video predictor with the same weights as `sam2_model` (MedSAM2: its published config)."""
    from sam2.build_sam import build_sam2_video_predictor

    config, extra = reference_config(size, image_size)
    pred = build_sam2_video_predictor(config, None, device="cpu", hydra_overrides_extra=extra)
    pred.load_state_dict(sam2_model.state_dict(), strict=True)
    return pred.eval()


@torch.inference_mode()
def reference_query_logits(
    predictor, video_dir: Path, support_masks: Sequence[Mapping[int, np.ndarray]], labels: Sequence[int]
) -> np.ndarray:
    """[L, H, W] logits the official predictor gives for the last frame of `video_dir`."""
    with warnings.catch_warnings():
        # On a CPU-only machine the predictor's optional hole filling (sam2._C) is skipped with a warning.
        warnings.simplefilter("ignore")
        state = predictor.init_state(str(video_dir))
        k = len(support_masks)
        assert state["num_frames"] == k + 1
        for i, masks in enumerate(support_masks):
            for lab in labels:
                h, w = state["video_height"], state["video_width"]
                m = masks.get(lab, np.zeros((h, w), dtype=bool))
                predictor.add_new_mask(state, frame_idx=i, obj_id=lab, mask=m)
        out = {}
        for frame_idx, obj_ids, video_res_masks in predictor.propagate_in_video(state):
            assert list(obj_ids) == list(labels)
            out[frame_idx] = video_res_masks[:, 0].float().cpu().numpy()
    return out[k]
