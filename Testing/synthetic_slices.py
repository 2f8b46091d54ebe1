"""Small synthetic 2D slices with known objects, for engine tests."""
from __future__ import annotations

import numpy as np


def disc_slice(h: int, w: int, shift: float, rng: np.random.Generator, dtype=np.uint8):
    """A noisy slice with two bright discs (labels 1 and 2) and their masks."""
    yy, xx = np.mgrid[:h, :w]
    img = 40 + 10 * rng.standard_normal((h, w))
    d1 = (yy - 0.42 * h - shift) ** 2 + (xx - 0.38 * w) ** 2 < (0.16 * min(h, w)) ** 2
    d2 = (yy - 0.62 * h) ** 2 + (xx - 0.68 * w - shift) ** 2 < (0.11 * min(h, w)) ** 2
    img[d1] += 120
    img[d2] += 70
    if dtype == np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    else:
        img = (img * 7 - 300).astype(dtype)  # a CT/MR-like range in another dtype
    return img, {1: d1, 2: d2}
