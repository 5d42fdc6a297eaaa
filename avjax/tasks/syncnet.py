"""Sync expert task: Wav2Lip's lip-sync discriminator, its held-out accuracy, LSE-C/D and the
AV offsets it recovers (joonson/syncnet_python's protocol, `avjax.eval.lse`).

Batches are clips: `{"video": [batch, frames, H, W, 3] uint8 face crops at 25 fps,
"audio": [batch, frames * 640] float32 at 16 kHz}`; the model draws its in-sync / shifted
pairs from them on the device (`avjax.models.syncnet`). `config.data.name="procedural"`:
`avjax.data.video.procedural.ProceduralClips` (talking faces whose mouth follows synthetic
syllables, made in memory in seconds); any other name: `avjax.data.video.av_data.AVData`
(the embedded AV corpus `synthetic`, or lrs3 / lrs2 / lrw / grid / dir from
`config.data.manual_dir`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avjax.data.video.procedural import ProceduralClips
from avjax.eval import lse
from avjax.models import syncnet as syncnet_lib
from avjax.tasks.base import Batch, LossContext, Metrics, Task

# --- task -------------------------------------------------------------------------------------


class SyncNetTask(Task):
    """The lip-sync expert trained with BCE on cosine similarity of 0.2 s AV windows."""

    name = "syncnet"

    def __init__(self, config, workdir):
        if config.data.name == "procedural":
            self.data = ProceduralClips.from_config(config, workdir)
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
        """Zeros of the expert's input shapes (`faces [B, S/2, S, 5 C]`, `mel [B, 80, 16]`):
        init reads only shapes, and the mel of the dummy batch computed inside the jitted init
        is constant-folded by XLA (10x the compile time of the mel itself)."""
        b, c = batch["video"].shape[0], batch["video"].shape[-1]
        s = int(self.config.model.face_size)
        faces = jnp.zeros((b, s // 2, s, syncnet_lib.WINDOW * c), jnp.float32)
        return {"faces": faces, "mel": jnp.zeros((b, syncnet_lib.N_MELS, syncnet_lib.MEL_STEPS))}

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
