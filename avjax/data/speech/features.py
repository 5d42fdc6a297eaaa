"""Pluggable frame-level speech features for unit discovery (k-means) and tokenising.

One interface: `get_extractor(name, ...)` returns a `FeatureExtractor`, a callable
`wav [samples] float32 at 16 kHz -> [units, dim] float32` that also states its `dim`,
`frame_rate` (Hz) and a JSON-able `spec` (what a saved `UnitTokenizer` records, so that
`from_spec` rebuilds the same features when it encodes).

Every extractor gives one vector per 25 Hz unit (`units.UNIT_RATE`), `n // 640` of them for
`n` samples: the unit vocoder, the token windows and the 4-minute training length all assume
25 Hz. Faster frames are stacked: 4 log-mel / MFCC frames (10 ms) per unit, and
`640 / samples_per_frame` HuBERT frames per unit (2 of its 20 ms frames for the published
models), as TWIST-style 25 Hz HuBERT units come from 2 x 20 ms.

- `"logmel"`: `avjax.data.speech.units.unit_features`, 4 stacked 10 ms 80-bin log-mel frames per
  40 ms: 320 dims at 25 Hz (`units.UNIT_RATE`), `n // 640` frames.
- `"mfcc"`: 13 MFCCs + deltas + delta-deltas (39 per 10 ms frame, computed by librosa from the
  same log-mel spectrogram), 4 frames stacked per 40 ms like `"logmel"`: 156 dims at 25 Hz,
  `n // 640` frames. (HuBERT's first iteration clustered 39-dim MFCCs.)
- `"hubert"`: the output of transformer layer `layer` of a HuggingFace HuBERT checkpoint in a
  local directory (`avjax.convert.hubert.load_hf_hubert`); its frames (`hidden_size` dims at
  50 Hz, `config.num_frames(n)` = `(n - 400) // 320 + 1` of them for the published models)
  stacked 2 per unit: `2 * hidden_size` dims at 25 Hz (1536 for HuBERT base). The encoder
  gives a frame or so fewer than `2 * (n // 640)` (its receptive field): the last frame is
  repeated, as `units.unit_mel` pads log-mel. GSLM uses layer 6 of HuBERT base. Audio longer
  than `max_chunk_seconds` (rounded down to whole units) is cut into chunks encoded
  independently (as textlesslib does), each padded to its own units so that no drift
  accumulates; inputs are zero-padded to whole seconds with the valid length passed to the
  model, which keeps the result exact and the number of compilations small.
  `HubertFeatures(...)(wav)` gives the unstacked 50 Hz frames.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from avjax.data.audio import SAMPLE_RATE
from avjax.data.speech import logmel as units  # (the log-mel primitives of the units)

EXTRACTORS = ("logmel", "mfcc", "hubert")
N_MFCC = 13
MFCC_DIM = 3 * N_MFCC * units.FRAMES_PER_UNIT  # 156


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """`wav [samples] (16 kHz float32) -> [frames, dim] float32` at `frame_rate` Hz."""

    name: str
    dim: int
    frame_rate: float
    fn: Callable[[np.ndarray], np.ndarray] = dataclasses.field(repr=False)
    spec: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        wav = np.asarray(wav, np.float32)
        if wav.ndim != 1:
            raise ValueError(f"{self.name} features expect mono audio [samples], got {wav.shape}")
        feats = np.asarray(self.fn(wav), np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise AssertionError(f"{self.name} gave {feats.shape}, expected [frames, {self.dim}]")
        return feats


def mfcc_features(wav: np.ndarray) -> np.ndarray:
    """`[n // 640, 156]` float32: 39-dim MFCC+deltas at 100 Hz, 4 frames stacked per unit."""
    import librosa

    mel_db = units.log_mel(wav) * np.float32(10.0 / np.log(10.0))  # natural log -> dB
    mfcc = librosa.feature.mfcc(S=mel_db.T, n_mfcc=N_MFCC)  # [13, frames]
    d1 = librosa.feature.delta(mfcc, order=1, mode="nearest")
    d2 = librosa.feature.delta(mfcc, order=2, mode="nearest")
    frames = np.concatenate([mfcc, d1, d2], axis=0).T.astype(np.float32)  # [frames, 39]
    return units.mel_to_unit_features(frames, units.num_units_for(len(wav)))


class HubertFeatures:
    """Layer-`layer` HuBERT features from a local HF directory: `__call__` gives the frames
    `[frames, hidden]` (50 Hz), `unit_features` the 25 Hz stack `[n // 640, fpu * hidden]`."""

    def __init__(
        self,
        hubert_dir: str | os.PathLike,
        layer: int = 6,
        max_chunk_seconds: float = 30.0,
        pad_to_seconds: float = 1.0,
    ):
        import jax
        import jax.numpy as jnp

        from avjax.convert.hubert import load_hf_hubert

        self.model, variables = load_hf_hubert(hubert_dir)
        cfg = self.model.config
        if not 0 <= layer <= cfg.num_hidden_layers:
            raise ValueError(
                f"HuBERT layer {layer} out of range: {hubert_dir} has {cfg.num_hidden_layers} "
                "transformer layers (0 = the input of the first)"
            )
        if units.SAMPLES_PER_UNIT % cfg.samples_per_frame:
            raise ValueError(
                f"{hubert_dir}: a HuBERT frame of {cfg.samples_per_frame} samples does not "
                f"divide the {units.SAMPLES_PER_UNIT}-sample (25 Hz) unit"
            )
        self.layer = int(layer)
        self.config = cfg
        self.frames_per_unit = units.SAMPLES_PER_UNIT // cfg.samples_per_frame
        self.params = jax.device_put(variables)
        # Whole units per chunk, so chunked and unchunked unit counts agree.
        self.max_chunk = (
            max(int(max_chunk_seconds * SAMPLE_RATE) // units.SAMPLES_PER_UNIT, 1)
            * units.SAMPLES_PER_UNIT
        )
        self.pad_to = max(int(pad_to_seconds * SAMPLE_RATE), 1)
        self.min_samples = next(n for n in range(1, 100_000) if cfg.num_frames(n) > 0)

        def run(params, wav, lengths):
            out = self.model.apply(params, wav, lengths, num_layers=self.layer)
            return out["last_hidden_state"].astype(jnp.float32)

        self._run = jax.jit(run)

    @property
    def frame_rate(self) -> float:
        return SAMPLE_RATE / self.config.samples_per_frame

    @property
    def unit_dim(self) -> int:
        return self.frames_per_unit * self.config.hidden_size

    def _frames(self, chunk: np.ndarray) -> np.ndarray:
        """`[num_frames(len(chunk)), hidden]` frames of one chunk (zero-padded inside)."""
        n = len(chunk)
        frames = self.config.num_frames(n)
        if frames == 0:
            return np.zeros((0, self.config.hidden_size), np.float32)
        padded = max(-(-n // self.pad_to) * self.pad_to, self.min_samples)
        x = np.zeros((1, padded), np.float32)
        x[0, :n] = chunk
        h = self._run(self.params, x, np.asarray([n], np.int32))
        return np.asarray(h[0, :frames])

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        """`[frames, hidden]` float32 at the model's frame rate (chunks concatenated)."""
        out = [
            self._frames(wav[a : a + self.max_chunk]) for a in range(0, len(wav), self.max_chunk)
        ]
        out = [o for o in out if len(o)]
        if not out:
            return np.zeros((0, self.config.hidden_size), np.float32)
        return np.concatenate(out)

    def _chunks(self, wav: np.ndarray) -> list[np.ndarray]:
        """`wav` cut into chunks of whole 25 Hz units (<= `max_chunk` samples; a final
        chunk too short for one unit is dropped, as everywhere)."""
        out = []
        for a in range(0, len(wav), self.max_chunk):
            chunk = wav[a : a + self.max_chunk]
            if units.num_units_for(len(chunk)):
                out.append(chunk)
        return out

    def _stack_units(self, frames: np.ndarray, n_samples: int) -> np.ndarray:
        """A chunk's frames `[frames, hidden]` -> `[units, frames_per_unit * hidden]`: the
        first `frames_per_unit * units` frames, the last one repeated when the encoder gave
        fewer."""
        n_units = units.num_units_for(n_samples)
        if len(frames) == 0:
            frames = np.zeros((1, self.config.hidden_size), np.float32)
        need = self.frames_per_unit * n_units
        if len(frames) < need:
            frames = np.pad(frames, ((0, need - len(frames)), (0, 0)), mode="edge")
        return frames[:need].reshape(n_units, self.unit_dim)

    def _encode_rows(self, chunks: list[np.ndarray], rows: int) -> list[np.ndarray]:
        """Frames `[num_frames(len(c)), hidden]` of each chunk, from one encoder call on a
        zero-padded batch `[rows, width]` (`rows >= len(chunks)`; filler rows unused)."""
        longest = max(len(c) for c in chunks)
        width = max(-(-longest // self.pad_to) * self.pad_to, self.min_samples)
        x = np.zeros((rows, width), np.float32)
        lengths = np.full(rows, width, np.int32)
        for r, c in enumerate(chunks):
            x[r, : len(c)] = c
            lengths[r] = len(c)
        out = np.asarray(self._run(self.params, x, lengths))
        return [out[r, : self.config.num_frames(len(c))] for r, c in enumerate(chunks)]

    def batched_unit_features(
        self, wavs: Sequence[np.ndarray], batch_size: int
    ) -> list[np.ndarray]:
        """`unit_features` of each waveform, the chunks of all of them encoded in batches of
        `batch_size` rows (sorted by length, so a batch pads little): the form that uses an
        accelerator well (Beam workers, `avjax.data.beam.hubert_batch`).

        Args:
          wavs: float32 16 kHz waveforms `[samples]`.
          batch_size: chunks per encoder call (rows of the padded batch `[batch, samples]`).

        Returns `[len(w) // 640, frames_per_unit * hidden]` float32 per waveform.
        """
        pieces = [
            (i, c) for i, w in enumerate(wavs) for c in self._chunks(np.asarray(w, np.float32))
        ]
        order = sorted(range(len(pieces)), key=lambda k: len(pieces[k][1]))
        feats: dict[int, np.ndarray] = {}
        for start in range(0, len(order), batch_size):
            ks = order[start : start + batch_size]
            frames = self._encode_rows([pieces[k][1] for k in ks], batch_size)
            for k, f in zip(ks, frames, strict=True):
                feats[k] = self._stack_units(f, len(pieces[k][1]))
        per_wav: list[list[np.ndarray]] = [[] for _ in wavs]
        for k, (i, _) in enumerate(pieces):
            per_wav[i].append(feats[k])
        empty = np.zeros((0, self.unit_dim), np.float32)
        return [np.concatenate(p) if p else empty for p in per_wav]

    def unit_features(self, wav: np.ndarray) -> np.ndarray:
        """`[n // 640, frames_per_unit * hidden]` float32 at 25 Hz: frames stacked per unit,
        chunk by chunk (`batched_unit_features` of one waveform, one chunk per call)."""
        return self.batched_unit_features([wav], 1)[0]


@functools.cache
def hubert_features(path: str, layer: int, max_chunk_seconds: float) -> HubertFeatures:
    """The process-wide `HubertFeatures` of a directory and layer (loaded once)."""
    return HubertFeatures(path, layer, max_chunk_seconds)


def get_extractor(
    name: str,
    *,
    hubert_dir: str | os.PathLike | None = None,
    layer: int = 6,
    max_chunk_seconds: float = 30.0,
) -> FeatureExtractor:
    """The feature extractor called `name` (one of `EXTRACTORS`).

    Args:
      name: "logmel", "mfcc" or "hubert".
      hubert_dir: for "hubert": a local HF HuBERT directory (`config.json` + weights).
      layer: for "hubert": which transformer layer's output (0 = the input of layer 1).
      max_chunk_seconds: for "hubert": longer audio is encoded in independent chunks.

    Raises:
      ValueError: an unknown name, or "hubert" without `hubert_dir`.
      FileNotFoundError: `hubert_dir` or its files do not exist.
    """
    if name == "logmel":
        return FeatureExtractor(
            "logmel",
            units.FEATURE_DIM,
            float(units.UNIT_RATE),
            units.unit_features,
            {"name": "logmel", **units.feature_config()},
        )
    if name == "mfcc":
        return FeatureExtractor(
            "mfcc",
            MFCC_DIM,
            float(units.UNIT_RATE),
            mfcc_features,
            {"name": "mfcc", "n_mfcc": N_MFCC, "deltas": 2, **units.feature_config()},
        )
    if name == "hubert":
        if hubert_dir is None or not str(hubert_dir):
            raise ValueError("the 'hubert' feature extractor needs hubert_dir (a local HF dir)")
        path = os.path.abspath(os.fspath(hubert_dir))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: HuBERT model directory not found")
        h = hubert_features(path, int(layer), float(max_chunk_seconds))
        return FeatureExtractor(
            "hubert",
            h.unit_dim,
            float(units.UNIT_RATE),
            h.unit_features,
            {
                "name": "hubert",
                "hubert_dir": path,
                "layer": int(layer),
                "max_chunk_seconds": float(max_chunk_seconds),
                "sample_rate": SAMPLE_RATE,
                "unit_rate": units.UNIT_RATE,
                "frame_rate": h.frame_rate,
                "frames_per_unit": h.frames_per_unit,
                "hidden_size": h.config.hidden_size,
            },
        )
    raise ValueError(f"unknown feature extractor {name!r}; expected one of {EXTRACTORS}")


def normalize_by_default(name: str) -> bool:
    """Whether k-means standardises these features per dimension: log-mel and MFCC yes,
    HuBERT no (clustered as they are, as GSLM does)."""
    return name != "hubert"


def check_spec(spec: Any, where: str) -> dict[str, Any]:
    """Validates a saved extractor spec without building it (a HuBERT model is not loaded).

    log-mel / MFCC specs must equal this code's; a HuBERT spec needs its directory and layer.
    `where` (e.g. the tokenizer.json path) starts the error message.
    """
    if not isinstance(spec, dict) or spec.get("name") not in EXTRACTORS:
        raise ValueError(f"{where}: extractor {spec!r} is not one of {EXTRACTORS}")
    name = spec["name"]
    if name in ("logmel", "mfcc"):
        expected = get_extractor(name).spec
        if spec != expected:
            diff = {
                k: (spec.get(k), expected.get(k))
                for k in sorted(set(spec) | set(expected))
                if spec.get(k) != expected.get(k)
            }
            raise ValueError(
                f"{where}: {name} extractor settings differ from this code's: {diff} "
                "(saved, expected)"
            )
    else:
        missing = [k for k in ("hubert_dir", "layer", "frames_per_unit") if k not in spec]
        if missing:
            raise ValueError(f"{where}: hubert extractor spec lacks {missing}")
        if spec.get("unit_rate") != units.UNIT_RATE:
            raise ValueError(
                f"{where}: hubert extractor at unit_rate {spec.get('unit_rate')}, this code "
                f"makes {units.UNIT_RATE} Hz units (a 50 Hz tokenizer from an older "
                "tools/fit_units.py must be refitted)"
            )
    return dict(spec)


def from_spec(spec: dict[str, Any], where: str = "extractor") -> FeatureExtractor:
    """Rebuilds the extractor a spec describes (`FeatureExtractor.spec`, as saved by
    `UnitTokenizer`); a rebuilt spec that differs (another HuBERT checkpoint config, say) is
    an error naming `where` and the fields."""
    spec = check_spec(spec, where)
    if spec["name"] != "hubert":
        return get_extractor(spec["name"])
    ex = get_extractor(
        "hubert",
        hubert_dir=spec["hubert_dir"],
        layer=int(spec["layer"]),
        max_chunk_seconds=float(spec.get("max_chunk_seconds", 30.0)),
    )
    if ex.spec != spec:
        diff = {
            k: (spec.get(k), ex.spec.get(k))
            for k in sorted(set(spec) | set(ex.spec))
            if spec.get(k) != ex.spec.get(k)
        }
        raise ValueError(f"{where}: HuBERT features now differ from the saved ones: {diff}")
    return ex
