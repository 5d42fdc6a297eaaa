"""Audio-visual metrics: image quality, mouth landmarks, recognition errors, speech quality, FID.

Video (talking-face generation: Wav2Lip, SyncTalkFace, CALS, TAEM):
  * `psnr`, `ssim`: per frame, on `[..., H, W, C]` images (dm-pix; SSIM with the usual
    11 x 11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, as in Wang et al. 2004). Papers
    report the mean over all frames of all test videos.
  * `landmark_distance` (LMD): mean Euclidean distance between predicted and reference mouth
    landmarks, per frame (points 48-67 of the 68-point iBUG layout by default).
  * FID: `frechet_distance` between Gaussian feature statistics, `fid` from two feature sets,
    and `fid_from_images`, which needs Inception-v3 weights the user supplies (no package
    ships them and avjax never downloads; `require_inception_weights` says so).
  * LSE-C / LSE-D need the SyncNet sync expert and live with it, not here.

Recognition (lip reading, AVSR, AV translation):
  * `word_accuracy`: word-level classification accuracy (LRW); for sentences, 1 - WER.
  * `wer`, `cer`, `error_counts`: corpus-level word / character error rates (jiwer) after a
    light normalisation (lower case, punctuation removed, whitespace collapsed).

Speech from video (lip-to-speech, AV2AV):
  * `stoi`, `estoi` (pystoi) and `pesq` (the ITU-T P.862 implementation of PyPI `pesq`, part
    of avjax's `eval` extra because it builds from source).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Sequence

import dm_pix as pix
import jax
import numpy as np
from etils import epath

from avjax.eval import _deps

# 68-point iBUG layout (dlib): outer lip 48-59, inner lip 60-67.
MOUTH_68 = tuple(range(48, 68))


# --- images ---------------------------------------------------------------------------------------


def _to_unit(a: np.ndarray, b: np.ndarray, max_val: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float32 in [0, 1] (uint8 is divided by 255, floats by `max_val`)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    if a.ndim < 3:
        raise ValueError(f"expected images [..., H, W, C], got shape {a.shape}")
    if max_val is None:
        max_val = 255.0 if a.dtype == np.uint8 else 1.0
    return a.astype(np.float32) / max_val, b.astype(np.float32) / max_val


@jax.jit
def _psnr(a: jax.Array, b: jax.Array) -> jax.Array:
    return pix.psnr(a, b)


@functools.partial(jax.jit, static_argnames=("filter_size", "filter_sigma"))
def _ssim(a: jax.Array, b: jax.Array, filter_size: int, filter_sigma: float) -> jax.Array:
    return pix.ssim(a, b, max_val=1.0, filter_size=filter_size, filter_sigma=filter_sigma)


def psnr(a: np.ndarray, b: np.ndarray, *, max_val: float | None = None) -> np.ndarray:
    """Peak signal-to-noise ratio per image, `10 log10(max_val^2 / MSE)` in dB.

    Args:
      a, b: `[..., H, W, C]` images of the same shape; uint8 (max 255) or float.
      max_val: the peak value; default 255 for uint8, else 1.0.

    Returns:
      `[...]` float32 (inf where the images are equal).
    """
    a, b = _to_unit(a, b, max_val)
    return np.asarray(_psnr(a, b))


def ssim(
    a: np.ndarray,
    b: np.ndarray,
    *,
    max_val: float | None = None,
    filter_size: int = 11,
    filter_sigma: float = 1.5,
) -> np.ndarray:
    """Structural similarity per image (Gaussian window; mean over pixels and channels).

    Args:
      a, b: `[..., H, W, C]` images (grey: `C == 1`), `H, W >= filter_size`; uint8 or float.
      max_val: the dynamic range; default 255 for uint8, else 1.0.
      filter_size, filter_sigma: the Gaussian window.

    Returns:
      `[...]` float32 in [-1, 1].
    """
    a, b = _to_unit(a, b, max_val)
    if min(a.shape[-3:-1]) < filter_size:
        raise ValueError(f"images {a.shape[-3:-1]} smaller than the SSIM window {filter_size}")
    return np.asarray(_ssim(a, b, filter_size, float(filter_sigma)))


# --- landmarks ------------------------------------------------------------------------------------


def landmark_distance(
    pred: np.ndarray, target: np.ndarray, *, indices: Sequence[int] | None = MOUTH_68
) -> np.ndarray:
    """Landmark distance (LMD): mean Euclidean distance over the selected points, per frame.

    Compare landmarks in the same image frame (both detected on crops of the same size; LMD
    is in those pixels).

    Args:
      pred, target: `[..., K, 2]` (or `[..., K, 3]`) landmark coordinates.
      indices: the points to compare; default the 20 mouth points of the 68-point layout
        (requires `K == 68`); None: all points.

    Returns:
      `[...]` float64 mean distance per frame; average it over frames and videos.
    """
    p, t = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if p.shape != t.shape or p.ndim < 2:
        raise ValueError(f"landmark shapes must match as [..., K, D], got {p.shape} vs {t.shape}")
    if indices is MOUTH_68 and p.shape[-2] != 68:
        raise ValueError(
            f"the default mouth indices need 68-point landmarks, got {p.shape[-2]} points; "
            "pass indices= for another layout (or None for all points)"
        )
    if indices is not None:
        p, t = p[..., list(indices), :], t[..., list(indices), :]
    return np.linalg.norm(p - t, axis=-1).mean(-1)


# --- recognition ----------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Lower case, punctuation removed (apostrophes inside words kept), whitespace collapsed."""
    text = re.sub(r"[^\w\s']|(?<!\w)'|'(?!\w)", " ", text.lower())
    return " ".join(text.split())


def word_accuracy(predictions: Sequence[str | int], targets: Sequence[str | int]) -> float:
    """Fraction of items whose predicted word (or class id) equals the target (LRW accuracy).

    Strings are compared after `normalize_text`. For sentences, word accuracy is `1 - wer`.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        raise ValueError("word_accuracy of zero items")

    def norm(x: str | int) -> str | int:
        return normalize_text(x) if isinstance(x, str) else x

    return float(np.mean([norm(p) == norm(t) for p, t in zip(predictions, targets, strict=True)]))


def _prepare(
    references: str | Sequence[str], hypotheses: str | Sequence[str], normalize: bool
) -> tuple[list[str], list[str]]:
    refs = [references] if isinstance(references, str) else list(references)
    hyps = [hypotheses] if isinstance(hypotheses, str) else list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references for {len(hyps)} hypotheses")
    if normalize:
        refs, hyps = [normalize_text(r) for r in refs], [normalize_text(h) for h in hyps]
    empty = [i for i, r in enumerate(refs) if not r.strip()]
    if empty:
        raise ValueError(f"references {empty[:10]} are empty (after normalisation)")
    return refs, hyps


def wer(
    references: str | Sequence[str], hypotheses: str | Sequence[str], *, normalize: bool = True
) -> float:
    """Corpus word error rate: (substitutions + deletions + insertions) / reference words."""
    import jiwer

    refs, hyps = _prepare(references, hypotheses, normalize)
    return float(jiwer.wer(refs, hyps))


def cer(
    references: str | Sequence[str], hypotheses: str | Sequence[str], *, normalize: bool = True
) -> float:
    """Corpus character error rate (spaces count as characters, as in jiwer)."""
    import jiwer

    refs, hyps = _prepare(references, hypotheses, normalize)
    return float(jiwer.cer(refs, hyps))


def error_counts(
    references: str | Sequence[str], hypotheses: str | Sequence[str], *, normalize: bool = True
) -> dict[str, int | float]:
    """Word-level alignment counts: `substitutions`, `deletions`, `insertions`, `hits`,
    `reference_words` and `wer`."""
    import jiwer

    refs, hyps = _prepare(references, hypotheses, normalize)
    out = jiwer.process_words(refs, hyps)
    n = out.substitutions + out.deletions + out.hits
    return {
        "substitutions": out.substitutions,
        "deletions": out.deletions,
        "insertions": out.insertions,
        "hits": out.hits,
        "reference_words": n,
        "wer": float(out.wer),
    }


# --- speech ---------------------------------------------------------------------------------------


def _pair(clean: np.ndarray, degraded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(clean, np.float64), np.asarray(degraded, np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"expected two mono signals [samples] of one length, got {x.shape}, {y.shape}"
        )
    return x, y


def stoi(
    clean: np.ndarray, degraded: np.ndarray, *, sample_rate: int = 16000, extended: bool = False
) -> float:
    """Short-time objective intelligibility (Taal et al. 2011) of `degraded [N]` against
    `clean [N]`, in about [0, 1]; `extended=True` gives ESTOI (Jensen & Taal 2016).
    pystoi resamples to 10 kHz internally and drops silent frames of `clean`."""
    from pystoi import stoi as _stoi

    x, y = _pair(clean, degraded)
    return float(_stoi(x, y, sample_rate, extended=extended))


def estoi(clean: np.ndarray, degraded: np.ndarray, *, sample_rate: int = 16000) -> float:
    """Extended STOI (`stoi(..., extended=True)`)."""
    return stoi(clean, degraded, sample_rate=sample_rate, extended=True)


def pesq(
    clean: np.ndarray, degraded: np.ndarray, *, sample_rate: int = 16000, mode: str = "wb"
) -> float:
    """PESQ (ITU-T P.862; `mode="wb"`: P.862.2 wide band, 16 kHz; `"nb"`: narrow band, 8 or
    16 kHz) MOS-LQO of `degraded [N]` against `clean [N]`, about 1.0 (bad) ... 4.64 (wb).

    Raises:
      MissingEvalDependency: PyPI `pesq` (the `eval` extra) is not installed.
      ValueError: unsupported rate / mode, or no speech found in `clean`.
    """
    mod = _deps.require("pesq", "pesq", "PESQ")
    if (
        mode not in ("wb", "nb")
        or sample_rate not in (8000, 16000)
        or (mode == "wb" and sample_rate != 16000)
    ):
        raise ValueError(
            f"PESQ supports mode 'wb' at 16 kHz and 'nb' at 8/16 kHz, got {mode!r} "
            f"at {sample_rate} Hz"
        )
    x, y = _pair(clean, degraded)
    try:
        return float(mod.pesq(sample_rate, x, y, mode))
    except mod.PesqError as e:  # e.g. NoUtterancesError on silence
        raise ValueError(f"PESQ failed ({type(e).__name__}: {e})") from e


# --- FID ------------------------------------------------------------------------------------------


class MissingWeightsError(FileNotFoundError):
    """A metric needs network weights that the user has to supply."""


def require_inception_weights(path: str | os.PathLike | None) -> epath.Path:
    """Checks the user-given Inception-v3 weights path for FID; returns it as a path.

    Raises:
      MissingWeightsError: `path` is None or does not exist. FID's Inception-v3 weights
        (e.g. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`) ship in no package, and
        avjax never downloads at run time: download them once yourself and pass the path.
    """
    hint = (
        "FID needs the Inception-v3 weights (e.g. pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth), which no package ships and avjax never "
        "downloads: fetch them once and pass their path (inception_weights=PATH)"
    )
    if path is None or not os.fspath(path):
        raise MissingWeightsError(f"{hint}; no path was given")
    p = epath.Path(path)
    if not p.exists():
        raise MissingWeightsError(f"{hint}; {os.fspath(path)} does not exist")
    return p


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean `[D]` and covariance `[D, D]` (unbiased, float64) of `features [N, D]`."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"expected features [N >= 2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between `N(mu1, sigma1)` and `N(mu2, sigma2)`:
    `|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))`.

    `tr((S1 S2)^(1/2))` is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix `S1^(1/2) S2 S1^(1/2)` (same spectrum), which stays real and stable
    for singular covariances (fewer samples than dimensions).

    Args:
      mu1, mu2: `[D]` means. sigma1, sigma2: `[D, D]` covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"expected means [D] and covariances [D, D], got {mu1.shape}, {s1.shape}, "
            f"{mu2.shape}, {s2.shape}"
        )
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets `[N1, D]`, `[N2, D]` (Inception pool3 features, D = 2048)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def fid_from_images(
    images1: np.ndarray,
    images2: np.ndarray,
    *,
    inception_weights: str | os.PathLike | None,
    extract_features: Callable[[epath.Path, np.ndarray], np.ndarray],
) -> float:
    """FID between two image sets `[N, H, W, 3]` with a user-supplied Inception-v3.

    Args:
      images1, images2: `[N, H, W, 3]` images (what `extract_features` expects).
      inception_weights: path to the Inception-v3 weights; checked first
        (`require_inception_weights`), so a missing file fails before any work.
      extract_features: `(weights_path, images [N, H, W, 3]) -> features [N, D]`, e.g. a
        pytorch-fid `InceptionV3` loaded from that file (avjax has no Inception port yet).
    """
    weights = require_inception_weights(inception_weights)
    return fid(extract_features(weights, images1), extract_features(weights, images2))
