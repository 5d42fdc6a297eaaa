"""Long-form evaluation metrics, per time slice (pure functions over numpy / JAX arrays).

A continuation of `T` units (25 Hz) is cut into consecutive time slices of `S` seconds
(`slice_bounds`); every metric below gives one value per slice, so a curve over time shows
whether a model stays on track (SpeechSSM, Park et al. 2025, report their metrics this way for
4- and 16-minute continuations).

Metrics:
  * `token_logprobs`, `perplexity_by_slice`: unit-level perplexity of the held-out continuation
    under teacher forcing, `ppl_k = exp(-mean_{t in slice k} log p(x_t | x_<t))`.
  * `ngram_stats`: distinct-n (n = 1..4) of the generated units, the fraction of n-grams that
    already occurred earlier (in the prompt or earlier slices), and the longest span repeated
    within the slice.
  * `speaker_embedding`, `cosine_similarity`: mean and standard deviation of MFCCs 1..19 over
    voiced frames, compared to the prompt's by cosine similarity (`mfcc_sim` in the long-form
    report). A spectral-envelope statistic, not a speaker-verification model: it sits near 1
    for any speech-like audio through one vocoder. The speaker similarity reported as
    `speaker_sim` uses GE2E d-vectors (`avjax.eval.speaker`).
  * `spectral_distance`, `continuity`: log-mel distance between the 0.5 s before and after each
    slice boundary, beside the same measure inside the slice (a discontinuity shows as a
    boundary distance well above the within-slice one).
  * `semantic_coherence`: SC-L, the cosine similarity of each slice's transcript embedding to
    the prompt transcript's embedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

N_MFCC = 20  # MFCCs computed; the 0th (log energy) is dropped from the speaker embedding


# --- time slices --------------------------------------------------------------------------------


def slice_bounds(length: int, slice_len: int) -> list[tuple[int, int]]:
    """`[(start, end), ...]` half-open index ranges of consecutive slices of `slice_len` items.

    The last slice may be shorter; `length == 0` gives no slices.
    """
    if slice_len <= 0:
        raise ValueError(f"slice_len must be positive, got {slice_len}")
    return [(s, min(s + slice_len, length)) for s in range(0, max(length, 0), slice_len)]


# --- perplexity ---------------------------------------------------------------------------------


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """`log p(targets)` under `softmax(logits)`.

    Args:
      logits: `[..., time, vocab]` (any float dtype; computed in float32).
      targets: `[..., time]` int.

    Returns:
      `[..., time]` float32 log-probabilities (natural log).
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, jnp.asarray(targets)[..., None].astype(jnp.int32), -1)[..., 0]


def perplexity_by_slice(
    logprobs: np.ndarray, slice_len: int, mask: np.ndarray | None = None
) -> np.ndarray:
    """Perplexity per time slice: `exp(-sum_{t in k} m_t log p_t / sum_{t in k} m_t)`.

    Args:
      logprobs: `[time]` or `[batch, time]` per-token log-probabilities of the reference
        continuation (teacher forcing). With a batch, each slice pools all tokens of all rows
        (token-weighted), i.e. `exp` of the mean negative log-likelihood in that slice.
      slice_len: tokens per slice (`S * 25` for 25 Hz units).
      mask: same shape as `logprobs`, 1 for tokens that count (e.g. rows whose reference is
        shorter are padded and masked). Default: all count.

    Returns:
      `[num_slices]` float64 perplexities; NaN for a slice with no counted token.
    """
    lp = np.atleast_2d(np.asarray(logprobs, np.float64))
    m = np.ones_like(lp) if mask is None else np.atleast_2d(np.asarray(mask, np.float64))
    if m.shape != lp.shape:
        raise ValueError(f"mask shape {m.shape} != logprobs shape {lp.shape}")
    out = []
    for s, e in slice_bounds(lp.shape[1], slice_len):
        w = m[:, s:e].sum()
        out.append(math.exp(-(lp[:, s:e] * m[:, s:e]).sum() / w) if w > 0 else math.nan)
    return np.asarray(out, np.float64)


# --- repetition / diversity ---------------------------------------------------------------------


def _ngrams(units: np.ndarray, n: int) -> np.ndarray:
    """`[len - n + 1]` int64 codes of the n-grams of `units` (exact: base = max + 1)."""
    u = np.asarray(units, np.int64).reshape(-1)
    if len(u) < n:
        return np.zeros(0, np.int64)
    base = int(u.max()) + 1 if len(u) else 1
    if n * math.log2(max(base, 2)) >= 62:  # would overflow int64: fall back to byte strings
        view = np.lib.stride_tricks.sliding_window_view(u, n)
        _, codes = np.unique(view, axis=0, return_inverse=True)
        return codes.reshape(-1).astype(np.int64)
    codes = np.zeros(len(u) - n + 1, np.int64)
    for i in range(n):
        codes = codes * base + u[i : len(u) - n + 1 + i]
    return codes


def distinct_n(units: np.ndarray, n: int) -> float:
    """distinct-n = (number of unique n-grams) / (number of n-grams) of `units` `[time]`.

    1 when no n-gram repeats; `1 / (T - n + 1)` for a constant sequence. NaN if `T < n`.
    """
    codes = _ngrams(units, n)
    return float(len(np.unique(codes)) / len(codes)) if len(codes) else math.nan


def longest_repeat(units: np.ndarray) -> int:
    """Length of the longest span of `units` `[time]` that occurs at least twice in it.

    Occurrences may overlap (a loop `abcabcabc` of period 3 gives `T - 3`; a constant
    sequence gives `T - 1`; all-distinct units give 0). O(T^2) time, O(T) memory: meant for
    slices (a 10 s slice is 250 units).
    """
    u = np.asarray(units).reshape(-1)
    best = 0
    for d in range(1, len(u)):
        eq = u[d:] == u[:-d]
        if not eq.any():
            continue
        # Longest run of True in eq.
        padded = np.concatenate([[0], eq.astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(padded))
        best = max(best, int((edges[1::2] - edges[::2]).max()))
        if best >= len(u) - d:  # later offsets cannot beat it
            break
    return best


def ngram_stats(
    units: np.ndarray,
    slice_len: int,
    *,
    context: np.ndarray | None = None,
    max_n: int = 4,
    repeat_n: int = 4,
    unit_rate: float = 25.0,
) -> dict[str, np.ndarray]:
    """Repetition and diversity of generated units, per slice.

    Args:
      units: `[time]` generated units (the continuation only).
      slice_len: units per slice.
      context: `[prompt_time]` units before `units` (the prompt), counted as "seen before"
        by `repeat_<n>`.
      max_n: distinct-n is reported for n = 1..max_n.
      repeat_n: n of the "already seen" fraction.
      unit_rate: units per second (for `longest_repeat_s`).

    Returns:
      `{name: [num_slices]}` with
        `distinct_<n>`: distinct-n inside the slice (see `distinct_n`), n = 1..max_n;
        `repeat_<repeat_n>`: fraction of the slice's `repeat_n`-grams (those starting in the
          slice) that already occurred starting at an earlier position anywhere before, from
          the start of `context` on; a model that loops back to earlier material scores high;
        `longest_repeat_s`: `longest_repeat` of the slice, in seconds.
    """
    u = np.asarray(units, np.int64).reshape(-1)
    ctx = np.zeros(0, np.int64) if context is None else np.asarray(context, np.int64).reshape(-1)
    full = np.concatenate([ctx, u])
    codes = _ngrams(full, repeat_n)
    # first[i]: True where codes[i] occurs for the first time.
    first = np.zeros(len(codes), bool)
    if len(codes):
        _, idx = np.unique(codes, return_index=True)
        first[idx] = True
    out: dict[str, list[float]] = {f"distinct_{n}": [] for n in range(1, max_n + 1)}
    out[f"repeat_{repeat_n}"] = []
    out["longest_repeat_s"] = []
    for s, e in slice_bounds(len(u), slice_len):
        piece = u[s:e]
        for n in range(1, max_n + 1):
            out[f"distinct_{n}"].append(distinct_n(piece, n))
        lo, hi = len(ctx) + s, min(len(ctx) + e, len(codes))
        out[f"repeat_{repeat_n}"].append(float(1.0 - first[lo:hi].mean()) if hi > lo else math.nan)
        out["longest_repeat_s"].append(longest_repeat(piece) / unit_rate)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


# --- speaker similarity -------------------------------------------------------------------------


def speaker_embedding(
    wav: np.ndarray, sample_rate: int = 16000, top_db: float = 40.0
) -> np.ndarray:
    """MFCC statistics (a proxy, see the module docstring): mean and std of MFCCs 1..19 over
    voiced frames.

    MFCCs (librosa: 20 coefficients, 25 ms windows, 10 ms hop, 40 mel bands) describe the
    spectral envelope, whose long-term statistics depend mostly on the vocal tract and the
    recording channel, not on what is said (a crude i-vector-like summary). c0 (energy) is
    dropped; frames more than `top_db` below the loudest frame are ignored (silence).

    Args:
      wav: `[samples]` float mono audio.

    Returns:
      `[38]` float64: 19 means followed by 19 standard deviations. Zeros for silent audio.
    """
    import librosa

    wav = np.asarray(wav, np.float32).reshape(-1)
    dim = 2 * (N_MFCC - 1)
    if len(wav) == 0 or not np.any(wav):
        return np.zeros(dim, np.float64)
    hop, win = sample_rate // 100, int(0.025 * sample_rate)
    mfcc = librosa.feature.mfcc(
        y=wav, sr=sample_rate, n_mfcc=N_MFCC, n_fft=512, win_length=win, hop_length=hop, n_mels=40
    )
    energy = librosa.feature.rms(y=wav, frame_length=512, hop_length=hop)[0][: mfcc.shape[1]]
    db = 20 * np.log10(np.maximum(energy, 1e-10))
    voiced = db >= db.max() - top_db
    c = mfcc[1:, voiced].astype(np.float64)
    return np.concatenate([c.mean(axis=1), c.std(axis=1)])


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """`a . b / (|a| |b|)` of two vectors `[d]`; NaN when either is zero."""
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return math.nan
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def speaker_similarity_by_slice(
    prompt_wav: np.ndarray, wav: np.ndarray, slice_samples: int, sample_rate: int = 16000
) -> np.ndarray:
    """Cosine similarity of each slice's `speaker_embedding` to the prompt's.

    Args:
      prompt_wav: `[samples]` the prompt's audio.
      wav: `[samples]` the continuation's audio (without the prompt).
      slice_samples: samples per slice.

    Returns:
      `[num_slices]` in [-1, 1] (1 for identical audio).
    """
    ref = speaker_embedding(prompt_wav, sample_rate)
    return np.asarray(
        [
            cosine_similarity(ref, speaker_embedding(wav[s:e], sample_rate))
            for s, e in slice_bounds(len(wav), slice_samples)
        ],
        np.float64,
    )


# --- acoustic continuity ------------------------------------------------------------------------


def spectral_distance(mel_a: np.ndarray, mel_b: np.ndarray) -> float:
    """Distance of two log-mel segments `[frames, n_mels]`: RMS over mel bins of the
    difference of their time-averaged log-mel spectra, in dB:

      d = sqrt(mean_f (mean_t A[t, f] - mean_t B[t, f])^2) * 10 / ln(10)

    (natural-log mel power in, decibels out). 0 for identical segments.
    """
    a, b = np.asarray(mel_a, np.float64), np.asarray(mel_b, np.float64)
    if len(a) == 0 or len(b) == 0:
        return math.nan
    diff = a.mean(axis=0) - b.mean(axis=0)
    return float(np.sqrt(np.mean(diff**2)) * 10.0 / math.log(10.0))


def continuity(
    mel: np.ndarray,
    start: int,
    slice_frames: int,
    window_frames: int = 50,
) -> dict[str, np.ndarray]:
    """Acoustic continuity at the slice boundaries of a log-mel `[frames, n_mels]`.

    The continuation starts at frame `start` (the prompt is `mel[:start]`) and is cut into
    slices of `slice_frames`. For slice k starting at frame b_k:
      boundary_k = spectral_distance(mel[b_k - w : b_k], mel[b_k : b_k + w])
    (slice 0's boundary is the prompt -> continuation join), and, as the reference of what
    an ordinary 2w stretch of the same speech looks like,
      within_k = spectral_distance(mel[c_k - w : c_k], mel[c_k : c_k + w]),  c_k = slice middle.
    `w = window_frames` (50 frames = 0.5 s at 100 Hz).

    Returns:
      `{"boundary": [num_slices], "within": [num_slices]}` in dB; NaN where a window does not
      fit.
    """
    mel = np.asarray(mel)
    w = int(window_frames)
    boundary, within = [], []
    for s, e in slice_bounds(len(mel) - start, slice_frames):
        b = start + s
        boundary.append(spectral_distance(mel[b - w : b], mel[b : b + w]) if b >= w else math.nan)
        c = start + (s + e) // 2
        fits = c - w >= start + s and c + w <= start + e
        within.append(spectral_distance(mel[c - w : c], mel[c : c + w]) if fits else math.nan)
    return {"boundary": np.asarray(boundary, np.float64), "within": np.asarray(within, np.float64)}


# --- semantic coherence (SC-L) ------------------------------------------------------------------


def semantic_coherence(
    prompt_text: str,
    slice_texts: Sequence[str],
    embed: Callable[[Sequence[str]], np.ndarray],
) -> np.ndarray:
    """SC-L: cosine similarity of each slice transcript's embedding to the prompt's.

    Args:
      prompt_text: transcript of the prompt.
      slice_texts: transcripts of the continuation's slices, in time order.
      embed: texts -> `[len(texts), dim]` sentence embeddings (e.g.
        `avjax.eval.text_embed.TextEmbedder.encode`).

    Returns:
      `[num_slices]` float64. A slice with an empty transcript (nothing recognised) scores 0;
      all NaN when the prompt's transcript is empty (nothing to compare with).
    """
    texts = [t.strip() for t in slice_texts]
    if not prompt_text.strip():
        return np.full(len(texts), math.nan)
    nonempty = [i for i, t in enumerate(texts) if t]
    out = np.zeros(len(texts), np.float64)
    if nonempty:
        e = np.asarray(embed([prompt_text.strip()] + [texts[i] for i in nonempty]), np.float64)
        for j, i in enumerate(nonempty):
            out[i] = cosine_similarity(e[0], e[j + 1])
    return out
