"""Log-mel features at the 25 Hz unit rate: the signal processing under units and vocoder.

80-bin log-mel power at 100 Hz (hop 160 at 16 kHz, Slaney filterbank, natural log floored at
`MEL_FLOOR`); 4 consecutive frames stacked per 40 ms unit: `[units, 320]` (`unit_features`).
A waveform of `n` samples gives `n // 640` units. `units` (tokenizer), `features` (extractors)
and `vocoder` (units -> mel -> audio) of `avjax.data.speech` build on this module, which imports
none of them.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np

from avjax.data.audio import SAMPLE_RATE

UNIT_RATE = 25  # units per second
HOP_LENGTH = 160  # 10 ms at 16 kHz
N_FFT = 1024
WIN_LENGTH = 1024
N_MELS = 80
FMIN = 0.0
FMAX = 8000.0
MEL_FLOOR = 1e-5  # log-mel = log(max(mel power, MEL_FLOOR))
FRAMES_PER_UNIT = SAMPLE_RATE // HOP_LENGTH // UNIT_RATE  # 4
SAMPLES_PER_UNIT = SAMPLE_RATE // UNIT_RATE  # 640
FEATURE_DIM = FRAMES_PER_UNIT * N_MELS  # 320


def logmel_spec() -> dict[str, Any]:
    """The extractor spec of the default features (`avjax.data.speech.features.get_extractor`)."""
    return {"name": "logmel", **feature_config()}


def feature_config() -> dict[str, Any]:
    """The feature parameters a saved tokenizer/vocoder must match."""
    return {
        "sample_rate": SAMPLE_RATE,
        "unit_rate": UNIT_RATE,
        "hop_length": HOP_LENGTH,
        "n_fft": N_FFT,
        "win_length": WIN_LENGTH,
        "n_mels": N_MELS,
        "fmin": FMIN,
        "fmax": FMAX,
        "mel_floor": MEL_FLOOR,
    }


@functools.cache
def mel_basis() -> np.ndarray:
    """`[n_mels, n_fft // 2 + 1]` float32 Slaney mel filterbank."""
    import librosa

    return librosa.filters.mel(
        sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX
    ).astype(np.float32)


def stft(wav: np.ndarray) -> np.ndarray:
    """Complex STFT `[n_fft // 2 + 1, 1 + len(wav) // hop]` (Hann, centred, zero padded)."""
    import librosa

    with warnings.catch_warnings():  # n_fft > len(wav) is fine with centred zero padding
        warnings.filterwarnings("ignore", message="n_fft=.*is too large", category=UserWarning)
        return librosa.stft(
            np.asarray(wav, np.float32),
            n_fft=N_FFT,
            hop_length=HOP_LENGTH,
            win_length=WIN_LENGTH,
            center=True,
            pad_mode="constant",
        )


def log_mel(wav: np.ndarray) -> np.ndarray:
    """Log-mel power spectrogram `[frames, n_mels]` float32 at 100 Hz; frames = 1 + n // 160."""
    wav = np.asarray(wav, np.float32)
    if wav.ndim != 1:
        raise ValueError(f"log_mel expects mono audio [samples], got shape {wav.shape}")
    spec = stft(wav)
    power = spec.real**2 + spec.imag**2
    # einsum, not `mel_basis() @ power`: per clip the product is too small for threaded BLAS,
    # whose waiting threads spin; in the AV data pipeline that cost 20 ms of CPU per 1.16 s
    # clip against 1.3 ms here (measured), and kept the read threads from using two cores
    mel = np.einsum("mf,ft->tm", mel_basis(), power)
    return np.log(np.maximum(mel, MEL_FLOOR), dtype=np.float32)


def num_units_for(num_samples: int) -> int:
    """Units a waveform of `num_samples` gives (40 ms each, a shorter tail dropped)."""
    return max(int(num_samples) // SAMPLES_PER_UNIT, 0)


def unit_mel(mel: np.ndarray, num_units: int) -> np.ndarray:
    """The first `4 * num_units` frames of `mel` `[frames, n_mels]` (edge-padded if short)."""
    need = FRAMES_PER_UNIT * num_units
    if len(mel) < need:
        mel = np.pad(mel, ((0, need - len(mel)), (0, 0)), mode="edge")
    return mel[:need]


def mel_to_unit_features(mel: np.ndarray, num_units: int | None = None) -> np.ndarray:
    """Stacks 4 log-mel frames per unit: `[frames, n_mels]` -> `[units, 4 * n_mels]`."""
    if num_units is None:
        num_units = len(mel) // FRAMES_PER_UNIT
    m = unit_mel(mel, num_units)
    return m.reshape(num_units, FRAMES_PER_UNIT * mel.shape[1])


def unit_features(wav: np.ndarray) -> np.ndarray:
    """Unit-rate features `[units, 320]` float32 at 25 Hz: 4 stacked 10 ms log-mel frames.

    Not yet normalised: `UnitTokenizer` learns the per-dimension mean and std at fit time.
    """
    return mel_to_unit_features(log_mel(wav), num_units_for(len(wav)))
