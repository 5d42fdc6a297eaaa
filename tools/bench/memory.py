r"""Benchmark: MAB's train step in JAX (ours) vs the same model written in PyTorch, same run.

  python tools/bench/memory.py --json=memory.json          # configs/mab.py's default sizes
  python tools/bench/memory.py --batch=8 --steps=5         # quicker

One train step = forward of both branches (visual front, audio front, associative bridge,
fusion, 2-layer BiGRU, classifier), the paper's loss (CE test branch + CE train branch + KL +
reconstruction), backward, Adam update, batch-norm statistics update; on random inputs of
the default config's shapes (`video [B, 29, 32, 32, 1]` uint8, `mel [B, 116, 80]`). The
PyTorch side (`TorchMAB` below) has the same layers and sizes (its own initialisation; the
GRU and convolutions are PyTorch's own kernels), `torch.set_num_threads` = JAX's CPU
threads. Each side runs in its own subprocess so its peak resident memory (ru_maxrss) is its
own. Reported: steps/s (median of `--repeats` timed blocks of `--steps` after warm-up, first
step = compile for JAX) and peak RSS; rows to `--json`.

Measured 2026-11-30 on the shared 2-core machine (load average ~8), `--batch=16 --steps=3
--repeats=2 --threads=2`, configs/mab.py's default sizes: ours 0.55 steps/s, PyTorch 0.39
(ours 1.40x faster); peak RSS ours 907 MiB vs PyTorch 595 MiB (XLA compilation included);
first step (compile) 24.8 s vs 3.4 s. Noisy at that load: rerun on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402


def _config() -> object:
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("_mab_cfg", os.path.join(root, "configs/mab.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _inputs(args) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = args.frames
    return {
        "video": rng.integers(0, 256, (args.batch, t, args.size, args.size, 1), np.uint8),
        "mel": rng.normal(-5.6, 3.8, (args.batch, 4 * t, 80)).astype(np.float32),
        "label": rng.integers(0, args.classes, (args.batch,)).astype(np.int32),
        "length": np.full((args.batch,), t, np.int32),
    }


# --- ours -------------------------------------------------------------------------------------


def run_jax(args) -> dict[str, float]:
    import flax.linen as nn
    import jax
    import optax

    from avjax.models import mab as mab_lib
    from avjax.tasks.mab import build_mab

    model = build_mab(_config().model, args.classes)
    x = {k: jax.numpy.asarray(v) for k, v in _inputs(args).items()}
    variables = nn.unbox(
        jax.jit(lambda k: model.init(k, x["video"], x["length"], x["mel"]))(jax.random.key(0))
    )
    params, stats = variables["params"], variables["batch_stats"]
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, stats, opt_state, key):
        def loss_fn(p):
            out, new = model.apply(
                {"params": p, "batch_stats": stats},
                x["video"],
                x["length"],
                x["mel"],
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": key},
            )
            return mab_lib.mab_losses(out, x["label"], x["length"])["loss"], new["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    key = jax.random.key(1)
    t0 = time.perf_counter()
    params, stats, opt_state, loss = step(params, stats, opt_state, key)
    loss.block_until_ready()
    first = time.perf_counter() - t0

    def block():
        nonlocal params, stats, opt_state, loss
        t = time.perf_counter()
        for i in range(args.steps):
            params, stats, opt_state, loss = step(params, stats, opt_state, jax.random.key(i))
        loss.block_until_ready()
        return args.steps / (time.perf_counter() - t)

    return {"first_step_s": first, **_timed(block, args), "loss": float(loss)}


# --- PyTorch ----------------------------------------------------------------------------------


def _torch_modules():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1, self.a1 = nn.BatchNorm2d(cout), nn.PReLU()
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2, self.a2 = nn.BatchNorm2d(cout), nn.PReLU()
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            h = self.b2(self.c2(self.a1(self.b1(self.c1(x)))))
            return self.a2(h + (x if self.down is None else self.down(x)))

    class TorchMAB(nn.Module):
        """The same layers as `avjax.models.mab.MAB` (train step: both branches)."""

        def __init__(self, m, classes):
            super().__init__()
            w, s = list(m.widths), int(m.stem_features)
            self.stem = nn.Sequential(
                nn.Conv3d(1, s, (5, 7, 7), (1, 2, 2), (2, 3, 3), bias=False),
                nn.BatchNorm3d(s),
                nn.PReLU(),
                nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            )
            blocks, cin = [], s
            for i, (width, n) in enumerate(zip(w, m.blocks, strict=True)):
                for j in range(n):
                    blocks.append(Block(cin, width, 2 if i > 0 and j == 0 else 1))
                    cin = width
            self.trunk = nn.Sequential(*blocks)
            c1, c2 = m.audio_channels
            self.audio = nn.Sequential(
                nn.Conv2d(1, c1, 3, 2, 1, bias=False),
                nn.BatchNorm2d(c1),
                nn.PReLU(),
                nn.Conv2d(c1, c2, 3, 2, 1, bias=False),
                nn.BatchNorm2d(c2),
                nn.PReLU(),
                Block(c2, c2, 1),
            )
            d = w[-1]
            self.audio_proj = nn.Linear(20 * c2, d)
            self.keys = nn.Parameter(torch.randn(m.num_slots, d) * 0.5)
            self.values = nn.Parameter(torch.randn(m.num_slots, d) * 0.5)
            self.q_embd, self.v_embd = nn.Linear(d, d), nn.Linear(d, d)
            self.fusion = nn.Linear(2 * d, d)
            self.gru = nn.GRU(d, m.gru_hidden, m.gru_layers, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(2 * m.gru_hidden, classes)
            self.radius, self.drop_v, self.drop_f = m.radius, nn.Dropout(0.3), nn.Dropout(0.5)

        def forward(self, video, mel, label):
            import torch.nn.functional as F

            b, t = video.shape[:2]
            x = (video.float() / 255.0 - 0.4136) / 0.17
            x = self.stem(x.permute(0, 4, 1, 2, 3))  # [B, C, T, H, W]
            x = x.transpose(1, 2).reshape(b * t, *x.shape[1:2], *x.shape[3:])
            f_v = self.drop_v(self.trunk(x).mean((2, 3)).reshape(b, t, -1))
            mel = (mel - mel.mean(1, keepdim=True)) / (mel.std(1, keepdim=True) + 1e-5)
            a = self.audio(mel[:, None])  # [B, c2, T, 20]
            f_a = self.audio_proj(a.permute(0, 2, 3, 1).reshape(b, t, -1))
            cos = lambda q, k: F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T  # noqa: E731
            src = self.radius * cos(self.q_embd(f_v), self.keys)
            recalled = src.softmax(-1) @ self.values.detach()
            tgt = self.radius * cos(self.v_embd(f_a.detach()), self.values)
            recon = F.mse_loss(tgt.softmax(-1) @ self.values, f_a.detach())
            kl = F.kl_div(
                src.log_softmax(-1).flatten(0, 1),
                tgt.softmax(-1).detach().flatten(0, 1),
                reduction="batchmean",
            )
            loss = recon + kl
            for other in (recalled, f_a):
                h = self.drop_f(self.fusion(torch.cat([f_v, other], -1)))
                loss = loss + F.cross_entropy(self.fc(self.gru(h)[0].mean(1)), label)
            return loss

    return TorchMAB


def run_torch(args) -> dict[str, float]:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = _torch_modules()(_config().model, args.classes)
    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = {k: torch.from_numpy(v.copy()) for k, v in _inputs(args).items()}
    label = x["label"].long()

    def one():
        opt.zero_grad(set_to_none=True)
        loss = model(x["video"], x["mel"], label)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    loss = one()
    first = time.perf_counter() - t0

    def block():
        nonlocal loss
        t = time.perf_counter()
        for _ in range(args.steps):
            loss = one()
        return args.steps / (time.perf_counter() - t)

    return {"first_step_s": first, **_timed(block, args), "loss": float(loss)}


def _timed(block, args) -> dict[str, float]:
    block()  # warm-up
    rates = [block() for _ in range(args.repeats)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB -> MiB
    return {"steps_per_s": statistics.median(rates), "peak_rss_mib": peak}


def _parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frames", type=int, default=29)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=125)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--side", choices=("both", "jax", "torch"), default="both")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def main() -> None:
    args = _parse_args()
    if args.side != "both":
        fn = run_jax if args.side == "jax" else run_torch
        print(json.dumps(fn(args)))
        return
    rows = {}
    for side in ("jax", "torch"):
        cmd = [sys.executable, os.path.abspath(__file__), f"--side={side}"]
        cmd += [f"--{k}={getattr(args, k)}" for k in ("batch", "frames", "size", "classes")]
        cmd += [f"--{k}={getattr(args, k)}" for k in ("steps", "repeats", "threads")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[side] = json.loads(out.strip().splitlines()[-1])
    print(f"MAB train step, batch {args.batch} x {args.frames} frames {args.size}^2, CPU")
    print(f"{'':8s}{'steps/s':>10s}{'peak RSS MiB':>14s}{'first step s':>14s}")
    for side, r in rows.items():
        name = "ours" if side == "jax" else "pytorch"
        print(
            f"{name:8s}{r['steps_per_s']:10.2f}{r['peak_rss_mib']:14.0f}{r['first_step_s']:14.1f}"
        )
    ratio = rows["jax"]["steps_per_s"] / rows["torch"]["steps_per_s"]
    print(f"speed ratio ours / pytorch: {ratio:.2f} (> 1: ours faster)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "speed_ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
