"""Medical slice -> what the models see: validation, intensity window, uint8, model tensors.

SAM 2 input follows the official video predictor (`sam2.utils.misc.load_video_frames`):
uint8 RGB -> PIL resize to image_size x image_size -> /255 -> ImageNet mean/std.
Masks go in as the official `add_new_mask` resizes them and logits come back on the slice's own
grid as `_get_orig_video_res_output` does, so no pixel is shifted relative to the input.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_PERCENTILES = (0.5, 99.5)


def validate_image(image: np.ndarray, what: str = "slice") -> np.ndarray:
    """A 2D grey or HxWx3 RGB numeric array with finite values, or a ValueError saying why not."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        pass
    elif arr.ndim != 2:
        raise ValueError(f"{what} must be a 2D image (H, W) or RGB (H, W, 3), got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"{what} is too small: shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise ValueError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{what} holds {n} NaN or infinite values; fix or mask them first")
    return arr


def validate_mask(mask: np.ndarray, shape: tuple[int, int], what: str = "mask") -> np.ndarray:
    """A boolean mask with the image's (H, W) shape, or a ValueError saying why not."""
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"{what} has shape {m.shape} but its image has shape {tuple(shape)}")
    if m.dtype != bool:
        if not np.issubdtype(m.dtype, np.number):
            raise ValueError(f"{what} must be boolean or numeric, got dtype {m.dtype}")
        if np.issubdtype(m.dtype, np.floating) and not np.isfinite(m).all():
            raise ValueError(f"{what} holds NaN or infinite values")
        m = m > 0
    return m


def robust_window(values: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> tuple[float, float]:
    """(low, high) intensity bounds from robust percentiles of `values` (any shape)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return (0.0, 1.0)
    if v.size > 2_000_000:  # percentiles of a strided sample are as good and much cheaper
        v = v[:: v.size // 1_000_000]
    lo, hi = np.percentile(v, percentiles)
    return float(lo), float(hi)


def window_from_level(window: float, level: float) -> tuple[float, float]:
    """(low, high) from a radiology window width and level."""
    if window <= 0:
        raise ValueError(f"window width must be positive, got {window}")
    return (level - window / 2.0, level + window / 2.0)


def to_uint8(image: np.ndarray, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Map intensities to uint8 through `bounds` (default: robust percentiles of this image).

    uint8 input without explicit bounds is taken as already windowed and returned unchanged.
    """
    arr = validate_image(image)
    if bounds is None and arr.dtype == np.uint8:
        return arr
    lo, hi = bounds if bounds is not None else robust_window(arr)
    if not hi > lo:  # constant image: nothing to show
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (arr.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(image_u8: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 from a grey or RGB uint8 image."""
    if image_u8.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image_u8.dtype}; window it with to_uint8 first")
    if image_u8.ndim == 2:
        return np.repeat(image_u8[:, :, None], 3, axis=2)
    return image_u8


def sam2_image_tensor(image_u8: np.ndarray, image_size: int) -> torch.Tensor:
    """[3, S, S] float tensor exactly as the official video predictor loads a frame."""
    from PIL import Image

    rgb = to_rgb(image_u8)
    resized = np.array(Image.fromarray(rgb).resize((image_size, image_size)))
    t = torch.from_numpy(resized).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return (t - mean) / std


def sam2_mask_tensor(mask: np.ndarray, image_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, 1, S, S] binary float mask, resized as `SAM2VideoPredictor.add_new_mask` does."""
    m = torch.as_tensor(np.asarray(mask, dtype=bool))[None, None].float().to(device)
    if m.shape[-2:] != (image_size, image_size):
        m = F.interpolate(m, size=(image_size, image_size), align_corners=False, mode="bilinear", antialias=True)
        m = (m >= 0.5).float()
    return m


def logits_to_grid(low_res_logits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Low-res mask logits [B, 1, h, w] -> [B, 1, H, W] on the slice grid (official resize)."""
    if tuple(low_res_logits.shape[-2:]) == tuple(shape):
        return low_res_logits
    return F.interpolate(low_res_logits, size=tuple(shape), mode="bilinear", align_corners=False)


def dinov2_batch(images_u8: Sequence[np.ndarray], input_size: int = 224) -> torch.Tensor:
    """[N, 3, s, s] DINOv2 input: the whole slice resized (no centre crop), ImageNet-normalised.

    `input_size` is floored to a multiple of the 14 px patch.
    """
    from PIL import Image

    size = max(14, (int(input_size) // 14) * 14)
    out = np.empty((len(images_u8), size, size, 3), dtype=np.uint8)
    for n, img in enumerate(images_u8):
        out[n] = np.array(Image.fromarray(to_rgb(img)).resize((size, size), Image.BICUBIC))
    t = torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    return (t - mean) / std
