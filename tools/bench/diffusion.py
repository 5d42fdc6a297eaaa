r"""Benchmark: DDIM sampling time per step, our DF-3DFace denoiser + `avjax.nn.diffusion`
(one jitted `lax.scan`) beside the same network in PyTorch + diffusers' `DDIMScheduler`.

  python tools/bench/diffusion.py     # width 128, 4 layers, code 32, 4 x (1 + 150) tokens
  python tools/bench/diffusion.py --steps=50 --json=diffusion.json

Both run the network as the task does (`configs/df3dface.py`): the static identity token
(row 0: a learned type embedding, no audio, cross-attends to its null frame only) then one
token per frame, so a sequence of T frames is 1 + T tokens. The PyTorch network has the same
layers and sizes (input / audio / timestep projections, the static token and audio null
embeddings; per block: modulated RMSNorm, bidirectional self-attention with RoPE on half of
each head's dims, the windowed audio cross-attention, gated MLP; output projection), its own
random weights (this is a timing
comparison, not a parity test: the parity of the scheduler numbers is tested in
tests/test_nn_diffusion.py) and runs under `torch.inference_mode`, eager, float32, on the
same CPU threads. Per-step time = (sampling time) / steps, median of `--repeats` after a
warm-up (compilation excluded from ours), as wall time and as process CPU time (the fair
figure on a shared machine), with the load average. Prints a table and writes JSON rows.
Guidance is off in both (one network call per step), as the task's default (1); a guidance
scale other than 1 makes two calls per step.
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
import numpy as np  # noqa: E402

from avjax.models import df3dface  # noqa: E402
from avjax.nn import diffusion  # noqa: E402


def _ours(cfg, batch: int, frames: int, steps: int, repeats: int) -> tuple[float, float]:
    model = df3dface.DF3DFace(cfg)
    x = jnp.zeros((batch, 1 + frames, cfg.dim))  # the static token, then the frames
    audio = jnp.zeros((batch, frames, cfg.feat_dim))
    ones = jnp.ones((batch, frames))
    params = model.init(
        jax.random.PRNGKey(0), x, jnp.zeros((batch,), jnp.int32), audio, ones, ones
    )["params"]
    params = jax.tree.map(
        lambda p: getattr(p, "value", p), params, is_leaf=lambda p: hasattr(p, "value")
    )
    sched = diffusion.make_schedule("cosine", 1000)
    ts = jnp.asarray(diffusion.inference_timesteps(1000, steps, "trailing"))

    @jax.jit
    def run(params, audio, rng, ts):
        def fn(xt, t):
            return model.apply({"params": params}, xt, t, audio, ones, ones)

        return diffusion.sample(fn, x.shape, rng, sched, ts, prediction_type="sample")

    jax.block_until_ready(run(params, audio, jax.random.PRNGKey(0), ts))
    return _timed(
        lambda r: jax.block_until_ready(run(params, audio, jax.random.PRNGKey(r + 1), ts)),
        repeats,
        steps,
    )


def _timed(fn, repeats: int, steps: int) -> tuple[float, float]:
    """`(wall s, process CPU s)` per sampling step, the medians of `repeats` calls of
    `fn(r)`. CPU-seconds count every thread's work, so they stay comparable when the machine
    is shared (a busy-waiting thread pool inflates wall time, not the work done)."""
    walls, cpus = [], []
    for r in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn(r)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls) / steps, statistics.median(cpus) / steps


def _torch_net(cfg):
    import torch
    from torch import nn

    w, h = cfg.width, cfg.num_heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mod = nn.ModuleList([nn.Linear(w, 2 * w) for _ in range(3)])
            self.norm = nn.ModuleList([nn.RMSNorm(w) for _ in range(3)])
            self.qkv, self.out = nn.Linear(w, 3 * w, bias=False), nn.Linear(w, w)
            self.xq, self.xkv = nn.Linear(w, w, bias=False), nn.Linear(w, 2 * w, bias=False)
            self.xout = nn.Linear(w, w)
            self.up, self.down = nn.Linear(w, 2 * cfg.mlp_width), nn.Linear(cfg.mlp_width, w)

        def _m(self, i, x, temb):
            shift, scale = self.mod[i](temb)[:, None].chunk(2, -1)
            return self.norm[i](x) * (1 + scale) + shift

        def _heads(self, z):
            b, t, _ = z.shape
            return z.view(b, t, h, w // h).transpose(1, 2)

        def forward(self, x, a, temb, sync_mask, rope):
            b, t, _ = x.shape
            q, k, v = map(self._heads, self.qkv(self._m(0, x, temb)).chunk(3, -1))
            o = torch.nn.functional.scaled_dot_product_attention(rope(q), rope(k), v)
            x = x + self.out(o.transpose(1, 2).reshape(b, t, w))
            ka, va = self.xkv(a).chunk(2, -1)
            q = self.xq(self._m(1, x, temb))
            o = torch.nn.functional.scaled_dot_product_attention(
                self._heads(q), self._heads(ka), self._heads(va), attn_mask=sync_mask
            )
            x = x + self.xout(o.transpose(1, 2).reshape(b, t, w))
            g, u = self.up(self._m(2, x, temb)).chunk(2, -1)
            return x + self.down(torch.nn.functional.gelu(g, approximate="tanh") * u)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.aud = nn.Linear(cfg.dim, w), nn.Linear(cfg.feat_dim, w)
            self.t1, self.t2 = nn.Linear(w, w), nn.Linear(w, w)
            self.blocks = nn.ModuleList([Block() for _ in range(cfg.num_layers)])
            self.norm, self.outp = nn.RMSNorm(w), nn.Linear(w, cfg.dim)
            self.null, self.static = nn.Parameter(torch.randn(w)), nn.Parameter(torch.randn(w))

        def forward(self, x, t, audio, sync_mask):  # x [b, 1 + T, dim], audio [b, T, feat]
            half = w // 2
            freqs = torch.exp(-np.log(10_000.0) * torch.arange(half) / half)
            args = t.float()[:, None] * freqs[None]
            temb = self.t2(
                torch.nn.functional.silu(self.t1(torch.cat([args.cos(), args.sin()], -1)))
            )
            b, n = x.shape[:2]
            a = torch.cat([self.null.expand(b, 1, w), self.aud(audio)], 1)
            hdn = self.inp(x) + torch.cat([self.static.expand(b, 1, w), a[:, 1:]], 1)
            rope = _torch_rope(n, w // h)
            for blk in self.blocks:
                hdn = blk(hdn, a, temb, sync_mask, rope)
            return self.outp(self.norm(hdn))

    return Net().eval()


def _torch_rope(n: int, head_dim: int):
    """`q -> q` rotating `[b, heads, n, head_dim]` as `avjax.nn.attention.apply_rope` (half
    of the dims, base 10,000, positions 0..n-1)."""
    import torch

    r = head_dim // 2
    freq = 10_000.0 ** (-(2.0 * torch.arange(r // 2) / r))
    angle = torch.arange(n)[:, None].float() * freq[None]
    cos, sin = angle.cos(), angle.sin()

    def rope(q):
        x1, x2, rest = q[..., : r // 2], q[..., r // 2 : r], q[..., r:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)

    return rope


def _reference(cfg, batch: int, frames: int, steps: int, repeats: int) -> tuple[float, float]:
    import torch
    from diffusers import DDIMScheduler

    net = _torch_net(cfg)
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        clip_sample=False,
        timestep_spacing="trailing",
    )
    audio = torch.zeros(batch, frames, cfg.feat_dim)
    pos = torch.arange(1 + frames)
    frame = pos >= 1  # frames hear nearby frames' audio; the static token its null frame only
    near = (pos[:, None] - pos[None]).abs() <= cfg.sync_window
    sync = ((near & frame[:, None] & frame[None]) | (~frame[:, None] & ~frame[None]))[None, None]

    def run(seed):
        sched.set_timesteps(steps)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 1 + frames, cfg.dim, generator=gen)
        for t in sched.timesteps:
            out = net(x, t.expand(batch), audio, sync)
            x = sched.step(out, t, x).prev_sample
        return x

    with torch.inference_mode():
        run(0)
        return _timed(lambda r: run(r + 1), repeats, steps)


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=32)  # the default config's code width
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="")
    a = p.parse_args()
    cfg = df3dface.DF3DFaceConfig(
        dim=a.dim,
        feat_dim=320,
        width=a.width,
        num_layers=a.layers,
        num_heads=4,
        mlp_width=3 * a.width,
        static_token=True,  # as the task runs it: 1 + frames tokens
    )
    (ours, ours_cpu), (ref, ref_cpu) = (
        fn(cfg, a.batch, a.frames, a.steps, a.repeats) for fn in (_ours, _reference)
    )
    row = {
        "width": a.width,
        "layers": a.layers,
        "batch": a.batch,
        "frames": a.frames,
        "tokens": 1 + a.frames,
        "dim": a.dim,
        "steps": a.steps,
        "ours_ms_per_step": ours * 1e3,
        "torch_diffusers_ms_per_step": ref * 1e3,
        "ratio": ours / ref,
        "ours_cpu_ms_per_step": ours_cpu * 1e3,
        "torch_diffusers_cpu_ms_per_step": ref_cpu * 1e3,
        "cpu_ratio": ours_cpu / ref_cpu,
        "torch_threads": _torch_threads(),
        "load_average_1min": os.getloadavg()[0],
        "backend": jax.default_backend(),
    }
    print(f"{'':>10} {'ours (jax scan)':>16} {'torch+diffusers':>16} {'ratio':>6}")
    for name, x, y in (("wall", ours, ref), ("CPU", ours_cpu, ref_cpu)):
        print(f"{name:>10} {x * 1e3:>13.2f} ms {y * 1e3:>13.2f} ms {x / y:>6.2f}")
    print(f"load average {row['load_average_1min']:.1f}, torch threads {row['torch_threads']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([row], f, indent=2)


if __name__ == "__main__":
    main()
