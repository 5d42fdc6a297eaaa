"""Tests of avjax.eval.av_metrics against numpy / scipy reference formulas and known values."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.linalg
import scipy.signal

from avjax.eval import av_metrics as m


def _images(seed: int = 0, shape=(3, 40, 48, 3)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    base = (np.sin(xx / 5)[..., None] * np.cos(yy / 7)[..., None] + 1) * 100 + 20
    a = np.clip(base[None] + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 12, shape), 0, 255).astype(np.uint8)
    return a, b


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 SSIM of one `[H, W, C]` image pair in [0, 1] (scipy, valid windows)."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    maps = []
    for c in range(a.shape[-1]):
        p, q = a[..., c].astype(np.float64), b[..., c].astype(np.float64)

        def f(z):
            return scipy.signal.convolve2d(z, win, mode="valid")

        mp, mq = f(p), f(q)
        vp, vq, cov = f(p * p) - mp**2, f(q * q) - mq**2, f(p * q) - mp * mq
        maps.append(((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
    return float(np.mean(maps))


def test_psnr_matches_numpy_formula():
    a, b = _images()
    mse = ((a.astype(np.float64) - b) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(m.psnr(a, b), 10 * np.log10(255**2 / mse), rtol=1e-4)
    fa, fb = a / 255.0, b / 255.0
    np.testing.assert_allclose(m.psnr(fa, fb), m.psnr(a, b), rtol=1e-4)
    assert np.isinf(m.psnr(a, a)).all()
    with pytest.raises(ValueError, match="shapes differ"):
        m.psnr(a, b[:, :-1])


def test_ssim_matches_reference():
    a, b = _images()
    got = m.ssim(a, b)
    assert got.shape == (3,)
    want = [_ssim_reference(x / 255.0, y / 255.0) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(m.ssim(a, a), 1.0, atol=1e-5)
    assert np.all(got < 0.95) and np.all(got > 0.3)
    if importlib.util.find_spec("skimage"):  # scikit-image pads instead of 'valid': close
        from skimage.metrics import structural_similarity

        sk = structural_similarity(
            a[0], b[0], channel_axis=-1, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=255,
        )  # fmt: skip
        assert abs(sk - got[0]) < 0.03


def test_landmark_distance():
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 96, (5, 68, 2))
    pred = target.copy()
    pred[:, 48:68] += np.array([3.0, 4.0])  # every mouth point 5 px off
    pred[:, :48] += 100.0  # the rest of the face is ignored
    np.testing.assert_allclose(m.landmark_distance(pred, target), np.full(5, 5.0))
    np.testing.assert_allclose(
        m.landmark_distance(pred, target, indices=[0]), np.full(5, 100 * 2**0.5)
    )
    with pytest.raises(ValueError, match="68-point"):
        m.landmark_distance(pred[:, :20], target[:, :20])


def test_word_accuracy_wer_cer():
    assert m.word_accuracy(["ABOUT", "after", "Again"], ["about", "AFTER", "against"]) == 2 / 3
    assert m.word_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    ref, hyp = "The cat sat on the mat.", "the cat sit on mat"
    assert m.wer(ref, hyp) == pytest.approx(2 / 6)  # one substitution, one deletion
    counts = m.error_counts(ref, hyp)
    assert (counts["substitutions"], counts["deletions"], counts["insertions"]) == (1, 1, 0)
    assert counts["reference_words"] == 6
    # corpus level: total errors / total reference words
    assert m.wer([ref, "hello world"], [hyp, "hello there world"]) == pytest.approx(3 / 8)
    assert m.cer("abcd", "abed") == pytest.approx(0.25)
    assert m.wer("It's fine!", "it's fine") == 0.0
    with pytest.raises(ValueError, match="empty"):
        m.wer(["hello", "..."], ["hello", "x"])


def _speechlike(seconds: float = 3.0, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """Harmonic voice with a wandering pitch, syllable-rate envelope and pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 130 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = sum(np.sin(k * phase) / k for k in range(1, 25))
    env = np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) ** 0.5 * (
        np.sin(2 * np.pi * 0.4 * t) > -0.6
    )
    x = voice * env + 0.01 * rng.normal(size=t.shape) * env
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def test_stoi_estoi():
    x = _speechlike()
    noisy = x + np.random.default_rng(1).normal(0, 0.05, x.shape).astype(np.float32)
    assert m.stoi(x, x) == pytest.approx(1.0, abs=1e-6)
    assert m.estoi(x, x) == pytest.approx(1.0, abs=1e-6)
    assert m.stoi(x, noisy) < 0.9
    assert m.estoi(x, noisy) < m.stoi(x, noisy)
    with pytest.raises(ValueError, match="one length"):
        m.stoi(x, x[:-1])


def test_pesq():
    pytest.importorskip("pesq")  # the `eval` extra
    x = _speechlike()
    noisy = x + np.random.default_rng(1).normal(0, 0.05, x.shape).astype(np.float32)
    clean_score = m.pesq(x, x)
    assert clean_score > 4.0
    assert m.pesq(x, noisy) < clean_score - 1.0
    with pytest.raises(ValueError, match="16 kHz"):
        m.pesq(x, x, sample_rate=8000, mode="wb")


def _scipy_frechet(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy_reference():
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(400, 12))
    f2 = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    s1, s2 = m.feature_statistics(f1), m.feature_statistics(f2)
    np.testing.assert_allclose(m.frechet_distance(*s1, *s2), _scipy_frechet(*s1, *s2), rtol=1e-6)
    assert m.fid(f1, f2) == pytest.approx(_scipy_frechet(*s1, *s2), rel=1e-6)
    assert abs(m.fid(f1, f1)) < 1e-8
    # fewer samples than dimensions: singular covariances stay finite and agree
    g1, g2 = rng.normal(size=(8, 20)), rng.normal(size=(8, 20)) + 1
    s1, s2 = m.feature_statistics(g1), m.feature_statistics(g2)
    np.testing.assert_allclose(m.frechet_distance(*s1, *s2), _scipy_frechet(*s1, *s2), rtol=1e-4)


def test_fid_needs_user_given_inception_weights(tmp_path):
    a, b = _images()
    with pytest.raises(m.MissingWeightsError, match="Inception-v3 weights.*no path was given"):
        m.fid_from_images(a, b, inception_weights=None, extract_features=lambda w, x: x)
    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(FileNotFoundError, match="pt_inception.pth does not exist"):
        m.fid_from_images(a, b, inception_weights=missing, extract_features=lambda w, x: x)
    missing.write_bytes(b"weights")
    seen = []

    def extract(weights, images):
        seen.append(weights)
        return images.reshape(len(images), -1)[:, :4].astype(np.float64)

    value = m.fid_from_images(a, b, inception_weights=missing, extract_features=extract)
    assert np.isfinite(value) and seen == [missing, missing]
