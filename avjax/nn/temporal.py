"""Temporal back-ends of lip readers: a bidirectional GRU stack and a multi-scale TCN.

Both map per-frame features `[batch, time, dim]` to `[batch, time, out]` and honour the valid
lengths `[batch]` of padded clips.

- `BiGRU`: `layers` bidirectional GRU layers (PyTorch `nn.GRU(bidirectional=True)`
  equations; flax's `GRUCell` gates are the same, with PyTorch's `b_ir + b_hr` folded into
  one bias). Each direction is a `lax.scan` (`nn.RNN`); the backward direction reads each
  sequence reversed within its valid length, so padding never leaks into valid frames.
  Output `[batch, time, 2 * hidden]`. MAB: 2 layers of 512 (1024 out), dropout 0.
- `MSTCN`: Martinez et al.'s multi-scale temporal convolutional network: `levels` blocks,
  block `i` dilated `2**i`; each block is two sub-layers of parallel branches (kernel sizes
  `kernels`, each `Conv1d + BatchNorm + PReLU` with `width / len(kernels)` channels,
  concatenated) with dropout, plus a residual (1x1 conv when the width changes). Non-causal
  ('same' padding). Padded frames are zeroed before every conv. Output `[batch, time, width]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes
from avjax.nn.conv2d import PReLU
from avjax.nn.resnet import batch_norm, conv


def _gru_cell(hidden: int, name: str, dtype: jnp.dtype | None) -> nn.GRUCell:
    """A GRU cell with PyTorch's init, U(-1/sqrt(hidden), 1/sqrt(hidden)) for every weight."""
    bound = hidden**-0.5

    def uniform(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nn.GRUCell(
        hidden,
        kernel_init=nn.with_logical_partitioning(uniform, (axes.EMBED, axes.RNN)),
        recurrent_kernel_init=nn.with_logical_partitioning(uniform, (None, axes.RNN)),
        bias_init=nn.with_logical_partitioning(uniform, (axes.RNN,)),
        dtype=dtype,
        name=name,
    )


def _lengths(x: jax.Array, lengths: jax.Array | None) -> jax.Array:
    if lengths is None:
        return jnp.full(x.shape[:1], x.shape[1], jnp.int32)
    return lengths.astype(jnp.int32)


class BiGRU(nn.Module):
    """`layers` bidirectional GRU layers: `[batch, time, dim] -> [batch, time, 2 * hidden]`.

    Layer `l` keeps its cells at `layer{l}_fwd` and `layer{l}_bwd` (gates `ir iz in` on the
    input, `hr hz hn` on the state). `dropout` applies between layers in training.
    """

    hidden: int = 512
    layers: int = 2
    dropout: float = 0.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, lengths: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        seq = _lengths(x, lengths)
        for i in range(self.layers):
            if i > 0 and self.dropout > 0:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
            fwd = nn.RNN(_gru_cell(self.hidden, f"layer{i}_fwd", self.dtype))
            bwd = nn.RNN(
                _gru_cell(self.hidden, f"layer{i}_bwd", self.dtype), reverse=True, keep_order=True
            )
            x = jnp.concatenate([fwd(x, seq_lengths=seq), bwd(x, seq_lengths=seq)], axis=-1)
            x = nn.with_logical_constraint(x, (axes.BATCH, axes.FRAMES, None))
        return x


class _Branches(nn.Module):
    """Parallel dilated convs with different kernels, concatenated: `[b, t, c] -> [b, t, w]`."""

    width: int
    kernels: Sequence[int]
    dilation: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        per = self.width // len(self.kernels)
        outs = []
        for k in self.kernels:
            h = nn.Conv(
                per,
                (k,),
                kernel_dilation=(self.dilation,),
                padding=[((k - 1) * self.dilation // 2,) * 2],
                dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    (axes.CONV, None, axes.EMBED),
                ),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.EMBED,)),
                name=f"conv_k{k}",
            )(x * mask)
            outs.append(PReLU(name=f"act_k{k}")(batch_norm(train, f"bn_k{k}", self.dtype)(h)))
        return jnp.concatenate(outs, axis=-1)


class MSTCN(nn.Module):
    """Multi-scale TCN: `[batch, time, dim] -> [batch, time, widths[-1]]` (module docstring).

    `widths`: one per level (the paper: 4 levels of 768 = 3 branches x 256); `kernels`:
    branch kernel sizes (3, 5, 7); `dropout` after each sub-layer in training.
    """

    widths: Sequence[int] = (768, 768, 768, 768)
    kernels: Sequence[int] = (3, 5, 7)
    dropout: float = 0.2
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, lengths: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        seq = _lengths(x, lengths)
        mask = (jnp.arange(x.shape[1])[None, :] < seq[:, None])[..., None].astype(x.dtype)
        for i, width in enumerate(self.widths):
            if width % len(self.kernels):
                raise ValueError(f"MSTCN width {width} is not divisible by {len(self.kernels)}")
            h = x
            for j in range(2):
                h = _Branches(width, self.kernels, 2**i, self.dtype, name=f"level{i}_{j}")(
                    h, mask, train
                )
                h = nn.Dropout(self.dropout, deterministic=not train)(h)
            res = x if x.shape[-1] == width else conv(width, (1,), name=f"level{i}_res")(x)
            x = PReLU(name=f"level{i}_act")(h + res)
            x = nn.with_logical_constraint(x, (axes.BATCH, axes.FRAMES, None))
        return x * mask
