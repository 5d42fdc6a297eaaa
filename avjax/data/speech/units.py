"""Discrete speech units at 25 Hz: log-mel features, a k-means unit tokenizer, corpus tokenising.

SpeechSSM models USM-v2 semantic tokens at 25 Hz. Offline and at CPU scale we use k-means units
over stacked log-mel frames instead: 80-bin log-mel at 100 Hz (hop 160 at 16 kHz), 4
consecutive frames stacked into one 320-dim vector per 40 ms, normalised per dimension, then
quantised to the nearest of `num_units` centroids (k-means++ init and Lloyd iterations in jitted
`jax.numpy`). Because each unit covers exactly 4 mel frames, a centroid is itself a 4-frame
mel patch, which gives the units->mel decoder (`vocoder.py`) its starting point.

Lengths: a waveform of `n` samples gives `n // 640` units (the tail shorter than 40 ms is
dropped); decoding `u` units gives `640 * u` samples.

Other features: a `UnitTokenizer` records the extractor its centroids were fitted on
(`extractor`, an `avjax.data.speech.features` spec: log-mel by default, MFCC, or a layer of a local
HuBERT checkpoint) and `encode` uses it; every extractor gives 25 Hz vectors (faster frames
stacked per unit), so units, vocoder and windows line up whatever the features.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from avjax import io as io_lib
from avjax.data.audio import SAMPLE_RATE  # noqa: F401  (re-exported)
from avjax.data.speech.logmel import (  # noqa: F401  (re-exported: the features of the units)
    FEATURE_DIM,
    FMAX,
    FMIN,
    FRAMES_PER_UNIT,
    HOP_LENGTH,
    MEL_FLOOR,
    N_FFT,
    N_MELS,
    SAMPLES_PER_UNIT,
    UNIT_RATE,
    WIN_LENGTH,
    feature_config,
    log_mel,
    logmel_spec,
    mel_basis,
    mel_to_unit_features,
    num_units_for,
    stft,
    unit_features,
    unit_mel,
)

if TYPE_CHECKING:
    from avjax.data.speech.corpus import Utterance
    from avjax.data.speech.vocoder import UnitVocoder


TOKENIZER_VERSION = 1
UNITS_CACHE_VERSION = 1


# --- k-means in JAX --------------------------------------------------------------------------

_BLOCK = 8192


def _pad_blocks(x: jax.Array) -> tuple[jax.Array, int]:
    n = x.shape[0]
    nb = max(1, -(-n // _BLOCK))
    return jnp.pad(x, ((0, nb * _BLOCK - n), (0, 0))).reshape(nb, _BLOCK, x.shape[1]), n


@jax.jit
def _assign(x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest centroid and its squared distance, `[n]` each; blockwise to bound memory."""
    xb, n = _pad_blocks(x)
    c2 = jnp.sum(c * c, axis=1)

    def block(xs):
        d = jnp.sum(xs * xs, axis=1, keepdims=True) - 2.0 * xs @ c.T + c2[None]
        return jnp.argmin(d, axis=1).astype(jnp.int32), jnp.maximum(jnp.min(d, axis=1), 0.0)

    a, d = jax.lax.map(block, xb)
    return a.reshape(-1)[:n], d.reshape(-1)[:n]


@functools.partial(jax.jit, static_argnames=("k",))
def _kmeans_pp(x: jax.Array, key: jax.Array, k: int) -> jax.Array:
    """k-means++ seeding: `[k, dim]` centroids drawn from `x` `[n, dim]` (D^2 sampling)."""
    key, sub = jax.random.split(key)
    c0 = x[jax.random.randint(sub, (), 0, x.shape[0])]
    cents = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(c0)
    d2 = jnp.sum((x - c0[None]) ** 2, axis=1)

    def body(i, carry):
        cents, d2, key = carry
        key, sub = jax.random.split(key)
        idx = jax.random.categorical(sub, jnp.log(jnp.maximum(d2, 1e-30)))
        c = x[idx]
        return cents.at[i].set(c), jnp.minimum(d2, jnp.sum((x - c[None]) ** 2, axis=1)), key

    cents, _, _ = jax.lax.fori_loop(1, k, body, (cents, d2, key))
    return cents


@jax.jit
def _lloyd_step(x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One Lloyd iteration: new centroids `[k, dim]` and the mean squared distance (inertia).

    An empty cluster is moved onto the point currently farthest from its centroid (distinct
    points for distinct empty clusters), the usual fix that keeps all `k` units in use.
    """
    k = c.shape[0]
    a, d = _assign(x, c)
    sums = jax.ops.segment_sum(x, a, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones_like(d), a, num_segments=k)
    new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)
    empty = counts == 0
    _, far = jax.lax.top_k(d, k)
    rank = jnp.cumsum(empty) - 1
    new = jnp.where(empty[:, None], x[far[jnp.clip(rank, 0, k - 1)]], new)
    return new, jnp.mean(d)


def feature_stats(x: np.ndarray, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension `(mean, std)`, each `[dim]` float32, of features `x [n, dim]` (std floored
    at 1e-3); `(0, 1)` when not `normalize` (e.g. HuBERT features, clustered as they are)."""
    if not normalize:
        return np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    return x.mean(axis=0).astype(np.float32), np.maximum(x.std(axis=0), 1e-3).astype(np.float32)


def kmeans(
    x: np.ndarray, num_clusters: int, *, seed: int = 0, iters: int = 30, tol: float = 1e-4
) -> tuple[np.ndarray, list[float]]:
    """k-means++ + Lloyd on `x` `[n, dim]`; returns centroids `[k, dim]` and inertia per step.

    Stops early when the inertia improves by less than `tol` (relative).
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[0] < num_clusters:
        raise ValueError(f"kmeans needs [n >= {num_clusters}, dim] points, got shape {x.shape}")
    xj = jnp.asarray(x)
    c = _kmeans_pp(xj, jax.random.key(seed), num_clusters)
    history: list[float] = []
    for _ in range(iters):
        c, inertia = _lloyd_step(xj, c)
        history.append(float(inertia))
        if len(history) > 1 and history[-2] - history[-1] <= tol * abs(history[-2]):
            break
    return np.asarray(c), history


class UnitTokenizer:
    """Waveform -> 25 Hz k-means units, over the features its `extractor` spec names.

    Attributes:
      centroids: `[num_units, dim]` float32 in normalised feature space (dim 320 for log-mel,
        156 for MFCC, `2 * hidden_size` for HuBERT: see `avjax.data.speech.features`).
      mean, std: `[dim]` float32 feature normalisation (0 / 1 where none was used).
      extractor: the `FeatureExtractor.spec` of the features (name + settings, e.g.
        hubert_dir and layer); default log-mel. Saved in tokenizer.json; `encode` rebuilds it.
    """

    def __init__(
        self,
        centroids: np.ndarray,
        mean: np.ndarray,
        std: np.ndarray,
        extractor: dict[str, Any] | None = None,
    ):
        self.centroids = np.asarray(centroids, np.float32)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        if self.centroids.ndim != 2 or self.mean.shape != (self.centroids.shape[1],):
            raise ValueError(
                f"tokenizer shapes disagree: centroids {self.centroids.shape}, "
                f"mean {self.mean.shape}, std {self.std.shape}"
            )
        self.extractor = dict(extractor) if extractor else logmel_spec()
        self._features = None  # the FeatureExtractor, built on the first `encode`
        self._cj = jnp.asarray(self.centroids)

    @property
    def features(self) -> str:
        """The extractor's name: "logmel", "mfcc" or "hubert"."""
        return str(self.extractor["name"])

    @property
    def num_units(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.centroids.shape[1])

    @classmethod
    def fit(
        cls,
        features: Sequence[np.ndarray],
        num_units: int = 256,
        seed: int = 0,
        iters: int = 30,
        max_points: int = 200_000,
        extractor: dict[str, Any] | None = None,
        normalize: bool = True,
    ) -> UnitTokenizer:
        """Fits k-means on unit features (a list of `[units, dim]` arrays, e.g. one per file).

        At most `max_points` vectors (a seeded random subset) are clustered. `extractor`: the
        spec of the features given (default log-mel); `normalize`: standardise each
        dimension first (off: mean 0, std 1, e.g. for HuBERT).
        """
        x = np.concatenate([np.asarray(f, np.float32) for f in features if len(f)])
        if len(x) > max_points:
            x = x[np.random.default_rng(seed).choice(len(x), max_points, replace=False)]
        mean, std = feature_stats(x, normalize)
        c, hist = kmeans((x - mean) / std, num_units, seed=seed, iters=iters)
        logging.info(
            "k-means: %d units on %d vectors x %d dims, %d iterations, inertia %.2f -> %.2f",
            num_units,
            len(x),
            x.shape[1],
            len(hist),
            hist[0],
            hist[-1],
        )
        return cls(c, mean, std, extractor)

    def encode_features(self, feats: np.ndarray) -> np.ndarray:
        """`[units, dim]` features -> `[units]` int32 unit ids."""
        feats = np.asarray(feats, np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim:
            raise ValueError(
                f"expected features [units, {self.feature_dim}], got shape {feats.shape}"
            )
        n = len(feats)
        if n == 0:
            return np.zeros(0, np.int32)
        x = (feats - self.mean) / self.std
        padded = -(-n // 1024) * 1024  # few distinct shapes: few compilations
        x = np.pad(x, ((0, padded - n), (0, 0)))
        a, _ = _assign(jnp.asarray(x), self._cj)
        return np.asarray(a[:n], np.int32)

    def unit_features(self, wav: np.ndarray) -> np.ndarray:
        """16 kHz waveform `[samples]` -> this tokenizer's features `[samples // 640, dim]`."""
        if self.features == "logmel":
            return unit_features(wav)
        if self._features is None:
            from avjax.data.speech import features as features_lib

            self._features = features_lib.from_spec(self.extractor, f"{self.features} tokenizer")
            if self._features.dim != self.feature_dim:
                raise ValueError(
                    f"the {self.features} extractor {self.extractor} gives {self._features.dim}-"
                    f"dim features, the centroids are {self.centroids.shape}"
                )
        return self._features(wav)

    def encode(self, wav: np.ndarray) -> np.ndarray:
        """16 kHz waveform `[samples]` -> `[samples // 640]` int32 units (25 Hz), computed on
        the features `extractor` names."""
        return self.encode_features(self.unit_features(wav))

    def centroid_mels(self) -> np.ndarray:
        """Each unit's centroid as a log-mel patch `[num_units, 4, n_mels]` (log-mel only)."""
        if self.features != "logmel":
            raise ValueError(f"a {self.features} tokenizer's centroids are not log-mel patches")
        m = self.centroids * self.std + self.mean
        return m.reshape(self.num_units, FRAMES_PER_UNIT, -1)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes `tokenizer.npz` + `tokenizer.json` into `directory` (local or remote; each
        file through a unique temporary name and a rename)."""
        directory = io_lib.as_path(directory)
        buf = io.BytesIO()
        np.savez(buf, centroids=self.centroids, mean=self.mean, std=self.std)
        io_lib.write_bytes_atomic(directory / "tokenizer.npz", buf.getvalue())
        meta = {
            "version": TOKENIZER_VERSION,
            "num_units": self.num_units,
            "feature_dim": self.feature_dim,
            "features": feature_config(),
            "extractor": self.extractor,
        }
        io_lib.write_text_atomic(directory / "tokenizer.json", json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> UnitTokenizer:
        """Reads a tokenizer saved by `save` (local or remote); errors name the file and the
        mismatch."""
        directory = io_lib.as_path(directory)
        meta_path, npz_path = directory / "tokenizer.json", directory / "tokenizer.npz"
        for p in (meta_path, npz_path):
            if not p.exists():
                raise FileNotFoundError(f"{p}: unit tokenizer file not found")
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != TOKENIZER_VERSION or meta.get("features") != feature_config():
            raise ValueError(
                f"{meta_path}: tokenizer made with version {meta.get('version')} / features "
                f"{meta.get('features')}, this code expects version {TOKENIZER_VERSION} / "
                f"{feature_config()}"
            )
        # Files from before the extractor was recorded are log-mel tokenizers.
        from avjax.data.speech import features as features_lib

        extractor = features_lib.check_spec(meta.get("extractor") or logmel_spec(), str(meta_path))
        with np.load(io.BytesIO(npz_path.read_bytes())) as z:
            tok = cls(z["centroids"], z["mean"], z["std"], extractor)
        if tok.num_units != meta["num_units"] or tok.feature_dim != meta["feature_dim"]:
            raise ValueError(
                f"{npz_path}: centroids {tok.centroids.shape} disagree with {meta_path} "
                f"(num_units {meta['num_units']}, feature_dim {meta['feature_dim']})"
            )
        return tok


def unigram_entropy(units: Sequence[np.ndarray] | np.ndarray, num_units: int) -> float:
    """Entropy (nats) of the unit frequencies: the loss of the best context-free predictor."""
    arr = units if isinstance(units, np.ndarray) else np.concatenate(list(units))
    counts = np.bincount(np.asarray(arr, np.int64), minlength=num_units).astype(np.float64)
    p = counts[counts > 0] / max(counts.sum(), 1.0)
    return float(-(p * np.log(p)).sum())


# --- corpus tokenising -----------------------------------------------------------------------


def _corpus_fingerprint(utts: Sequence[Utterance]) -> str:
    h = hashlib.sha256()
    for u in utts:
        h.update(f"{u.id}|{u.doc_id}|{u.split}|{u.num_samples}\n".encode())
    return h.hexdigest()[:16]


def units_key(
    utts: Sequence[Utterance], *, num_units: int, seed: int, kmeans_iters: int, vocoder_steps: int
) -> dict[str, Any]:
    """What the units of a corpus depend on (also the key of `units_info.json`)."""
    return {
        "version": UNITS_CACHE_VERSION,
        "corpus": _corpus_fingerprint(utts),
        "num_units": int(num_units),
        "seed": int(seed),
        "kmeans_iters": int(kmeans_iters),
        "vocoder_steps": int(vocoder_steps),
        "features": feature_config(),
    }


def prepare_units(
    corpus: str | os.PathLike | Sequence[Utterance],
    out_dir: str | os.PathLike,
    *,
    num_units: int = 256,
    seed: int = 0,
    kmeans_iters: int = 30,
    vocoder_steps: int = 300,
    progress: bool = True,
    corpus_key: Any = None,
    context: dict[str, Any] | None = None,
    **artifact_options: Any,
) -> tuple[UnitTokenizer, UnitVocoder, dict[str, np.ndarray]]:
    """Fits the unit tokenizer (train split) and the unit vocoder once; tokenises every file.

    Args:
      corpus: a corpus root (with `manifest.jsonl`) or a list of `Utterance`s.
      out_dir: the artifact folder (`avjax.data.artifacts`; local or remote): `tokenizer/`,
        `vocoder/`, `units.npz` ({utterance id: int32 `[units]`}), `units_info.json`
        (sizes, unigram entropy, timings), `manifest.json`.
      num_units, seed, kmeans_iters, vocoder_steps: fit settings (part of the key).
      corpus_key: what identifies the corpus in the key (default: a hash of its utterance
        ids, splits and lengths). The default corpus passes its parameters: espeak-ng
        output may differ by a few samples between builds (hosts, cache rebuilds), which
        must not make the units of a checkpoint look different.
      context: shown when the units differ, not part of the key (e.g. the config fields that
        chose the corpus, whose fingerprint is in the key).
      artifact_options: passed on to `artifacts.prepare_artifact` (group, processes,
        read_only, frozen_by, force).

    Returns:
      (tokenizer, vocoder, {utterance id: int32 `[num_samples // 640]` units}). A second call
      with the same corpus and settings loads everything from `out_dir`.
    """
    from avjax.data import artifacts
    from avjax.data.speech import corpus as corpus_lib

    utts = (
        corpus_lib.load_manifest(corpus) if isinstance(corpus, str | os.PathLike) else list(corpus)
    )
    if not any(u.split == "train" for u in utts):
        raise ValueError("prepare_units: the corpus has no train-split utterances")
    key = units_key(
        utts,
        num_units=num_units,
        seed=seed,
        kmeans_iters=kmeans_iters,
        vocoder_steps=vocoder_steps,
    )

    def adopt(path):  # units made before manifests: units_info.json with the same key
        try:
            info = json.loads((path / "units_info.json").read_text())
        except (OSError, ValueError):
            return None
        return info if info.get("key") == key and (path / "units.npz").exists() else None

    art = artifacts.prepare_artifact(
        out_dir,
        {"units": key if corpus_key is None else {**key, "corpus": corpus_key}},
        functools.partial(
            _fit_units,
            utts,
            num_units=num_units,
            seed=seed,
            kmeans_iters=kmeans_iters,
            vocoder_steps=vocoder_steps,
            progress=progress,
            key=key,
        ),
        what="the unit tokenizer and vocoder",
        adopt=adopt,
        context=context,
        **artifact_options,
    )
    tok, voc, units = load_units(art.path)
    logging.info(
        "Units: %d, %d files from %s (train unigram entropy %.3f nats)",
        tok.num_units,
        len(units),
        art.path,
        art.info.get("unigram_entropy_nats", float("nan")),
    )
    return tok, voc, units


def load_units(
    out_dir: str | os.PathLike,
) -> tuple[UnitTokenizer, UnitVocoder, dict[str, np.ndarray]]:
    """(tokenizer, vocoder, {utterance id: int32 units}) of a `prepare_units` folder."""
    from avjax.data.speech import vocoder as vocoder_lib

    out_dir = io_lib.as_path(out_dir)
    tok = UnitTokenizer.load(out_dir / "tokenizer")
    voc = vocoder_lib.UnitVocoder.load(out_dir / "vocoder")
    with np.load(io.BytesIO((out_dir / "units.npz").read_bytes())) as z:
        units = {k: z[k] for k in z.files}
    return tok, voc, units


def _unit_mels(utts: Sequence[Utterance], progress: bool) -> dict[str, np.ndarray]:
    """{utterance id: log-mel `[4 * units, n_mels]`} of every file."""
    from avjax.data import audio as audio_lib

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(utts), desc="log-mel", mininterval=1.0)
    mels: dict[str, np.ndarray] = {}
    for u in utts:
        wav = audio_lib.load_audio(u.audio_path)
        mels[u.id] = unit_mel(log_mel(wav), num_units_for(len(wav)))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return mels


def _fit_units(
    utts: Sequence[Utterance],
    out_dir: os.PathLike,
    *,
    num_units: int,
    seed: int,
    kmeans_iters: int,
    vocoder_steps: int,
    progress: bool,
    key: dict[str, Any],
) -> dict[str, Any]:
    """Fits tokenizer + vocoder on the train split, tokenises every file, saves into `out_dir`;
    returns the info also written to `units_info.json`."""
    from avjax.data.speech import vocoder as vocoder_lib

    t0 = time.time()
    train = [u for u in utts if u.split == "train"]
    mels = _unit_mels(utts, progress)
    t_feat = time.time() - t0

    t1 = time.time()
    tok = UnitTokenizer.fit(
        [mel_to_unit_features(mels[u.id]) for u in train],
        num_units=num_units,
        seed=seed,
        iters=kmeans_iters,
    )
    t_kmeans = time.time() - t1
    all_units = tok.encode_features(
        np.concatenate([mel_to_unit_features(mels[u.id]) for u in utts])
    )
    bounds = np.cumsum([len(mels[u.id]) // FRAMES_PER_UNIT for u in utts])[:-1]
    units = dict(zip([u.id for u in utts], np.split(all_units, bounds), strict=True))

    t2 = time.time()
    voc = vocoder_lib.UnitVocoder.fit(
        [units[u.id] for u in train],
        [mels[u.id] for u in train],
        steps=vocoder_steps,
        seed=seed,
        num_units=tok.num_units,
        progress=progress,
    )
    t_voc = time.time() - t2

    train_units = np.concatenate([units[u.id] for u in train])
    entropy = unigram_entropy(train_units, tok.num_units)
    out_dir = io_lib.as_path(out_dir)
    tok.save(out_dir / "tokenizer")
    voc.save(out_dir / "vocoder")
    buf = io.BytesIO()
    np.savez(buf, **units)
    io_lib.write_bytes_atomic(out_dir / "units.npz", buf.getvalue())
    info = {
        "key": key,
        "num_units": tok.num_units,
        "used_units": int(len(np.unique(train_units))),
        "train_tokens": int(len(train_units)),
        "unigram_entropy_nats": entropy,
        "seconds": {
            "features": t_feat,
            "kmeans": t_kmeans,
            "vocoder": t_voc,
            "total": time.time() - t0,
        },
        "vocoder_final_l1": voc.final_loss,
    }
    io_lib.write_text_atomic(out_dir / "units_info.json", json.dumps(info, indent=2))
    logging.info(
        "Units: %d (%d used), %d train tokens, unigram entropy %.3f nats; features %.1f s, "
        "k-means %.1f s, vocoder %.1f s",
        tok.num_units,
        info["used_units"],
        info["train_tokens"],
        entropy,
        t_feat,
        t_kmeans,
        t_voc,
    )
    return info
