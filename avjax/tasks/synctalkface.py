"""SyncTalkFace task: the audio-lip memory talking-face generator trained as a GAN.

Batches are clips of `avjax.data.video.av_data.AVData` (RGB face crops `video [B, T, S, S, 3]`
uint8 at 25 fps, `audio [B, T * 640]` at 16 kHz; the embedded AV corpus or a real one). On the
device, each clip gives one window of 5 frames at a random start, a reference window of the
same clip at least 5 frames away, the mel window of each frame (80 x 16, centred on it) and the
mel window of the 5-frame window (the sync expert's input).

Two parts, each with its own optimizer state (`Task.parts`, stepped in this order):
- `generator`: `l1 * (L1(recalled) + L1(real))` + `av_sync * BCE(expert(recalled), 1)` +
  `vv_sync * L1(lip(recalled), lip(ground truth))` + `gan * BCE(D(recalled), 1)` +
  `memory * (L_store + L_align)` (weights `config.loss`; the paper: 10, 0.2, 0.2, 0.2, 0.2).
  The audio-visual sync expert is Wav2Lip's expert trained by `configs/syncnet.py`, loaded
  FROZEN from `config.model.sync_expert_workdir` (outside the param tree, never trained
  here); the visual-visual sync loss uses the generator's own lip encoder with its params
  stopped (the paper's "copy refreshed each step"). `config.loss.sync=False` drops both sync
  losses (the ablation); an empty `sync_expert_workdir` drops the audio-visual one (logged).
- `discriminator`: `BCE(D(real), 1) + BCE(D(stopgrad(recalled)), 0)` on lower face halves.

`--mode=eval` (`evaluate`): held-out speakers' clips regenerated frame by frame from their
own audio (the test-time path: memory recall, no lip input), PSNR / SSIM / LMD against the
real frames, LSE-C / LSE-D of the generated and of the real clips (the sync expert's
embeddings, `avjax.eval.lse`), and a contact sheet. `--mode=sample` (`sample`): a face video
(MP4) or image (PNG) driven by a WAV -> a lip-synced MP4 with the audio and a side-by-side.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from avjax.data.video.av_data import AVData
from avjax.models import syncnet as syncnet_lib
from avjax.models import synctalkface as stf
from avjax.tasks.base import Batch, LossContext, Metrics, Task
from avjax.train import checkpoint as ckpt_lib

T = stf.WINDOW
PAD_BEFORE, PAD_AFTER = 2, 3  # frames of silence around the audio: every frame has a window


def padded_mel(audio: jax.Array) -> jax.Array:
    """`[batch, frames * 640]` -> Wav2Lip mel `[batch, steps, 80]` of the audio padded with 2
    frames of silence before and 3 after, so that frame `f`'s centred window (audio frames
    `f-2 .. f+2`) starts at mel step `mel_start(f)`."""
    pad = ((0, 0), (PAD_BEFORE * 640, PAD_AFTER * 640))
    return syncnet_lib.wav2lip_mel(jnp.pad(audio, pad))


def frame_mels(mel: jax.Array, starts: jax.Array) -> jax.Array:
    """`padded_mel [batch, steps, 80]`, window starts `[batch]` -> `[batch, 5, 80, 16]`: the
    centred mel window of each of the frames `start .. start+4`."""
    return jnp.stack([syncnet_lib.mel_windows(mel, starts + k) for k in range(T)], axis=1)


def window_mel(mel: jax.Array, starts: jax.Array) -> jax.Array:
    """The 0.2 s mel window aligned with frames `start .. start+4` (the expert's): `[batch,
    80, 16]` (padded frame `start + 2`)."""
    return syncnet_lib.mel_windows(mel, starts + PAD_BEFORE)


def to_unit(video: jax.Array) -> jax.Array:
    """uint8 `[..., 3]` -> float32 in [-1, 1]."""
    return video.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(frames: jax.Array | np.ndarray) -> np.ndarray:
    """[-1, 1] -> uint8."""
    return np.clip(np.round((np.asarray(frames) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _slice(video: jax.Array, starts: jax.Array) -> jax.Array:
    return jax.vmap(lambda v, s: jax.lax.dynamic_slice_in_dim(v, s, T, axis=0))(video, starts)


def sample_windows(rng: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Random training windows of a clip batch (see the module docstring): `faces` and
    `reference` `[B, 5, S, S, 3]` in [-1, 1], `mel [B, 5, 80, 16]`, `sync_mel [B, 80, 16]`."""
    video = jnp.asarray(batch["video"])
    b, n = video.shape[:2]
    length = jnp.asarray(batch.get("length", np.full((b,), n)), jnp.int32)
    last = jnp.maximum(length - T, 0)  # the last window start inside the valid frames
    k_v, k_r = jax.random.split(rng)
    v = jnp.floor(jax.random.uniform(k_v, (b,)) * (last + 1)).astype(jnp.int32)
    r = jnp.floor(jax.random.uniform(k_r, (b,)) * (last + 1)).astype(jnp.int32)
    # The reference: uniform over the starts >= 5 frames from `v` (any start if none is).
    left, right = jnp.maximum(v - T + 1, 0), jnp.maximum(last - v - T + 1, 0)
    u = jnp.floor(jax.random.uniform(k_r, (b,)) * (left + right)).astype(jnp.int32)
    r = jnp.where(left + right > 0, jnp.where(u < left, u, v + T + u - left), r)
    mel = padded_mel(jnp.asarray(batch["audio"]))
    return {
        "faces": to_unit(_slice(video, v)),
        "reference": to_unit(_slice(video, r)),
        "mel": frame_mels(mel, v),
        "sync_mel": window_mel(mel, v),
    }


class SyncTalkFaceTask(Task):
    """Audio-lip memory talking faces (`generator` and `discriminator` parts)."""

    name = "synctalkface"
    parts = ("generator", "discriminator")

    def __init__(self, config, workdir):
        self.data = AVData.from_config(config, workdir)
        super().__init__(config, workdir)
        self._expert: tuple[nn.Module, Any, int] | None = None
        self.expert()  # loaded here, never inside a traced loss
        if bool(config.loss.sync) and not str(config.model.sync_expert_workdir):
            logging.warning(
                "SyncTalkFace: model.sync_expert_workdir is empty: NO audio-visual sync loss "
                "is trained (only the visual-visual one); train configs/syncnet.py first"
            )

    # --- model ------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return stf.build(self.config.model)

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        """Zeros of the model's input shapes (`faces`, `reference [B, 5, S, S, C]`, `mel [B, 5,
        80, 16]`): init reads only shapes, and computing the mel of the dummy batch inside the
        jitted init made XLA constant-fold the STFT (10x the compile time of the mel itself)."""
        b, _, h, w, c = batch["video"].shape
        faces = jnp.zeros((b, T, h, w, c), jnp.float32)
        mel = jnp.zeros((b, T, 80, syncnet_lib.MEL_STEPS), jnp.float32)
        return {"faces": faces, "reference": faces, "mel": mel}

    def init_variables(self, model: nn.Module, rng: jax.Array, batch: Batch) -> Any:
        return model.init(rng, **self.model_inputs(batch), train=True)  # the lip branch too

    def expert(self) -> tuple[nn.Module, Any, int] | None:
        """`(expert module, frozen params, face size)` from `model.sync_expert_workdir`, or
        None when the audio-visual sync loss is off (`loss.sync=False` or no workdir)."""
        path = str(self.config.model.sync_expert_workdir)
        if not path:
            return None
        if self._expert is None:
            params, saved = ckpt_lib.newest_params(path, "model.sync_expert_workdir")
            if saved is None or "model" not in saved:
                raise ValueError(f"{path}: no saved config with the sync expert's model fields")
            cfg = ml_collections.ConfigDict(saved["model"])
            self._expert = (syncnet_lib.sync_expert(cfg), params, int(cfg.face_size))
            logging.info("SyncTalkFace: frozen sync expert from %s", path)
        return self._expert

    def _av_sync(self, frames: jax.Array, sync_mel: jax.Array) -> jax.Array:
        """Mean BCE of the frozen expert's P(sync) of generated windows `[B, 5, S, S, 3]`."""
        expert, params, face_size = self.expert()
        video = (frames + 1.0) * 127.5  # face_windows scales by 1/255
        faces = syncnet_lib.face_windows(video, jnp.zeros((frames.shape[0],), jnp.int32), face_size)
        logit, _, _ = expert.apply({"params": params}, faces, sync_mel)
        return jnp.mean(syncnet_lib.sync_loss(logit, jnp.ones_like(logit))[0])

    # --- losses -----------------------------------------------------------------------------
    def _generator_losses(self, model, params, w) -> dict[str, jax.Array]:
        lc = self.config.loss
        out = model.apply(
            {"params": params}, w["faces"], w["reference"], w["mel"], True, method="generate"
        )
        gt, fake = w["faces"], out.recalled_frames
        losses = {
            "l1_recalled": stf.l1(fake, gt),
            "l1_real": stf.l1(out.real_frames, gt),
            **stf.memory_losses(out.memory),
            "gan": stf.generator_gan_loss(
                model.apply({"params": params}, fake, method="discriminate")
            ),
        }
        total = float(lc.l1) * (losses["l1_recalled"] + losses["l1_real"])
        total += float(lc.memory) * (losses["store"] + losses["align"])
        total += float(lc.gan) * losses["gan"]
        if bool(lc.sync):
            frozen = jax.lax.stop_gradient(params)
            lip_fake = model.apply({"params": frozen}, fake, method="lip_features")
            losses["vv_sync"] = stf.l1(lip_fake, jax.lax.stop_gradient(out.lip))
            total += float(lc.vv_sync) * losses["vv_sync"]
            if self.expert() is not None:
                losses["av_sync"] = self._av_sync(fake, w["sync_mel"])
                total += float(lc.av_sync) * losses["av_sync"]
        losses["total"] = total
        return losses

    def _discriminator_losses(self, model, params, w) -> dict[str, jax.Array]:
        out = model.apply(
            {"params": jax.lax.stop_gradient(params)},
            w["faces"],
            w["reference"],
            w["mel"],
            False,
            method="generate",
        )
        real = model.apply({"params": params}, w["faces"], method="discriminate")
        fake = model.apply(
            {"params": params}, jax.lax.stop_gradient(out.recalled_frames), method="discriminate"
        )
        real_acc = jnp.mean((real > 0).astype(jnp.float32))
        fake_acc = jnp.mean((fake < 0).astype(jnp.float32))
        return {"total": stf.gan_losses(real, fake), "real_acc": real_acc, "fake_acc": fake_acc}

    def apply_loss(
        self, model: nn.Module, params: Any, batch: Batch, ctx: LossContext
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        """Per part (`ctx.part`); eval (`part=None`) reports the generator's losses."""
        w = sample_windows(ctx.rng, batch)
        b = jnp.asarray(w["faces"].shape[0], jnp.float32)
        if ctx.part == "discriminator":
            losses = self._discriminator_losses(model, params, w)
        else:
            losses = self._generator_losses(model, params, w)
        metrics = {k: v * b for k, v in losses.items() if k != "total"}
        metrics["weight"] = b
        return losses["total"] * b, metrics, dict(ctx.model_state)

    def tokens_per_batch(self, batch: Batch) -> int:
        return int(batch["video"].shape[0]) * T

    def compatibility(self) -> dict[str, Any]:
        """The model fields a checkpoint binds, less `sync_expert_workdir`: the frozen expert
        is no part of the generator, so a run trained without it (`:nosync`) or with another
        one is still evaluated (LSE) with whichever expert `--mode=eval` names."""
        model = {k: v for k, v in self.config.model.to_dict().items() if k != "sync_expert_workdir"}
        return {"task": self.name, "model": model}

    # --- inference --------------------------------------------------------------------------
    def generate_clip(
        self,
        model: nn.Module,
        params: Any,
        video: np.ndarray,
        audio: np.ndarray,
        reference: np.ndarray | None = None,
    ) -> np.ndarray:
        """Regenerates every frame of `video [N, S, S, 3]` uint8 from `audio [N * 640]` (the
        test-time path: upper halves + reference + memory recall) -> `[N, S, S, 3]` uint8.
        `reference` defaults to the video itself (Wav2Lip's inference)."""
        n = video.shape[0]
        if n < T:
            raise ValueError(f"a clip of {n} frames: needs at least {T}")
        ref = video if reference is None else reference
        starts = np.array(sorted(set(range(0, n - T + 1, T)) | {n - T}), np.int32)
        gen = _generate_fn(model)(self.variables(params), video, ref, audio, starts)
        out = np.zeros_like(video)
        for i, s in enumerate(starts):
            out[s : s + T] = to_uint8(gen[i])
        return out

    def evaluate(self, model, params, step, eval_loss) -> dict[str, Any]:
        """`evaluate_heldout` (the `task` evaluator; options in `config.stf_eval`)."""
        return evaluate_heldout(self, model, params, step)

    def sample(self, model: nn.Module, params: Any, step: int) -> dict[str, Any]:
        """`lip_sync_video` with `config.sample.audio` and `config.sample.video`."""
        return lip_sync_video(self, model, params, step)


@functools.cache
def _generate_fn(model: nn.Module):
    @jax.jit
    def run(variables, video, ref, audio, starts):
        mel = padded_mel(jnp.asarray(audio)[None])
        b = starts.shape[0]
        mel = jnp.broadcast_to(mel, (b,) + mel.shape[1:])
        faces = _slice(jnp.broadcast_to(to_unit(video)[None], (b,) + video.shape), starts)
        refs = _slice(jnp.broadcast_to(to_unit(ref)[None], (b,) + ref.shape), starts)
        out = model.apply(variables, faces, refs, frame_mels(mel, starts), False, method="generate")
        return out.recalled_frames

    return run


# --- evaluation and sampling ------------------------------------------------------------------


def heldout_clips(task: Task) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """`(video [T, S, S, 3] uint8, audio [T * 640], valid frames)` of each held-out clip
    (the data module's fixed held-out batches: held-out speakers)."""
    clips = []
    for batch in task.eval_batches(jax.process_index(), jax.process_count()):
        n_all = batch["video"].shape[1]
        lengths = batch.get("length", np.full(len(batch["video"]), n_all))
        for video, audio, n in zip(batch["video"], batch["audio"], lengths, strict=True):
            if int(n) > 6:  # at least two LSE windows
                clips.append((np.asarray(video), np.asarray(audio), int(n)))
    return clips


def _lmd(real: list[np.ndarray], fake: list[np.ndarray]) -> dict[str, Any]:
    """Mouth landmark distance (dlib 68 points, pixels) over frames with a face in both."""
    from avjax.data.video import crops
    from avjax.eval import av_metrics

    try:
        detect = crops.LandmarkDetector()
    except (ImportError, FileNotFoundError) as e:
        return {"lmd_skipped": f"no landmark detector ({e})"}
    dists, missed = [], 0
    for r_clip, f_clip in zip(real, fake, strict=True):
        for r, f in zip(r_clip, f_clip, strict=True):
            a, b = detect(r), detect(f)
            if a is None or b is None:
                missed += 1
                continue
            dists.append(float(av_metrics.landmark_distance(b, a)))
    out: dict[str, Any] = {"lmd_frames": len(dists), "lmd_missed_frames": missed}
    if dists:
        out["lmd"] = float(np.mean(dists))
    return out


def _lse(task: Task, clips: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    from avjax.eval import lse
    from avjax.tasks.syncnet import expert_lse

    expert, params, face_size = task.expert()
    return lse.mean_scores([expert_lse(expert, params, v, a, face_size) for v, a in clips])


def evaluate_heldout(task: SyncTalkFaceTask, model, params, step: int) -> dict[str, Any]:
    """PSNR / SSIM / LMD of regenerated held-out clips against the real ones, LSE-C / LSE-D of
    generated and real clips (with the frozen expert; skipped without one), and a contact
    sheet `eval/contact_<step>.png` (real above generated). Options: `config.stf_eval.clips`
    (how many held-out clips), `.lmd` (dlib landmarks, slow)."""
    from avjax.data.video import io as vio
    from avjax.eval import av_metrics

    opts = task.config.get("stf_eval", {})
    real, fake, audios = [], [], []
    for video, audio, n in heldout_clips(task)[: int(opts.get("clips", 8))]:
        ref = video.copy()
        ref[:n] = np.roll(video[:n], n // 2, axis=0)  # another moment of the same clip
        gen = task.generate_clip(model, params, video, audio, ref)
        real.append(video[:n])
        fake.append(gen[:n])
        audios.append(audio[: n * 640])
    r, f = np.concatenate(real), np.concatenate(fake)
    out: dict[str, Any] = {
        "clips": len(real),
        "psnr": float(np.mean(av_metrics.psnr(f, r))),
        "ssim": float(np.mean(av_metrics.ssim(f, r))),
        "psnr_lower_half": float(np.mean(av_metrics.psnr(stf.lower_half(f), stf.lower_half(r)))),
    }
    if bool(opts.get("lmd", False)):
        out.update(_lmd(real, fake))
    if task.expert() is not None:
        out.update(
            {f"gen_{k}": v for k, v in _lse(task, list(zip(fake, audios, strict=True))).items()}
        )
        out.update(
            {f"real_{k}": v for k, v in _lse(task, list(zip(real, audios, strict=True))).items()}
        )
    else:
        out["lse_skipped"] = "no model.sync_expert_workdir"
    path = os.path.join(task.workdir, "eval", f"contact_{step}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    k = min(8, len(real[0]))
    vio.write_contact_sheet(path, np.concatenate([real[0][:k], fake[0][:k]]), num=None, cols=k)
    out["contact_sheet"] = path
    return out


def _driving_face(path: str, frames: int, size: int) -> np.ndarray:
    """`[frames, size, size, 3]` uint8 from a face MP4 (looped back and forth to `frames`)
    or a PNG / JPEG image (held still)."""
    from PIL import Image

    from avjax.data.video import io as vio

    if path.lower().endswith((".png", ".jpg", ".jpeg")):
        video = np.asarray(Image.open(path).convert("RGB"))[None]
    else:
        video = vio.read_video(path, require_audio=False)[0]
    if video.shape[1:3] != (size, size):
        video = np.stack([np.asarray(Image.fromarray(v).resize((size, size))) for v in video])
    order = np.concatenate([np.arange(len(video)), np.arange(len(video))[::-1]])
    return video[order[np.arange(frames) % len(order)]]


def lip_sync_video(task: SyncTalkFaceTask, model, params, step: int) -> dict[str, Any]:
    """`config.sample.video` (MP4 or image of a face) driven by `config.sample.audio` (WAV)
    -> `samples/synctalkface_<step>.mp4` (generated, with the audio) and
    `samples/synctalkface_<step>_side_by_side.mp4` (input | generated)."""
    from avjax.data.audio import load_audio
    from avjax.data.video import io as vio

    sc = task.config.sample
    if not sc.audio or not sc.video:
        raise ValueError(
            "--mode=sample needs --config.sample.audio=WAV --config.sample.video=MP4|PNG"
        )
    audio = load_audio(sc.audio)
    n = len(audio) // 640
    if sc.max_seconds:
        n = min(n, int(float(sc.max_seconds) * 25))
    audio = audio[: n * 640]
    size = min(int(task.config.data.crop_size), int(task.config.data.image_size))
    video = _driving_face(str(sc.video), n, size)
    gen = task.generate_clip(model, params, video, audio)
    folder = os.path.join(task.workdir, "samples")
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, f"synctalkface_{step}.mp4")
    side = os.path.join(folder, f"synctalkface_{step}_side_by_side.mp4")
    vio.write_video(out, gen, audio)
    vio.write_comparison_video(side, {"input": video, "SyncTalkFace": gen}, audio=audio)
    return {"video": out, "side_by_side": side, "frames": n, "seconds": n / 25.0}
