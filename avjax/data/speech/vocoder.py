"""Units -> audio: a small conv net (units at 25 Hz -> log-mel at 100 Hz) and Griffin-Lim.

SpeechSSM turns semantic tokens into audio with SoundStorm + SoundStream over overlapping
windows. Our offline stand-in keeps the windowing and swaps the models:

1. `UnitVocoder.units_to_mel`: a Flax linen net. A per-unit table of 4 log-mel frames
   (initialised with each unit's mean mel in the training data, which is already a
   reasonable decoder) plus a residual 1-D conv stack over unit embeddings (context of +-6
   units) and a frame-rate conv that smooths the 4-frame steps. Trained briefly with L1 on
   normalised log-mel of (units, mel) pairs from the corpus.
2. `mel_to_wav`: log-mel -> magnitude (non-negative least squares through the mel filterbank,
   by multiplicative updates) -> fast Griffin-Lim (momentum 0.99).
3. `decode_units_to_wav`: 30 s windows with 4 s overlap decoded independently, the phase of
   each window's overlap initialised from the previous window's audio, cross-faded, streamed
   to a WAV file; memory does not grow with length, and the input may be an iterator of unit
   chunks (a sampler that streams).
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import serialization, traverse_util

from avjax import io as io_lib
from avjax.data import audio as audio_lib
from avjax.data.speech import logmel as units_lib  # (the log-mel primitives of the units)

VOCODER_VERSION = 1
FPU = units_lib.FRAMES_PER_UNIT


class UnitToMel(nn.Module):
    """`[batch, units]` int32 -> normalised log-mel `[batch, 4 * units, n_mels]`."""

    num_units: int
    n_mels: int = units_lib.N_MELS
    hidden: int = 128
    num_layers: int = 3
    kernel: int = 5

    @nn.compact
    def __call__(self, units: jax.Array) -> jax.Array:
        b, t = units.shape
        base = nn.Embed(self.num_units, FPU * self.n_mels, name="table")(units)
        h = nn.Embed(self.num_units, self.hidden, name="embed")(units)
        for i in range(self.num_layers):
            y = nn.LayerNorm(name=f"norm_{i}")(h)
            y = nn.Conv(self.hidden, (self.kernel,), padding="SAME", name=f"conv_{i}")(y)
            y = nn.Dense(self.hidden, name=f"mix_{i}")(nn.gelu(y))
            h = h + y
        h = nn.LayerNorm(name="norm_out")(h)
        delta = nn.Dense(FPU * self.n_mels, kernel_init=nn.initializers.zeros, name="out")(h)
        mel = (base + delta).reshape(b, t * FPU, self.n_mels)
        # Frame-rate refinement (residual, starts at zero).
        z = nn.gelu(nn.Conv(128, (5,), padding="SAME", name="post_0")(mel))
        z = nn.Conv(
            self.n_mels, (5,), padding="SAME", kernel_init=nn.initializers.zeros, name="post_1"
        )(z)
        return mel + z


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: UnitToMel, params: Any, units: jax.Array) -> jax.Array:
    return model.apply({"params": params}, units)


def _bucket(n: int) -> int:
    """Padded length for jitted decoding (few distinct shapes)."""
    if n <= 256:
        return 256
    return int(2 ** np.ceil(np.log2(n))) if n <= 1024 else -(-n // 512) * 512


def _paired(
    units_list: Sequence[np.ndarray], mels_list: Sequence[np.ndarray], num_units: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """`(units [u], log-mel [4u, n_mels], num_units)`: the pairs concatenated, each mel cut
    (or edge-padded) to 4 frames per unit; ids checked against `num_units` (default max + 1)."""
    if len(units_list) != len(mels_list) or not units_list:
        raise ValueError(
            f"need equally many unit and mel arrays, got {len(units_list)}, {len(mels_list)}"
        )
    units = np.concatenate([np.asarray(u, np.int32) for u in units_list])
    mels = np.concatenate(
        [
            units_lib.unit_mel(np.asarray(m, np.float32), len(u))
            for u, m in zip(units_list, mels_list, strict=True)
        ]
    )
    if num_units is None:
        num_units = int(units.max()) + 1
    if units.min() < 0 or units.max() >= num_units:
        raise ValueError(f"unit ids must be in [0, {num_units}), got {units.min()}..{units.max()}")
    return units, mels, num_units


def _mean_patch_table(units: np.ndarray, norm: np.ndarray, num_units: int) -> np.ndarray:
    """`[num_units, 4 * n_mels]` float32: each unit's mean normalised mel patch (0 if unseen),
    the best decoder that ignores context. `units [u]`, `norm [4u, n_mels]`."""
    patches = norm.reshape(len(units), -1)
    sums = np.zeros((num_units, patches.shape[1]), np.float64)
    np.add.at(sums, units, patches)
    counts = np.bincount(units, minlength=num_units)[:, None]
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(np.float32)


def _train(
    model: nn.Module,
    params: Any,
    units: np.ndarray,
    norm: np.ndarray,
    crop: int,
    steps: int,
    seed: int,
    batch_size: int,
    lr: float,
    progress: bool,
) -> tuple[Any, list[float]]:
    """`(params, L1 every 50 steps)` after `steps` Adam steps (warm-up + cosine) on random
    crops of `crop` units: `units [u]` -> normalised mel `norm [4u, n_mels]`."""
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps, lr * 0.05)
    opt = optax.adam(sched)
    opt_state = opt.init(params)
    u_all, m_all = jnp.asarray(units), jnp.asarray(norm)

    def loss_fn(p, starts):
        u = u_all[starts[:, None] + jnp.arange(crop)[None]]
        target = m_all[(starts * FPU)[:, None] + jnp.arange(crop * FPU)[None]]
        return jnp.mean(jnp.abs(model.apply({"params": p}, u) - target))

    @jax.jit
    def step(p, s, starts):
        loss, g = jax.value_and_grad(loss_fn)(p, starts)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    losses = []
    with tqdm(total=steps, desc="unit vocoder", mininterval=1.0, disable=not progress) as bar:
        for i in range(steps):
            starts = rng.integers(0, len(units) - crop + 1, size=batch_size)
            params, opt_state, loss = step(params, opt_state, jnp.asarray(starts, jnp.int32))
            if i % 50 == 0 or i == steps - 1:
                losses.append(float(loss))
                bar.set_postfix(l1=f"{losses[-1]:.3f}")
            bar.update(1)
    return params, losses


class UnitVocoder:
    """Units (25 Hz) -> log-mel (100 Hz) -> waveform (16 kHz).

    Attributes:
      num_units, n_mels, sample_rate; params (Flax pytree); mel_mean, mel_std `[n_mels]`;
      final_loss (L1 on normalised log-mel at the end of fitting, nan when loaded).
    """

    sample_rate = audio_lib.SAMPLE_RATE
    unit_rate = units_lib.UNIT_RATE

    def __init__(
        self,
        params: Any,
        num_units: int,
        mel_mean: np.ndarray,
        mel_std: np.ndarray,
        hidden: int = 128,
        num_layers: int = 3,
        final_loss: float = float("nan"),
    ):
        self.params = params
        self.num_units = int(num_units)
        self.mel_mean = np.asarray(mel_mean, np.float32)
        self.mel_std = np.asarray(mel_std, np.float32)
        self.n_mels = int(self.mel_mean.shape[0])
        self.hidden = int(hidden)
        self.num_layers = int(num_layers)
        self.final_loss = float(final_loss)
        self.model = UnitToMel(self.num_units, self.n_mels, self.hidden, self.num_layers)

    # --- fitting ------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        units_list: Sequence[np.ndarray],
        mels_list: Sequence[np.ndarray],
        steps: int = 300,
        seed: int = 0,
        *,
        num_units: int | None = None,
        batch_size: int = 16,
        crop_units: int = 64,
        lr: float = 2e-3,
        hidden: int = 128,
        num_layers: int = 3,
        progress: bool = False,
    ) -> UnitVocoder:
        """Trains on pairs `units [u]` / log-mel `[>= 4u, n_mels]` (e.g. one pair per file).

        The per-unit mel table starts at each unit's mean mel over the data (the best decoder
        that ignores context); `steps` Adam steps on random crops then add context.
        """
        units, mels, num_units = _paired(units_list, mels_list, num_units)
        n_mels = mels.shape[1]
        mel_mean = mels.mean(axis=0)
        mel_std = np.maximum(mels.std(axis=0), 1e-3)
        norm = (mels - mel_mean) / mel_std  # [4u, n_mels]
        model = UnitToMel(num_units, n_mels, hidden, num_layers)
        crop = int(min(crop_units, len(units)))
        params = model.init(jax.random.key(seed), jnp.zeros((1, crop), jnp.int32))["params"]
        params = dict(params)
        params["table"] = {"embedding": jnp.asarray(_mean_patch_table(units, norm, num_units))}
        voc = cls(params, num_units, mel_mean, mel_std, hidden, num_layers)
        if steps <= 0:
            return voc
        voc.params, losses = _train(
            model, params, units, norm, crop, steps, seed, batch_size, lr, progress
        )
        logging.info("Unit vocoder: %d steps, L1 %.3f -> %.3f", steps, losses[0], losses[-1])
        voc.final_loss = losses[-1]
        return voc

    # --- inference ----------------------------------------------------------------------------
    def units_to_mel(self, units: np.ndarray) -> np.ndarray:
        """`[units]` int -> log-mel `[4 * units, n_mels]` float32 (natural log of mel power)."""
        units = np.asarray(units, np.int32).reshape(-1)
        n = len(units)
        if n == 0:
            return np.zeros((0, self.n_mels), np.float32)
        if units.min() < 0 or units.max() >= self.num_units:
            raise ValueError(
                f"unit ids must be in [0, {self.num_units}), got {units.min()}..{units.max()}"
            )
        padded = np.pad(units, (0, _bucket(n) - n), mode="edge")
        out = np.asarray(_apply(self.model, self.params, jnp.asarray(padded[None])))[0]
        return out[: n * FPU] * self.mel_std + self.mel_mean

    def mel_to_wav(
        self,
        mel: np.ndarray,
        *,
        n_iter: int = 16,
        seed: int = 0,
        init_audio: np.ndarray | None = None,
    ) -> np.ndarray:
        """Log-mel `[frames, n_mels]` -> waveform `[frames * 160]` (Griffin-Lim)."""
        return mel_to_wav(mel, n_iter=n_iter, seed=seed, init_audio=init_audio)

    def decode(self, units: np.ndarray, *, n_iter: int = 16, seed: int = 0) -> np.ndarray:
        """`[units]` -> waveform `[640 * units]` in one window (short inputs; see
        `decode_units_to_wav` for long ones)."""
        return self.mel_to_wav(self.units_to_mel(units), n_iter=n_iter, seed=seed)

    # --- persistence --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Writes `vocoder.npz` (parameters, mel stats) and `vocoder.json` into `directory`
        (local or remote; each file through a unique temporary name and a rename)."""
        directory = io_lib.as_path(directory)
        flat = traverse_util.flatten_dict(serialization.to_state_dict(self.params), sep="/")
        arrays = {f"params/{k}": np.asarray(v) for k, v in flat.items()}
        arrays["mel_mean"] = self.mel_mean
        arrays["mel_std"] = self.mel_std
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        io_lib.write_bytes_atomic(directory / "vocoder.npz", buf.getvalue())
        meta = {
            "version": VOCODER_VERSION,
            "num_units": self.num_units,
            "n_mels": self.n_mels,
            "hidden": self.hidden,
            "num_layers": self.num_layers,
            "final_loss": self.final_loss,
            "features": units_lib.feature_config(),
        }
        io_lib.write_text_atomic(directory / "vocoder.json", json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> UnitVocoder:
        """Reads a vocoder saved by `save` (local or remote); errors name the file and the
        mismatch."""
        directory = io_lib.as_path(directory)
        meta_path, npz_path = directory / "vocoder.json", directory / "vocoder.npz"
        for p in (meta_path, npz_path):
            if not p.exists():
                raise FileNotFoundError(f"{p}: unit vocoder file not found")
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != VOCODER_VERSION or meta.get("features") != (
            units_lib.feature_config()
        ):
            raise ValueError(
                f"{meta_path}: vocoder version {meta.get('version')} / features "
                f"{meta.get('features')}, expected {VOCODER_VERSION} / {units_lib.feature_config()}"
            )
        with np.load(io.BytesIO(npz_path.read_bytes())) as z:
            flat = {
                k[len("params/") :]: jnp.asarray(z[k]) for k in z.files if k.startswith("params/")
            }
            mel_mean, mel_std = z["mel_mean"], z["mel_std"]
        params = traverse_util.unflatten_dict(flat, sep="/")
        voc = cls(
            params,
            meta["num_units"],
            mel_mean,
            mel_std,
            meta["hidden"],
            meta["num_layers"],
            meta.get("final_loss", float("nan")),
        )
        expected = jax.eval_shape(
            lambda: voc.model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        )
        want = {k: v.shape for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
        got = {k: tuple(v.shape) for k, v in flat.items()}
        if want != got:
            raise ValueError(f"{npz_path}: parameter shapes {got} do not match {meta_path}: {want}")
        return voc


# --- Griffin-Lim -----------------------------------------------------------------------------


@functools.cache
def _mel_pinv() -> np.ndarray:
    return np.linalg.pinv(units_lib.mel_basis()).astype(np.float32)


def mel_to_magnitude(log_mel: np.ndarray, nnls_iters: int = 10) -> np.ndarray:
    """Log-mel power `[frames, n_mels]` -> linear magnitude `[n_fft // 2 + 1, frames]`.

    Non-negative least squares through the filterbank: a clipped pseudo-inverse refined by
    multiplicative updates (fast, vectorised stand-in for librosa's per-frame NNLS).
    """
    m = units_lib.mel_basis()
    mel = np.exp(np.asarray(log_mel, np.float32)).T  # [n_mels, frames]
    s = np.maximum(_mel_pinv() @ mel, 1e-10)
    num = m.T @ mel
    for _ in range(nnls_iters):
        s *= num / np.maximum(m.T @ (m @ s), 1e-12)
    return np.sqrt(s)


def griffin_lim(
    mag: np.ndarray,
    length: int,
    *,
    n_iter: int = 16,
    momentum: float = 0.99,
    seed: int = 0,
    init_audio: np.ndarray | None = None,
) -> np.ndarray:
    """Fast Griffin-Lim (Perraudin et al. 2013): magnitude `[bins, frames]` -> `[length]`.

    `init_audio` (optional, `[k]` samples, k <= length) fixes the initial phase of the frames
    it covers (the start of the signal): used to continue the previous window seamlessly.
    """
    import librosa

    kw = dict(hop_length=units_lib.HOP_LENGTH, win_length=units_lib.WIN_LENGTH, center=True)
    rng = np.random.default_rng(seed)
    angles = np.exp(2j * np.pi * rng.random(mag.shape)).astype(np.complex64)
    if init_audio is not None and len(init_audio):
        spec = units_lib.stft(init_audio)
        # Frames whose window lies fully inside init_audio.
        k = min((len(init_audio) - units_lib.N_FFT // 2) // units_lib.HOP_LENGTH + 1, mag.shape[1])
        if k > 0:
            angles[:, :k] = np.exp(1j * np.angle(spec[:, :k]))
    rebuilt = np.zeros_like(angles)
    for _ in range(n_iter):
        tprev = rebuilt
        y = librosa.istft(mag * angles, n_fft=units_lib.N_FFT, length=length, **kw)
        rebuilt = units_lib.stft(y)[:, : mag.shape[1]]
        angles = rebuilt - (momentum / (1 + momentum)) * tprev
        angles /= np.abs(angles) + 1e-16
    y = librosa.istft(mag * angles, n_fft=units_lib.N_FFT, length=length, **kw)
    return y.astype(np.float32)


def mel_to_wav(
    log_mel: np.ndarray,
    *,
    n_iter: int = 16,
    seed: int = 0,
    init_audio: np.ndarray | None = None,
) -> np.ndarray:
    """Log-mel `[frames, n_mels]` at 100 Hz -> float32 waveform `[frames * 160]` at 16 kHz."""
    frames = len(log_mel)
    if frames == 0:
        return np.zeros(0, np.float32)
    mag = mel_to_magnitude(log_mel)
    # A centred STFT of frames * hop samples has frames + 1 frames: repeat the last one.
    mag = np.concatenate([mag, mag[:, -1:]], axis=1)
    wav = griffin_lim(
        mag, frames * units_lib.HOP_LENGTH, n_iter=n_iter, seed=seed, init_audio=init_audio
    )
    return np.clip(wav, -1.0, 1.0)


# --- windowed, streamed decoding -------------------------------------------------------------


def _unit_chunks(units: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if isinstance(units, np.ndarray):
        yield units.reshape(-1).astype(np.int32)
        return
    for c in units:
        yield np.asarray(c, np.int32).reshape(-1)


def decode_units_to_wav(
    vocoder: UnitVocoder,
    units: np.ndarray | Iterable[np.ndarray],
    path: str | os.PathLike,
    *,
    window_s: float = 30.0,
    overlap_s: float = 4.0,
    n_iter: int = 16,
    seed: int = 0,
    progress: bool = True,
    total_units: int | None = None,
) -> int:
    """Decodes units to a 16 kHz WAV in overlapping windows, streamed; returns samples written.

    Windows of `window_s` seconds start every `window_s - overlap_s` seconds; each is decoded
    on its own (units -> mel -> Griffin-Lim, with the phase of its overlap initialised from the
    previous window's audio) and the overlaps are cross-faded with a raised-cosine ramp. Only
    one window is held in memory, so 16 minutes (24,000 units) or more decode in flat memory.

    Args:
      vocoder: a fitted `UnitVocoder`.
      units: `[units]` int array, or an iterable of such chunks (e.g. a streaming sampler).
      path: output WAV; written atomically (temp file, renamed when done).
      total_units: for the progress bar when `units` is an iterator.

    Returns:
      Samples written: exactly `640 * number of units` (len(units) / 25 seconds).
    """
    rate = units_lib.UNIT_RATE
    spu = units_lib.SAMPLES_PER_UNIT
    win = int(round(window_s * rate))
    ovl = int(round(overlap_s * rate))
    if win <= 0 or not 0 <= ovl < win:
        raise ValueError(f"need 0 <= overlap_s < window_s, got {overlap_s}, {window_s}")
    stride = win - ovl
    if total_units is None and isinstance(units, np.ndarray):
        total_units = units.size
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_units, desc="decode units", unit="unit", mininterval=2.0)
    fade_in = (0.5 - 0.5 * np.cos(np.pi * (np.arange(ovl * spu) + 0.5) / (ovl * spu))).astype(
        np.float32
    )
    buf = np.zeros(0, np.int32)  # units not yet finalised; buf[:len(tail) // spu] overlap `tail`
    tail = np.zeros(0, np.float32)  # previous window's audio over the start of buf
    window_index = 0

    def decode(u: np.ndarray) -> np.ndarray:
        nonlocal window_index
        wav = vocoder.mel_to_wav(
            vocoder.units_to_mel(u), n_iter=n_iter, seed=seed + window_index, init_audio=tail
        )
        window_index += 1
        if len(tail):
            n = len(tail)
            f = fade_in[:n] if n == len(fade_in) else np.linspace(0, 1, n, dtype=np.float32)
            wav[:n] = tail * (1.0 - f) + wav[:n] * f
        return wav

    with audio_lib.WavStreamWriter(path, vocoder.sample_rate) as w:
        for chunk in _unit_chunks(units):
            buf = np.concatenate([buf, chunk])
            while len(buf) >= win + 1:  # more follows this window: decode it and move on
                wav = decode(buf[:win])
                w.write(wav[: stride * spu])
                tail = wav[stride * spu :]
                buf = buf[stride:]
                if bar is not None:
                    bar.update(stride)
        done = len(tail) // spu
        if len(buf) > done:  # the last (possibly shorter) window
            w.write(decode(buf))
        else:
            w.write(tail)
        if bar is not None:
            bar.update(len(buf))
            bar.close()
        return w.num_samples
