"""Video file I/O: streaming reads at 25 fps + 16 kHz, MP4 writing, comparison videos, sheets.

Reading (PyAV, FFmpeg inside the wheel; MP4, AVI, MPG, MKV, ... whatever FFmpeg demuxes):

  * `iter_video(path, chunk_frames=...)` yields `VideoChunk`s: `frames [t, H, W, 3]` uint8 RGB
    at exactly `fps` (25) frames per second and the audio that plays under them,
    `audio [round(end*sr/fps) - round(start*sr/fps)]` float32 mono at `sample_rate` (16 kHz).
    Only one chunk of frames, the last decoded source frame and a little audio are held at a
    time, so a long file is never whole in memory (video and audio are decoded from two
    handles on the file and pulled in step, so this holds whatever the file's interleaving).
  * `read_video(path)` concatenates the chunks of a short clip:
    `(frames [T, H, W, 3] uint8, audio [N] float32, VideoInfo)`.

Frame-rate conversion selects frames by their timestamps (sample and hold): output frame `k`
is shown at `t_k = t_0 + k / fps`, where `t_0` is the first source frame's time, and is the
latest source frame whose time is `<= t_k`; the clip ends where the last source frame stops
being shown (its time + its duration). This handles any source rate and variable frame rate
(phone recordings) alike: a 30 fps clip of 2 s gives 50 frames, a 25 fps clip is unchanged.
The audio is aligned on the same clock: sample `i` plays at `t_0 + i / sample_rate`
(audio starting late is padded with zeros, audio starting early is cut), is cut or
zero-padded to the video's length, so `N == round(T * sample_rate / fps)` (640 per frame at
25 fps and 16 kHz), and multi-channel audio is averaged to mono.

Writing:

  * `VideoWriter` / `write_video`: MP4 with H.264 (libx264, yuv420p, `+faststart`) and AAC
    audio muxed in, which browsers play; an odd width or height is padded by repeating the
    last column / row (yuv420p needs even sizes).
  * `write_comparison_video`: several videos side by side, each under a title, one audio track.
  * `contact_sheet` / `write_contact_sheet`: a PNG grid of frames with their indices.

Every failure to read a file raises `VideoError` naming the file and the problem (unreadable
or corrupt, truncated, no video stream or no frames, no audio when audio is required). Paths
may be `str` or `etils.epath.Path`; remote ones (`gs://...`) are read through a local
temporary copy and written through a local temporary file that is copied up on success.
Rotation metadata (phone videos) is not applied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from fractions import Fraction
from types import TracebackType
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from avjax import io as avio

FPS = 25
SAMPLE_RATE = 16000

# A source frame whose time is within this many seconds after an output time still counts as
# "at" that time (timestamps are quantised to the stream's time base).
_TIME_EPS = 1e-4


class VideoError(ValueError):
    """A video file is missing, unreadable, corrupt, has no frames, or lacks required audio."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What `read_video` / `iter_video` found in a file and what they return.

    Attributes:
      path: the file as given.
      fps: output frame rate (frames are resampled to it).
      sample_rate: output audio rate (Hz).
      width, height: frame size in pixels (unchanged from the source).
      source_fps: the video stream's average frame rate, or None if the file does not say.
      source_sample_rate: the audio stream's rate, or None without audio.
      has_audio: whether the file has a decodable audio stream.
      video_codec, audio_codec: FFmpeg codec names (audio_codec None without audio).
      start_time: time of the first video frame in the file's clock (seconds); output frame
        `k` is shown at `start_time + k / fps`.
    """

    path: str
    fps: float
    sample_rate: int
    width: int
    height: int
    source_fps: float | None
    source_sample_rate: int | None
    has_audio: bool
    video_codec: str
    audio_codec: str | None
    start_time: float


@dataclasses.dataclass(frozen=True)
class VideoChunk:
    """Consecutive output frames and the audio under them.

    Attributes:
      frames: `[t, H, W, 3]` uint8 RGB.
      audio: `[n]` float32 mono in [-1, 1], samples `round(start_frame * sr / fps)` up to
        `round((start_frame + t) * sr / fps)` of the aligned track; `[0]` without audio.
      start_frame: index of `frames[0]` in the whole output video.
      info: the file's `VideoInfo`.
    """

    frames: np.ndarray
    audio: np.ndarray
    start_frame: int
    info: VideoInfo

    @property
    def times(self) -> np.ndarray:
        """`[t]` float64 display times (seconds, from the first frame) of `frames`."""
        return (self.start_frame + np.arange(len(self.frames))) / self.info.fps


# --- paths ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _readable_local(path: avio.PathLike) -> Iterator[str]:
    """Yields a local file name for `path`; a remote file is first copied to a temp folder."""
    if not avio.is_remote(path):
        yield os.fspath(path)
        return
    p = avio.as_path(path)
    if not p.exists():
        raise VideoError(path, "file not found")
    with tempfile.TemporaryDirectory(prefix="avjax-video-") as d:
        local = os.path.join(d, p.name)
        with p.open("rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        yield local


def _open(path: avio.PathLike, local: str) -> av.container.InputContainer:
    if not os.path.exists(local):
        raise VideoError(path, "file not found")
    if os.path.isdir(local):
        raise VideoError(path, "is a directory, expected a video file")
    try:
        return av.open(local, mode="r")
    except Exception as e:  # av.error.InvalidDataError, FileNotFoundError, ...
        raise VideoError(path, f"unreadable or corrupt video ({type(e).__name__}: {e})") from e


# --- reading -------------------------------------------------------------------------------------


def _frame_time(frame: av.frame.Frame, fallback: float) -> float:
    t = frame.time
    return fallback if t is None else float(t)


def _audio_samples(
    path: avio.PathLike, local: str, sample_rate: int
) -> tuple[Iterator[np.ndarray], float | None]:
    """A lazy iterator of mono float32 sample blocks at `sample_rate`, and the audio start time.

    The start time is the first decoded audio frame's time (None if there is none).
    """
    container = _open(path, local)
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    frames = container.decode(stream)

    def to_np(fs: list[av.AudioFrame]) -> Iterator[np.ndarray]:
        for f in fs:
            yield f.to_ndarray().reshape(-1).astype(np.float32, copy=False)

    try:
        first = next(frames)
    except StopIteration:
        container.close()
        return iter(()), None
    except av.error.FFmpegError as e:
        container.close()
        raise VideoError(path, f"corrupt audio stream ({type(e).__name__}: {e})") from e
    start = _frame_time(first, 0.0)

    def gen() -> Iterator[np.ndarray]:
        try:
            yield from to_np(resampler.resample(first))
            while True:
                try:
                    f = next(frames)
                except StopIteration:
                    break
                except av.error.FFmpegError as e:
                    raise VideoError(path, f"corrupt audio stream ({type(e).__name__}: {e})") from e
                yield from to_np(resampler.resample(f))
            yield from to_np(resampler.resample(None))
        finally:
            container.close()

    return gen(), start


class _AlignedAudio:
    """Pulls blocks from an audio iterator on demand and serves aligned sample ranges."""

    def __init__(self, blocks: Iterator[np.ndarray], offset: int):
        self._blocks = blocks
        self._buf: list[np.ndarray] = []
        self._have = 0  # samples in _buf
        self._pos = 0  # aligned index of _buf's first sample
        self._skip = max(-offset, 0)  # samples before the video's first frame, dropped
        self._pad = max(offset, 0)  # silence before the audio starts
        self._done = False

    def _pull(self) -> bool:
        if self._pad:
            self._buf.append(np.zeros(self._pad, np.float32))
            self._have += self._pad
            self._pad = 0
            return True
        for block in self._blocks:
            if self._skip:
                cut = min(self._skip, len(block))
                block, self._skip = block[cut:], self._skip - cut
            if len(block):
                self._buf.append(block)
                self._have += len(block)
                return True
        self._done = True
        return False

    def take(self, start: int, stop: int) -> np.ndarray:
        """Samples `[start, stop)` (start = end of the previous take), zero-padded past the end."""
        assert start == self._pos, (start, self._pos)
        while self._have < stop - start and not self._done:
            self._pull()
        buf = np.concatenate(self._buf) if self._buf else np.zeros(0, np.float32)
        n = stop - start
        out = buf[:n]
        rest = buf[n:]
        self._buf, self._have, self._pos = ([rest] if len(rest) else []), len(rest), stop
        if len(out) < n:
            out = np.concatenate([out, np.zeros(n - len(out), np.float32)])
        return out

    def close(self) -> None:
        close = getattr(self._blocks, "close", None)
        if close is not None:
            close()


def iter_video(
    path: avio.PathLike,
    *,
    chunk_frames: int = 250,
    fps: float = FPS,
    sample_rate: int = SAMPLE_RATE,
    require_audio: bool = True,
) -> Iterator[VideoChunk]:
    """Streams a video as chunks of at most `chunk_frames` frames at `fps` with their audio.

    Args:
      path: a video file (MP4, AVI, ...), local or remote (`gs://...`, read through a local
        temporary copy).
      chunk_frames: frames per chunk (the last chunk may be shorter).
      fps: output frame rate; frames are selected by timestamp (see the module docstring).
      sample_rate: output audio rate (Hz); audio is mixed to mono.
      require_audio: if True (default), a file without an audio stream raises `VideoError`;
        if False it gives chunks with empty audio `[0]` and `info.has_audio == False`.

    Yields:
      `VideoChunk`s covering the whole video in order: `frames [t, H, W, 3]` uint8,
      `audio [n]` float32 (see `VideoChunk`).

    Raises:
      VideoError: missing, unreadable or corrupt file, no video stream, no decodable frames,
        no audio while `require_audio`, or (after the chunks decoded so far) a video stream
        that ends more than 0.1 s before the duration its container declares (truncated).
    """
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    with _readable_local(path) as local:
        container = _open(path, local)
        try:
            yield from _iter_local(
                path, local, container, chunk_frames, fps, sample_rate, require_audio
            )
        finally:
            container.close()


def _video_stream(
    path: avio.PathLike, container: av.container.InputContainer, require_audio: bool
) -> tuple[Any, float | None, float | None]:
    """`(video stream, its average fps or None, the duration it declares in s or None)`."""
    if not container.streams.video:
        raise VideoError(path, "no video stream")
    vstream = container.streams.video[0]
    vstream.thread_type = "AUTO"
    if require_audio and not container.streams.audio:
        raise VideoError(path, "no audio stream (pass require_audio=False to allow silent video)")
    source_fps = float(vstream.average_rate) if vstream.average_rate else None
    declared = (
        float(vstream.duration * vstream.time_base)
        if vstream.duration and vstream.time_base
        else None
    )
    return vstream, source_fps, declared


def _frame_reader(path: avio.PathLike, decoded: Iterator[Any]) -> Callable[[], Any]:
    """`next_frame()`: the next decoded frame, None at the end; VideoError if corrupt."""

    def next_frame() -> av.VideoFrame | None:
        try:
            return next(decoded)
        except StopIteration:
            return None
        except av.error.FFmpegError as e:
            raise VideoError(path, f"corrupt video stream ({type(e).__name__}: {e})") from e

    return next_frame


def _open_audio(
    path: avio.PathLike,
    local: str,
    container: av.container.InputContainer,
    sample_rate: int,
    t0: float,
    require_audio: bool,
) -> tuple[_AlignedAudio | None, str | None, int | None]:
    """`(audio aligned to the first video frame at t0, codec, source rate)`; Nones without
    an audio stream (or an empty one, when audio is not required)."""
    if not container.streams.audio:
        return None, None, None
    blocks, a0 = _audio_samples(path, local, sample_rate)
    if a0 is None:
        if require_audio:
            raise VideoError(path, "audio stream has no decodable samples")
        return None, None, None
    astream = container.streams.audio[0]
    audio = _AlignedAudio(blocks, round((a0 - t0) * sample_rate))
    return audio, astream.codec_context.name, astream.rate


class _Chunker:
    """Collects output frames into `VideoChunk`s of `size` frames with their audio."""

    def __init__(self, info: VideoInfo, audio: _AlignedAudio | None, size: int):
        self.info, self.audio, self.size = info, audio, size
        self.pending: list[np.ndarray] = []
        self.emitted = 0  # output frames in the chunks made so far

    def add(self, rgb: np.ndarray) -> VideoChunk | None:
        """Adds one output frame; returns a chunk when `size` frames are pending."""
        self.pending.append(rgb)
        return self.make() if len(self.pending) == self.size else None

    def make(self) -> VideoChunk:
        start, stop = self.emitted, self.emitted + len(self.pending)
        sr, fps = self.info.sample_rate, self.info.fps
        if self.audio is not None:
            wav = self.audio.take(round(start * sr / fps), round(stop * sr / fps))
        else:
            wav = np.zeros(0, np.float32)
        chunk = VideoChunk(np.stack(self.pending), wav, start, self.info)
        self.pending, self.emitted = [], stop
        return chunk


def _iter_local(
    path: avio.PathLike,
    local: str,
    container: av.container.InputContainer,
    chunk_frames: int,
    fps: float,
    sample_rate: int,
    require_audio: bool,
) -> Iterator[VideoChunk]:
    """`iter_video` on an open local container: probe, align audio, resample by timestamp."""
    vstream, source_fps, declared = _video_stream(path, container, require_audio)
    default_dt = 1.0 / source_fps if source_fps else 1.0 / fps
    next_frame = _frame_reader(path, container.decode(vstream))
    first = next_frame()
    if first is None:
        raise VideoError(path, "no video frames (zero-frame or undecodable video stream)")
    t0 = _frame_time(first, 0.0)
    audio, audio_codec, source_sr = _open_audio(
        path, local, container, sample_rate, t0, require_audio
    )
    info = VideoInfo(
        path=os.fspath(path),
        fps=float(fps),
        sample_rate=sample_rate,
        width=first.width,
        height=first.height,
        source_fps=source_fps,
        source_sample_rate=source_sr,
        has_audio=audio is not None,
        video_codec=vstream.codec_context.name,
        audio_codec=audio_codec,
        start_time=t0,
    )
    chunker = _Chunker(info, audio, chunk_frames)
    try:
        end, k = yield from _resample(path, first, t0, default_dt, next_frame, chunker)
        if chunker.pending:
            yield chunker.make()
        if k == 0:
            raise VideoError(path, "no video frames (zero-length video stream)")
        if declared is not None and end - t0 < declared - max(0.1, 2 * default_dt):
            raise VideoError(
                path,
                f"truncated or corrupt video stream: decoded {end - t0:.2f} s of the "
                f"{declared:.2f} s the file declares",
            )
    finally:
        if audio is not None:
            audio.close()


def _resample(
    path: avio.PathLike,
    first: Any,
    t0: float,
    default_dt: float,
    next_frame: Callable[[], Any],
    chunker: _Chunker,
) -> Generator[VideoChunk, None, tuple[float, int]]:
    """Output frame k (at t0 + k / fps) shows the last source frame shown by then; yields the
    full chunks and returns `(end time of the last source frame, output frames made)`."""
    fps, info = chunker.info.fps, chunker.info
    prev, prev_t, prev_rgb = first, t0, None
    dt = default_dt
    k = 0  # next output frame index
    while True:
        frame = next_frame()
        if frame is None:
            if prev.duration and prev.time_base:
                dt = float(prev.duration * prev.time_base)
            end = prev_t + dt
        else:
            t = _frame_time(frame, prev_t + dt)
            if t > prev_t:
                dt = t - prev_t
            end = t
        # Output frames shown before `end` (the next frame's time) show `prev`.
        while t0 + k / fps < end - _TIME_EPS:
            if prev_rgb is None:
                prev_rgb = prev.to_ndarray(format="rgb24")
            k += 1
            chunk = chunker.add(prev_rgb)
            if chunk is not None:
                yield chunk
        if frame is None:
            return end, k
        if frame.width != info.width or frame.height != info.height:
            raise VideoError(
                path,
                f"frame size changes mid-stream ({info.width}x{info.height} -> "
                f"{frame.width}x{frame.height})",
            )
        prev, prev_t, prev_rgb = frame, max(end, prev_t), None


def read_video(
    path: avio.PathLike,
    *,
    fps: float = FPS,
    sample_rate: int = SAMPLE_RATE,
    require_audio: bool = True,
) -> tuple[np.ndarray, np.ndarray, VideoInfo]:
    """Reads a whole (short) video: `(frames [T, H, W, 3] uint8, audio [N] float32, info)`.

    Frames are at `fps` (25) and audio at `sample_rate` (16 kHz, mono) on the same clock,
    `N == round(T * sample_rate / fps)` (`N == 0` for a silent video read with
    `require_audio=False`). For long files iterate `iter_video` instead. Raises `VideoError`
    as `iter_video` does.
    """
    frames, audio = [], []
    info = None
    for chunk in iter_video(
        path, chunk_frames=250, fps=fps, sample_rate=sample_rate, require_audio=require_audio
    ):
        frames.append(chunk.frames)
        audio.append(chunk.audio)
        info = chunk.info
    assert info is not None  # iter_video raises on zero frames
    return np.concatenate(frames), np.concatenate(audio), info


def probe_video(path: avio.PathLike) -> dict:
    """Container-level facts without decoding: codecs, pixel format, size, rates, durations.

    Returns a dict with `format`, `duration` (seconds or None), `video` (`codec`, `pix_fmt`,
    `width`, `height`, `fps`, `frames`) and `audio` (`codec`, `sample_rate`, `channels`) or
    None.
    """
    with _readable_local(path) as local, _open(path, local) as c:
        out: dict = {
            "format": c.format.name,
            "duration": c.duration / 1e6 if c.duration is not None else None,
            "video": None,
            "audio": None,
        }
        if c.streams.video:
            v = c.streams.video[0]
            out["video"] = {
                "codec": v.codec_context.name,
                "pix_fmt": v.codec_context.pix_fmt,
                "width": v.codec_context.width,
                "height": v.codec_context.height,
                "fps": float(v.average_rate) if v.average_rate else None,
                "frames": v.frames,
                "profile": v.codec_context.profile,
            }
        if c.streams.audio:
            a = c.streams.audio[0]
            out["audio"] = {
                "codec": a.codec_context.name,
                "sample_rate": a.rate,
                "channels": a.codec_context.channels,
            }
        return out


# --- writing -------------------------------------------------------------------------------------


def _as_uint8_rgb(frames: np.ndarray) -> np.ndarray:
    """`[t, H, W]`, `[t, H, W, 1]` or `[t, H, W, 3]` uint8 (or float in [0, 1]) -> uint8 RGB."""
    x = np.asarray(frames)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected frames [T, H, W, 3] (or grey [T, H, W]), got {x.shape}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"expected uint8 or float frames in [0, 1], got {x.dtype}")
        x = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def _even(frames: np.ndarray) -> np.ndarray:
    """Pads `[t, H, W, 3]` to even H and W by repeating the last row / column."""
    h, w = frames.shape[1:3]
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _as_rate(fps: float) -> Fraction:
    r = Fraction(fps).limit_denominator(1001)
    if r <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return r


class VideoWriter:
    """Writes an MP4 (H.264 yuv420p + AAC) chunk by chunk, so long videos stay out of memory.

        with VideoWriter(out / "sample.mp4", fps=25, sample_rate=16000) as w:
            for frames, wav in chunks:          # [t, H, W, 3] uint8, [n] float32
                w.write(frames, wav)

    The file appears at `path` only when the writer closes without an error (written to a
    temporary file, then renamed into place or copied to a remote path). The first frames fix
    the size; odd sizes are padded to even. Audio is optional (`sample_rate=None` for a silent
    video); it may be written in any pieces, before or after the frames it plays under.

    Args:
      path: output `.mp4`, local or remote.
      fps: frame rate of the written frames.
      sample_rate: rate of the audio given to `write` (mono float32 in [-1, 1]); None: no
        audio track.
      crf: x264 constant rate factor (0 lossless ... 51 worst; 18 looks lossless).
      preset: x264 speed preset.
      audio_bitrate: AAC bit rate (bits/s).
    """

    def __init__(
        self,
        path: avio.PathLike,
        *,
        fps: float = FPS,
        sample_rate: int | None = SAMPLE_RATE,
        crf: int = 18,
        preset: str = "medium",
        audio_bitrate: int = 96_000,
    ):
        self.path = path
        self.fps = fps
        self.sample_rate = sample_rate
        self._crf, self._preset, self._audio_bitrate = crf, preset, audio_bitrate
        self._ctx = avio.local_then_copy(path)
        self._local = self._ctx.__enter__()
        try:
            self._container = av.open(
                self._local, mode="w", format="mp4", options={"movflags": "+faststart"}
            )
        except BaseException as e:
            self._ctx.__exit__(type(e), e, e.__traceback__)
            raise
        self._vstream = None
        self._astream = None
        self._size: tuple[int, int] | None = None
        self._nframes = 0
        self._nsamples = 0
        self._early_audio: list[np.ndarray] = []  # audio written before the first frames
        self._closed = False
        if sample_rate is not None:
            a = self._container.add_stream("aac", rate=sample_rate, layout="mono")
            a.bit_rate = audio_bitrate
            self._astream = a

    def _video_stream(self, h: int, w: int):
        if self._vstream is None:
            rate = _as_rate(self.fps)
            v = self._container.add_stream(
                "libx264",
                rate=rate,
                options={"crf": str(self._crf), "preset": self._preset},
            )
            v.width, v.height = w, h
            v.pix_fmt = "yuv420p"
            v.time_base = 1 / rate
            self._vstream = v
            self._size = (h, w)
        return self._vstream

    def write(self, frames: np.ndarray | None = None, audio: np.ndarray | None = None) -> None:
        """Appends `frames [t, H, W, 3]` (uint8 or float in [0, 1]; grey `[t, H, W]` ok) and/or
        `audio [n]` float32 mono at `sample_rate`."""
        if self._closed:
            raise ValueError(f"{os.fspath(self.path)}: write after close")
        if frames is not None and len(frames):
            x = _even(_as_uint8_rgb(frames))
            v = self._video_stream(*x.shape[1:3])
            if x.shape[1:3] != self._size:
                raise ValueError(
                    f"{os.fspath(self.path)}: frame size {x.shape[1:3]} differs from the "
                    f"first frames' {self._size}"
                )
            for img in x:
                f = av.VideoFrame.from_ndarray(img, format="rgb24")
                f.pts = self._nframes
                self._nframes += 1
                self._container.mux(v.encode(f))
            early, self._early_audio = self._early_audio, []
            for wav in early:
                self._write_audio(wav)
        if audio is not None and len(audio):
            if self._astream is None:
                raise ValueError(f"{os.fspath(self.path)}: audio given to a writer without audio")
            wav = np.asarray(audio, np.float32)
            if wav.ndim != 1:
                raise ValueError(f"expected mono audio [samples], got shape {wav.shape}")
            if self._vstream is None:
                # The MP4 header needs both streams: hold audio until the first frames come.
                self._early_audio.append(wav.copy())
            else:
                self._write_audio(wav)

    def _write_audio(self, wav: np.ndarray) -> None:
        f = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(np.clip(wav, -1.0, 1.0)[None]), format="flt", layout="mono"
        )
        f.sample_rate = self.sample_rate
        f.pts = self._nsamples
        f.time_base = Fraction(1, self.sample_rate)
        self._nsamples += len(wav)
        self._container.mux(self._astream.encode(f))

    def close(self) -> None:
        """Flushes the encoders and publishes the file (raises if no frame was written)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._vstream is None:
                raise ValueError(f"{os.fspath(self.path)}: no frames written")
            self._container.mux(self._vstream.encode(None))
            if self._astream is not None:
                self._container.mux(self._astream.encode(None))
            self._container.close()
        except BaseException as e:
            self._abort(e)
            raise
        self._ctx.__exit__(None, None, None)

    def _abort(self, e: BaseException) -> None:
        with contextlib.suppress(Exception):
            self._container.close()
        with contextlib.suppress(Exception):
            self._ctx.__exit__(type(e), e, e.__traceback__)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        elif not self._closed:
            self._closed = True
            self._abort(exc)


def write_video(
    path: avio.PathLike,
    frames: np.ndarray,
    audio: np.ndarray | None = None,
    *,
    fps: float = FPS,
    sample_rate: int = SAMPLE_RATE,
    **writer_kwargs,
) -> None:
    """Writes `frames [T, H, W, 3]` (uint8, or float in [0, 1]; grey `[T, H, W]` ok) and
    optional `audio [N]` float32 mono at `sample_rate` to an MP4 (H.264 + AAC) at `path`.

    Other keyword arguments go to `VideoWriter` (`crf`, `preset`, `audio_bitrate`).
    """
    with VideoWriter(
        path, fps=fps, sample_rate=sample_rate if audio is not None else None, **writer_kwargs
    ) as w:
        w.write(frames, audio)


# --- comparison videos and contact sheets ---------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _resize_height(frames: np.ndarray, height: int) -> np.ndarray:
    t, h, w, _ = frames.shape
    if h == height:
        return frames
    new_w = max(1, round(w * height / h))
    return np.stack(
        [np.asarray(Image.fromarray(f).resize((new_w, height), Image.BILINEAR)) for f in frames]
    )


def comparison_frames(
    videos: Sequence[np.ndarray] | Mapping[str, np.ndarray],
    titles: Sequence[str] | None = None,
    *,
    gap: int = 4,
    title_height: int = 20,
) -> np.ndarray:
    """Places several videos side by side, each under its title: `[T, H', W', 3]` uint8.

    Args:
      videos: `[T_i, H_i, W_i, 3]` (or grey `[T_i, H_i, W_i]`) uint8 / float in [0, 1], or a
        mapping title -> video. Each is scaled to the tallest height (keeping its aspect);
        shorter ones hold their last frame up to the longest `T`.
      titles: one per video (defaults to the mapping's keys, or none).
      gap: black pixels between panels.
      title_height: height of the title strip above the panels (0: no titles).

    Returns:
      `[T, title_height + H, sum(W_i) + gap * (n - 1), 3]` uint8 with `H = max(H_i)`.
    """
    if isinstance(videos, Mapping):
        titles = list(videos) if titles is None else titles
        videos = list(videos.values())
    vids = [_as_uint8_rgb(v) for v in videos]
    if not vids:
        raise ValueError("comparison_frames needs at least one video")
    if titles is not None and len(titles) != len(vids):
        raise ValueError(f"{len(titles)} titles for {len(vids)} videos")
    height = max(v.shape[1] for v in vids)
    vids = [_resize_height(v, height) for v in vids]
    t = max(len(v) for v in vids)
    vids = [
        np.concatenate([v, np.repeat(v[-1:], t - len(v), 0)]) if len(v) < t else v for v in vids
    ]
    width = sum(v.shape[2] for v in vids) + gap * (len(vids) - 1)
    out = np.zeros((t, title_height + height, width, 3), np.uint8)
    x = 0
    font = _font(max(8, title_height - 6))
    for i, v in enumerate(vids):
        w = v.shape[2]
        out[:, title_height:, x : x + w] = v
        if titles is not None and title_height:
            strip = Image.new("RGB", (w, title_height))
            ImageDraw.Draw(strip).text((2, 2), str(titles[i]), fill=(255, 255, 255), font=font)
            out[:, :title_height, x : x + w] = np.asarray(strip)[None]
        x += w + gap
    return out


def write_comparison_video(
    path: avio.PathLike,
    videos: Sequence[np.ndarray] | Mapping[str, np.ndarray],
    titles: Sequence[str] | None = None,
    audio: np.ndarray | None = None,
    *,
    fps: float = FPS,
    sample_rate: int = SAMPLE_RATE,
    **writer_kwargs,
) -> np.ndarray:
    """Writes `comparison_frames(videos, titles)` with one shared `audio [N]` track to an MP4.

    Returns the composed frames `[T, H', W', 3]` uint8 (see `comparison_frames`).
    """
    frames = comparison_frames(videos, titles)
    write_video(path, frames, audio, fps=fps, sample_rate=sample_rate, **writer_kwargs)
    return frames


def contact_sheet(
    frames: np.ndarray,
    *,
    num: int | None = 16,
    cols: int = 8,
    gap: int = 2,
    label_height: int = 12,
    fps: float | None = None,
) -> np.ndarray:
    """A grid of frames: `[rows * (label_height + H) + gap * (rows - 1), cols * W + gap *
    (cols - 1), 3]` uint8.

    Args:
      frames: `[T, H, W, 3]` or grey `[T, H, W]` (uint8 or float in [0, 1]).
      num: how many frames, evenly spaced over `T` (first and last included); None: all.
      cols: frames per row (`rows = ceil(n / cols)`; fewer columns if `n < cols`).
      gap: black pixels between cells.
      label_height: height of the strip above each frame holding its index (and its time in
        seconds if `fps` is given); 0: no labels.
    """
    x = _as_uint8_rgb(frames)
    t, h, w, _ = x.shape
    if t == 0:
        raise ValueError("contact_sheet needs at least one frame")
    n = t if num is None else min(num, t)
    idx = np.unique(np.round(np.linspace(0, t - 1, n)).astype(int))
    n = len(idx)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    ch = label_height + h
    sheet = np.zeros((rows * ch + gap * (rows - 1), cols * w + gap * (cols - 1), 3), np.uint8)
    font = _font(max(6, label_height - 2))
    for j, i in enumerate(idx):
        r, c = divmod(j, cols)
        y0, x0 = r * (ch + gap), c * (w + gap)
        sheet[y0 + label_height : y0 + ch, x0 : x0 + w] = x[i]
        if label_height:
            text = f"{i}" if fps is None else f"{i} {i / fps:.2f}s"
            strip = Image.new("RGB", (w, label_height))
            ImageDraw.Draw(strip).text((1, 0), text, fill=(255, 255, 255), font=font)
            sheet[y0 : y0 + label_height, x0 : x0 + w] = np.asarray(strip)
    return sheet


def write_contact_sheet(path: avio.PathLike, frames: np.ndarray, **kwargs) -> np.ndarray:
    """Writes `contact_sheet(frames, **kwargs)` as a PNG at `path`; returns the sheet array."""
    sheet = contact_sheet(frames, **kwargs)
    with avio.local_then_copy(path) as f:
        Image.fromarray(sheet).save(f, format="PNG")
    return sheet
