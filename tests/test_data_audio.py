"""Audio I/O: validated loading (errors name the file), mono mixdown, resampling, atomic writes."""

import os

import numpy as np
import pytest
import soundfile as sf

from avjax.data import audio


def _tone(seconds=0.5, rate=16000, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_write_then_load_round_trip(tmp_path):
    wav = _tone()
    path = tmp_path / "a.wav"
    audio.write_wav(path, wav, 16000)
    info = sf.info(path)
    assert info.subtype == "PCM_16" and info.samplerate == 16000 and info.channels == 1
    back = audio.load_audio(path)
    assert back.dtype == np.float32 and back.shape == wav.shape
    np.testing.assert_allclose(back, wav, atol=1e-4)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_stereo_is_mixed_down_and_resampled(tmp_path):
    left = _tone(1.0, 44100, 300.0)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    path = tmp_path / "stereo.flac"
    sf.write(path, stereo, 44100)
    wav = audio.load_audio(path, 16000)
    assert wav.ndim == 1 and abs(len(wav) - 16000) <= 1
    # Mixdown halves the amplitude; resampling keeps the 300 Hz tone.
    assert 0.2 < np.abs(wav[1000:-1000]).max() < 0.3
    spec = np.abs(np.fft.rfft(wav))
    assert abs(np.argmax(spec) * 16000 / len(wav) - 300.0) < 3.0
    with pytest.raises(audio.AudioError, match=r"stereo\.flac.*44100 Hz, expected 16000"):
        audio.load_audio(path, 16000, strict_rate=True)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(audio.AudioError, match=r"nope\.wav: file not found") as e:
        audio.load_audio(path)
    assert e.value.path == str(path)


def test_corrupt_file_names_path(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage that is not audio" * 3)
    with pytest.raises(audio.AudioError, match=r"corrupt\.wav: unreadable or corrupt"):
        audio.load_audio(path)
    assert isinstance(audio.AudioError("x", "y"), ValueError)


def test_empty_file_names_path(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    with pytest.raises(audio.AudioError, match=r"empty\.wav: empty audio \(0 samples\)"):
        audio.load_audio(path)
    zero_bytes = tmp_path / "zero.flac"
    zero_bytes.write_bytes(b"")
    with pytest.raises(audio.AudioError, match=r"zero\.flac"):
        audio.load_audio(zero_bytes)


def test_stream_writer_appends_chunks(tmp_path):
    path = tmp_path / "stream.wav"
    chunks = [_tone(0.1) * k / 10 for k in range(1, 11)]
    with audio.WavStreamWriter(path, 16000) as w:
        for c in chunks:
            w.write(c)
        assert not path.exists()  # only the temp file exists while writing
    assert w.num_samples == sum(len(c) for c in chunks)
    back = audio.load_audio(path)
    np.testing.assert_allclose(back, np.concatenate(chunks), atol=1e-4)


def test_stream_writer_error_leaves_no_file(tmp_path):
    path = tmp_path / "bad.wav"
    with pytest.raises(RuntimeError):
        with audio.WavStreamWriter(path) as w:
            w.write(_tone(0.1))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
