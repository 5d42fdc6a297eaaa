"""Mini-batch k-means over 8 CPU devices, and tools/fit_units.py end to end (MFCC features)."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
import soundfile as sf

from avjax.data import features as features_lib
from avjax.data import kmeans as kmeans_lib
from avjax.data.units import UnitTokenizer

_spec = importlib.util.spec_from_file_location(
    "fit_units", os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "fit_units.py")
)
fit_units = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fit_units)


def _blobs(n=12_000, k=6, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, dim)).astype(np.float32) * 8.0
    labels = rng.integers(0, k, n)
    x = means[labels] + rng.normal(size=(n, dim)).astype(np.float32) * 0.5
    return x.astype(np.float32), labels, means


def test_recovers_planted_clusters_on_8_devices():
    assert len(jax.devices()) == 8
    x, labels, means = _blobs()
    res = kmeans_lib.fit_minibatch_kmeans(x, 6, batch_size=1000, epochs=3, seed=0)
    assert res.centroids.shape == (6, 8)
    assert res.batch_size % 8 == 0
    assign = np.argmin(((x[:, None] - res.centroids[None]) ** 2).sum(-1), axis=1)
    blob_to_c = [np.bincount(assign[labels == b], minlength=6) for b in range(6)]
    # Every point of a blob goes to one centroid, and distinct blobs to distinct centroids.
    for counts in blob_to_c:
        assert counts.max() == counts.sum()
    mapping = [int(np.argmax(c)) for c in blob_to_c]
    assert sorted(mapping) == list(range(6))
    # Centroids sit on the true means (noise std 0.5, ~2000 points per blob).
    err = np.abs(res.centroids[mapping] - means).max()
    assert err < 0.1, err
    # Inertia approaches the noise variance summed over dims: 8 * 0.25.
    assert abs(kmeans_lib.mean_sq_distance(x, res.centroids) - 2.0) < 0.1
    # Every batch point (12 full batches per epoch, no padding) is counted once.
    assert res.counts.sum() == res.steps * 1000


def test_sharded_fit_equals_one_device_fit():
    x, _, _ = _blobs(n=5000, k=6, dim=8, seed=1)
    kw = dict(batch_size=512, epochs=2, seed=3, max_no_improvement=None)
    r8 = kmeans_lib.fit_minibatch_kmeans(x, 10, **kw)
    r1 = kmeans_lib.fit_minibatch_kmeans(x, 10, mesh=kmeans_lib.data_mesh(jax.devices()[:1]), **kw)
    assert r8.steps == r1.steps == 20
    np.testing.assert_allclose(r8.centroids, r1.centroids, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(r8.counts, r1.counts)
    np.testing.assert_allclose(r8.inertia, r1.inertia, rtol=1e-5)


def test_empty_centroids_are_reseeded():
    # Duplicate points: k-means++ must pick repeats; every centroid still ends up used.
    x = np.repeat(np.eye(4, dtype=np.float32) * 5, 64, axis=0)
    res = kmeans_lib.fit_minibatch_kmeans(x, 4, batch_size=64, epochs=4, seed=0)
    assign = np.argmin(((x[:, None] - res.centroids[None]) ** 2).sum(-1), axis=1)
    assert len(np.unique(assign)) == 4


def test_feature_extractors_and_errors(tmp_path):
    wav = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    for name, dim in (("logmel", 320), ("mfcc", 156)):
        ex = features_lib.get_extractor(name)
        f = ex(wav)
        assert f.shape == (25, dim) and ex.dim == dim and ex.frame_rate == 25.0
        assert np.isfinite(f).all()
    with pytest.raises(ValueError, match="unknown feature extractor 'mel'"):
        features_lib.get_extractor("mel")
    with pytest.raises(ValueError, match="hubert_dir"):
        features_lib.get_extractor("hubert")
    with pytest.raises(FileNotFoundError, match="nope"):
        features_lib.get_extractor("hubert", hubert_dir=tmp_path / "nope")


def _write_corpus(root, num_files=6, seconds=2.0, sr=16000):
    """Files of three kinds of sound (low tone, high tone, noise), so units have structure."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    for i in range(num_files):
        spk = root / f"spk{i % 2}"
        spk.mkdir(parents=True, exist_ok=True)
        parts = [
            0.3 * np.sin(2 * np.pi * 220 * t[: len(t) // 3]),
            0.3 * np.sin(2 * np.pi * 1800 * t[: len(t) // 3]),
            0.1 * rng.standard_normal(len(t) // 3),
        ]
        sf.write(spk / f"utt{i}.wav", np.concatenate(parts).astype(np.float32), sr)


def test_fit_units_tool_end_to_end_mfcc(tmp_path, capsys):
    _write_corpus(tmp_path / "audio")
    out = tmp_path / "units"
    info = fit_units.main(
        [
            f"--audio_dir={tmp_path / 'audio'}",
            "--features=mfcc",
            "--num_units=8",
            f"--out={out}",
            "--batch_size=64",
            "--epochs=5",
            "--no_progress",
        ]
    )
    printed = capsys.readouterr().out
    assert "h of audio / min" in printed
    tok = UnitTokenizer.load(out)
    assert tok.num_units == 8 and tok.feature_dim == 156
    meta = json.loads((out / "tokenizer.json").read_text())
    assert meta["extractor"]["name"] == "mfcc"
    assert info["files"] == 5  # one of 6 files is held out by scan_audio_dir
    assert info["frames"] == 5 * (3 * (32000 // 3) // 640)  # ~2 s at 25 Hz, 49 frames each
    assert info["used_units"] >= 3
    # Units follow the sound: tone / tone / noise thirds get different dominant units.
    wav, _ = sf.read(tmp_path / "audio" / "spk0" / "utt0.wav", dtype="float32")
    units = tok.encode_features(features_lib.get_extractor("mfcc")(wav))
    assert units.shape == (49,)
    # The saved tokenizer knows its features: encoding audio gives the same units.
    assert tok.features == "mfcc" and tok.extractor == features_lib.get_extractor("mfcc").spec
    np.testing.assert_array_equal(tok.encode(wav), units)
    thirds = [np.bincount(units[a : a + 14], minlength=8).argmax() for a in (1, 18, 35)]
    assert len(set(thirds)) == 3, units
    with pytest.raises(ValueError, match="unknown feature extractor"):
        fit_units.main([f"--audio_dir={tmp_path / 'audio'}", "--features=x", f"--out={out}"])
