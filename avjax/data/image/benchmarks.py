"""Real-noise benchmarks read from `manual_dir` in their published layouts (nothing downloads).

  sidd_small  <manual_dir>/Data/<scene>/GT_SRGB_*.PNG + NOISY_SRGB_*.PNG   (SIDD-Small sRGB)
  sidd_val    <manual_dir>/ValidationNoisyBlocksSrgb.mat + ValidationGtBlocksSrgb.mat
              (uint8 [40, 32, 256, 256, 3] blocks)
  polyu       <manual_dir>/**/*_real.JPG + *_mean.JPG (any case of the extension)
  nam         <manual_dir>/**/*_real.png + *_mean.png (CC15 / CC60 crops)

Each loader returns `(pairs, skipped)`: pairs `(name, noisy, clean)` of uint8 `[H, W, 3]`
arrays in a stable order. A pair that is missing its partner, unreadable or of mismatched
shape raises an error naming the file; with `skip_bad=True` it is skipped and counted.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from PIL import Image

Pair = tuple[str, np.ndarray, np.ndarray]
NAMES = ("sidd_small", "sidd_val", "polyu", "nam")


def read_image(path: str) -> np.ndarray:
    """uint8 `[H, W, 3]` from an image file (error naming the file if unreadable)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except Exception as e:  # noqa: BLE001  (PIL raises many types)
        raise ValueError(f"cannot read image {path}: {e}") from e


def _require_dir(root: str, name: str, layout: str) -> None:
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"config.data.manual_dir={root!r} is not a folder; {name} expects {layout}"
        )


def _pairs_from_files(files: list[tuple[str, str, str]], skip_bad: bool) -> tuple[list[Pair], int]:
    """`files`: (name, noisy path, clean path) -> read pairs, skipping or raising on bad ones."""
    pairs, skipped = [], 0
    for name, noisy_path, clean_path in files:
        try:
            for p in (noisy_path, clean_path):
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"{name}: missing {p}")
            noisy, clean = read_image(noisy_path), read_image(clean_path)
            if noisy.shape != clean.shape:
                raise ValueError(
                    f"{noisy_path} is {noisy.shape} but its clean image {clean_path} is "
                    f"{clean.shape}"
                )
        except (ValueError, FileNotFoundError):
            if not skip_bad:
                raise
            skipped += 1
            continue
        pairs.append((name, noisy, clean))
    return pairs, skipped


def _suffix_pairs(root: str, noisy_sfx: str, clean_sfx: str) -> list[tuple[str, str, str]]:
    """Every file ending in `noisy_sfx` (case-insensitive) under `root`, with its partner
    (the same name with `clean_sfx`'s tag, keeping the file's extension as written)."""
    out = []
    noisy_tag, clean_tag = noisy_sfx.split(".")[0], clean_sfx.split(".")[0]
    for dirpath, _, names in sorted(os.walk(root)):
        for n in sorted(names):
            if n.lower().endswith(noisy_sfx.lower()):
                stem = n[: -len(noisy_sfx)]
                partner = stem + clean_tag + n[len(stem) + len(noisy_tag) :]
                rel = os.path.relpath(os.path.join(dirpath, stem), root)
                out.append((rel, os.path.join(dirpath, n), os.path.join(dirpath, partner)))
    return out


def sidd_small(root: str, skip_bad: bool = False) -> tuple[list[Pair], int]:
    """SIDD-Small sRGB: `Data/<scene>/NOISY_SRGB_*.PNG` with its `GT_SRGB_*.PNG`."""
    _require_dir(os.path.join(root, "Data"), "sidd_small", "Data/<scene>/NOISY_SRGB_*.PNG")
    files = []
    data = os.path.join(root, "Data")
    for scene in sorted(os.listdir(data)):
        d = os.path.join(data, scene)
        for n in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if n.upper().startswith("NOISY_SRGB_"):
                gt = "GT_SRGB_" + n[len("NOISY_SRGB_") :]
                files.append((f"{scene}/{n}", os.path.join(d, n), os.path.join(d, gt)))
    if not files:
        raise FileNotFoundError(f"no Data/<scene>/NOISY_SRGB_*.PNG under {root}")
    return _pairs_from_files(files, skip_bad)


def sidd_val(root: str, skip_bad: bool = False) -> tuple[list[Pair], int]:
    """SIDD validation blocks from the two .mat files (every block one pair)."""
    import scipy.io

    _require_dir(root, "sidd_val", "ValidationNoisyBlocksSrgb.mat + ValidationGtBlocksSrgb.mat")
    arrays = {}
    for key in ("ValidationNoisyBlocksSrgb", "ValidationGtBlocksSrgb"):
        path = os.path.join(root, key + ".mat")
        try:
            arrays[key] = np.asarray(scipy.io.loadmat(path)[key], np.uint8)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read {path} (expected variable {key!r}): {e}") from e
    noisy, clean = arrays["ValidationNoisyBlocksSrgb"], arrays["ValidationGtBlocksSrgb"]
    if noisy.shape != clean.shape or noisy.ndim != 5 or noisy.shape[-1] != 3:
        raise ValueError(
            f"SIDD validation blocks in {root}: noisy {noisy.shape} and clean {clean.shape} "
            "must both be [images, blocks, H, W, 3]"
        )
    pairs = [
        (f"{i:02d}_{j:02d}", noisy[i, j], clean[i, j])
        for i in range(noisy.shape[0])
        for j in range(noisy.shape[1])
    ]
    return pairs, 0


def polyu(root: str, skip_bad: bool = False) -> tuple[list[Pair], int]:
    """PolyU: `*_real.JPG` with `*_mean.JPG`."""
    _require_dir(root, "polyu", "*_real.JPG + *_mean.JPG")
    files = _suffix_pairs(root, "_real.jpg", "_mean.jpg")
    if not files:
        raise FileNotFoundError(f"no *_real.JPG under {root}")
    return _pairs_from_files(files, skip_bad)


def nam(root: str, skip_bad: bool = False) -> tuple[list[Pair], int]:
    """Nam (CC15 / CC60): `*_real.png` with `*_mean.png`."""
    _require_dir(root, "nam", "CC15|CC60/*_real.png + *_mean.png")
    files = _suffix_pairs(root, "_real.png", "_mean.png")
    if not files:
        raise FileNotFoundError(f"no *_real.png under {root}")
    return _pairs_from_files(files, skip_bad)


LOADERS: dict[str, Callable[[str, bool], tuple[list[Pair], int]]] = {
    "sidd_small": sidd_small,
    "sidd_val": sidd_val,
    "polyu": polyu,
    "nam": nam,
}


def load(name: str, root: str, skip_bad: bool = False) -> tuple[list[Pair], int]:
    """The pairs of benchmark `name` (one of `NAMES`) under `root`, and how many were skipped."""
    if name not in LOADERS:
        raise ValueError(f"config.data.name={name!r}: benchmarks are {NAMES} (or 'default')")
    return LOADERS[name](root, skip_bad)
