"""Spectrogram pictures of audio or log-mel (matplotlib Agg canvas, no display needed)."""

from __future__ import annotations

import os

import numpy as np

from avjax.data.audio import SAMPLE_RATE

MAX_COLUMNS = 2000  # time columns kept in a picture (long audio is block-averaged down)


def save_spectrogram_png(
    wav_or_mel: np.ndarray,
    path: str | os.PathLike,
    sample_rate: int = SAMPLE_RATE,
    title: str | None = None,
    *,
    frame_rate: float = 100.0,
) -> str:
    """Writes a log-mel spectrogram picture to `path` (PNG); returns the path.

    Args:
      wav_or_mel: a waveform `[samples]` at `sample_rate` (its log-mel is computed) or a
        log-mel `[frames, n_mels]` at `frame_rate` frames per second.
      title: optional title; the x axis is in seconds (minutes beyond 5 minutes).
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    from avjax.data.speech import units as units_lib

    x = np.asarray(wav_or_mel, np.float32)
    if x.ndim == 1:
        if sample_rate != SAMPLE_RATE:
            from avjax.data.audio import resample

            x = resample(x, sample_rate, SAMPLE_RATE)
        mel = units_lib.log_mel(x)
        frame_rate = SAMPLE_RATE / units_lib.HOP_LENGTH
    elif x.ndim == 2:
        mel = x
    else:
        raise ValueError(f"expected a waveform [samples] or log-mel [frames, mels], got {x.shape}")
    seconds = len(mel) / frame_rate
    if len(mel) > MAX_COLUMNS:  # block-average the time axis
        f = -(-len(mel) // MAX_COLUMNS)
        n = len(mel) // f * f
        mel = mel[:n].reshape(-1, f, mel.shape[1]).mean(axis=1)
    minutes = seconds > 300
    extent = (0.0, seconds / 60 if minutes else seconds, 0, mel.shape[1] if len(mel) else 1)
    fig = Figure(figsize=(12 if seconds > 30 else 8, 3.2), dpi=100)
    ax = fig.add_subplot()
    if len(mel):
        ax.imshow(
            mel.T,
            origin="lower",
            aspect="auto",
            extent=extent,
            cmap="magma",
            interpolation="nearest",
        )
    ax.set_xlabel("minutes" if minutes else "seconds")
    ax.set_ylabel("mel bin")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)  # Figure.savefig renders with Agg for .png
    return path
