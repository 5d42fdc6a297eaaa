"""Sync expert task: Wav2Lip's lip-sync discriminator, its held-out accuracy, LSE-C/D and the
AV offsets it recovers (joonson/syncnet_python's protocol, `avjax.eval.lse`).

Batches are clips: `{"video": [batch, frames, H, W, 3] uint8 face crops at 25 fps,
"audio": [batch, frames * 640] float32 at 16 kHz}`; the model draws its in-sync / shifted
pairs from them on the device (`avjax.models.syncnet`). `config.data.name="procedural"`:
`SyntheticAVClips` below (procedural talking faces whose mouth follows synthetic syllables,
made in memory in seconds); any other name: `avjax.data.video.av_data.AVData` (the embedded
AV corpus `synthetic`, or lrs3 / lrs2 / lrw / grid / dir from `config.data.manual_dir`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from avjax.eval import lse
from avjax.models import syncnet as syncnet_lib
from avjax.tasks.base import Batch, LossContext, Metrics, Task

# --- data: synthetic talking faces (fallback) ---------------------------------------------------

# Vowel classes: (F1, F2) in Hz, mouth opening and width factors (open "a", spread "i", round "u").
_VOWELS = ((750.0, 1200.0, 1.0, 1.0), (300.0, 2300.0, 0.35, 1.35), (320.0, 800.0, 0.55, 0.6))


def _syllable(rng: np.random.Generator, n: int, f0: float, vowel: int) -> np.ndarray:
    """`[n]` a voiced syllable: harmonics of a gliding `f0` shaped by the vowel's formants,
    under a raised-cosine envelope."""
    f1, f2 = _VOWELS[vowel][:2]
    t = np.arange(n) / 16000.0
    glide = f0 * (1.0 + rng.uniform(-0.15, 0.15) * t / max(t[-1], 1e-3))
    phase = 2 * np.pi * np.cumsum(glide) / 16000.0
    k = np.arange(1, int(4000 // f0) + 1, dtype=np.float64)
    h = k * f0
    amp = np.exp(-(((h - f1) / 150.0) ** 2)) + 0.7 * np.exp(-(((h - f2) / 200.0) ** 2)) + 0.02
    offsets = rng.uniform(0, 2 * np.pi, len(k))
    y = amp @ np.sin(k[:, None] * phase[None, :] + offsets[:, None])
    return y * np.sin(np.pi * np.arange(n) / n) ** 0.7


def synth_audio(rng: np.random.Generator, frames: int, f0: float) -> tuple[np.ndarray, ...]:
    """`(audio [frames * 640], open [frames], width [frames])`: syllables with pauses and
    unvoiced bursts (sound with a closed mouth), and the mouth shape each frame shows."""
    n = frames * 640
    audio, open_, width = np.zeros(n), np.zeros(n), np.ones(n)
    pos = int(rng.integers(0, 4000))
    while pos < n:
        if rng.random() < 0.2:  # an unvoiced burst: noise, mouth nearly closed
            m = int(rng.integers(600, 1600))
            seg = rng.standard_normal(min(m, n - pos)) * 0.15
            audio[pos : pos + len(seg)] += seg * np.hanning(len(seg))
        else:
            m = int(rng.integers(1300, 4800))
            vowel = int(rng.integers(0, 3))
            seg = _syllable(rng, m, f0 * rng.uniform(0.85, 1.2), vowel)[: n - pos]
            env = np.sin(np.pi * np.arange(m) / m)[: len(seg)]
            sl = slice(pos, pos + len(seg))
            audio[sl] += seg
            open_[sl] = np.maximum(open_[sl], env * _VOWELS[vowel][2])
            width[sl] += env * (_VOWELS[vowel][3] - 1.0)
        pos += m + int(rng.integers(300, 5000))
    audio = 0.5 * audio / max(np.abs(audio).max(), 1e-6) + 0.003 * rng.standard_normal(n)
    per_frame = lambda x: np.convolve(x.reshape(frames, 640).mean(1), [0.2, 0.6, 0.2], "same")  # noqa: E731
    return audio.astype(np.float32), per_frame(open_), per_frame(width)


def render_faces(
    rng: np.random.Generator, ident: dict[str, Any], open_: np.ndarray, width: np.ndarray, size: int
) -> np.ndarray:
    """`[frames, size, size, 3]` uint8: a face (identity colours and shape) with drifting
    pose, blinks and sensor noise, whose mouth opens `open_` and widens `width` per frame."""
    t = len(open_)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    drift = np.cumsum(rng.normal(0, 0.004, (t, 2)), axis=0)
    cy = (0.5 + drift[:, 0])[:, None, None]
    cx = (0.5 + drift[:, 1])[:, None, None]
    ry, rx = ident["face"]
    face = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0
    hair = face & (yy < cy - 0.6 * ry)
    eye_open = np.where(rng.random(t) < 0.06, 0.2, 1.0)[:, None, None]
    eyes = sum(
        ((yy - cy + 0.12) / (0.035 * eye_open)) ** 2 + ((xx - cx - dx) / 0.05) ** 2 < 1.0
        for dx in (-0.14, 0.14)
    )
    my, mh = cy + 0.22, (0.012 + 0.085 * open_)[:, None, None]
    mw = (0.11 * width)[:, None, None]
    lips = ((yy - my) / (mh + 0.025)) ** 2 + ((xx - cx) / (mw + 0.02)) ** 2 < 1.0
    mouth = ((yy - my) / mh) ** 2 + ((xx - cx) / mw) ** 2 < 1.0
    img = np.broadcast_to(ident["bg"], (t, size, size, 3)).copy()
    for mask, colour in ((face, "skin"), (hair, "hair"), (eyes > 0, "eye"), (lips, "lip")):
        img[mask] = ident[colour]
    img[mouth] = (40.0, 12.0, 15.0)
    img += rng.normal(0, 4.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def identity(seed: int, i: int) -> dict[str, Any]:
    """The look and voice of identity `i`."""
    r = np.random.default_rng([seed, 7, i])
    skin = r.uniform([90, 60, 40], [240, 200, 170])
    return {
        "bg": r.uniform(0, 255, 3),
        "skin": skin,
        "hair": r.uniform(0, 120, 3),
        "eye": r.uniform(0, 60, 3),
        "lip": np.clip(skin * r.uniform(0.5, 0.8) + [40, 0, 0], 0, 255),
        "face": (r.uniform(0.36, 0.46), r.uniform(0.28, 0.38)),
        "f0": float(r.uniform(90, 260)),
    }


def make_clip(seed: int, index: int, ident: int, frames: int, size: int) -> dict[str, np.ndarray]:
    """One clip `{"video": [frames, size, size, 3] uint8, "audio": [frames * 640] float32}`."""
    look = identity(seed, ident)
    rng = np.random.default_rng([seed, 11, index])
    audio, open_, width = synth_audio(rng, frames, look["f0"])
    return {"video": render_faces(rng, look, open_, width, size), "audio": audio}


class _Clips(grain.sources.RandomAccessDataSource):
    def __init__(self, clips: list[dict[str, np.ndarray]]):
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        clip = self.clips[i]
        return {**clip, "length": np.int32(len(clip["video"]))}


@dataclasses.dataclass
class SyntheticAVClips:
    """Procedural talking-face clips, speakers held out (`config.data.procedural`:
    `identities`, `heldout_identities`, `train_clips`, `eval_clips`; `config.data`:
    `num_frames`, `crop_size` = the face size).

    Deterministic in `seed`: nothing is written, so read-only runs rebuild the same clips.
    """

    data: Any
    workdir: str
    seed: int = 0
    batch_size: int = 8
    num_eval_batches: int = 1
    read_only: bool = False
    _clips: dict[str, list] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, config: Any, workdir: str) -> SyntheticAVClips:
        return cls(
            config.data,
            workdir,
            seed=int(config.seed),
            batch_size=int(config.train.batch_size),
            num_eval_batches=int(config.train.eval_batches),
        )

    def _split(self, split: str) -> list[dict[str, np.ndarray]]:
        """The clips of `train` (training identities) or `heldout` (the others), made once."""
        if split not in self._clips:
            dc = self.data.procedural
            n_id, n_held = int(dc.identities), int(dc.heldout_identities)
            t, s = int(self.data.num_frames), int(self.data.crop_size)
            if split == "train":
                ids = [i % (n_id - n_held) for i in range(int(dc.train_clips))]
            else:
                ids = [n_id - n_held + i % n_held for i in range(int(dc.eval_clips))]
            seed = self.seed + (split != "train")
            self._clips[split] = [make_clip(seed, i, d, t, s) for i, d in enumerate(ids)]
        return self._clips[split]

    def prepare(self, read_only: bool | None = None) -> dict[str, Any]:
        """Facts of the clips (made lazily: evaluation never synthesises the train split)."""
        dc = self.data.procedural
        if int(self.data.num_frames) < 2 * 15 + 6:
            raise ValueError(f"config.data.num_frames={self.data.num_frames}: use >= 36")
        return {
            "train_clips": int(dc.train_clips),
            "heldout_clips": int(dc.eval_clips),
            "train_identities": int(dc.identities) - int(dc.heldout_identities),
            "heldout_identities": int(dc.heldout_identities),
            "seconds_per_clip": int(self.data.num_frames) / 25.0,
        }

    def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        self.prepare()
        ds = grain.MapDataset.source(_Clips(self._split("train")))
        ds = ds.shuffle(seed=self.seed).repeat(None)[process_index::process_count]
        return ds.batch(self.batch_size // process_count, drop_remainder=True).to_iter_dataset()

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        self.prepare()
        held = self._split("heldout")[process_index::process_count]
        b = self.batch_size // process_count
        out = []
        for i in range(0, min(len(held), b * self.num_eval_batches) - b + 1, b):
            batch = {k: np.stack([c[k] for c in held[i : i + b]]) for k in ("video", "audio")}
            batch["length"] = np.full((b,), int(self.data.num_frames), np.int32)
            out.append(batch)
        return out

    def dummy_batch(self) -> Batch:
        t, s = int(self.data.num_frames), int(self.data.crop_size)
        return {
            "video": np.zeros((self.batch_size, t, s, s, 3), np.uint8),
            "audio": np.zeros((self.batch_size, t * 640), np.float32),
            "length": np.full((self.batch_size,), t, np.int32),
        }


# --- task -------------------------------------------------------------------------------------


class SyncNetTask(Task):
    """The lip-sync expert trained with BCE on cosine similarity of 0.2 s AV windows."""

    name = "syncnet"

    def __init__(self, config, workdir):
        if config.data.name == "procedural":
            self.data = SyntheticAVClips.from_config(config, workdir)
        else:  # the embedded AV corpus (`synthetic`) or a real one (lrs3, lrs2, lrw, grid, dir)
            from avjax.data.video.av_data import AVData

            self.data = AVData.from_config(config, workdir)
        super().__init__(config, workdir)

    def build_model(self) -> nn.Module:
        return syncnet_lib.sync_expert(self.config.model)

    def _windows(self, batch: Batch, v: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
        faces = syncnet_lib.face_windows(batch["video"], v, int(self.config.model.face_size))
        mel = syncnet_lib.mel_windows(syncnet_lib.wav2lip_mel(batch["audio"]), a)
        return faces, mel

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        zeros = jnp.zeros((batch["video"].shape[0],), jnp.int32)
        faces, mel = self._windows(batch, zeros, zeros)
        return {"faces": faces, "mel": mel}

    def apply_loss(
        self, model: nn.Module, params: Any, batch: Batch, ctx: LossContext
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        b, t = batch["video"].shape[:2]
        mc = self.config.model
        v, a, label = syncnet_lib.sample_pairs(ctx.rng, b, t, int(mc.min_shift), int(mc.max_shift))
        faces, mel = self._windows(batch, v, a)
        # No non-param collections (GroupNorm): LossContext.apply would hand back
        # `(out, {})` as the output in training (it passes `mutable=[]`).
        logit, _, _ = model.apply({"params": params}, faces, mel)
        state = dict(ctx.model_state)
        bce, correct = syncnet_lib.sync_loss(logit, label)
        metrics = {"weight": jnp.asarray(b, jnp.float32), "accuracy": jnp.sum(correct)}
        loss = jnp.sum(bce)
        radius = int(mc.get("offset_radius", 0))
        if radius:
            ce, hit = self._offset_term(model, params, batch, jax.random.fold_in(ctx.rng, 1))
            loss = loss + float(mc.get("offset_weight", 1.0)) * jnp.sum(ce)
            metrics.update(offset_loss=jnp.sum(ce), offset_accuracy=jnp.sum(hit))
        return loss, metrics, state

    def _offset_term(
        self, model: nn.Module, params: Any, batch: Batch, rng: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """`(cross-entropy [batch], correct [batch])` of finding the in-sync mel window among
        the `2 model.offset_radius + 1` of the same clip (`models.syncnet.offset_loss`)."""
        b, t = batch["video"].shape[:2]
        radius = int(self.config.model.offset_radius)
        v, a = syncnet_lib.sample_offset_windows(rng, b, t, radius)
        faces = syncnet_lib.face_windows(batch["video"], v, int(self.config.model.face_size))
        mel = syncnet_lib.wav2lip_mel(batch["audio"])
        mels = jax.vmap(lambda s: syncnet_lib.mel_windows(mel, s), in_axes=1, out_axes=1)(a)
        logits = model.apply({"params": params}, faces, mels, method="candidate_logits")
        return syncnet_lib.offset_loss_from_logits(logits)

    def tokens_per_batch(self, batch: Batch) -> int:
        return int(batch["video"].shape[0])

    def compatibility(self) -> dict[str, Any]:
        return {"task": self.name, "model": self.config.model.to_dict()}

    def evaluate(self, model, params, step, eval_loss) -> dict[str, Any]:
        """`sync_eval` with the options of `config.sync_eval` (the `task` evaluator)."""
        return sync_eval(self, model, params, self.config.get("sync_eval", {}))


# --- evaluation -------------------------------------------------------------------------------


@functools.cache
def _embedders(model: nn.Module) -> tuple[Any, Any]:
    face = jax.jit(lambda p, x: model.apply({"params": p}, x, method="embed_face"))
    audio = jax.jit(lambda p, x: model.apply({"params": p}, x, method="embed_audio"))
    return face, audio


def heldout_clips(task: Task) -> list[tuple[np.ndarray, np.ndarray]]:
    """`(video [T, H, W, C] uint8, audio [T * 640])` of each held-out clip, cut to its
    `length` (from the data module's fixed held-out batches)."""
    clips = []
    for batch in task.eval_batches(jax.process_index(), jax.process_count()):
        lengths = batch.get("length", np.full(len(batch["video"]), batch["video"].shape[1]))
        for video, audio, n in zip(batch["video"], batch["audio"], lengths, strict=True):
            if int(n) > lse.WINDOW_FRAMES + 1:  # at least two LSE windows
                clips.append((video[: int(n)], audio[: int(n) * lse.SAMPLES_PER_FRAME]))
    return clips


def shift_audio(audio: np.ndarray, frames: int) -> np.ndarray:
    """Audio delayed by `frames` video frames (zeros in front; negative: advanced)."""
    s = frames * lse.SAMPLES_PER_FRAME
    if s >= 0:
        return np.concatenate([np.zeros(s, audio.dtype), audio[: len(audio) - s]])
    return np.concatenate([audio[-s:], np.zeros(-s, audio.dtype)])


def expert_lse(
    model: nn.Module, params: Any, video: np.ndarray, audio: np.ndarray, face_size: int
) -> dict[str, float]:
    """LSE-D / LSE-C / offset of one clip (`[T, H, W, 3]` uint8, `[T * 640]`) scored by the
    trained expert (distances between its unit embeddings)."""
    embed_face, embed_audio = _embedders(model)
    mel = np.asarray(syncnet_lib.wav2lip_mel(jnp.asarray(audio[None])))  # [1, steps, 80]

    chunk = 32  # windows per call, padded: one compiled shape per clip size

    def starts(s: int, e: int) -> jax.Array:
        return jnp.minimum(jnp.arange(s, s + chunk), e - 1)

    def vid(s: int, e: int) -> np.ndarray:
        clip = jnp.broadcast_to(jnp.asarray(video)[None], (chunk, *video.shape))
        faces = syncnet_lib.face_windows(clip, starts(s, e), face_size)
        return np.asarray(embed_face(params, faces))[: e - s]

    def aud(s: int, e: int) -> np.ndarray:
        m = jnp.broadcast_to(jnp.asarray(mel), (chunk, *mel.shape[1:]))
        return np.asarray(embed_audio(params, syncnet_lib.mel_windows(m, starts(s, e))))[: e - s]

    return lse.lse(vid, aud, video.shape[0], len(audio), batch=chunk)


def _heldout_accuracy(task: Task, model: nn.Module, params: Any, repeats: int) -> float:
    """Accuracy of P(sync) > 0.5 on held-out pairs drawn `repeats` times from each batch."""
    face_size = int(task.config.model.face_size)
    mc = task.config.model

    @jax.jit
    def correct(params, video, audio, rng):
        b, t = video.shape[:2]
        v, a, label = syncnet_lib.sample_pairs(rng, b, t, int(mc.min_shift), int(mc.max_shift))
        faces = syncnet_lib.face_windows(video, v, face_size)
        mel = syncnet_lib.mel_windows(syncnet_lib.wav2lip_mel(audio), a)
        logit, _, _ = model.apply({"params": params}, faces, mel)
        return jnp.sum(syncnet_lib.sync_loss(logit, label)[1])

    hits, total = 0.0, 0
    for i, batch in enumerate(task.eval_batches(jax.process_index(), jax.process_count())):
        for r in range(repeats):
            key = jax.random.fold_in(jax.random.key(1234), i * repeats + r)
            hits += float(correct(params, batch["video"], batch["audio"], key))
            total += batch["video"].shape[0]
    return hits / max(total, 1)


def sync_eval(
    task: Task, model: nn.Module, params: Any, options: Mapping[str, Any]
) -> dict[str, Any]:
    """Held-out sync accuracy (in-sync vs shifted pairs), LSE-D / LSE-C of held-out clips in
    sync and with the audio delayed by `options["lse_shift"]` frames, and the offsets found
    for each clip shifted by `-max_offset .. +max_offset` frames (`offset_exact`: the fraction
    recovering exactly `-shift`, syncnet_python's sign)."""
    repeats = int(options.get("repeats", 4))
    out: dict[str, Any] = {"accuracy": _heldout_accuracy(task, model, params, repeats)}
    clips = heldout_clips(task)[: int(options.get("clips", 16))]
    face_size = int(task.config.model.face_size)
    score = functools.partial(expert_lse, model, params, face_size=face_size)
    shift = int(options.get("lse_shift", 8))
    synced = [score(v, a) for v, a in clips]
    shifted = [score(v, shift_audio(a, shift)) for v, a in clips]
    out.update({f"insync_{k}": v for k, v in lse.mean_scores(synced).items()})
    out.update({f"shifted_{k}": v for k, v in lse.mean_scores(shifted).items()})
    out["insync_offset_exact"] = float(np.mean([s["offset"] == 0 for s in synced]))
    m = int(options.get("max_offset", 5))
    found = [
        (d, score(v, shift_audio(a, d))["offset"])
        for v, a in clips[: int(options.get("offset_clips", 8))]
        for d in range(-m, m + 1)
    ]
    out["offset_exact"] = float(np.mean([off == -d for d, off in found]))
    out["offset_within_1"] = float(np.mean([abs(off + d) <= 1 for d, off in found]))
    out["offset_trials"] = len(found)
    return out
