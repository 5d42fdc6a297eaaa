"""Units -> mel -> audio: fitting, Griffin-Lim, windowed streamed decoding, spectrogram PNGs."""

import numpy as np
import pytest

from avjax.data import audio, plots
from avjax.data.speech import espeak, units, vocoder

NUM_UNITS = 16


@pytest.fixture(scope="module")
def fitted():
    text = "Clara the baker walked to the old mill. The wind was cold, and the bell rang twice."
    wavs = [espeak.synthesize(text, v, r, p).wav for v, p, r in espeak.SPEAKERS[:2]]
    mels = [units.log_mel(w) for w in wavs]
    feats = [
        units.mel_to_unit_features(m, units.num_units_for(len(w)))
        for m, w in zip(mels, wavs, strict=True)
    ]
    tok = units.UnitTokenizer.fit(feats, num_units=NUM_UNITS, seed=0, iters=10)
    us = [tok.encode_features(f) for f in feats]
    voc = vocoder.UnitVocoder.fit(us, mels, steps=30, seed=0, num_units=NUM_UNITS, hidden=32)
    return voc, us, mels


def test_fit_improves_on_the_unit_table(fitted):
    voc, us, mels = fitted
    assert np.isfinite(voc.final_loss)
    table_only = vocoder.UnitVocoder.fit(us, mels, steps=0, num_units=NUM_UNITS, hidden=32)
    target = units.unit_mel(mels[0], len(us[0]))
    err_fit = np.abs(voc.units_to_mel(us[0]) - target).mean()
    err_table = np.abs(table_only.units_to_mel(us[0]) - target).mean()
    assert err_fit < err_table
    mel = voc.units_to_mel(us[0])
    assert mel.shape == (4 * len(us[0]), 80) and mel.dtype == np.float32


def test_griffin_lim_reconstructs_a_real_spectrogram():
    wav = espeak.synthesize("Griffin and Lim.").wav
    mel = units.log_mel(wav)[:-1]
    y = vocoder.mel_to_wav(mel, n_iter=32)
    assert len(y) == len(mel) * 160
    back = units.log_mel(y)[: len(mel)]
    speech = mel.max(axis=1) > np.log(units.MEL_FLOOR) + 8
    err = np.abs(back[speech] - mel[speech]).mean()
    assert err < 1.0, err  # nats of log power (floor-dominated bins are ignored)


@pytest.mark.parametrize("n", [0, 1, 37, 200])
def test_decode_writes_n_over_25_seconds(fitted, tmp_path, n):
    voc, us, _ = fitted
    u = np.resize(us[0], n).astype(np.int32)
    path = tmp_path / f"d{n}.wav"
    written = vocoder.decode_units_to_wav(voc, u, path, progress=False)
    assert written == n * 640
    if n:
        wav = audio.load_audio(path, strict_rate=True)
        assert len(wav) == n * 640
    if n > 30:
        assert np.sqrt(np.mean(wav**2)) > 1e-3


def test_streaming_windows_match_array_decode(fitted, tmp_path):
    voc, us, _ = fitted
    long = np.resize(np.concatenate(us), 1003).astype(np.int32)  # 40 s: 6 windows of 8 s
    kw = dict(window_s=8.0, overlap_s=2.0, progress=False, n_iter=8)
    n_arr = vocoder.decode_units_to_wav(voc, long, tmp_path / "a.wav", **kw)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, len(long)), 12, replace=False))

    def chunks():  # a streaming sampler's output, in uneven pieces
        yield from np.split(long, cuts)

    n_it = vocoder.decode_units_to_wav(voc, chunks(), tmp_path / "b.wav", **kw)
    assert n_arr == n_it == len(long) * 640
    a = audio.load_audio(tmp_path / "a.wav")
    b = audio.load_audio(tmp_path / "b.wav")
    np.testing.assert_array_equal(a, b)
    # Every second of the output is sound (no dropped or zeroed windows at the seams).
    rms = np.sqrt(np.mean(a[: len(a) // 16000 * 16000].reshape(-1, 16000) ** 2, axis=1))
    assert rms.min() > 1e-3
    # Cross-faded seams have no clicks: sample jumps there are like jumps elsewhere.
    jumps = np.abs(np.diff(a))
    for k in range(1, 5):
        seam = k * 6 * 16000
        assert jumps[seam - 200 : seam + 200].max() <= jumps.max()
    png = plots.save_spectrogram_png(a, tmp_path / "a.png", title="decoded")
    assert (tmp_path / "a.png").stat().st_size > 5000 and png.endswith("a.png")


def test_default_windows_on_a_minute(fitted, tmp_path):
    voc, us, _ = fitted
    u = np.resize(np.concatenate(us), 25 * 61).astype(np.int32)  # 61 s: 3 windows of 30 s
    n = vocoder.decode_units_to_wav(voc, u, tmp_path / "m.wav", progress=False, n_iter=4)
    assert n == len(u) * 640
    assert audio.load_audio(tmp_path / "m.wav").shape == (n,)


def test_save_load_round_trip(fitted, tmp_path):
    voc, us, _ = fitted
    voc.save(tmp_path / "v")
    back = vocoder.UnitVocoder.load(tmp_path / "v")
    np.testing.assert_allclose(back.units_to_mel(us[1]), voc.units_to_mel(us[1]), atol=1e-5)
    with pytest.raises(FileNotFoundError, match=r"missing.vocoder\.json"):
        vocoder.UnitVocoder.load(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"unit ids must be in \[0, 16\)"):
        voc.units_to_mel(np.array([0, 16]))


def test_spectrogram_png_of_long_mel_stays_small(tmp_path):
    mel = np.random.default_rng(0).normal(size=(16 * 60 * 100, 80)).astype(np.float32)  # 16 min
    plots.save_spectrogram_png(mel, tmp_path / "long.png", title="16 minutes")
    size = (tmp_path / "long.png").stat().st_size
    assert 10_000 < size < 2_000_000
