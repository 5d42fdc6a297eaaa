"""Whisper's log-mel front-end, equal to transformers' `WhisperFeatureExtractor`, in JAX.

    audio [batch, samples] at 16 kHz, zero-padded (or cut) to `pad_to` samples (30 s)
    -> |STFT|^2: 400-point periodic Hann window, hop 160, centred (reflect-padded by 200),
       the last frame dropped                            # [batch, samples // 160, 201]
    -> Slaney-normalised Slaney-scale mel filters 0..8 kHz      # 80 or 128 bins
    -> log10(max(mel, 1e-10)), floored at (its maximum over the utterance) - 8
    -> (x + 4) / 4                                              # [batch, num_mel_bins, frames]

The output feeds `avjax.nn.whisper.WhisperEncoder` directly. It is a pure function, so it can
run in a grain map (numpy in, numpy out through `jax.jit` on the host) or inside a jitted
model step. Float32 throughout; `tests/test_convert_whisper.py` states the measured distance
to transformers (its torch STFT path).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160
N_SAMPLES = 30 * SAMPLE_RATE  # Whisper's 30 s window: 3000 frames
LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0  # in log10 units (80 dB)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 mel / 200 Hz) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    log_step = 27.0 / np.log(6.4)
    return np.where(
        hz < 1000.0, 3.0 * hz / 200.0, 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) * log_step
    )


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    log_step = np.log(6.4) / 27.0
    return np.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * np.exp(log_step * (mel - 15.0)))


@functools.lru_cache(maxsize=8)
def mel_filters(
    num_mel_bins: int = 80,
    n_fft: int = N_FFT,
    sample_rate: int = SAMPLE_RATE,
    f_min: float = 0.0,
    f_max: float = 8000.0,
) -> np.ndarray:
    """Triangular Slaney filters `[n_fft // 2 + 1, num_mel_bins]` float32, each of unit area
    (scaled by 2 / bandwidth), centres evenly spaced on the Slaney mel scale."""
    fft_freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    mels = np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), num_mel_bins + 2)
    edges = _mel_to_hz(mels)  # [num_mel_bins + 2]
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]  # [freqs, num_mel_bins + 2]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (edges[2:] - edges[:-2])[None]
    return filters.astype(np.float32)


def fit_length(audio: np.ndarray, length: int) -> np.ndarray:
    """`audio [..., samples]` zero-padded at the end or cut to `length` samples."""
    n = audio.shape[-1]
    if n >= length:
        return audio[..., :length]
    pad = [(0, 0)] * (audio.ndim - 1) + [(0, length - n)]
    return np.pad(audio, pad)


def power_spectrogram(audio: jax.Array, n_fft: int = N_FFT, hop: int = HOP) -> jax.Array:
    """`[batch, samples]` -> `|STFT|^2 [batch, samples // hop, n_fft // 2 + 1]` float32.

    Centred frames (reflect padding of n_fft // 2 each side), periodic Hann window; of the
    `samples // hop + 1` frames the last is dropped, as Whisper does.
    """
    x = jnp.pad(audio.astype(jnp.float32), ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    frames = audio.shape[1] // hop
    idx = jnp.arange(frames)[:, None] * hop + jnp.arange(n_fft)[None, :]  # [frames, n_fft]
    window = 0.5 - 0.5 * jnp.cos(2 * jnp.pi * jnp.arange(n_fft, dtype=jnp.float32) / n_fft)
    spec = jnp.fft.rfft(x[:, idx] * window[None, None], axis=-1)
    return jnp.square(spec.real) + jnp.square(spec.imag)


@functools.partial(jax.jit, static_argnames=("num_mel_bins",))
def log_mel_from_audio(audio: jax.Array, num_mel_bins: int = 80) -> jax.Array:
    """`audio [batch, samples]` (already at its final length) -> `[batch, num_mel_bins,
    samples // 160]`, Whisper's normalised log-mel."""
    power = power_spectrogram(audio)
    filters = jnp.asarray(mel_filters(num_mel_bins))
    mel = jnp.einsum("btf,fm->bmt", power, filters, precision=jax.lax.Precision.HIGHEST)
    log = jnp.log10(jnp.maximum(mel, LOG_FLOOR))
    top = jnp.max(log, axis=(1, 2), keepdims=True)
    return (jnp.maximum(log, top - DYNAMIC_RANGE) + 4.0) / 4.0


def whisper_features(
    audio: np.ndarray | list[np.ndarray], num_mel_bins: int = 80, pad_to: int | None = N_SAMPLES
) -> np.ndarray:
    """Whisper's encoder input `[batch, num_mel_bins, pad_to // 160]` float32 for 16 kHz audio.

    `audio` is `[samples]`, `[batch, samples]` or a list of 1-D arrays of any lengths; each is
    zero-padded or cut to `pad_to` samples (None: the longest in the batch), as
    `WhisperFeatureExtractor(feature_size=num_mel_bins)(audio, sampling_rate=16000)` does.
    """
    if isinstance(audio, np.ndarray):
        rows = [audio] if audio.ndim == 1 else list(audio)
    else:
        rows = list(audio)
    if any(np.ndim(r) != 1 for r in rows):
        raise ValueError("audio: expected [samples], [batch, samples] or a list of 1-D arrays")
    length = pad_to or max(len(r) for r in rows)
    if length <= N_FFT // 2:
        raise ValueError(f"audio of {length} samples is too short for a {N_FFT}-point STFT")
    batch = np.stack([fit_length(np.asarray(r, np.float32), length) for r in rows])
    return np.asarray(log_mel_from_audio(batch, num_mel_bins))
