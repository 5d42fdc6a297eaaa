"""Pluggable frame-level speech features for unit discovery (k-means) and tokenising.

One interface: `get_extractor(name, ...)` returns a `FeatureExtractor`, a callable
`wav [samples] float32 at 16 kHz -> [frames, dim] float32` that also states its `dim`,
`frame_rate` (Hz) and a JSON-able `spec` (what a saved tokenizer records so the same features
can be rebuilt).

- `"logmel"`: `avjax.data.units.unit_features`, 4 stacked 10 ms 80-bin log-mel frames per
  40 ms: 320 dims at 25 Hz (`units.UNIT_RATE`), `n // 640` frames.
- `"mfcc"`: 13 MFCCs + deltas + delta-deltas (39 per 10 ms frame, computed by librosa from the
  same log-mel spectrogram), 4 frames stacked per 40 ms like `"logmel"`: 156 dims at 25 Hz,
  `n // 640` frames. (HuBERT's first iteration clustered 39-dim MFCCs.)
- `"hubert"`: the output of transformer layer `layer` of a HuggingFace HuBERT checkpoint in a
  local directory (`avjax.convert.hubert.load_hf_hubert`), `hidden_size` dims at 50 Hz
  (`config.num_frames(n)` frames: `(n - 400) // 320 + 1` for the published models). GSLM uses
  layer 6 of HuBERT base. Audio longer than `max_chunk_seconds` is cut into chunks encoded
  independently (as textlesslib does); inputs are zero-padded to whole seconds with the valid
  length passed to the model, which keeps the result exact and the number of compilations small.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from avjax.data import units
from avjax.data.audio import SAMPLE_RATE

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
    """Layer-`layer` HuBERT features `[frames, hidden]` at 50 Hz from a local HF directory."""

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
        self.layer = int(layer)
        self.config = cfg
        self.params = jax.device_put(variables)
        self.max_chunk = int(max_chunk_seconds * SAMPLE_RATE)
        self.pad_to = max(int(pad_to_seconds * SAMPLE_RATE), 1)
        self.min_samples = next(n for n in range(1, 100_000) if cfg.num_frames(n) > 0)

        def run(params, wav, lengths):
            out = self.model.apply(params, wav, lengths, num_layers=self.layer)
            return out["last_hidden_state"].astype(jnp.float32)

        self._run = jax.jit(run)

    @property
    def frame_rate(self) -> float:
        return SAMPLE_RATE / self.config.samples_per_frame

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(wav), self.max_chunk):
            chunk = wav[start : start + self.max_chunk]
            n = len(chunk)
            frames = self.config.num_frames(n)
            if frames == 0:
                continue
            padded = max(-(-n // self.pad_to) * self.pad_to, self.min_samples)
            x = np.zeros((1, padded), np.float32)
            x[0, :n] = chunk
            h = self._run(self.params, x, np.asarray([n], np.int32))
            out.append(np.asarray(h[0, :frames]))
        if not out:
            return np.zeros((0, self.config.hidden_size), np.float32)
        return np.concatenate(out)


@functools.cache
def _hubert(path: str, layer: int, max_chunk_seconds: float) -> HubertFeatures:
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
        h = _hubert(path, int(layer), float(max_chunk_seconds))
        return FeatureExtractor(
            "hubert",
            h.config.hidden_size,
            h.frame_rate,
            h,
            {
                "name": "hubert",
                "hubert_dir": path,
                "layer": int(layer),
                "max_chunk_seconds": float(max_chunk_seconds),
                "sample_rate": SAMPLE_RATE,
                "frame_rate": h.frame_rate,
            },
        )
    raise ValueError(f"unknown feature extractor {name!r}; expected one of {EXTRACTORS}")
