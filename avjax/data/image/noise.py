"""Noise models on float images `[H, W, 3]` in [0, 1] (numpy, host side, seeded).

Synthetic families (TTAID's stage 1): additive Gaussian and speckle (multiplicative) noise
with sigma in [5, 50] / 255 and salt-and-pepper, applied in random order (`synthetic`).
Realistic camera noise (`camera`): an image-formation model in the spirit of "unprocessing"
(Brooks et al., 2019): sRGB -> inverse gamma -> inverse tone curve -> inverse white balance
-> RGGB mosaic -> Poisson-Gaussian shot/read noise at a sampled ISO -> bilinear demosaic ->
white balance -> tone curve -> gamma -> JPEG. Its noise is signal dependent, spatially
correlated (demosaicking) and blocky (JPEG): structure the Gaussian stage never saw.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

FAMILIES = ("gaussian", "speckle", "salt_pepper", "synthetic", "camera")
SIGMA_RANGE = (5.0 / 255.0, 50.0 / 255.0)


def gaussian(img: np.ndarray, rng: np.random.Generator, sigma: float | None = None) -> np.ndarray:
    """`img + N(0, sigma^2)`, sigma uniform in [5, 50]/255 unless given; clipped to [0, 1]."""
    sigma = rng.uniform(*SIGMA_RANGE) if sigma is None else sigma
    return np.clip(img + rng.normal(0.0, sigma, img.shape), 0.0, 1.0).astype(np.float32)


def speckle(img: np.ndarray, rng: np.random.Generator, sigma: float | None = None) -> np.ndarray:
    """`img * (1 + N(0, sigma^2))` (multiplicative); clipped to [0, 1]."""
    sigma = rng.uniform(*SIGMA_RANGE) if sigma is None else sigma
    return np.clip(img * (1.0 + rng.normal(0.0, sigma, img.shape)), 0.0, 1.0).astype(np.float32)


def salt_pepper(
    img: np.ndarray, rng: np.random.Generator, amount: float | None = None
) -> np.ndarray:
    """A fraction `amount` (uniform in [0, 0.02] unless given) of pixels set to 0 or 1."""
    amount = rng.uniform(0.0, 0.02) if amount is None else amount
    hit = rng.random(img.shape[:2]) < amount
    value = (rng.random(img.shape[:2]) < 0.5).astype(np.float32)
    out = img.copy()
    out[hit] = value[hit][:, None]
    return out.astype(np.float32)


def synthetic(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian, speckle and salt-and-pepper noise, each in a random order (TTAID stage 1)."""
    out = img
    for i in rng.permutation(3):
        out = (gaussian, speckle, salt_pepper)[int(i)](out, rng)
    return out


# --- camera image-formation model -----------------------------------------------------------


def _inverse_tone(y: np.ndarray) -> np.ndarray:
    """Inverse of the smoothstep tone curve `3x^2 - 2x^3`."""
    y = np.clip(y, 0.0, 1.0)
    return 0.5 - np.sin(np.arcsin(1.0 - 2.0 * y) / 3.0)


def _tone(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return 3.0 * x**2 - 2.0 * x**3


def mosaic(rgb: np.ndarray) -> np.ndarray:
    """RGGB Bayer mosaic `[H, W, 3] -> [H, W]` (H, W even)."""
    raw = np.empty(rgb.shape[:2], rgb.dtype)
    raw[0::2, 0::2] = rgb[0::2, 0::2, 0]
    raw[0::2, 1::2] = rgb[0::2, 1::2, 1]
    raw[1::2, 0::2] = rgb[1::2, 0::2, 1]
    raw[1::2, 1::2] = rgb[1::2, 1::2, 2]
    return raw


def _conv3(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """3 x 3 correlation with reflect padding `[H, W] -> [H, W]`."""
    p = np.pad(x, 1, mode="reflect")
    h, w = x.shape
    return sum(k[i, j] * p[i : i + h, j : j + w] for i in range(3) for j in range(3))


def demosaic(raw: np.ndarray) -> np.ndarray:
    """Bilinear demosaicking of an RGGB mosaic `[H, W] -> [H, W, 3]`."""
    masks = np.zeros(raw.shape + (3,), raw.dtype)
    masks[0::2, 0::2, 0] = 1
    masks[0::2, 1::2, 1] = 1
    masks[1::2, 0::2, 1] = 1
    masks[1::2, 1::2, 2] = 1
    k_rb = np.array([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]])
    k_g = np.array([[0.0, 0.25, 0.0], [0.25, 1.0, 0.25], [0.0, 0.25, 0.0]])
    chans = [_conv3(raw * masks[..., c], k_g if c == 1 else k_rb) for c in range(3)]
    return np.stack(chans, axis=-1)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip at `quality` (uint8 quantisation included)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())), np.float32) / 255.0


ISO_RANGE = (800.0, 12800.0)  # held-out 96 x 96 crops: ~31 dB at 800, ~22 dB at 12800
JPEG_RANGE = (60, 90)


def camera(
    img: np.ndarray,
    rng: np.random.Generator,
    iso: float | None = None,
    jpeg_quality: int | None = None,
) -> np.ndarray:
    """Realistic camera noise on a clean sRGB image `[H, W, 3]` (H, W even).

    `iso` log-uniform in `ISO_RANGE` unless given sets the shot noise of the linear raw
    signal (variance `shot * x`, `shot = 1.5e-4 * iso / 100`); the read-noise variance
    follows the log-linear fit of "unprocessing" (Brooks et al., 2019),
    `exp(2.18 log(shot) + 1.2 + N(0, 0.26^2))`; white-balance gains are sampled (red
    1.9-2.4, blue 1.5-1.9); JPEG quality uniform in `JPEG_RANGE` unless given. Held-out
    96 x 96 crops score ~26 dB PSNR on average (SIDD's sRGB pairs: ~24-30 dB).
    """
    lo, hi = np.log(ISO_RANGE[0]), np.log(ISO_RANGE[1])
    iso = float(np.exp(rng.uniform(lo, hi))) if iso is None else iso
    quality = int(rng.integers(JPEG_RANGE[0], JPEG_RANGE[1] + 1))
    quality = quality if jpeg_quality is None else jpeg_quality
    gains = np.array([rng.uniform(1.9, 2.4), 1.0, rng.uniform(1.5, 1.9)], np.float32)
    lin = _inverse_tone(np.clip(img, 0.0, 1.0) ** 2.2)
    raw = mosaic(lin / gains[None, None])
    shot = 1.5e-4 * iso / 100.0
    read = float(np.exp(2.18 * np.log(shot) + 1.2 + rng.normal(0.0, 0.26)))
    noisy = raw + rng.normal(0.0, 1.0, raw.shape) * np.sqrt(np.maximum(shot * raw + read, 0))
    rgb = np.clip(demosaic(noisy) * gains[None, None], 0.0, 1.0)
    srgb = _tone(rgb) ** (1.0 / 2.2)
    return jpeg(srgb, quality)


def apply(family: str, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The noise `family` (one of `FAMILIES`) applied to `img [H, W, 3]` in [0, 1]."""
    fns = {
        "gaussian": gaussian,
        "speckle": speckle,
        "salt_pepper": salt_pepper,
        "synthetic": synthetic,
        "camera": camera,
    }
    if family not in fns:
        raise ValueError(f"noise family {family!r} is not one of {FAMILIES}")
    return fns[family](img, rng).astype(np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """`[..., 3]` float in [0, 1] -> uint8 (rounded, clipped)."""
    return np.clip(np.round(np.asarray(img, np.float32) * 255.0), 0, 255).astype(np.uint8)
