"""DF-3DFace task: diffusion over 3D face mesh sequences conditioned on speech.

A composition: the data module `avjax.data.mesh.mesh_data.MeshData` (corpus, representation,
features, windows), the denoiser of `avjax.models.df3dface`, the diffusion core
`avjax.nn.diffusion` (schedule, x0 loss, DDIM sampling as one `lax.scan`), the metrics of
`avjax.eval.mesh_metrics` and the renderer of `avjax.data.mesh.render`.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from avjax.data.audio import load_audio
from avjax.data.mesh import render
from avjax.data.mesh.mesh_data import MeshData, audio_envelope
from avjax.eval import mesh_metrics
from avjax.io import as_path, write_text_atomic
from avjax.models import df3dface as model_lib
from avjax.nn import diffusion
from avjax.tasks.base import Batch, Metrics, Task


class DF3DFaceTask(Task):
    """Speech -> 3D face mesh sequences (identity, head pose and lips sampled jointly)."""

    name = "df3dface"

    def __init__(self, config, workdir):
        self.data = MeshData.from_config(config, workdir)
        super().__init__(config, workdir)
        dc = config.diffusion
        self.schedule = diffusion.make_schedule(dc.schedule, int(dc.num_train_timesteps))
        self._samplers: dict[tuple[int, float], Any] = {}

    # --- model ------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        m = self.config.model
        return model_lib.DF3DFace(
            model_lib.DF3DFaceConfig(
                dim=self.data.code_dim,
                feat_dim=self.data.feature_dim,
                width=int(m.width),
                num_layers=int(m.num_layers),
                num_heads=int(m.num_heads),
                mlp_width=int(m.mlp_width),
                sync_window=int(m.sync_window),
                use_audio=bool(m.use_audio),
                static_token=True,
                dtype=jnp.dtype(m.dtype),
            )
        )

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        b = batch["x"].shape[0]
        return {
            "x_t": pack(batch),
            "timesteps": jnp.zeros((b,), jnp.int32),
            "audio": batch["audio"],
            "audio_mask": batch["mask"],
            "frame_mask": batch["mask"],
        }

    def loss(self, model, params, batch, rng) -> tuple[jax.Array, Metrics]:
        """x0-prediction MSE per valid token (the static token and each valid frame; sum over
        tokens, mean over the code's own dims) plus the frames' velocity error; audio masked
        on random spans and dropped whole with `model.cond_drop_prob` (guidance)."""
        m, dc = self.config.model, self.config.diffusion
        x, mask = pack(batch), jnp.asarray(batch["mask"])
        r_noise, r_span, r_drop = jax.random.split(rng, 3)
        inp = diffusion.training_inputs(r_noise, x, self.schedule, dc.prediction_type)
        span = model_lib.random_span_mask(r_span, mask.shape, float(m.mask_prob), int(m.mask_span))
        keep = diffusion.condition_keep_mask(r_drop, x.shape[0], float(m.cond_drop_prob))
        audio_mask = mask * span * keep[:, None].astype(jnp.float32)
        out = model.apply({"params": params}, inp.x_t, inp.t, batch["audio"], audio_mask, mask)
        dims = self._dim_weights()  # [1 + 1, dim]: static row, motion rows
        sq = jnp.square(out - inp.target)
        err_static = jnp.sum(sq[:, 0] * dims[:1], axis=-1)
        err = jnp.sum(sq[:, 1:] * dims[None, 1:], axis=-1) * mask
        vel = jnp.square(jnp.diff(out[:, 1:], axis=1) - jnp.diff(inp.target[:, 1:], axis=1))
        vel = jnp.sum(vel * dims[None, 1:], axis=-1) * mask[:, 1:] * mask[:, :-1]
        loss_sum = jnp.sum(err) + jnp.sum(err_static) + float(m.velocity_weight) * jnp.sum(vel)
        return loss_sum, {
            "weight": jnp.sum(mask) + x.shape[0],
            "mse": jnp.sum(err) + jnp.sum(err_static),
        }

    def _dim_weights(self) -> jax.Array:
        """`[2, dim]`: 1 / (code width) on the static code's (row 0) and the motion code's
        (row 1) own dims, 0 on their zero padding."""
        declared = int(self.config.data.get("code_dim", 0) or 0)
        if declared and self.data._prepared is None:  # noqa: SLF001 (AOT: shapes only)
            widths = (declared, declared)
        else:
            widths = (self.data.repr.static_dim, self.data.repr.motion_dim)
        dim = self.data.code_dim
        return jnp.stack([(jnp.arange(dim) < w).astype(jnp.float32) / w for w in widths])

    def tokens_per_batch(self, batch: Batch) -> int:
        return int(np.sum(batch["mask"]))

    def compatibility(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "model": self.config.model.to_dict(),
            **self.data.compatibility(),
            "seed": int(self.config.seed),
        }

    # --- generation -------------------------------------------------------------------------
    def sampler(self, model: nn.Module, steps: int, guidance: float):
        """`(params, audio [N, T, F], audio_mask [N, T], rng) -> x0 [N, 1 + T, dim]` (row 0:
        the static code; `MeshRepr.decode` turns it into meshes): `steps`
        DDIM steps as one `lax.scan`, jitted once per (steps, guidance) and input shape; the
        timesteps are an argument, so other step values reuse the executable."""
        key = (steps, guidance)
        if key in self._samplers:
            return self._samplers[key]
        dc = self.config.diffusion
        timesteps = jnp.asarray(
            diffusion.inference_timesteps(int(dc.num_train_timesteps), steps, dc.spacing)
        )
        dim = self.data.repr.dim

        def denoise(params, x, tt, cond):
            audio, audio_mask = cond
            frames = jnp.ones(audio_mask.shape, jnp.float32)
            return model.apply({"params": params}, x, tt, audio, audio_mask, frames)

        @jax.jit
        def run(params, audio, audio_mask, rng, ts):
            cond = (audio, audio_mask)
            if guidance == 1.0:
                fn = functools.partial(denoise, params, cond=cond)
            else:
                null = (jnp.zeros_like(audio[:1]), jnp.zeros_like(audio_mask[:1]))
                fn = diffusion.guided_denoise_fn(
                    functools.partial(denoise, params), cond, null, guidance
                )
            return diffusion.sample(
                fn,
                (audio.shape[0], 1 + audio.shape[1], dim),
                rng,
                self.schedule,
                ts,
                method="ddim",
                prediction_type=dc.prediction_type,
                eta=float(dc.eta),
            )

        def call(params, audio, audio_mask, rng):
            return run(params, audio, audio_mask, rng, timesteps)

        call.jitted, call.timesteps = run, timesteps  # (tests: compile count, jaxpr)
        self._samplers[key] = call
        return call

    def generate(
        self, model, params, feats: np.ndarray, num: int, seed: int, audio_on: bool = True
    ) -> np.ndarray:
        """`num` mesh sequences `[num, T, V, 3]` for speech features `[T, F]`."""
        sc = self.config.sample
        run = self.sampler(model, int(sc.steps), float(sc.guidance))
        audio = jnp.broadcast_to(jnp.asarray(feats)[None], (num, *feats.shape))
        amask = jnp.full((num, feats.shape[0]), 1.0 if audio_on else 0.0)
        x = run(params, audio, amask, jax.random.PRNGKey(seed))
        return self.data.repr.decode(np.asarray(x))

    def sample(self, model, params, step: int) -> dict[str, Any]:
        """Meshes (`meshes.npy [N, T, V, 3]`, OBJ frames of sample 0 with `sample.obj`) and
        `grid.mp4` (the N samples rendered, with the audio) for `sample.audio` or the first
        held-out utterance, under `<workdir>/samples/step_<N>/<name>/`."""
        sc = self.config.sample
        fps = float(self.data.prepare()["fps"])
        if sc.audio:
            wav = load_audio(sc.audio)
            name = as_path(sc.audio).stem
        else:
            wav, name = self.data.heldout[0].audio, "heldout_0"
        feats = self.data.features_of(wav, fps)
        verts = self.generate(model, params, feats, int(sc.num_samples), int(sc.seed))
        out = as_path(self.workdir) / "samples" / f"step_{step}" / name
        out.mkdir(parents=True, exist_ok=True)
        with (out / "meshes.npy").open("wb") as f:
            np.save(f, verts.astype(np.float32))
        faces = self._faces(verts)
        summary: dict[str, Any] = {"meshes": str(out / "meshes.npy"), "shape": verts.shape}
        if faces is not None:
            render.write_grid_video(out / "grid.mp4", verts, faces, wav, fps, int(sc.size))
            summary["video"] = str(out / "grid.mp4")
            if sc.obj:
                summary["obj_frames"] = render.write_obj_frames(out / "obj", verts[0], faces)
        logging.info("DF-3DFace samples: %s", summary)
        return summary

    def _faces(self, verts: np.ndarray) -> np.ndarray | None:
        faces = self.data.repr.faces
        if faces is None:
            logging.warning("no triangles for this corpus' meshes: no video is rendered")
        return faces

    def evaluate(self, model, params, step, eval_loss) -> dict[str, Any]:
        """LVE / FDD / lip sync vs ground truth, baselines and diversity on held-out speech
        (`eval_report.json` and `.md` under `<workdir>/eval/step_<N>/`)."""
        return evaluate_heldout(self, model, params, step)


def pack(batch: Batch) -> jax.Array:
    """The model's array `[b, 1 + window, dim]`: the static code (`batch["static"] [b, dim]`)
    as row 0, then the motion codes (`batch["x"] [b, window, dim]`)."""
    x = jnp.asarray(batch["x"], jnp.float32)
    return jnp.concatenate([jnp.asarray(batch["static"], jnp.float32)[:, None], x], axis=1)


def _score(task: DF3DFaceTask, model, params, i: int) -> tuple[dict[str, float], dict]:
    """Metrics of held-out sequence i (first `eval.max_frames` frames): the model's samples,
    the same model with the audio masked out, and the mean-motion baseline (no motion)."""
    ec, rep = task.config.eval, task.data.repr
    reg = rep.regions
    seq = task.data.heldout[i]
    n = min(seq.num_frames, int(ec.max_frames))
    gt = seq.vertices[:n]
    feats = task.data.heldout_features(i)[:n]
    samples = task.generate(model, params, feats, int(ec.samples), seed=1000 + i)
    null = task.generate(model, params, feats, 1, seed=2000 + i, audio_on=False)[0]
    rigid = np.setdiff1d(np.arange(rep.mean.shape[0]), reg.lip)
    gt_m = mesh_metrics.motion(gt, rep.mean, rigid)
    moves = [mesh_metrics.motion(s, rep.mean, rigid) for s in samples]
    env = audio_envelope(seq.audio, n, seq.fps)
    opening = [mesh_metrics.mouth_opening(m, reg.upper_lip, reg.lower_lip) for m in moves]
    out = {
        "lve": float(np.mean([mesh_metrics.lve(m, gt_m, reg.lip) for m in moves])),
        "lve_mean_motion": mesh_metrics.lve(np.zeros_like(gt_m), gt_m, reg.lip),
        "lve_audio_masked": mesh_metrics.lve(
            mesh_metrics.motion(null, rep.mean, rigid), gt_m, reg.lip
        ),
        "fdd": float(np.mean([mesh_metrics.fdd(m, gt_m, reg.upper_face) for m in moves])),
        "lip_sync": float(np.mean([mesh_metrics.lip_sync(o, env) for o in opening])),
        "lip_sync_gt": mesh_metrics.lip_sync(
            mesh_metrics.mouth_opening(gt_m, reg.upper_lip, reg.lower_lip), env
        ),
    }
    if len(samples) > 1:
        out.update(_diversity(task, samples, gt_m, i))
    curves = {"envelope": env, "opening": opening[0], "gt_opening": None}
    curves["gt_opening"] = mesh_metrics.mouth_opening(gt_m, reg.upper_lip, reg.lower_lip)
    return out, curves


def _diversity(task: DF3DFaceTask, samples: np.ndarray, gt_m: np.ndarray, i: int) -> dict:
    """Diversity of `samples [N, T, V, 3]` for held-out sequence i (`DIVERSITY_NOTES`), with
    the region motion of its ground truth `gt_m [T, V, 3]` and, on the embedded corpus, the
    same spread of N ground-truth renditions of the speech by corpus speakers."""
    rep = task.data.repr
    reg = rep.regions
    rigid = np.setdiff1d(np.arange(rep.mean.shape[0]), reg.lip)
    div = mesh_metrics.diversity(samples, rep.mean, rigid, reg.lip, reg.upper_face)
    out = {f"diversity_{k}": v for k, v in div.items()}
    for region, idx in (("lip", reg.lip), ("upper", reg.upper_face)):
        size = float(np.linalg.norm(gt_m[:, idx], axis=-1).mean())
        out[f"motion_{region}_gt"] = size
        out[f"diversity_{region}_spread_rel"] = div[f"{region}_spread"] / max(size, 1e-12)
    floor = task.data.heldout_renditions(i, len(samples), seed=3000 + i)
    if floor is not None:
        fd = mesh_metrics.diversity(
            floor[:, : gt_m.shape[0]], rep.mean, rigid, reg.lip, reg.upper_face
        )
        out.update({f"corpus_{k}": v for k, v in fd.items()})
    return out


DIVERSITY_NOTES = """\
Diversity across the samples of one speech (motion = frames rigidly aligned on the non-lip
vertices, minus the sequence's mean shape; units of the mesh, ~10 cm):

- `diversity_identity`: mean pairwise distance of the samples' mean shapes (per vertex);
  `diversity_pose_deg`: mean pairwise angle between their head rotations, per frame.
- `diversity_<lip|upper>_spread` (absolute): std of the motion across samples, norm over
  xyz, mean over the region's vertices and frames.
- `diversity_<region>_spread_rel`: that spread / the region's own ground-truth motion
  (`motion_<region>_gt`, mean vertex norm), per sequence.
- `corpus_<...>` (embedded corpus only): the same measures on as many ground-truth
  renditions of the same speech (same phone timings) by distinct corpus speakers (their own
  identity, articulation gain and pose style; fresh blinks, brows and pose): the spread the
  data itself has for fixed speech. `diversity_<...>_vs_corpus` = model / corpus (ratio of
  the means): 1 matches the data's one-to-many; lips that agree as in the data have
  `diversity_lip_spread_vs_corpus` near 1 and not above `diversity_upper_spread_vs_corpus`.
"""


def _vs_corpus(summary: dict[str, float]) -> dict[str, float]:
    """`diversity_<k>_vs_corpus` = `diversity_<k>` / `corpus_<k>` of the means."""
    return {
        f"diversity_{k}_vs_corpus": summary[f"diversity_{k}"] / max(summary[f"corpus_{k}"], 1e-12)
        for k in ("identity", "pose_deg", "lip_spread", "upper_spread")
        if f"corpus_{k}" in summary
    }


def _plot(path, curves: dict, fps: float) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = np.arange(len(curves["envelope"])) / fps
    fig, ax = plt.subplots(figsize=(8, 3))
    for k in ("opening", "gt_opening"):
        o = curves[k]
        ax.plot(t, (o - o.mean()) / (o.std() + 1e-9), label=f"mouth {k} (z)")
    e = curves["envelope"]
    ax.plot(t, (e - e.mean()) / (e.std() + 1e-9), label="speech envelope (z)", alpha=0.6)
    ax.set_xlabel("s")
    ax.legend(loc="upper right", fontsize=7)
    with as_path(path).open("wb") as f:
        fig.savefig(f, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def _noaudio_lve(workdir: str) -> dict[str, float]:
    """`{"lve_noaudio_model": ...}`: the LVE of the newest eval report in `workdir` (a run of
    the `:noaudio` variant, scored on the same held-out sequences); {} when none is given."""
    if not workdir:
        return {}
    reports = sorted(
        as_path(workdir).glob("eval/step_*/eval_report.json"),
        key=lambda p: int(p.parent.name.removeprefix("step_")),
    )
    if not reports:
        raise FileNotFoundError(f"eval.noaudio_workdir={workdir}: no eval report; run its eval")
    got = json.loads(reports[-1].read_text())
    return {"lve_noaudio_model": float(got["lve"])}


def evaluate_heldout(task: DF3DFaceTask, model, params, step: int) -> dict[str, Any]:
    """Means over `eval.num_sequences` held-out sequences of `_score`; report + plot."""
    n = min(int(task.config.eval.num_sequences), len(task.data.heldout))
    rows, curves = [], None
    for i in range(n):
        row, c = _score(task, model, params, i)
        rows.append(row)
        curves = curves or c
    summary = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    summary.update(_vs_corpus(summary))
    summary["guidance"] = float(task.config.sample.guidance)
    summary.update(_noaudio_lve(str(task.config.eval.get("noaudio_workdir", ""))))
    summary["sequences"] = n
    out = as_path(task.workdir) / "eval" / f"step_{step}"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "eval_report.json", json.dumps(summary, indent=2))
    lines = [f"# DF-3DFace, step {step}: {n} held-out sequences", "", "| metric | value |"]
    lines += ["|---|---|"] + [f"| {k} | {v:.6g} |" for k, v in summary.items()]
    lines += ["", DIVERSITY_NOTES]
    write_text_atomic(out / "eval_report.md", "\n".join(lines))
    if _plot(out / "lip_sync.png", curves, task.data.heldout[0].fps):
        summary["plot"] = str(out / "lip_sync.png")
    summary["report"] = str(out / "eval_report.md")
    return summary
