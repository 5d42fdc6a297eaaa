"""25 Hz speech units: log-mel features, jitted k-means, the tokenizer, corpus tokenising."""

import json

import numpy as np
import pytest

from avjax.data.speech import corpus, espeak, units


def test_feature_shapes_and_rates():
    wav = espeak.synthesize("Shapes and rates of the features.").wav
    mel = units.log_mel(wav)
    assert mel.shape == (1 + len(wav) // 160, 80) and mel.dtype == np.float32
    feats = units.unit_features(wav)
    assert feats.shape == (len(wav) // 640, 320)
    np.testing.assert_array_equal(feats[3, 80:160], mel[13])  # unit 3 = frames 12..15
    assert units.UNIT_RATE == 25 and units.SAMPLES_PER_UNIT * units.UNIT_RATE == 16000
    # Silence sits at the floor, speech well above it.
    assert mel.min() == pytest.approx(np.log(units.MEL_FLOOR), abs=1e-3)
    assert np.median(mel.max(axis=1)) > np.log(units.MEL_FLOOR) + 10


def test_kmeans_recovers_planted_clusters():
    rng = np.random.default_rng(0)
    k, dim, per = 12, 16, 300
    centers = rng.normal(size=(k, dim)) * 6.0
    labels = np.repeat(np.arange(k), per)
    x = centers[labels] + rng.normal(size=(k * per, dim))
    perm = rng.permutation(len(x))
    x, labels = x[perm], labels[perm]
    c, hist = units.kmeans(x, k, seed=0, iters=50)
    assert hist[-1] <= hist[0]
    # Every planted centre has exactly one fitted centroid next to it.
    d = np.linalg.norm(centers[:, None] - c[None], axis=-1)
    assert sorted(np.argmin(d, axis=1).tolist()) == list(range(k))
    assert d.min(axis=1).max() < 0.5
    # The tokenizer gives a one-to-one relabelling of the planted clusters.
    tok = units.UnitTokenizer.fit([x[:1000], x[1000:]], num_units=k, seed=0, iters=50)
    pred = tok.encode_features(x)
    for j in range(k):
        assert len(np.unique(pred[labels == j])) == 1
    assert len(np.unique(pred)) == k
    assert pred.dtype == np.int32


def test_kmeans_refills_empty_clusters():
    x = np.concatenate([np.zeros((50, 2)), np.ones((50, 2)) * 10, np.random.randn(20, 2) + 5])
    c, _ = units.kmeans(x.astype(np.float32), 8, seed=3, iters=20)
    a = units.UnitTokenizer(c, np.zeros(2), np.ones(2)).encode_features(x)
    assert len(np.unique(a)) == 8  # no dead units


def test_tokenizer_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(200, units.FEATURE_DIM)).astype(np.float32) for _ in range(3)]
    tok = units.UnitTokenizer.fit(feats, num_units=16, seed=0, iters=5)
    tok.save(tmp_path / "tok")
    back = units.UnitTokenizer.load(tmp_path / "tok")
    np.testing.assert_array_equal(back.centroids, tok.centroids)
    np.testing.assert_array_equal(back.encode_features(feats[0]), tok.encode_features(feats[0]))
    assert back.num_units == 16 and back.centroid_mels().shape == (16, 4, 80)
    with pytest.raises(FileNotFoundError, match=r"nowhere.tokenizer\.json"):
        units.UnitTokenizer.load(tmp_path / "nowhere")
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    meta["features"]["n_mels"] = 64
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"tok.tokenizer\.json: .*n_mels"):
        units.UnitTokenizer.load(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"expected features \[units, 320\]"):
        tok.encode_features(np.zeros((4, 80)))


def test_prepare_units_on_tiny_corpus(tmp_path, monkeypatch):
    utts = corpus.build_default_corpus(tmp_path / "corpus", minutes=0.5, progress=False)
    out = tmp_path / "units"
    tok, voc, u = units.prepare_units(
        utts, out, num_units=24, seed=0, kmeans_iters=10, vocoder_steps=10, progress=False
    )
    assert tok.num_units == 24 and voc.num_units == 24
    assert set(u) == {x.id for x in utts}
    for x in utts:
        assert u[x.id].dtype == np.int32 and len(u[x.id]) == x.num_samples // 640
        assert u[x.id].max() < 24
    info = json.loads((out / "units_info.json").read_text())
    train = np.concatenate([u[x.id] for x in utts if x.split == "train"])
    assert info["unigram_entropy_nats"] == pytest.approx(units.unigram_entropy(train, 24))
    assert 1.5 < info["unigram_entropy_nats"] <= np.log(24) + 1e-6
    # Encoding a waveform directly agrees with the cached units.
    from avjax.data import audio

    x0 = utts[0]
    np.testing.assert_array_equal(tok.encode(audio.load_audio(x0.audio_path)), u[x0.id])

    # Second call (also from the corpus root): loads, fits nothing.
    def no_fit(*a, **k):
        raise AssertionError("refitted")

    monkeypatch.setattr(units.UnitTokenizer, "fit", no_fit)
    tok2, voc2, u2 = units.prepare_units(
        str(tmp_path / "corpus"),
        out,
        num_units=24,
        seed=0,
        kmeans_iters=10,
        vocoder_steps=10,
        progress=False,
    )
    np.testing.assert_array_equal(tok2.centroids, tok.centroids)
    assert all(np.array_equal(u2[k], u[k]) for k in u)
    np.testing.assert_allclose(voc2.units_to_mel(u[x0.id]), voc.units_to_mel(u[x0.id]), atol=1e-5)


def test_tokenizer_records_its_extractor_and_old_files_load_as_logmel(tmp_path):
    from avjax.data.speech import features, tokenize

    wavs = [espeak.synthesize(t).wav for t in ("One two three.", "Four five six seven.")]
    ex = features.get_extractor("mfcc")
    feats = [ex(w) for w in wavs]
    tok = units.UnitTokenizer.fit(feats, num_units=8, seed=0, iters=5, extractor=ex.spec)
    assert tok.features == "mfcc" and tok.feature_dim == 156
    tok.save(tmp_path / "mfcc")
    back = units.UnitTokenizer.load(tmp_path / "mfcc")
    assert back.extractor == ex.spec
    for w, f in zip(wavs, feats, strict=True):
        u = back.encode(w)
        assert u.shape == (len(w) // 640,)
        np.testing.assert_array_equal(u, tok.encode_features(f))
    plain = units.UnitTokenizer(back.centroids, back.mean, back.std)
    assert plain.features == "logmel"
    assert tokenize.tokenizer_fingerprint(back) != tokenize.tokenizer_fingerprint(plain)
    with pytest.raises(ValueError, match="not log-mel patches"):
        back.centroid_mels()
    meta = json.loads((tmp_path / "mfcc" / "tokenizer.json").read_text())
    meta["extractor"]["n_mfcc"] = 20
    (tmp_path / "mfcc" / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"mfcc.tokenizer\.json: mfcc extractor .*n_mfcc"):
        units.UnitTokenizer.load(tmp_path / "mfcc")
    # A tokenizer.json from before the extractor was recorded is a log-mel tokenizer.
    lm = units.UnitTokenizer.fit([units.unit_features(w) for w in wavs], num_units=8, iters=3)
    lm.save(tmp_path / "lm")
    meta = json.loads((tmp_path / "lm" / "tokenizer.json").read_text())
    assert meta.pop("extractor") == units.logmel_spec()
    (tmp_path / "lm" / "tokenizer.json").write_text(json.dumps(meta))
    old = units.UnitTokenizer.load(tmp_path / "lm")
    assert old.features == "logmel"
    np.testing.assert_array_equal(old.encode(wavs[1]), lm.encode(wavs[1]))
    assert tokenize.tokenizer_fingerprint(old) == tokenize.tokenizer_fingerprint(lm)
