"""TTAID task: meta-auxiliary pretraining, meta-transfer and test-time adaptation.

`config.stage` picks the learning strategy of one run:
  pretrain       L1(clean) + aux_weight * auxiliary loss (mask held fixed): plain multi-task.
  meta_aux       stage 1: per task (one crop) one inner SGD step (lr `meta.inner_lr`) on
                 L1 + masked auxiliary loss over body and heads; outer loss L1 of the adapted
                 network + `meta.mask_tv` * mask smoothness. The mask network is trained
                 through the inner step (second order).
  meta_transfer  stage 2 (start: `config.init_from=<stage-1 workdir>`): per task
                 `meta.inner_steps` SGD steps on `meta.aux_weight` * auxiliary loss updating
                 the heads only; outer loss `meta.outer_weight` * L1.
Inner loops are `lax.scan`s of `jax.grad` inside the loss; the train loop's `jax.grad` of it
is the second-order meta-gradient (`meta.first_order=True` stops gradients through the inner
gradients). The meta-batch is the batch axis (sharded over `data`); each example is a task.

Test-time adaptation (`adaptation_fn`): copy of the weights, body frozen, `tta.steps` Adam
steps (lr `tta.lr`) on the auxiliary loss, then denoise: one jitted scan per image shape.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from avjax.data.image import benchmarks, noise
from avjax.data.image.ttaid_data import TTAIDData
from avjax.io import as_path, write_text_atomic
from avjax.models import ttaid as ttaid_lib
from avjax.tasks.base import Batch, LossContext, Metrics, Task
from avjax.train import checkpoint as ckpt_lib

STAGES = ("pretrain", "meta_aux", "meta_transfer")


def adapt(
    inner_loss: Callable[[Any], jax.Array],
    params: dict[str, Any],
    keys: tuple[str, ...],
    lr: float,
    steps: int,
    first_order: bool = False,
    unroll: bool = False,
) -> tuple[dict[str, Any], jax.Array]:
    """`steps` SGD steps of `inner_loss(params)` on `params[k]` for `k in keys` (the rest
    fixed), as a `lax.scan`; differentiable (second order unless `first_order`, which stops
    gradients through the inner gradients). `unroll` unrolls the scan (no while loop):
    compiles about twice as long; no faster at 32 x 32 crops, but with the task loop unrolled
    too a meta step on 2 x 128^2 crops took 5.8 CPU-s instead of 32 (see `adaptation_fn`).
    Returns the adapted params and the `[steps]` inner losses."""
    fast = {k: params[k] for k in keys}
    rest = {k: v for k, v in params.items() if k not in keys}

    def step(f, _):
        loss, g = jax.value_and_grad(lambda f_: inner_loss({**rest, **f_}))(f)
        if first_order:
            g = jax.lax.stop_gradient(g)
        return jax.tree.map(lambda p, d: p - lr * d, f, g), loss

    fast, losses = jax.lax.scan(step, fast, None, length=int(steps), unroll=bool(unroll))
    return {**rest, **fast}, losses


def meta_objective(
    model: nn.Module, params: Any, noisy: jax.Array, clean: jax.Array, stage: str, mc: Any
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The outer loss of one task (`noisy`, `clean`: `[1, h, w, 3]`) after its inner loop,
    and metrics (`l1` after adaptation, `inner_first` / `inner_last` inner losses, the
    mask's `mask_mean` / `mask_std`; `mc.aux_norm` picks the auxiliary loss's normalisation)."""
    apply = functools.partial(model.apply, method="denoise")
    mask = model.apply({"params": params}, noisy, method="mask")
    fo = bool(mc.first_order)
    unroll = bool(mc.get("unroll", False))
    norm = str(mc.get("aux_norm", "mean"))
    if stage == "meta_aux":

        def inner(p):
            out = apply({"params": p}, noisy)
            aux = ttaid_lib.aux_loss(noisy, out["recon"], mask, norm)
            return ttaid_lib.l1(out["clean"], clean) + aux

        keys = (ttaid_lib.BODY, *ttaid_lib.HEADS)
        fast, losses = adapt(inner, params, keys, float(mc.inner_lr), 1, fo, unroll)
        l1 = ttaid_lib.l1(apply({"params": fast}, noisy)["clean"], clean)
        outer = l1 + float(mc.mask_tv) * ttaid_lib.mask_smoothness(mask, norm)
    else:  # meta_transfer

        def inner(p):
            out = apply({"params": p}, noisy)
            return float(mc.aux_weight) * ttaid_lib.aux_loss(noisy, out["recon"], mask, norm)

        fast, losses = adapt(
            inner, params, ttaid_lib.HEADS, float(mc.inner_lr), int(mc.inner_steps), fo, unroll
        )
        l1 = ttaid_lib.l1(apply({"params": fast}, noisy)["clean"], clean)
        outer = float(mc.outer_weight) * l1
    stats = {"mask_mean": jnp.mean(mask), "mask_std": jnp.std(mask)}
    return outer, {"l1": l1, "inner_first": losses[0], "inner_last": losses[-1], **stats}


def adaptation_fn(model: nn.Module, tc: Any, aux_norm: str = "mean") -> Callable:
    """A jitted `(params, noisy [1, h, w, 3]) -> (plain, adapted [1, h, w, 3], aux losses
    [steps + 1], mask mean)`: denoised without adaptation, and after `tc.steps` optimizer
    steps (`tc.optimizer`: adam | sgd, lr `tc.lr`) on the masked auxiliary loss (`aux_norm`)
    over the heads only (the body and mask network frozen). Compiled once per image shape.
    The steps' scan is unrolled unless `tc.unroll` is False: in a while loop XLA:CPU ran them
    ~13x slower (256 x 256, 16 features: 6 CPU-s per step, unrolled 0.4); the gradient
    convolutions of a while body miss the fast path (cf. jax-ml/jax#12868)."""
    opt = optax.adam(float(tc.lr)) if str(tc.optimizer) == "adam" else optax.sgd(float(tc.lr))

    def run(params, noisy):
        mask = model.apply({"params": params}, noisy, method="mask")
        heads = {k: params[k] for k in ttaid_lib.HEADS}

        def loss_fn(h):
            out = model.apply({"params": {**params, **h}}, noisy, method="denoise")
            return ttaid_lib.aux_loss(noisy, out["recon"], mask, aux_norm)

        def step(carry, _):
            h, s = carry
            loss, g = jax.value_and_grad(loss_fn)(h)
            upd, s = opt.update(g, s, h)
            return (optax.apply_updates(h, upd), s), loss

        plain = model.apply({"params": params}, noisy, method="denoise")["clean"]
        (heads_new, _), losses = jax.lax.scan(
            step, (heads, opt.init(heads)), None, int(tc.steps), unroll=bool(tc.get("unroll", True))
        )
        adapted = model.apply({"params": {**params, **heads_new}}, noisy, method="denoise")
        losses = jnp.concatenate([losses, loss_fn(heads_new)[None]])
        return plain, adapted["clean"], losses, jnp.mean(mask)

    return jax.jit(run)


def tile_positions(size: int, tile: int, overlap: int) -> list[int]:
    """Tile starts covering `[0, size)` with tiles of `tile` overlapping by >= `overlap`."""
    if size <= tile:
        return [0]
    stride = max(tile - overlap, 1)
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def denoise_tiled(fn: Callable, params: Any, noisy: np.ndarray, tc: Any) -> dict[str, Any]:
    """Runs `adaptation_fn` over `noisy [h, w, 3]` in overlapping `tc.tile` tiles (each
    adapted on its own; averaged where they overlap); images are reflect-padded to a
    multiple of 4. Returns `plain`, `adapted` `[h, w, 3]`, `aux_losses [tiles, steps+1]` and
    the mean of the mask over the tiles, `mask_mean`."""
    h, w = noisy.shape[:2]
    tile = int(tc.tile)
    th, tw = min(tile, -(-h // 4) * 4), min(tile, -(-w // 4) * 4)
    ph, pw = max(th, h), max(tw, w)
    padded = np.pad(noisy, ((0, ph - h), (0, pw - w), (0, 0)), mode="reflect")
    acc = np.zeros((2, ph, pw, 3), np.float32)
    cnt = np.zeros((ph, pw, 1), np.float32)
    losses, masks = [], []
    for y in tile_positions(ph, th, int(tc.overlap)):
        for x in tile_positions(pw, tw, int(tc.overlap)):
            crop = padded[None, y : y + th, x : x + tw]
            plain, adapted, loss, mask_mean = fn(params, jnp.asarray(crop))
            acc[0, y : y + th, x : x + tw] += np.asarray(plain[0])
            acc[1, y : y + th, x : x + tw] += np.asarray(adapted[0])
            cnt[y : y + th, x : x + tw] += 1.0
            losses.append(np.asarray(loss))
            masks.append(float(mask_mean))
    out = acc / cnt[None]
    return {
        "plain": out[0, :h, :w],
        "adapted": out[1, :h, :w],
        "aux_losses": np.stack(losses),
        "mask_mean": float(np.mean(masks)),
    }


class TTAIDTask(Task):
    """Test-time adaptive real-image denoising (TTAID) with a configurable learning stage."""

    name = "ttaid"

    def __init__(self, config, workdir):
        if str(config.stage) not in STAGES:
            raise ValueError(f"config.stage={config.stage!r} is not one of {STAGES}")
        self.data = TTAIDData.from_config(config, workdir)
        self._init_params: dict[str, Any] | None = None
        super().__init__(config, workdir)

    def prepare(self, read_only: bool | None = None) -> dict[str, Any]:
        """The data, and in training the params of `config.init_from` (read here, outside
        any trace, for `init_variables`)."""
        facts = self.data.prepare(read_only)
        src = str(self.config.get("init_from", "") or "")
        if src and not self.read_only and self._init_params is None:
            self._init_params = ckpt_lib.newest_params(src, "init_from")[0]
        return facts

    def build_model(self) -> nn.Module:
        m = self.config.model
        return ttaid_lib.TTAIDNet(
            int(m.features),
            int(m.scale_step),
            int(m.body_blocks),
            int(m.head_blocks),
            int(m.mask_blocks),
        )

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        return {"noisy": batch["noisy"]}

    def init_variables(self, model, rng, batch):
        """Fresh variables, or (`config.init_from`, a workdir) the params of its newest
        checkpoint (stage 2 starts from stage 1), in the fresh tree's boxes."""
        variables = dict(super().init_variables(model, rng, batch))
        src = str(self.config.get("init_from", "") or "")
        loaded = self._init_params
        if not src or loaded is None:  # (sample / eval restore their own checkpoint)
            return variables
        fresh = variables["params"]
        boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
        want = jax.tree.structure(nn.meta.unbox(fresh))
        if jax.tree.structure(loaded) != want:
            raise ValueError(f"config.init_from={src}: its params do not fit this model")
        leaves = iter(jax.tree.leaves(loaded))
        variables["params"] = jax.tree.map(
            lambda b: (
                b.replace_boxed(jnp.asarray(next(leaves)))
                if boxed(b)
                else jnp.asarray(next(leaves))
            ),
            fresh,
            is_leaf=boxed,
        )
        return variables

    def apply_loss(
        self, model: nn.Module, params: Any, batch: Batch, ctx: LossContext
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        """Summed per-task loss of the stage (eval: the L1 of the unadapted denoiser)."""
        noisy, clean = batch["noisy"], batch["clean"]
        b = noisy.shape[0]
        stage = str(self.config.stage)
        if not ctx.train or stage == "pretrain":
            out = model.apply({"params": params}, noisy)
            l1 = ttaid_lib.l1(out["clean"], clean)
            mask = jax.lax.stop_gradient(out["mask"])
            aux = ttaid_lib.aux_loss(noisy, out["recon"], mask, self._aux_norm)
            loss = l1 + float(self.config.meta.aux_weight) * aux if ctx.train else l1
            metrics = {"weight": jnp.float32(b), "l1": l1 * b, "aux": aux * b}
            metrics |= {"mask_mean": jnp.mean(mask) * b, "mask_std": jnp.std(mask) * b}
            return loss * b, metrics, dict(ctx.model_state)
        # One task (image) at a time: `vmap` would batch each task's adapted kernels into a
        # grouped convolution, which XLA's SPMD partitioner rejects on a sharded meta-batch.
        # `meta.unroll` unrolls this loop too (no while loop: faster at large crops on CPU).
        outer, m = jax.lax.scan(
            lambda _, nc: (
                None,
                meta_objective(model, params, nc[0][None], nc[1][None], stage, self.config.meta),
            ),
            None,
            (noisy, clean),
            unroll=bool(self.config.meta.get("unroll", False)),
        )[1]
        metrics = {"weight": jnp.float32(b), **{k: jnp.sum(v) for k, v in m.items()}}
        return jnp.sum(outer), metrics, dict(ctx.model_state)

    @property
    def _aux_norm(self) -> str:
        return str(self.config.meta.get("aux_norm", "mean"))

    def compatibility(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "model": self.config.model.to_dict(),
            **self.data.compatibility(),
            "seed": int(self.config.seed),
        }

    # --- inference --------------------------------------------------------------------------
    def sample(self, model, params, step: int) -> dict[str, Any]:
        """Denoises `config.sample.image` (a PNG or a folder of them; "" = the held-out
        photographs with camera noise) with and without test-time adaptation; writes
        `<name>_denoised.png` and `<name>_side.png` (noisy | no adaptation | adapted | clean
        when known) under `<workdir>/samples/step_<N>/`."""
        sc = self.config.sample
        src = str(sc.image or "")
        if src:
            paths = (
                sorted(os.path.join(src, f) for f in os.listdir(src) if f.lower().endswith(".png"))
                if os.path.isdir(src)
                else [src]
            )
            if not paths:
                raise FileNotFoundError(f"config.sample.image={src}: no .png files")
            items = [
                (os.path.splitext(os.path.basename(p))[0], benchmarks.read_image(p), None)
                for p in paths
            ]
            items = [(n, a.astype(np.float32) / 255.0, c) for n, a, c in items]
        else:
            items = self.data.heldout("camera", int(self.config.eval.size))
        out_dir = as_path(self.workdir) / "samples" / f"step_{step}"
        out_dir.mkdir(parents=True, exist_ok=True)
        fn = adaptation_fn(model, self.config.tta, self._aux_norm)
        params = jax.device_get(params)
        summary: dict[str, Any] = {"images": len(items), "out_dir": str(out_dir)}
        for name, noisy, clean in items:
            res = denoise_tiled(fn, params, noisy, self.config.tta)
            panels = [noisy, res["plain"], res["adapted"]] + ([clean] if clean is not None else [])
            _write_png(out_dir / f"{name}_denoised.png", res["adapted"])
            _write_png(out_dir / f"{name}_side.png", np.concatenate(panels, axis=1))
            if clean is not None:
                summary[f"{name}_psnr_plain"] = _psnr(res["plain"], clean)
                summary[f"{name}_psnr_adapted"] = _psnr(res["adapted"], clean)
        return summary

    def evaluate(self, model, params, step, eval_loss) -> dict[str, Any]:
        """PSNR / SSIM before and after test-time adaptation per noise family, for this
        workdir and every `config.eval.compare` entry (`label=workdir,...`): the ablation
        report `<workdir>/eval/step_<N>/ttaid_report.{json,md}`."""
        runs = {str(self.config.stage): jax.device_get(params)}
        for entry in [e for e in str(self.config.eval.compare).split(",") if e.strip()]:
            label, _, path = entry.partition("=")
            runs[label.strip()] = ckpt_lib.newest_params(path.strip(), "eval.compare")[0]
        fn = adaptation_fn(model, self.config.tta, self._aux_norm)
        ec = self.config.eval
        families = [f.strip() for f in str(ec.families).split(",") if f.strip()]
        rows = []
        for fam in families:
            items = self.data.heldout(
                fam, int(ec.size), int(ec.get("grid", 1)), int(ec.get("draws", 1))
            )
            for label, p in runs.items():
                rows.append(_score(fn, p, items, self.config.tta, label, fam))
        out_dir = as_path(self.workdir) / "eval" / f"step_{step}"
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "ttaid_report.json", json.dumps(rows, indent=2))
        write_text_atomic(out_dir / "ttaid_report.md", _markdown(rows, step))
        summary: dict[str, Any] = {"report": str(out_dir / "ttaid_report.md")}
        for r in rows:
            if r["run"] == str(self.config.stage):
                for k in ("psnr_plain", "psnr_adapted", "ssim_plain", "ssim_adapted"):
                    summary[f"{r['noise']}/{k}"] = r[k]
        return summary


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    from avjax.eval.av_metrics import psnr

    return float(psnr(np.clip(a, 0, 1), np.clip(b, 0, 1), max_val=1.0))


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    from avjax.eval.av_metrics import ssim

    return float(ssim(np.clip(a, 0, 1), np.clip(b, 0, 1), max_val=1.0))


def _se(x: np.ndarray) -> float:
    """Standard error of the mean of `x [n]` (nan for n < 2)."""
    return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def _score(fn, params, items, tc, label: str, fam: str) -> dict[str, Any]:
    """Mean PSNR / SSIM of noisy, unadapted and adapted outputs over `items`, the mean TTA
    PSNR gain with its standard error over the items (`psnr_gain`, `psnr_gain_se`), the
    mean gain per source photograph (`gain_by_image`: item names `<image>[_c<k>][_d<j>]`)
    and the standard error over those photograph means (`psnr_gain_se_images`)."""
    keys = ("noisy", "plain", "adapted")
    per: dict[str, list[float]] = {f"{m}_{k}": [] for m in ("psnr", "ssim") for k in keys}
    masks, by_image = [], {}
    for name, noisy, clean in items:
        res = denoise_tiled(fn, params, noisy, tc)
        for k, img in zip(keys, (noisy, res["plain"], res["adapted"]), strict=True):
            per[f"psnr_{k}"].append(_psnr(img, clean))
            per[f"ssim_{k}"].append(_ssim(img, clean))
        masks.append(res["mask_mean"])
        gain = per["psnr_adapted"][-1] - per["psnr_plain"][-1]
        by_image.setdefault(re.sub(r"(_c\d+)?(_d\d+)?$", "", name), []).append(gain)
    gains = np.asarray(per["psnr_adapted"]) - np.asarray(per["psnr_plain"])
    photo = np.asarray([np.mean(v) for v in by_image.values()])
    return {
        "run": label,
        "noise": fam,
        "images": len(items),
        **{k: float(np.mean(v)) for k, v in per.items()},
        "mask_mean": float(np.mean(masks)),
        "psnr_gain": float(np.mean(gains)),
        "psnr_gain_se": _se(gains),
        "psnr_gain_se_images": _se(photo),
        "gain_by_image": {k: float(np.mean(v)) for k, v in by_image.items()},
    }


def _markdown(rows: list[dict[str, Any]], step: int) -> str:
    lines = [
        f"# TTAID evaluation (step {step})",
        "",
        "PSNR (dB) / SSIM on held-out images: noisy input, denoised without test-time "
        "adaptation, denoised after it.",
        "",
        "TTA gain: mean over the items (crops x noise draws); s.e.: its standard error over the "
        "items / over the photographs' mean gains.",
        "",
        "| run | noise | items | noisy | no TTA | TTA | TTA gain (dB) | s.e. items / photos |"
        " mask mean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cell = lambda k, r=r: f"{r['psnr_' + k]:.2f} / {r['ssim_' + k]:.3f}"  # noqa: E731
        se = f"{r['psnr_gain_se']:.3f} / {r['psnr_gain_se_images']:.3f}"
        lines.append(
            f"| {r['run']} | {r['noise']} | {r['images']} | {cell('noisy')} | {cell('plain')} "
            f"| {cell('adapted')} | {r['psnr_gain']:+.3f} | {se} | {r['mask_mean']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _write_png(path: Any, img: np.ndarray) -> None:
    import io

    from PIL import Image

    from avjax.io import write_bytes_atomic

    buf = io.BytesIO()
    Image.fromarray(noise.to_uint8(img)).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
