"""Wav2Lip's lip-sync expert (Prajwal et al., 2020), as the frozen sync loss of talking faces.

Input: a clip batch of face crops `video [batch, frames, H, W, 3]` uint8 at 25 fps and its
audio `[batch, frames * 640]` float32 at 16 kHz. Training pairs are drawn from it on the
device: a window of 5 consecutive frames (lower halves, stacked on channels) and a mel window
of 16 steps (80 Hz, 0.2 s) starting at the same time (in sync, label 1) or shifted by
`min_shift .. max_shift` frames (label 0). Both encoders embed to unit vectors; the cosine
similarity is P(sync) and the loss is its binary cross-entropy.

Mel (Wav2Lip's hparams): pre-emphasis 0.97, STFT n_fft 800 / hop 200 / Hann 800 (centred,
reflect padding), 80 Slaney mels 55..7600 Hz of the magnitude, 20 log10 - 20 dB, scaled from
[-100, 0] dB to [-4, 4]. The mel window of video frame `t` starts at step `floor(3.2 t)`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from avjax.nn.syncnet import ConvSpec, SyncExpert

SAMPLE_RATE = 16000
FPS = 25
N_FFT, HOP, N_MELS, FMIN, FMAX = 800, 200, 80, 55.0, 7600.0
MEL_STEPS = 16  # 0.2 s of mel at 80 Hz
WINDOW = 5  # video frames per window

R = True  # residual


def _face_layers(w: int, deep: bool) -> list[ConvSpec]:
    """Wav2Lip's face encoder (`w=32, deep=True`: 32..512 channels, for 48 x 96 inputs);
    `deep=False` drops the last two stride-2 stages (small CPU faces)."""
    layers = [
        ConvSpec(w, (7, 7), (1, 1), (3, 3)),
        ConvSpec(2 * w, (5, 5), (1, 2), (1, 1)),
        ConvSpec(2 * w, (3, 3), residual=R),
        ConvSpec(2 * w, (3, 3), residual=R),
        ConvSpec(4 * w, (3, 3), (2, 2)),
        ConvSpec(4 * w, (3, 3), residual=R),
        ConvSpec(4 * w, (3, 3), residual=R),
        ConvSpec(8 * w, (3, 3), (2, 2)),
        ConvSpec(8 * w, (3, 3), residual=R),
        ConvSpec(8 * w, (3, 3), residual=R),
    ]
    if deep:
        layers += [
            ConvSpec(16 * w, (3, 3), (2, 2)),
            ConvSpec(16 * w, (3, 3), residual=R),
            ConvSpec(16 * w, (3, 3), residual=R),
            ConvSpec(16 * w, (3, 3), (2, 2)),
            ConvSpec(16 * w, (3, 3), padding=(0, 0)),
        ]
    return layers + [ConvSpec(layers[-1].features, (1, 1), padding=(0, 0))]


def _audio_layers(w: int, deep: bool) -> list[ConvSpec]:
    """Wav2Lip's audio encoder over `[80, 16, 1]` mel (`w=32, deep=True`: 32..512)."""
    layers = [
        ConvSpec(w, (3, 3)),
        ConvSpec(w, (3, 3), residual=R),
        ConvSpec(w, (3, 3), residual=R),
        ConvSpec(2 * w, (3, 3), (3, 1)),
        ConvSpec(2 * w, (3, 3), residual=R),
        ConvSpec(2 * w, (3, 3), residual=R),
        ConvSpec(4 * w, (3, 3), (3, 3)),
        ConvSpec(4 * w, (3, 3), residual=R),
        ConvSpec(4 * w, (3, 3), residual=R),
        ConvSpec(8 * w, (3, 3), (3, 2)),
        ConvSpec(8 * w, (3, 3), residual=R),
    ]
    if deep:
        layers += [ConvSpec(8 * w, (3, 3), residual=R), ConvSpec(16 * w, (3, 3), padding=(0, 0))]
    return layers + [ConvSpec(layers[-1].features, (1, 1), padding=(0, 0))]


def _shallow_face_layers(w: int) -> list[ConvSpec]:
    """Three stride-2 convs (`w, 2w, 4w`) and a `4w` head: the CPU-scale expert that learns."""
    return [
        ConvSpec(w, (5, 5), (2, 2), (2, 2)),
        ConvSpec(2 * w, (3, 3), (2, 2)),
        ConvSpec(4 * w, (3, 3), (2, 2)),
        ConvSpec(4 * w, (1, 1), padding=(0, 0)),
    ]


def _shallow_audio_layers(w: int) -> list[ConvSpec]:
    """`[80, 16, 1]` mel -> three strided convs (to `[3, 4, 4w]`) and a `4w` head."""
    return [
        ConvSpec(w, (3, 3), (3, 1)),
        ConvSpec(2 * w, (3, 3), (3, 2)),
        ConvSpec(4 * w, (3, 3), (3, 2)),
        ConvSpec(4 * w, (1, 1), padding=(0, 0)),
    ]


def sync_expert(cfg: Any) -> SyncExpert:
    """The expert `config.model` describes (`arch`: "wav2lip" (the paper's stack; `deep`) or
    "shallow"; `width`, `norm_groups`, `similarity`, `head`, `centre`, `dtype`)."""
    w, deep, arch = int(cfg.width), bool(cfg.deep), str(cfg.get("arch", "wav2lip"))
    if arch == "wav2lip":
        face, audio = _face_layers(w, deep), _audio_layers(w, deep)
    elif arch == "shallow":
        face, audio = _shallow_face_layers(w), _shallow_audio_layers(w)
    else:
        raise ValueError(f"model.arch={arch!r}: expected 'wav2lip' or 'shallow'")
    return SyncExpert(  # tuples: the module stays hashable (jit caches keyed on it)
        tuple(face),
        tuple(audio),
        norm_groups=int(cfg.norm_groups),
        similarity=str(cfg.similarity),
        dtype=jnp.dtype(cfg.dtype),
        head=str(cfg.get("head", "relu")),
        centre=bool(cfg.get("centre", False)),
    )


# --- features ---------------------------------------------------------------------------------


@functools.cache
def _mel_basis() -> np.ndarray:
    import librosa

    return librosa.filters.mel(
        sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX
    ).astype(np.float32)


def wav2lip_mel(audio: jax.Array) -> jax.Array:
    """`[batch, samples]` -> `[batch, 1 + samples // 200, 80]` normalised log-mel in [-4, 4]."""
    x = jnp.concatenate([audio[:, :1], audio[:, 1:] - 0.97 * audio[:, :-1]], axis=1)
    x = jnp.pad(x, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    n = 1 + (x.shape[1] - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n)[:, None]
    window = np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # periodic Hann
    mag = jnp.abs(jnp.fft.rfft(x[:, idx] * window[None, None], axis=-1))  # [batch, n, 401]
    mel = jnp.einsum("bnf,mf->bnm", mag, _mel_basis())
    db = 20.0 * jnp.log10(jnp.maximum(mel, 1e-5)) - 20.0
    return jnp.clip(8.0 * (db + 100.0) / 100.0 - 4.0, -4.0, 4.0)


def mel_start(frame: jax.Array) -> jax.Array:
    """Mel step where video frame `frame`'s window starts: `floor(80 * frame / 25)`."""
    return (frame * 16) // 5


def face_windows(video: jax.Array, starts: jax.Array, face_size: int) -> jax.Array:
    """`video [batch, T, H, W, C]` uint8, `starts [batch]` -> `[batch, S/2, S, 5 C]` in [0, 1]:
    the lower halves of frames `start .. start+4` (resized to S x S), stacked on channels."""
    b = video.shape[0]
    win = jax.vmap(lambda v, s: jax.lax.dynamic_slice_in_dim(v, s, WINDOW, axis=0))(video, starts)
    win = win.astype(jnp.float32) / 255.0  # [batch, 5, H, W, 3]
    if win.shape[2:4] != (face_size, face_size):
        win = jax.image.resize(win, (b, WINDOW, face_size, face_size, win.shape[-1]), "linear")
    lower = win[:, :, face_size // 2 :]  # [batch, 5, S/2, S, 3]
    return jnp.transpose(lower, (0, 2, 3, 1, 4)).reshape(b, face_size // 2, face_size, -1)


def mel_windows(mel: jax.Array, frames: jax.Array) -> jax.Array:
    """`mel [batch, steps, 80]`, `frames [batch]` -> `[batch, 80, 16]` windows."""
    win = jax.vmap(lambda m, s: jax.lax.dynamic_slice_in_dim(m, mel_start(s), MEL_STEPS, axis=0))(
        mel, frames
    )
    return jnp.swapaxes(win, 1, 2)


def sample_pairs(
    rng: jax.Array, batch: int, num_frames: int, min_shift: int, max_shift: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(video_start, audio_start, label)`, each `[batch]`: half in sync (label 1), half with
    the audio window shifted by `min_shift .. max_shift` frames either way (label 0; the
    other direction when the first leaves the clip). Needs `num_frames >= 2 * max_shift + 6`
    (else some shifted windows would leave the clip both ways and be clamped back into it)."""
    if num_frames < 2 * max_shift + WINDOW + 1:
        raise ValueError(
            f"clips of {num_frames} frames are too short for off-sync shifts up to "
            f"model.max_shift={max_shift}: need >= {2 * max_shift + WINDOW + 1} frames "
            f"(lower model.max_shift to <= {(num_frames - WINDOW - 1) // 2} or use longer clips)"
        )
    k_start, k_label, k_mag, k_sign = jax.random.split(rng, 4)
    last = num_frames - WINDOW - 1  # the last audio start whose mel window fits for sure
    v = jax.random.randint(k_start, (batch,), 0, last + 1)
    label = jax.random.bernoulli(k_label, 0.5, (batch,))
    mag = jax.random.randint(k_mag, (batch,), min_shift, max_shift + 1)
    sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, (batch,)), 1, -1)
    a = v + sign * mag
    a = jnp.where((a < 0) | (a > last), v - sign * mag, a)
    a = jnp.where(label, v, a)
    return v, a, label.astype(jnp.float32)


def sync_loss(logit: jax.Array, label: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(bce [batch], correct [batch])` of the sync logit `[batch]` against `label` in {0, 1}
    (with Wav2Lip's cosine similarity, the BCE of P(sync) = cosine)."""
    bce = optax.sigmoid_binary_cross_entropy(logit, label)
    correct = ((logit > 0) == (label > 0.5)).astype(jnp.float32)
    return bce, correct


def sample_offset_windows(
    rng: jax.Array, batch: int, num_frames: int, radius: int
) -> tuple[jax.Array, jax.Array]:
    """`(video_start [batch], audio_starts [batch, 2 radius + 1])`: a face window and the audio
    windows of the same clip at offsets `-radius .. +radius` frames (the in-sync one at index
    `radius`), all inside the clip. Needs `num_frames >= 2 * radius + 6`."""
    last = num_frames - WINDOW - 1
    if last - 2 * radius < 0:
        raise ValueError(
            f"clips of {num_frames} frames are too short for offset candidates within "
            f"+-{radius} frames: need >= {2 * radius + WINDOW + 1} frames"
        )
    v = jax.random.randint(rng, (batch,), radius, last - radius + 1)
    return v, v[:, None] + jnp.arange(-radius, radius + 1)[None, :]


def offset_loss(
    scale: jax.Array, face_emb: jax.Array, audio_emb: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Which offset is in sync, as a softmax over the candidates of one clip.

    `face_emb [batch, dim]`, `audio_emb [batch, candidates, dim]` unit vectors (the in-sync
    candidate in the middle), `scale` a positive scalar -> `(cross-entropy [batch],
    correct [batch])`. Only differences between candidates of the same clip enter, so what all
    embeddings share (the face's identity, the voice, a common direction) cancels out; the BCE
    on the cosine alone sees it and, at CPU scale, collapses to a constant cosine."""
    return offset_loss_from_logits(scale * jnp.einsum("bd,bkd->bk", face_emb, audio_emb))


def offset_loss_from_logits(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`logits [batch, candidates]` (the in-sync candidate in the middle) -> `(cross-entropy
    [batch], correct [batch])` of the softmax over the candidates."""
    mid = logits.shape[1] // 2
    ce = jax.nn.logsumexp(logits, axis=-1) - logits[:, mid]
    return ce, (jnp.argmax(logits, axis=-1) == mid).astype(jnp.float32)
