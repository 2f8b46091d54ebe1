"""Synthetic short-axis cardiac MR studies for tests, benchmarks and demos (no data download).

Each case is a stack of short-axis slices (through-plane axis k, the one with the largest
spacing) with an MR-like int16 image and a uint8 label map: 1 'RV' (a crescent beside the
septum), 2 'Myo' (a ring), 3 'LV' (a disc inside the ring). Shapes change smoothly from base
to apex, differ slightly between cases, and the slices above the base and below the apex carry
no label. Everything is drawn from `numpy.random.default_rng((seed, case_index))`, so case i
is identical for a given seed whatever `n_cases` is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .volume import Volume, write_volume

#: Label value -> (name, RGB colour in 0..1).
LABELS: dict[int, tuple[str, tuple[float, float, float]]] = {
    1: ("RV", (0.35, 0.55, 0.95)),  # right-ventricle blood pool: venous blue
    2: ("Myo", (0.75, 0.41, 0.35)),  # myocardium: muscle (Slicer's "heart" tone)
    3: ("LV", (0.90, 0.22, 0.22)),  # left-ventricle blood pool: arterial red
}
#: Label value -> name.
LABEL_NAMES: dict[int, str] = {value: name for value, (name, _) in LABELS.items()}


def rotation_matrix(rx_deg: float, ry_deg: float, rz_deg: float) -> tuple[float, ...]:
    """Row-major 3x3 rotation Rz @ Ry @ Rx (angles in degrees), as an ITK direction tuple."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return tuple(float(x) for x in (rz @ ry @ rx).ravel())


#: An oblique, short-axis-like orientation (a proper rotation, determinant +1).
DEFAULT_DIRECTION: tuple[float, ...] = rotation_matrix(20.0, -35.0, 30.0)
DEFAULT_ORIGIN: tuple[float, float, float] = (-30.0, -25.0, 10.0)


@dataclass
class Case:
    """One synthetic study: an MR-like image and its label map on the same grid."""

    case_id: str
    image: Volume  # int16
    labels: Volume  # uint8, values in LABELS (0 = background)


def _smooth_field(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, n: int = 3
) -> np.ndarray:
    """A smooth random field in about -1..1 on normalised in-plane coordinates."""
    field = np.zeros_like(xx)
    for _ in range(n):
        fx, fy = rng.uniform(0.3, 1.5, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        field += np.sin(np.pi * (fx * xx + fy * yy) + phase)
    return field / n


def _box_blur(img: np.ndarray) -> np.ndarray:
    """3x3 in-plane mean (partial-volume-like soft edges), edges replicated."""
    padded = np.pad(img, ((1, 1), (1, 1)), mode="edge")
    out = np.zeros_like(img)
    for dy in range(3):
        for dx in range(3):
            out += padded[dy : dy + img.shape[0], dx : dx + img.shape[1]]
    return out / 9.0


def _make_case(
    index: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    seed: int,
    direction: tuple[float, ...],
    origin: tuple[float, float, float],
) -> Case:
    rng = np.random.default_rng((seed, index))
    nk, nj, ni = shape
    si, sj = spacing[0], spacing[1]
    # In-plane coordinates in mm, centred; the field of view sets the anatomy's scale.
    x = (np.arange(ni) - (ni - 1) / 2.0) * si
    y = (np.arange(nj) - (nj - 1) / 2.0) * sj
    yy, xx = np.meshgrid(y, x, indexing="ij")
    fov = min(ni * si, nj * sj)
    norm_y, norm_x = yy / (nj * sj / 2.0), xx / (ni * si / 2.0)

    # Case-level anatomy: small variations around a common heart.
    r_lv = fov * 0.12 * rng.uniform(0.92, 1.08)  # LV cavity radius at the base (mm)
    thick = fov * 0.055 * rng.uniform(0.9, 1.1)  # myocardial wall thickness (mm)
    ecc = rng.uniform(0.0, 0.08)  # LV ellipticity
    tilt = rng.uniform(0, np.pi)  # orientation of that ellipse
    cx0, cy0 = rng.uniform(-0.025, 0.025, size=2) * fov
    drift_x, drift_y = rng.uniform(-0.03, 0.03, size=2) * fov  # centre drift base -> apex
    rv_angle = np.deg2rad(180.0 + rng.uniform(-15, 15))  # RV lies on the -x side of the LV
    # Heart occupies slices [base, apex]; slices outside carry no label (>= 1 on each side).
    first = 1 + int(rng.integers(0, max(1, nk // 10) + 1))
    last = nk - 2 - int(rng.integers(0, max(1, nk // 10) + 1))
    last = max(last, first)
    rv_fraction = rng.uniform(0.65, 0.8)  # the RV ends before the apex

    gain = rng.uniform(0.9, 1.1)
    image = np.zeros(shape, dtype=np.float64)
    labels = np.zeros(shape, dtype=np.uint8)
    body = (norm_x / 0.9) ** 2 + (norm_y / 0.8) ** 2 <= 1.0
    lungs = (((np.abs(norm_x) - 0.5) / 0.3) ** 2 + (norm_y / 0.55) ** 2 <= 1.0) & body
    for k in range(nk):
        lab = np.zeros((nj, ni), dtype=np.uint8)
        if first <= k <= last:
            t = (k - first) / max(last - first, 1) * 0.9  # 0 at the base, 0.9 at the apex
            cx, cy = cx0 + drift_x * t, cy0 + drift_y * t
            r_in = r_lv * np.sqrt(1.0 - t**2)
            r_out = r_in + thick * (1.0 + 0.3 * t)
            dx, dy = xx - cx, yy - cy
            u = dx * np.cos(tilt) + dy * np.sin(tilt)
            v = -dx * np.sin(tilt) + dy * np.cos(tilt)
            rho = np.sqrt((u / (1 + ecc)) ** 2 + (v / (1 - ecc)) ** 2)
            lab[rho <= r_out] = 2
            lab[rho <= r_in] = 3
            if t <= rv_fraction:
                s = np.sqrt(1.0 - (t / max(rv_fraction, 1e-6)) ** 2 * 0.75)
                rcx = cx + np.cos(rv_angle) * r_out * 0.9
                rcy = cy + np.sin(rv_angle) * r_out * 0.9
                a, b = 1.0 * r_out * s, 1.6 * r_out * s  # short along the septal normal
                ru = (xx - rcx) * np.cos(rv_angle) + (yy - rcy) * np.sin(rv_angle)
                rvv = -(xx - rcx) * np.sin(rv_angle) + (yy - rcy) * np.cos(rv_angle)
                rv = ((ru / a) ** 2 + (rvv / b) ** 2 <= 1.0) & (lab == 0)
                lab[rv] = 1
        labels[k] = lab

        bg = 60.0 + 25.0 * _smooth_field(rng, norm_y, norm_x)
        sl = np.where(body, 300.0, bg)
        sl = np.where(lungs, 45.0, sl)
        sl = np.where(lab == 2, 330.0, sl)
        sl = np.where(lab == 3, 860.0, sl)
        sl = np.where(lab == 1, 780.0, sl)
        sl = _box_blur(sl)
        bias = 1.0 + 0.15 * _smooth_field(rng, norm_y, norm_x, n=2)
        sl = sl * bias * gain + rng.normal(0.0, 18.0, size=sl.shape)
        image[k] = sl

    image_i16 = np.clip(np.rint(image), 0, 4095).astype(np.int16)
    geometry = dict(spacing=spacing, origin=origin, direction=direction)
    case_id = f"synth{seed:03d}_{index:03d}"
    return Case(case_id, Volume(image_i16, **geometry), Volume(labels, **geometry))


def make_synthetic_study(
    n_cases: int = 2,
    shape: tuple[int, int, int] = (12, 64, 64),
    spacing: tuple[float, float, float] = (1.0, 1.0, 4.0),
    seed: int = 0,
    direction: tuple[float, ...] = DEFAULT_DIRECTION,
    origin: tuple[float, float, float] = DEFAULT_ORIGIN,
) -> list[Case]:
    """Synthetic cardiac cases; `shape` is the array shape (k, j, i), `spacing` ITK (i, j, k)."""
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive sizes (k, j, i), got {shape}")
    if shape[0] < 4 or shape[1] < 16 or shape[2] < 16:
        raise ValueError(f"shape {shape} is too small: need at least 4 slices of 16 x 16")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive values (i, j, k) in mm, got {spacing}")
    d = np.asarray(direction, dtype=float)
    if d.size != 9 or not np.allclose(d.reshape(3, 3) @ d.reshape(3, 3).T, np.eye(3), atol=1e-6):
        raise ValueError(f"direction must be 9 values of an orthonormal matrix, got {direction}")
    return [
        _make_case(i, tuple(shape), tuple(spacing), seed, tuple(direction), tuple(origin))
        for i in range(n_cases)
    ]


def write_study(
    cases: list[Case], folder: str | os.PathLike[str], suffix: str = ".nii.gz"
) -> list[tuple[Path, Path]]:
    """Write each case as `<case_id>_image<suffix>` and `<case_id>_labels<suffix>`."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in cases:
        img = write_volume(case.image, out / f"{case.case_id}_image{suffix}")
        lbl = write_volume(case.labels, out / f"{case.case_id}_labels{suffix}")
        paths.append((img, lbl))
    return paths
