"""Mini-batch k-means over 8 CPU devices, and tools/fit_units.py end to end (MFCC features)."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
import soundfile as sf

from avjax.data.speech import features as features_lib
from avjax.data.speech import kmeans as kmeans_lib
from avjax.data.speech.units import UnitTokenizer

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
    # 245 vectors for 10 units are 24.5 per unit: refused before k-means, naming the fix.
    with pytest.raises(ValueError, match=r"24.5 per unit; fitting needs >= 30") as e:
        fit_units.main(
            [f"--audio_dir={tmp_path / 'audio'}", "--features=mfcc", "--num_units=10"]
            + [f"--out={tmp_path / 'few'}", "--no_progress"]
        )
    assert "data.min_vectors_per_unit" in str(e.value) and not (tmp_path / "few").exists()


def test_fit_units_tool_streams_features_from_disk(tmp_path, monkeypatch):
    _write_corpus(tmp_path / "audio")
    written, real_writer = [], kmeans_lib.ShardWriter
    monkeypatch.setattr(
        kmeans_lib, "ShardWriter", lambda d: written.append(real_writer(d, 64)) or written[-1]
    )
    info = fit_units.main(
        [f"--audio_dir={tmp_path / 'audio'}", "--features=mfcc", "--num_units=4"]
        + [f"--out={tmp_path / 'u'}", "--batch_size=64", "--epochs=2", "--no_progress"]
    )
    # The 245 vectors (5 files x 49) went to disk as shards of 98, 98 and 49 rows (one
    # written once >= 64 rows are pending), removed after the fit.
    assert len(written) == 1 and len(written[0].paths) == 3 and written[0].rows == 245
    assert not os.path.exists(written[0].directory)
    assert info["frames"] == 245 and info["inertia"] > 0


class _CountingSource(kmeans_lib.NpyShards):
    """NpyShards that records the largest read (to show the fit never loads everything)."""

    largest = 0

    def read(self, start, stop):
        self.largest = max(self.largest, stop - start)
        return super().read(start, stop)

    def take(self, rows):
        self.largest = max(self.largest, len(rows))
        return super().take(rows)


def test_streamed_fit_from_disk_shards_equals_in_memory_fit(tmp_path):
    x, _, _ = _blobs(n=6000, k=6, dim=8, seed=2)
    x = x * np.arange(1, 9, dtype=np.float32) + 3.0  # dims on different scales: normalised
    writer = kmeans_lib.ShardWriter(tmp_path / "feats", shard_rows=700)
    for a in range(0, len(x), 333):  # the feature pass appends files of uneven length
        writer.append(x[a : a + 333])
    disk = _CountingSource(writer.close().paths)
    assert len(disk.paths) == 7 and len(disk) == 6000 and disk.dim == 8
    np.testing.assert_array_equal(disk.read(900, 2100), x[900:2100])  # across 2 shard edges
    mean, std = kmeans_lib.source_stats(disk, chunk_rows=500)
    assert disk.largest == 1200  # (the read above)
    from avjax.data.speech.units import feature_stats

    ref_mean, ref_std = feature_stats(x)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, ref_std, rtol=1e-5)
    kw = dict(
        batch_size=256,
        epochs=2,
        seed=5,
        max_no_improvement=None,
        init_size=512,
        mean=mean,
        std=std,
        block_rows=250,
        buffer_rows=1000,
    )
    streamed = kmeans_lib.fit_minibatch_kmeans(disk, 12, **kw)
    in_memory = kmeans_lib.fit_minibatch_kmeans(x, 12, **kw)
    assert streamed.steps == in_memory.steps == 2 * 24
    np.testing.assert_array_equal(streamed.centroids, in_memory.centroids)
    np.testing.assert_array_equal(streamed.counts, in_memory.counts)
    assert streamed.counts.sum() == 2 * 6000  # every point once per epoch, across shards
    assert disk.largest <= 1000 + 250  # one buffer (+ carried rows), never all 6000
    # And it is a good fit: normalised inertia near the 8 dims' noise over std^2.
    xn = (x - mean) / std
    assert kmeans_lib.mean_sq_distance(xn, streamed.centroids) < 0.5 * np.mean(
        np.sum(xn**2, axis=1)
    )


def test_refuses_too_few_vectors_per_unit():
    kmeans_lib.check_enough_vectors(30 * 100, 100)  # exactly enough
    with pytest.raises(ValueError) as e:
        kmeans_lib.check_enough_vectors(90_000, 32768, audio_minutes=60.0)
    msg = str(e.value)
    for part in ("data.fit_minutes", "data.num_units=32768", ">= 30 per unit", "2.7 per unit"):
        assert part in msg, msg
    assert ">= 656" in msg and "<= 3000" in msg  # 30 x 32768 / 25 Hz = 655.4 min
    x, _, _ = _blobs(n=200, k=4, dim=4)
    with pytest.raises(ValueError, match="data.min_vectors_per_unit"):
        kmeans_lib.fit_minibatch_kmeans(x, 10, min_per_unit=30)


def test_fit_units_streams_large_vocabularies_and_refuses_too_little_audio(monkeypatch):
    from avjax.data.speech import tokenize

    rng = np.random.default_rng(0)
    t = np.arange(32000) / 16000
    source = [  # 2 s files of a tone and noise: 50 vectors each, 300 in all
        {"audio": (0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(32000))}
        for f in (200, 400, 800, 1600, 3200, 6400)
    ]
    source = [{"audio": s["audio"].astype(np.float32)} for s in source]
    key = dict(num_units=12, kmeans_iters=3, vocoder_steps=0, max_minutes=1.0, seed=0)
    with pytest.raises(ValueError) as e:  # (what fit_units runs first)
        tokenize._fit_examples([source], key, None, None, min_per_unit=30)
    assert "data.fit_minutes" in str(e.value) and "data.num_units=12" in str(e.value)
    assert "25.0 per unit" in str(e.value) and ">= 30 per unit" in str(e.value)
    written = []
    real_writer = kmeans_lib.ShardWriter
    monkeypatch.setattr(tokenize, "VOCODER_MAX_MINUTES", 0.05)  # the vocoder keeps 3 s
    monkeypatch.setattr(
        kmeans_lib, "ShardWriter", lambda d: written.append(d) or real_writer(d, shard_rows=64)
    )
    tok, mels, feats, taken = tokenize._fit_streamed(
        [source], {**key, "num_units": 6}, None, True, 30, False
    )
    assert len(written) == 1 and not os.path.exists(written[0])  # temp shards, removed after
    assert taken == 6 * 32000 and len(mels) == len(feats) == 2  # first 3 s for the vocoder
    assert tok.num_units == 6 and tok.feature_dim == 320 and tok.features == "logmel"
    units = tok.encode_features(np.concatenate([f for f in feats]))
    assert units.shape == (100,)
    # The two files kept for the vocoder (two tones) get distinct dominant units.
    assert np.bincount(units[:50]).argmax() != np.bincount(units[50:]).argmax(), units
