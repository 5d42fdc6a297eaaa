"""Tests of avjax.data.video.io: round trips, frame-rate conversion, streaming, errors, writers."""

from __future__ import annotations

import tracemalloc
from fractions import Fraction

import av
import numpy as np
import pytest
from etils import epath
from PIL import Image

from avjax.data import video
from avjax.data.video import io as vio

H, W = 48, 64


def _pattern_frames(t: int, h: int = H, w: int = W) -> np.ndarray:
    """`[t, h, w, 3]` uint8 smooth moving colour pattern (compresses well, changes per frame)."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    out = np.empty((t, h, w, 3), np.uint8)
    for k in range(t):
        base = np.sin(xx / 6 + k / 4) * 50 + np.cos(yy / 8 - k / 5) * 50 + 128
        out[k] = np.stack([base, 255 - base, np.full_like(base, 40 + 2 * (k % 50))], -1)
    return out


def _index_frames(n: int, h: int = H, w: int = W) -> np.ndarray:
    """`[n, h, w, 3]` frames showing their index in binary: 6 black/white vertical bars."""
    bits = (np.arange(n)[:, None] >> np.arange(6)[None]) & 1  # [n, 6]
    bars = np.repeat(bits * 255, w // 6, axis=1).astype(np.uint8)  # [n, 6 * (w // 6)]
    bars = np.pad(bars, ((0, 0), (0, w - bars.shape[1])))
    return np.repeat(np.repeat(bars[:, None, :, None], h, 1), 3, 3)


def _frame_index(frames: np.ndarray) -> np.ndarray:
    """Inverse of `_index_frames` (robust to compression: each bar's mean is thresholded)."""
    w = frames.shape[2] // 6
    bars = frames[:, :, : 6 * w].reshape(len(frames), -1, 6, w, 3).mean(axis=(1, 3, 4))
    return ((bars > 128) * (1 << np.arange(6))).sum(-1)


def _chirp(n: int, sr: int = 16000) -> np.ndarray:
    t = np.arange(n) / sr
    return (
        0.3 * np.sin(2 * np.pi * 200 * t * (1 + t)) * (0.6 + 0.4 * np.sin(6 * np.pi * t))
    ).astype(np.float32)


def test_round_trip_mp4(tmp_path):
    frames, audio = _pattern_frames(50), _chirp(32000)
    path = tmp_path / "clip.mp4"
    video.write_video(path, frames, audio)
    got, wav, info = video.read_video(str(path))
    assert got.shape == (50, H, W, 3) and got.dtype == np.uint8
    assert wav.shape == (32000,) and wav.dtype == np.float32
    assert np.abs(got.astype(np.float32) - frames).mean() < 4.0
    assert np.corrcoef(wav, audio)[0, 1] > 0.95
    assert info.has_audio and info.source_fps == 25 and (info.width, info.height) == (W, H)
    assert info.video_codec == "h264" and info.audio_codec == "aac"


def test_written_mp4_is_h264_aac_yuv420p_even_size(tmp_path):
    path = epath.Path(tmp_path) / "odd.mp4"
    video.write_video(path, _pattern_frames(10, 47, 63), _chirp(6400))
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and v.codec_context.pix_fmt == "yuv420p"
        assert (v.codec_context.width, v.codec_context.height) == (64, 48)  # padded to even
        assert a.codec_context.name == "aac" and a.rate == 16000
        assert "mp4" in c.format.name
    frames, _, _ = video.read_video(path)
    assert frames.shape == (10, 48, 64, 3)
    assert not list(tmp_path.glob("*.tmp-*"))  # written atomically, nothing left over


def test_30fps_avi_with_44k_stereo_is_resampled(tmp_path):
    """An AVI (MPEG-4 + PCM) at 30 fps and 44.1 kHz stereo -> 25 fps and 16 kHz mono."""
    path = tmp_path / "clip30.avi"
    src = _index_frames(60)
    sr = 44100
    t = np.arange(2 * sr) / sr
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    with av.open(str(path), "w", format="avi") as c:
        v = c.add_stream("mpeg4", rate=30, options={"qscale": "2"})
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        a = c.add_stream("pcm_s16le", rate=sr, layout="stereo")
        for i, img in enumerate(src):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = i
            c.mux(v.encode(f))
        pcm = (np.stack([tone, tone]) * 32767).astype(np.int16).T.reshape(1, -1)
        af = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm), format="s16", layout="stereo")
        af.sample_rate, af.pts, af.time_base = sr, 0, Fraction(1, sr)
        c.mux(a.encode(af))
        c.mux(v.encode(None))
        c.mux(a.encode(None))
    frames, wav, info = video.read_video(path)
    assert info.source_fps == 30 and info.source_sample_rate == sr
    assert frames.shape == (50, H, W, 3) and wav.shape == (32000,)
    # Frame k at k/25 s shows the 30 fps frame floor(k * 30 / 25).
    np.testing.assert_array_equal(_frame_index(frames), (np.arange(50) * 6) // 5)
    ref = (0.3 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)).astype(np.float32)
    assert np.corrcoef(wav[100:-100], ref[100:-100])[0, 1] > 0.99


def test_variable_frame_rate_selects_by_timestamp(tmp_path):
    path = tmp_path / "vfr.mp4"
    gaps_ms = np.array([20, 33, 50, 27, 70, 40, 10])
    pts = np.concatenate([[0], np.cumsum(np.resize(gaps_ms, 54))])  # 55 frames over ~2 s
    last_ms = 40  # duration of the last frame
    with av.open(str(path), "w", format="mp4") as c:
        v = c.add_stream("libx264", rate=25, options={"crf": "10"})
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        v.time_base = Fraction(1, 1000)
        v.codec_context.time_base = Fraction(1, 1000)
        for i, img in enumerate(_index_frames(len(pts))):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = int(pts[i]), Fraction(1, 1000)
            f.duration = int(np.append(np.diff(pts), last_ms)[i])
            c.mux(v.encode(f))
        c.mux(v.encode(None))
    frames, wav, info = video.read_video(path, require_audio=False)
    with av.open(str(path)) as c:  # the times and last duration the file really holds
        decoded = list(c.decode(video=0))
        times = np.array([f.time for f in decoded])
        end = times[-1] + float(decoded[-1].duration * decoded[-1].time_base)
    np.testing.assert_allclose(times, pts / 1000, atol=1e-3)
    n = int(np.ceil(end * 25 - 1e-3))
    assert frames.shape == (n, H, W, 3) and wav.shape == (0,) and not info.has_audio
    expected = np.searchsorted(pts / 1000, np.arange(n) / 25 + 1e-4, side="right") - 1
    np.testing.assert_array_equal(_frame_index(frames), expected)


def test_streaming_long_file_in_bounded_memory(tmp_path):
    path = tmp_path / "long.mp4"
    seconds, chunk = 16, 25
    with video.VideoWriter(path, preset="ultrafast") as w:
        frames = _pattern_frames(50)
        for _ in range(seconds // 2):  # written in 2 s pieces: audio first, then frames
            w.write(audio=_chirp(32000))
            w.write(frames)
    total = seconds * 25
    whole_bytes = total * H * W * 3 + seconds * 16000 * 4
    tracemalloc.start()
    shapes, starts, audio_lens = [], [], []
    try:
        for c in video.iter_video(path, chunk_frames=chunk):
            shapes.append(c.frames.shape)
            starts.append(c.start_frame)
            audio_lens.append(len(c.audio))
            assert c.times[0] == c.start_frame / 25
            del c
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert shapes == [(chunk, H, W, 3)] * (total // chunk)
    assert starts == list(range(0, total, chunk)) and audio_lens == [chunk * 640] * len(shapes)
    assert peak < whole_bytes / 4, (peak, whole_bytes)


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(video.VideoError, match="corrupt.mp4"):
        video.read_video(bad)
    with pytest.raises(video.VideoError, match="missing.mp4.*not found"):
        video.read_video(tmp_path / "missing.mp4")

    whole = tmp_path / "whole.mp4"
    noise = np.random.default_rng(0).integers(0, 256, (50, H, W, 3), dtype=np.uint8)
    video.write_video(whole, noise, _chirp(32000))  # noise: the cut falls in the video data
    data = whole.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(video.VideoError, match=r"truncated.mp4: truncated .*of the 2.00 s"):
        video.read_video(tmp_path / "truncated.mp4")

    silent = tmp_path / "silent.mp4"
    video.write_video(silent, _pattern_frames(5))
    with pytest.raises(video.VideoError, match=r"silent.mp4.*no audio.*require_audio=False"):
        video.read_video(silent)
    frames, wav, info = video.read_video(silent, require_audio=False)
    assert frames.shape == (5, H, W, 3) and wav.shape == (0,) and not info.has_audio

    empty = tmp_path / "noframes.mkv"  # (an MP4 demuxer drops a video track without samples)
    with av.open(str(empty), "w", format="matroska") as c:
        v = c.add_stream("libx264", rate=25)  # a video stream that never gets a frame
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        a = c.add_stream("aac", rate=16000, layout="mono")
        af = av.AudioFrame.from_ndarray(_chirp(8000)[None], format="flt", layout="mono")
        af.sample_rate, af.pts, af.time_base = 16000, 0, Fraction(1, 16000)
        c.mux(a.encode(af))
        c.mux(a.encode(None))
        c.mux(v.encode(None))
    with av.open(str(empty)) as c:
        assert len(c.streams.video) == 1
    with pytest.raises(video.VideoError, match=r"noframes.mkv: no video frames"):
        video.read_video(empty)

    audio_only = tmp_path / "audio_only.mp4"
    with av.open(str(audio_only), "w", format="mp4") as c:
        a = c.add_stream("aac", rate=16000, layout="mono")
        af = av.AudioFrame.from_ndarray(_chirp(8000)[None], format="flt", layout="mono")
        af.sample_rate, af.pts, af.time_base = 16000, 0, Fraction(1, 16000)
        c.mux(a.encode(af))
        c.mux(a.encode(None))
    with pytest.raises(video.VideoError, match="audio_only.mp4: no video stream"):
        video.read_video(audio_only)


def test_remote_paths_go_through_a_local_copy(tmp_path, monkeypatch):
    """With every path treated as remote, reads copy to a temp folder and writes copy up."""
    monkeypatch.setattr(vio.avio, "is_remote", lambda p: True)
    path = tmp_path / "remote.mp4"
    video.write_video(path, _pattern_frames(10), _chirp(6400))
    frames, wav, _ = video.read_video(path)
    assert frames.shape == (10, H, W, 3) and wav.shape == (6400,)
    with pytest.raises(video.VideoError, match="nothere.mp4: file not found"):
        video.read_video(tmp_path / "nothere.mp4")


def test_comparison_video_and_contact_sheet(tmp_path):
    a, b = _pattern_frames(20), _pattern_frames(15, 24, 32)  # other size and length
    out = video.write_comparison_video(
        tmp_path / "cmp.mp4", {"real": a, "generated": b}, audio=_chirp(12800)
    )
    assert out.shape == (20, 20 + H, W + 4 + W, 3)  # b scaled to height 48 -> width 64
    frames, wav, _ = video.read_video(tmp_path / "cmp.mp4")
    assert frames.shape == (20, 20 + H, 2 * W + 4, 3) and wav.shape == (12800,)
    assert frames[:, :20].max() > 100  # titles drawn

    sheet = video.write_contact_sheet(tmp_path / "sheet.png", a, num=10, cols=4, fps=25)
    rows, cols, gap, label = 3, 4, 2, 12
    expect = (rows * (label + H) + gap * (rows - 1), cols * W + gap * (cols - 1))
    with Image.open(tmp_path / "sheet.png") as im:
        assert im.format == "PNG" and (im.height, im.width) == expect
    assert sheet.shape == (*expect, 3)
    grey = video.contact_sheet(a[..., 0], num=None, cols=10, gap=0, label_height=0)
    assert grey.shape == (2 * H, 10 * W, 3)
    np.testing.assert_array_equal(grey[:H, W : 2 * W, 1], a[1, ..., 0])
