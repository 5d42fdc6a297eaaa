"""Speaker similarity from a speaker-verification embedding: GE2E d-vectors in JAX.

The encoder is the pretrained GE2E model (Wan et al., 2018, generalized end-to-end loss)
shipped in the PyPI wheel `resemblyzer==0.1.4` (`resemblyzer/pretrained.pt`, trained for
speaker verification on LibriSpeech, VoxCeleb 1/2; nothing is downloaded). Its network is
small and is ported here to JAX, batched over partial utterances and jitted:

  wav [samples] at 16 kHz
    -> mel power spectrogram [frames, 40] (not log): 25 ms Hann windows (n_fft 400),
       10 ms hop, 40 Slaney mel bins (librosa's `melspectrogram` defaults otherwise)
    -> partial utterances of 160 frames (1.6 s), 1.3 per second, the last kept when it
       covers >= 75 % (zero-padded audio), at least one
    -> 3-layer LSTM (256 units) over each partial, last layer's final hidden state
    -> linear 256 -> 256, ReLU, L2 norm: one embedding per partial `[partials, 256]`
    -> mean over partials, L2 norm: the utterance's d-vector `[256]`.

Equal to `resemblyzer.VoiceEncoder.embed_utterance` to float32 tolerance (tests). The weights
are read from the wheel with torch (`torch.load`; resemblyzer depends on torch), once.

Preprocessing: resemblyzer's `preprocess_wav` raises the volume to -30 dBFS (never lowers it)
and cuts long silences with WebRTC VAD. `embed` does the volume step only: generated speech is
scored as it is heard, pauses included (a model that goes silent scores lower, not higher).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

from avjax.eval._deps import require

SAMPLE_RATE = 16000
N_MELS = 40
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
PARTIAL_FRAMES = 160  # 1.6 s
HIDDEN = 256
EMBED_DIM = 256
NUM_LAYERS = 3
TARGET_DBFS = -30.0
INT16_MAX = 2**15 - 1


def weights_path() -> str:
    """`pretrained.pt` inside the installed `resemblyzer` wheel (the package is not imported)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        require("resemblyzer", "resemblyzer", "GE2E speaker similarity (avjax.eval.speaker)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "pretrained.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: resemblyzer's GE2E weights are missing")
    return path


def load_params(path: str | None = None) -> dict[str, np.ndarray]:
    """The GE2E weights as float32 numpy arrays, keyed as in the torch state dict:
    `lstm.weight_ih_l{i}` `[4 * 256, in]`, `lstm.weight_hh_l{i}` `[4 * 256, 256]`,
    `lstm.bias_ih_l{i}`, `lstm.bias_hh_l{i}` `[4 * 256]` (gates i, f, g, o),
    `linear.weight` `[256, 256]`, `linear.bias` `[256]`."""
    torch = require("torch", "torch", "reading resemblyzer's GE2E weights")
    state = torch.load(path or weights_path(), map_location="cpu")["model_state"]
    return {k: v.numpy().astype(np.float32) for k, v in state.items() if not k.startswith("sim")}


def mel_power(wav: np.ndarray) -> np.ndarray:
    """GE2E's front-end: `[frames, 40]` float32 mel power (1 + samples // 160 frames)."""
    import librosa

    m = librosa.feature.melspectrogram(
        y=np.asarray(wav, np.float32), sr=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS
    )
    return m.astype(np.float32).T


def normalize_volume(wav: np.ndarray, target_dbfs: float = TARGET_DBFS) -> np.ndarray:
    """Scales `wav` `[samples]` up to `target_dbfs` RMS (int16 full scale); never down."""
    wav = np.asarray(wav, np.float32)
    rms = np.sqrt(np.mean((wav.astype(np.float64) * INT16_MAX) ** 2))
    if rms == 0:
        return wav
    change = target_dbfs - 20 * np.log10(rms / INT16_MAX)
    return wav if change < 0 else (wav * 10 ** (change / 20)).astype(np.float32)


def partial_starts(n_samples: int, rate: float = 1.3, min_coverage: float = 0.75) -> list[int]:
    """First mel frame of each 160-frame partial of an `n_samples` utterance (see module)."""
    n_frames = int(np.ceil((n_samples + 1) / HOP))
    step = int(np.round(SAMPLE_RATE / rate / HOP))
    if not 0 < step <= PARTIAL_FRAMES:
        raise ValueError(f"rate={rate} gives a step of {step} frames (1..{PARTIAL_FRAMES})")
    starts = list(range(0, max(1, n_frames - PARTIAL_FRAMES + step + 1), step))
    last = starts[-1] * HOP
    coverage = (n_samples - last) / (PARTIAL_FRAMES * HOP)
    if coverage < min_coverage and len(starts) > 1:
        starts = starts[:-1]
    return starts


def _lstm_layer(x: jax.Array, w_ih: jax.Array, w_hh: jax.Array, b: jax.Array) -> jax.Array:
    """One LSTM layer over `x` `[batch, time, in]` -> hidden states `[batch, time, 256]`."""
    gates_x = jnp.einsum("bti,gi->tbg", x, w_ih) + b[None, None]  # [time, batch, 4 * 256]

    def step(carry, gx):
        h, c = carry
        g = gx + h @ w_hh.T
        i, f, u, o = jnp.split(g, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(u)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((x.shape[0], w_hh.shape[1]), x.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), gates_x)
    return jnp.swapaxes(hs, 0, 1)


@jax.jit
def embed_partials(params: dict[str, jax.Array], mels: jax.Array) -> jax.Array:
    """`mels` `[partials, 160, 40]` -> unit-norm embeddings `[partials, 256]`."""
    h = mels
    for i in range(NUM_LAYERS):
        b = params[f"lstm.bias_ih_l{i}"] + params[f"lstm.bias_hh_l{i}"]
        h = _lstm_layer(h, params[f"lstm.weight_ih_l{i}"], params[f"lstm.weight_hh_l{i}"], b)
    e = jax.nn.relu(h[:, -1] @ params["linear.weight"].T + params["linear.bias"][None])
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


class GE2EEncoder:
    """Utterance d-vectors `[256]` and their cosine similarities (see the module docstring).

    Args:
      path: a resemblyzer-format checkpoint (default: the wheel's `pretrained.pt`).
      volume_norm: raise each waveform to -30 dBFS first (resemblyzer's preprocessing).
    """

    def __init__(self, path: str | None = None, volume_norm: bool = True):
        self.params = {k: jnp.asarray(v) for k, v in load_params(path).items()}
        self.volume_norm = volume_norm
        self._refs: dict[tuple[int, str], np.ndarray] = {}  # prompt d-vectors, by content

    def partials(self, wav: np.ndarray) -> np.ndarray:
        """Unit-norm embeddings `[partials, 256]` of `wav` `[samples]` (16 kHz float)."""
        wav = np.asarray(wav, np.float32)
        if self.volume_norm:
            wav = normalize_volume(wav)
        starts = partial_starts(len(wav))
        end = (starts[-1] + PARTIAL_FRAMES) * HOP
        if end >= len(wav):
            wav = np.pad(wav, (0, end - len(wav)))
        mel = mel_power(wav)
        mels = np.stack([mel[s : s + PARTIAL_FRAMES] for s in starts])
        n = len(mels)
        padded = -(-n // 8) * 8  # few distinct batch shapes: few compilations
        mels = np.pad(mels, ((0, padded - n), (0, 0), (0, 0)))
        return np.asarray(embed_partials(self.params, jnp.asarray(mels)))[:n]

    def embed(self, wav: np.ndarray) -> np.ndarray:
        """The utterance d-vector `[256]`: L2-normalised mean of the partial embeddings."""
        e = self.partials(wav).astype(np.float64).mean(axis=0)
        return (e / max(np.linalg.norm(e), 1e-12)).astype(np.float32)

    def similarity_by_slice(
        self, prompt_wav: np.ndarray, wav: np.ndarray, slice_samples: int
    ) -> np.ndarray:
        """Cosine similarity `[num_slices]` of each `slice_samples` slice of `wav` `[samples]`
        to the prompt's d-vector (`prompt_wav` `[samples]`); NaN for an empty slice."""
        from avjax.eval import metrics

        prompt_wav = np.asarray(prompt_wav, np.float32)
        key = (len(prompt_wav), hashlib.sha1(prompt_wav.tobytes()).hexdigest())
        if key not in self._refs:  # every row of a report compares with the same prompts
            if len(self._refs) >= 64:
                self._refs.clear()
            self._refs[key] = self.embed(prompt_wav)
        ref = self._refs[key]
        out = []
        for s, e in metrics.slice_bounds(len(wav), slice_samples):
            out.append(metrics.cosine_similarity(ref, self.embed(wav[s:e])) if e > s else np.nan)
        return np.asarray(out, np.float64)


@functools.cache
def default_encoder() -> GE2EEncoder:
    """One shared encoder with the wheel's weights (loaded on first use)."""
    return GE2EEncoder()
