"""Lip-sync error (LSE-D, LSE-C) and the audio-visual offset, as joonson/syncnet_python.

The protocol (25 fps video, 16 kHz audio; `vshift = 15`):
- `n = min(frames, samples // 640)`; one window per start frame `v` in `0 .. n - 6` (the
  original's `range(0, n - 5)`): 5 video frames `v .. v+4` and 20 audio feature frames at
  100 Hz `4v .. 4v+19` (0.2 s), each embedded by the sync network.
- For every video window `i`, Euclidean distances to the audio windows `i + k` for
  `k = -vshift .. +vshift` (audio embeddings zero-padded past either end): `[n_win, 31]`.
- The mean over windows gives a distance per offset; LSE-D is its minimum, LSE-C its median
  minus that minimum, and the AV offset `vshift - argmin`: audio that lags the video by `d`
  frames gives offset `-d` (the minimum sits at `k = +d`).

The sync network is passed in as two embedding functions, so the same code scores SyncNet v2
(imported weights, 13 MFCC from `syncnet_mfcc`) and a sync expert trained here (any audio
features with 4 frames per video frame: callers slice their own windows).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
FEATURES_PER_FRAME = 4  # 100 Hz audio features per 25 fps video frame
WINDOW_FRAMES = 5
WINDOW_FEATURES = 20
VSHIFT = 15


def num_windows(num_frames: int, num_samples: int) -> int:
    """Windows scored for a clip of `num_frames` video frames and `num_samples` audio
    samples: `min(num_frames, num_samples // 640) - 5` (never negative)."""
    return max(0, min(num_frames, num_samples // SAMPLES_PER_FRAME) - WINDOW_FRAMES)


def offset_distances(
    video_emb: np.ndarray, audio_emb: np.ndarray, vshift: int = VSHIFT
) -> np.ndarray:
    """`[n, dim]` video and audio window embeddings -> `[n, 2 * vshift + 1]` distances.

    Entry `[i, j]` is `|video_emb[i] - audio_emb[i + j - vshift]|`; audio beyond either end
    is a zero vector (as the original's padding).
    """
    video_emb = np.asarray(video_emb, np.float64)
    audio_emb = np.asarray(audio_emb, np.float64)
    if video_emb.shape != audio_emb.shape or video_emb.ndim != 2:
        raise ValueError(
            f"embeddings [n, dim] of equal shape, got {video_emb.shape} and {audio_emb.shape}"
        )
    n = video_emb.shape[0]
    padded = np.pad(audio_emb, ((vshift, vshift), (0, 0)))
    idx = np.arange(n)[:, None] + np.arange(2 * vshift + 1)[None, :]  # [n, win]
    diff = video_emb[:, None, :] - padded[idx]
    # torch's pairwise_distance adds eps = 1e-6 to the difference before the norm.
    return np.sqrt(np.sum(np.square(diff + 1e-6), axis=-1))


def lse_from_distances(dists: np.ndarray, vshift: int = VSHIFT) -> dict[str, float]:
    """`[n, 2 * vshift + 1]` distances -> `{"lse_d", "lse_c", "offset"}` of one clip."""
    dists = np.asarray(dists, np.float64)
    if dists.ndim != 2 or dists.shape[0] == 0 or dists.shape[1] != 2 * vshift + 1:
        raise ValueError(f"distances [windows > 0, {2 * vshift + 1}] expected, got {dists.shape}")
    mean = dists.mean(axis=0)
    best = int(np.argmin(mean))
    # torch.median: the lower middle value (the curve has an odd length, so the middle one).
    median = float(np.sort(mean)[(mean.size - 1) // 2])
    return {
        "lse_d": float(mean[best]),
        "lse_c": median - float(mean[best]),
        "offset": vshift - best,
    }


def lse(
    embed_video: Callable[[int, int], np.ndarray],
    embed_audio: Callable[[int, int], np.ndarray],
    num_frames: int,
    num_samples: int,
    *,
    vshift: int = VSHIFT,
    batch: int = 64,
) -> dict[str, float]:
    """LSE-D, LSE-C and the offset of one clip, from window embedding functions.

    `embed_video(start, stop)` returns `[stop - start, dim]` embeddings of the video windows
    starting at frames `start .. stop-1`; `embed_audio(start, stop)` those of the audio windows
    at the same frames (features `4v .. 4v+19`). They are called in chunks of `batch`.

    Raises:
      ValueError: the clip is too short for one window (naming its length).
    """
    n = num_windows(num_frames, num_samples)
    if n <= 0:
        raise ValueError(
            f"a clip of {num_frames} frames / {num_samples} samples is too short for LSE "
            f"(needs more than {WINDOW_FRAMES} frames of both)"
        )
    vid = np.concatenate([embed_video(s, min(n, s + batch)) for s in range(0, n, batch)])
    aud = np.concatenate([embed_audio(s, min(n, s + batch)) for s in range(0, n, batch)])
    return {**lse_from_distances(offset_distances(vid, aud, vshift), vshift), "windows": n}


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    """Mean LSE-D / LSE-C over clips (as papers report them)."""
    return {k: float(np.mean([s[k] for s in scores])) for k in ("lse_d", "lse_c")}


# --- SyncNet v2's audio features ----------------------------------------------------------------


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def _triangular_filters(nfilt: int, nfft: int, sample_rate: int) -> np.ndarray:
    """`[nfilt, nfft // 2 + 1]` triangles on FFT bins `floor((nfft + 1) * hz / rate)`."""
    mels = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), nfilt + 2)
    bins = np.floor((nfft + 1) * _mel_to_hz(mels) / sample_rate).astype(int)
    fb = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        fb[j, lo:mid] = (np.arange(lo, mid) - lo) / max(mid - lo, 1)
        fb[j, mid:hi] = (hi - np.arange(mid, hi)) / max(hi - mid, 1)
    return fb


def syncnet_mfcc(wav: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
    """`[samples]` -> `[13, frames]` float32 MFCC at 100 Hz, SyncNet's audio input.

    The defaults of `python_speech_features.mfcc` that syncnet_python calls: pre-emphasis
    0.97, 25 ms rectangular frames every 10 ms (the last one zero-padded), 512-point power
    spectrum, 26 mel triangles, natural log, orthonormal DCT-II, lifter 22, coefficient 0
    replaced by the log frame energy. The waveform is taken at its own scale (int16 range
    in the original, which reads WAV files as integers).
    """
    from scipy.fft import dct

    x = np.asarray(wav, np.float64)
    x = np.append(x[:1], x[1:] - 0.97 * x[:-1])
    win, step, nfft = int(round(0.025 * sample_rate)), int(round(0.01 * sample_rate)), 512
    n = 1 if len(x) <= win else 1 + int(np.ceil((len(x) - win) / step))
    x = np.pad(x, (0, max(0, (n - 1) * step + win - len(x))))
    idx = np.arange(win)[None, :] + step * np.arange(n)[:, None]
    power = np.square(np.abs(np.fft.rfft(x[idx], nfft))) / nfft  # [n, nfft/2+1]
    eps = np.finfo(float).eps
    energy = np.maximum(power.sum(axis=1), eps)
    feat = np.maximum(power @ _triangular_filters(26, nfft, sample_rate).T, eps)
    cep = dct(np.log(feat), type=2, axis=1, norm="ortho")[:, :13]
    cep *= 1.0 + 11.0 * np.sin(np.pi * np.arange(13) / 22.0)
    cep[:, 0] = np.log(energy)
    return cep.T.astype(np.float32)
