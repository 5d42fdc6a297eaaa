"""Normalisation layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes
from avjax.nn.layers import expand_to


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale.

    The scale is stored as an offset from 1 (`y = (1 + w) * x / rms(x)`, `w` initialised to 0:
    Gemma/RecurrentGemma's form) or, with `scale_offset=False`, directly (`y = w * x / rms(x)`,
    `w` initialised to 1: HF Mamba/Llama's form), so imported weights are copied, not shifted.
    `[..., dim] -> [..., dim]`, computed in float32, returned in `dtype` (or the input's).
    """

    eps: float = 1e-6
    dtype: jnp.dtype | None = None
    scale_offset: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros_init() if self.scale_offset else nn.initializers.ones_init()
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(init, (axes.EMBED,)),
            (x.shape[-1],),
            jnp.float32,
        )
        scale = expand_to(scale, x.ndim)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps) * ((1.0 + scale) if self.scale_offset else scale)
        return y.astype(self.dtype or x.dtype)


def layer_norm(eps: float, name: str | None = None, axis_name: str = axes.EMBED) -> nn.LayerNorm:
    """LayerNorm over the last axis (float32 two-pass statistics, PyTorch's `nn.LayerNorm`
    numerics) with a learned scale and bias named `axis_name`. `[..., dim] -> [..., dim]`."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis_name,)),
        name=name,
    )
