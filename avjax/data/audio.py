"""Audio file I/O: validated loading at 16 kHz, atomic WAV writing, streaming WAV writer.

All waveforms are float32 mono `[samples]` in [-1, 1]. Every failure to read a file raises
`AudioError` whose message names the file and what was wrong with it, so a bad file in a
corpus of thousands is found at once.
"""

from __future__ import annotations

import os
import tempfile
from types import TracebackType

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """An audio file is missing, unreadable, corrupt, empty or has an unexpected rate."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def resample(wav: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resamples `[samples]` float32 audio from `orig_rate` to `target_rate` (soxr, HQ)."""
    if orig_rate == target_rate:
        return np.asarray(wav, np.float32)
    import soxr

    return soxr.resample(np.asarray(wav, np.float32), orig_rate, target_rate, quality="HQ").astype(
        np.float32
    )


def load_audio(
    path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, *, strict_rate: bool = False
) -> np.ndarray:
    """Reads an audio file as mono float32 `[samples]` at `sample_rate`.

    Multi-channel audio is averaged to mono. A file at another rate is resampled, or, with
    `strict_rate=True`, rejected.

    Raises:
      AudioError: the file is missing, not a readable audio file (corrupt, truncated, wrong
        format), holds no samples, contains NaN/inf, or (strict_rate) has another rate.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(path, "file not found")
    if os.path.isdir(path):
        raise AudioError(path, "is a directory, expected an audio file")
    try:
        wav, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioError(path, f"unreadable or corrupt audio ({type(e).__name__}: {e})") from e
    if wav.shape[0] == 0:
        raise AudioError(path, "empty audio (0 samples)")
    if strict_rate and rate != sample_rate:
        raise AudioError(path, f"sample rate {rate} Hz, expected {sample_rate} Hz")
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    if not np.all(np.isfinite(wav)):
        raise AudioError(path, "contains NaN or infinite samples")
    return resample(wav, rate, sample_rate)


def _to_pcm16(wav: np.ndarray) -> np.ndarray:
    wav = np.asarray(wav, np.float32)
    if wav.ndim != 1:
        raise ValueError(f"expected mono audio [samples], got shape {wav.shape}")
    return (np.clip(np.nan_to_num(wav), -1.0, 1.0) * 32767.0).astype(np.int16)


def write_wav(path: str | os.PathLike, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Writes float32 `[samples]` as a 16-bit PCM WAV, atomically (temp file, then rename)."""
    with WavStreamWriter(path, sample_rate) as w:
        w.write(wav)


class WavStreamWriter:
    """Appends float32 chunks to a 16-bit PCM WAV on disk; memory stays flat with length.

    Writes to a temporary file beside `path` and renames it onto `path` on a clean close, so
    readers never see a half-written file; on an exception inside `with` the temp is removed.

        with WavStreamWriter("out.wav", 16000) as w:
            for chunk in chunks:   # each [samples] float32
                w.write(chunk)
        w.num_samples  # total written
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int = SAMPLE_RATE):
        self.path = os.fspath(path)
        self.sample_rate = int(sample_rate)
        self.num_samples = 0
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(
            prefix="." + os.path.basename(self.path) + ".", suffix=".tmp", dir=d
        )
        os.close(fd)
        self._file: sf.SoundFile | None = sf.SoundFile(
            self._tmp,
            "w",
            samplerate=self.sample_rate,
            channels=1,
            subtype="PCM_16",
            format="WAV",
        )

    def write(self, chunk: np.ndarray) -> None:
        """Appends `[samples]` float32 audio (clipped to [-1, 1])."""
        if self._file is None:
            raise ValueError(f"{self.path}: write after close")
        pcm = _to_pcm16(chunk)
        if len(pcm):
            self._file.write(pcm)
            self.num_samples += len(pcm)

    def close(self) -> None:
        """Finishes the header and renames the temp file onto `path`."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Discards everything written; `path` is left untouched."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self) -> WavStreamWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
