"""Small building blocks shared by the cores: logically-partitioned dense layers."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    scale: float = 1.0,
    dtype: jnp.dtype | None = None,
    name: str | None = None,
) -> nn.Dense:
    """`nn.Dense` whose kernel `[in, out]` carries logical axis names `axes`."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.variance_scaling(scale, "fan_in", "normal"), axes
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


class BlockDiagonalLinear(nn.Module):
    """`num_blocks` independent linear maps on equal slices of the last axis.

    `[..., width] -> [..., width]`; weights `w [blocks, width/blocks, width/blocks]`.
    """

    width: int
    num_blocks: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.width % self.num_blocks:
            raise ValueError(f"width {self.width} is not divisible by {self.num_blocks} blocks")
        size = self.width // self.num_blocks
        w = self.param(
            "w",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=2),
                (axes.HEADS, None, None),
            ),
            (self.num_blocks, size, size),
            jnp.float32,
        )
        b = self.param(
            "b",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.HEADS, None)),
            (self.num_blocks, size),
            jnp.float32,
        )
        dtype = self.dtype or x.dtype
        xs = x.astype(dtype).reshape(x.shape[:-1] + (self.num_blocks, size))
        y = jnp.einsum("...hi,hij->...hj", xs, w.astype(dtype)) + expand_to(
            b.astype(dtype), xs.ndim
        )
        return y.reshape(x.shape)


def segment_ids(segment_pos: jax.Array) -> jax.Array:
    """Document ids `[batch, time]`: a new id wherever `segment_pos == 0`."""
    return jnp.cumsum(segment_pos == 0, axis=-1)


def shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def expand_to(x: jax.Array, ndim: int) -> jax.Array:
    """`x` with leading unit axes up to rank `ndim`: `[d] -> [1, ..., 1, d]`.

    Explicit broadcasting of a parameter (a bias, a scale `[dim]`) against activations
    `[batch, time, dim]`; the tests run with `jax_numpy_rank_promotion="raise"`.
    """
    if x.ndim > ndim:
        raise ValueError(f"cannot expand {shape_str(x.shape)} to rank {ndim}")
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)
