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


# ----------------------------------------------------------------------------- batched, on device
# Pillow's 8-bit resampling (libImaging/Resample.c) as tensor ops: the same filter taps, the same
# 22-bit fixed-point coefficients, the same rounding and clipping after each pass (horizontal, then
# vertical). Every partial sum is an integer below 2**53, so float64 matrix products give Pillow's
# uint8 output bit for bit on any device (checked against Pillow in Testing/engine/test_batched.py).
_PIL_PRECISION_BITS = 32 - 8 - 2
_PIL_FILTERS = {"bicubic": 2.0, "bilinear": 1.0}


def _pil_filter(name: str, x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    if name == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5  # Pillow's bicubic
    return np.where(
        x < 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
        np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0),
    )


def pil_resample_matrix(in_size: int, out_size: int, filter: str = "bicubic") -> np.ndarray:
    """[out, in] float64 matrix of Pillow's integer coefficients for one axis (8-bit images)."""
    support0 = _PIL_FILTERS[filter]
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = support0 * filterscale
    ss = 1.0 / filterscale
    out = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        x = np.arange(xmin, xmax)
        w = _pil_filter(filter, (x - center + 0.5) * ss)
        ww = 0.0
        for v in w:  # sequential sum, as Pillow accumulates
            ww += float(v)
        if ww != 0.0:
            w = w / ww
        scaled = w * float(1 << _PIL_PRECISION_BITS)
        out[xx, xmin:xmax] = np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled))
    return out


_matrix_cache: dict[tuple, torch.Tensor] = {}


def _resample_matrix_t(in_size: int, out_size: int, filter: str, device: torch.device) -> torch.Tensor:
    key = (in_size, out_size, filter, str(device))
    m = _matrix_cache.get(key)
    if m is None:
        m = torch.from_numpy(pil_resample_matrix(in_size, out_size, filter)).to(device)
        if len(_matrix_cache) > 32:
            _matrix_cache.clear()
        _matrix_cache[key] = m
    return m


def _clip8(acc: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8 on fixed-point sums (rounding offset included by the caller)."""
    return torch.floor(acc / float(1 << _PIL_PRECISION_BITS)).clamp_(0.0, 255.0)


def pil_resize_batch(images: torch.Tensor, size: tuple[int, int], filter: str = "bicubic") -> torch.Tensor:
    """[N, H, W] (or [N, C, H, W]) uint8-valued tensor resized to size=(h, w) exactly as Pillow
    resizes an 8-bit image; float64 result holding integers 0..255, on the input's device."""
    x = images.to(torch.float64)
    h_out, w_out = int(size[0]), int(size[1])
    half = float(1 << (_PIL_PRECISION_BITS - 1))
    h_in, w_in = x.shape[-2], x.shape[-1]
    if (h_in, w_in) == (h_out, w_out):
        return x

    def horizontal(x: torch.Tensor) -> torch.Tensor:
        if w_in == w_out:
            return x
        mx = _resample_matrix_t(w_in, w_out, filter, x.device)
        return _clip8(torch.matmul(x, mx.T) + half)

    def vertical(x: torch.Tensor) -> torch.Tensor:
        if h_in == h_out:
            return x
        my = _resample_matrix_t(h_in, h_out, filter, x.device)
        return _clip8(torch.matmul(my, x) + half)

    # Pillow (13) runs the vertical pass first when it shrinks rows while columns grow (found by
    # comparing both orders with Pillow's output), else horizontal first.
    if h_out < h_in and w_out > w_in:
        return horizontal(vertical(x))
    return vertical(horizontal(x))


def _grey_or_rgb_stack(images_u8: Sequence[np.ndarray]) -> np.ndarray:
    """[N, H, W] when every image is grey, else [N, H, W, 3]; one array to copy to the device."""
    if all(np.asarray(im).ndim == 2 for im in images_u8):
        return np.stack(images_u8)
    return np.stack([to_rgb(im) for im in images_u8])


def _normalise_batch(resized: torch.Tensor, grey: bool) -> torch.Tensor:
    """[N, 3, S, S] float32: /255 then ImageNet mean/std, as `sam2_image_tensor` computes it."""
    t = resized.to(torch.float32)
    t = t[:, None].expand(-1, 3, -1, -1) if grey else t
    t = t / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=t.device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=t.device)[None, :, None, None]
    return (t - mean) / std


def sam2_image_batch(images_u8: Sequence[np.ndarray], image_size: int, device: torch.device | str) -> torch.Tensor:
    """[N, 3, S, S] on `device`, equal to stacking `sam2_image_tensor` of each image, computed as
    one upload of the uint8 slices and tensor ops on the device (Pillow's bicubic reproduced)."""
    arr = _grey_or_rgb_stack(images_u8)
    grey = arr.ndim == 3
    key = (arr.shape[1:], int(image_size))
    if not _pil_verified.setdefault(key, _same_as_pillow(arr[0], int(image_size), device)):
        return torch.stack([sam2_image_tensor(im, image_size) for im in images_u8]).to(device)
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(device, non_blocking=True)
    if not grey:
        x = x.permute(0, 3, 1, 2)
    resized = pil_resize_batch(x, (image_size, image_size), "bicubic")
    return _normalise_batch(resized, grey)


_pil_verified: dict[tuple, bool] = {}


def _same_as_pillow(image_u8: np.ndarray, size: int, device: torch.device | str) -> bool:
    """Once per input shape and size: the tensor resize gives Pillow's pixels on this install
    (another Pillow version could resample differently); if not, callers fall back to Pillow."""
    import warnings

    from PIL import Image

    want = np.array(Image.fromarray(to_rgb(image_u8)).resize((size, size)))
    x = torch.from_numpy(np.ascontiguousarray(to_rgb(image_u8))).to(device).permute(2, 0, 1)
    got = pil_resize_batch(x, (size, size), "bicubic").permute(1, 2, 0).cpu().numpy()
    same = bool(np.array_equal(got.astype(np.uint8), want))
    if not same:
        warnings.warn(
            f"tensor resize differs from this Pillow's for {image_u8.shape} -> {size}; "
            "using Pillow per image (slower, same result)", RuntimeWarning, stacklevel=3,
        )
    return same


def dinov2_batch_on_device(images_u8: Sequence[np.ndarray], input_size: int, device: torch.device | str) -> torch.Tensor:
    """`dinov2_batch` computed on `device` (one upload, Pillow's bicubic reproduced)."""
    size = max(14, (int(input_size) // 14) * 14)
    return sam2_image_batch(images_u8, size, device)
