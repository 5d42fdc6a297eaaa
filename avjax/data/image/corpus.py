"""The embedded default image corpus: photographs shipped with scikit-image (offline).

`train_images()` and `heldout_images()` are float32 `[H, W, 3]` in [0, 1] (grey images are
repeated over 3 channels). Whole photographs are held out (never cropped for training).
Loading takes well under a second, so nothing is cached.
"""

from __future__ import annotations

import numpy as np

TRAIN = (
    "astronaut",
    "camera",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "moon",
    "coins",
    "brick",
    "grass",
    "cell",
    "page",
    "colorwheel",
)
HELDOUT = ("chelsea", "clock", "gravel")


def load(name: str) -> np.ndarray:
    """One `skimage.data` photograph as float32 `[H, W, 3]` in [0, 1]."""
    import skimage.data

    fn = getattr(skimage.data, name, None)
    if fn is None:
        raise ValueError(f"skimage.data has no image {name!r}")
    img = np.asarray(fn())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img[..., :3]
    return (img.astype(np.float32) / 255.0).astype(np.float32)


def train_images(names: tuple[str, ...] = TRAIN) -> list[np.ndarray]:
    """The training photographs (float32 `[H, W, 3]`)."""
    return [load(n) for n in names]


def heldout_images(names: tuple[str, ...] = HELDOUT) -> list[np.ndarray]:
    """The held-out photographs (float32 `[H, W, 3]`)."""
    return [load(n) for n in names]


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random `[size, size, 3]` crop, with a random flip and 90-degree rotation."""
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {img.shape} is smaller than the crop {size}")
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    crop = img[y : y + size, x : x + size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(np.rot90(crop, int(rng.integers(0, 4))))


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The central `[size, size, 3]` crop."""
    h, w = img.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(img[y : y + size, x : x + size])
