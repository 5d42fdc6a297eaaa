r"""Benchmark: TTAID in JAX (ours) vs the same network and loops written in PyTorch, same run.

  python tools/bench/ttaid.py --json=ttaid.json            # configs/ttaid.py's model size
  python tools/bench/ttaid.py --paper --repeats=2          # 32 features, 2 blocks per level

Times (median of `--repeats` after a warm-up, CPU) of
  tta   test-time adaptation of one `--size` x `--size` image: `--tta_steps` Adam steps on the
        masked auxiliary loss over the heads (body frozen), then the denoised output;
  meta  one meta-transfer training step on a meta-batch of `--batch` `--crop` crops: per task
        `--inner_steps` SGD steps on 10 x auxiliary loss over the heads (second order), outer
        10 x L1, Adam over all parameters.
The PyTorch side is a functional re-implementation (`F.conv2d` on a dict of tensors) loaded
with our initial weights; the outputs of the two denoisers are compared first (max abs
difference, printed). Rows (ours, torch: median wall and process CPU-seconds; ratios ours / torch,
< 1 is faster) go to `--json`; `--only=tta|meta` times one row.

Measured 2026-12-01 (default sizes, 2 shared CPU cores at load average 16-18, torch 2 threads,
`--repeats=2`): tta 256 x 256 ours 13.3 s / 2.34 CPU-s vs torch 68.8 s / 10.2 CPU-s (0.19x
wall, 0.23x CPU); meta step 4 x 32^2 ours 25.3 s / 2.86 CPU-s vs torch 120.6 s / 19.0 CPU-s
(0.21x, 0.15x); denoisers agree to 3.8e-5. Before `tta.unroll` (the 5 Adam steps in a while
loop, whose gradient convolutions XLA:CPU ran ~13x slower) ours was 3.2x torch on tta.
At the paper's crop, `--only=meta --crop=128 --batch=2 --repeats=1` (load 6-9): looped
(`meta.unroll=False`) ours 76.6 s / 32.0 CPU-s vs torch 48.3 s / 26.5 CPU-s (1.6x, 1.2x);
with `--meta_unroll` ours 21.0 s / 6.3 CPU-s vs torch 93.3 s / 36.3 CPU-s (0.23x, 0.17x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import linen as nn  # noqa: E402

from avjax.models import ttaid as ttaid_lib  # noqa: E402
from avjax.tasks import ttaid as task_lib  # noqa: E402


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else k
        out.update(_flat(v, name) if isinstance(v, dict) else {name: v})
    return out


def torch_params(params) -> dict[str, torch.Tensor]:
    """Our params as `{path: tensor}`; conv kernels `[k, k, in, out] -> [out, in, k, k]`."""
    out = {}
    for k, v in _flat(jax.device_get(params)).items():
        a = np.asarray(v, np.float32)
        out[k] = torch.tensor(a.transpose(3, 2, 0, 1).copy() if a.ndim == 4 else a)
    return out


def _conv(p, name, x):
    w = p[f"{name}/kernel"]
    return F.conv2d(x, w, p.get(f"{name}/bias"), padding=w.shape[-1] // 2)


def _prelu(p, name, x):
    return torch.where(x >= 0, x, p[f"{name}/a_param"] * x)


def _res(p, name, x):
    return x + _conv(p, f"{name}/conv2", _prelu(p, f"{name}/act", _conv(p, f"{name}/conv1", x)))


def _resize(x, h, w):
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def t_denoise(p, noisy, blocks: int, head_blocks: int):
    """The network of `avjax.models.ttaid` in PyTorch (NCHW): clean, residual, recon."""
    h = _conv(p, "body/shallow", noisy)
    skips = []
    for lvl in range(3):
        if lvl:
            h = _conv(p, f"body/down{lvl}/proj", _resize(h, h.shape[2] // 2, h.shape[3] // 2))
        for i in range(blocks):
            h = _res(p, f"body/enc{lvl}_{i}", h)
        skips.append(h)
    for lvl in (2, 1, 0):
        if lvl < 2:
            s = skips[lvl]
            h = _conv(p, f"body/up{lvl}/proj", _resize(h, s.shape[2], s.shape[3])) + s
        for i in range(blocks):
            h = _res(p, f"body/dec{lvl}_{i}", h)
    r = h
    for i in range(head_blocks):
        r = _res(p, f"head/block{i}", r)
    residual = _conv(p, "head/out", r)
    clean = noisy + residual
    a = _conv(p, "aux/inp", torch.cat([clean, residual], 1))
    for i in range(head_blocks):
        a = _res(p, f"aux/block{i}", a)
    return clean, residual, _conv(p, "aux/out", a)


def t_mask(p, noisy, mask_blocks: int):
    h = _prelu(p, "mask_net/act", _conv(p, "mask_net/inp", noisy))
    for i in range(mask_blocks):
        h = _res(p, f"mask_net/block{i}", h)
    return torch.sigmoid(_conv(p, "mask_net/out", h))


def _is_head(k: str) -> bool:
    return k.split("/")[0] in ttaid_lib.HEADS


def torch_tta(p, noisy, args):
    """Adam on the heads' copies, body frozen; returns the adapted denoised image."""
    with torch.no_grad():
        mask = t_mask(p, noisy, args.mask_blocks)
    heads = {k: v.clone().requires_grad_(True) for k, v in p.items() if _is_head(k)}
    opt = torch.optim.Adam(heads.values(), lr=args.tta_lr)
    for _ in range(args.tta_steps):
        opt.zero_grad()
        _, _, recon = t_denoise({**p, **heads}, noisy, args.blocks, args.head_blocks)
        (torch.abs(noisy - recon) * mask).mean().backward()
        opt.step()
    with torch.no_grad():
        return t_denoise({**p, **heads}, noisy, args.blocks, args.head_blocks)[0]


def torch_meta_step(p, opt, noisy, clean, args):
    """One second-order meta-transfer step over the meta-batch (tasks one by one)."""
    opt.zero_grad()
    total = 0.0
    for i in range(noisy.shape[0]):
        n, c = noisy[i : i + 1], clean[i : i + 1]
        mask = t_mask(p, n, args.mask_blocks)
        fast = {k: v for k, v in p.items() if _is_head(k)}
        for _ in range(args.inner_steps):
            _, _, recon = t_denoise({**p, **fast}, n, args.blocks, args.head_blocks)
            loss = 10.0 * (torch.abs(n - recon) * mask).mean()
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {k: v - args.inner_lr * g for (k, v), g in zip(fast.items(), grads, strict=True)}
        out = t_denoise({**p, **fast}, n, args.blocks, args.head_blocks)[0]
        outer = 10.0 * torch.abs(out - c).mean() / noisy.shape[0]
        outer.backward()
        total += float(outer)
    opt.step()
    return total


def _median_time(fn, repeats: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds (all threads) of `fn` after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def _row(what: str, ours, torch_fn, repeats: int) -> dict:
    ours_s, ours_cpu = _median_time(ours, repeats)
    torch_s, torch_cpu = _median_time(torch_fn, repeats)
    return {
        "what": what,
        "ours_s": ours_s,
        "torch_s": torch_s,
        "ours_cpu_s": ours_cpu,
        "torch_cpu_s": torch_cpu,
        "cpu_ratio": ours_cpu / torch_cpu,
    }


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--paper", action="store_true", help="32 features (+16), 2 blocks per level")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tta_steps", type=int, default=5)
    ap.add_argument("--tta_lr", type=float, default=1e-5)
    ap.add_argument("--inner_steps", type=int, default=5)
    ap.add_argument("--inner_lr", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--meta_unroll", action="store_true", help="meta.unroll=True (large crops)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=("", "tta", "meta"), default="", help="one row only")
    args = ap.parse_args()
    args.features, args.scale_step = (32, 16) if args.paper else (16, 8)
    args.blocks = 2 if args.paper else 1
    args.head_blocks, args.mask_blocks = 2, 3
    return args


def _build(args, rng: np.random.Generator):
    """Our network, its (perturbed) params, their torch copies and a `[1, size, size, 3]`
    image; prints the max abs difference of the two denoisers' outputs on it."""
    net = ttaid_lib.TTAIDNet(
        args.features, args.scale_step, args.blocks, args.head_blocks, args.mask_blocks
    )
    img = rng.random((1, args.size, args.size, 3)).astype(np.float32)
    params = jax.jit(lambda x: net.init(jax.random.key(0), x))(jnp.asarray(img))["params"]
    params = nn.meta.unbox(params)
    params = jax.tree.map(lambda x: x + 0.01 * jnp.ones_like(x), params)  # non-zero head out
    tp = torch_params(params)
    ours = np.asarray(net.apply({"params": params}, jnp.asarray(img), method="denoise")["clean"])
    with torch.no_grad():
        x_t = torch.tensor(img.transpose(0, 3, 1, 2).copy())
        ref = t_denoise(tp, x_t, args.blocks, args.head_blocks)[0].numpy().transpose(0, 2, 3, 1)
    diff = float(np.abs(ours - ref).max())
    print(f"denoiser outputs: max |ours - torch| = {diff:.2e}")
    return net, params, tp, img, diff


def _tta_row(args, net, params, tp, img) -> dict:
    """Test-time adaptation of one image (5 Adam steps + denoise), ours vs torch."""
    tc = ml_collections.ConfigDict(
        {"steps": args.tta_steps, "lr": args.tta_lr, "optimizer": "adam"}
    )
    fn = task_lib.adaptation_fn(net, tc)
    x, x_t = jnp.asarray(img), torch.tensor(img.transpose(0, 3, 1, 2).copy())
    return _row(
        f"tta {args.size}x{args.size} ({args.tta_steps} Adam steps + denoise)",
        lambda: jax.block_until_ready(fn(params, x)),
        lambda: torch_tta(tp, x_t, args),
        args.repeats,
    )


def _ours_meta_step(args, net, params):
    """Our jitted meta-transfer step (tasks one at a time, as the task does; `--meta_unroll`:
    inner steps and task loop unrolled, the task's `meta.unroll`)."""
    meta = ml_collections.ConfigDict(
        {
            "inner_lr": args.inner_lr,
            "inner_steps": args.inner_steps,
            "aux_weight": 10.0,
            "outer_weight": 10.0,
            "mask_tv": 0.0,
            "first_order": False,
            "unroll": args.meta_unroll,
        }
    )
    tx = optax.adam(1e-4)

    def loss_fn(p, n, c):
        per = lambda nc: task_lib.meta_objective(  # noqa: E731
            net, p, nc[0][None], nc[1][None], "meta_transfer", meta
        )[0]
        outer = jax.lax.scan(lambda _, nc: (None, per(nc)), None, (n, c), unroll=args.meta_unroll)
        return jnp.mean(outer[1])

    @jax.jit
    def step(p, s, n, c):
        loss, g = jax.value_and_grad(loss_fn)(p, n, c)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    return step, tx.init(params)


def _meta_row(args, net, params, tp, rng: np.random.Generator) -> dict:
    """One second-order meta-transfer training step, ours vs torch."""
    noisy = rng.random((args.batch, args.crop, args.crop, 3)).astype(np.float32)
    clean = rng.random((args.batch, args.crop, args.crop, 3)).astype(np.float32)
    step, opt_state = _ours_meta_step(args, net, params)
    state = [params, opt_state]
    jn, jc = jnp.asarray(noisy), jnp.asarray(clean)

    def ours_meta():
        state[0], state[1], loss = step(state[0], state[1], jn, jc)
        jax.block_until_ready(loss)

    tp_train = {k: v.clone().requires_grad_(True) for k, v in tp.items()}
    topt = torch.optim.Adam(tp_train.values(), lr=1e-4)
    tn, tcl = (torch.tensor(a.transpose(0, 3, 1, 2).copy()) for a in (noisy, clean))
    return _row(
        f"meta step ({args.batch} x {args.crop}^2, {args.inner_steps} inner steps)",
        ours_meta,
        lambda: torch_meta_step(tp_train, topt, tn, tcl, args),
        args.repeats,
    )


def main() -> None:
    args = _parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net, params, tp, img, diff = _build(args, rng)
    rows = [_tta_row(args, net, params, tp, img)] if args.only != "meta" else []
    rows += [_meta_row(args, net, params, tp, rng)] if args.only != "tta" else []
    print(f"{'what':<48}{'ours s / cpu-s':>16}{'torch s / cpu-s':>17}{'ratio':>7}{'cpu':>7}")
    for r in rows:
        r["ratio"] = r["ours_s"] / r["torch_s"]
        ours, ref = (
            f"{r['ours_s']:.2f}/{r['ours_cpu_s']:.2f}",
            f"{r['torch_s']:.2f}/{r['torch_cpu_s']:.2f}",
        )
        print(f"{r['what']:<48}{ours:>16}{ref:>17}{r['ratio']:>7.2f}{r['cpu_ratio']:>7.2f}")
    if args.json:
        summary = {
            "features": args.features,
            "max_abs_diff": diff,
            "rows": rows,
            "torch_threads": torch.get_num_threads(),
            "load_avg_1_5_15": list(os.getloadavg()),
            "devices": str(jax.devices()),
        }
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
