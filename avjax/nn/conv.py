"""Causal temporal convolution (depthwise), as in Griffin's recurrent block."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes
from avjax.nn.layers import segment_ids


class Conv1DCache(NamedTuple):
    """The last `width - 1` inputs `[batch, width - 1, dim]`, oldest first."""

    inputs: jax.Array


class Conv1D(nn.Module):
    """Depthwise causal conv over time: y_t = b + sum_j w[j] * x_{t - (width-1) + j}.

    Inputs from an earlier document (a `segment_pos == 0` in between) are masked out in the
    full-sequence call. Weights `w [width, dim]`, bias `b [dim]`.
    """

    temporal_width: int = 4
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        segment_pos: jax.Array,
        cache: Conv1DCache | None = None,
        return_cache: bool = False,
    ) -> tuple[jax.Array, Conv1DCache | None]:
        """`x [batch, time, dim]` -> `[batch, time, dim]`; with a cache, `time` must be 1."""
        dim = x.shape[-1]
        w = self.param(
            "w",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(0.01, "fan_in", "normal"), (axes.CONV, axes.RNN)
            ),
            (self.temporal_width, dim),
            jnp.float32,
        )
        b = self.param(
            "b",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.RNN,)),
            (dim,),
            jnp.float32,
        )
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        w, b = w.astype(dtype), b.astype(dtype)
        k = self.temporal_width
        if cache is not None:
            if x.shape[1] != 1:
                raise ValueError(f"Conv1D decoding takes one token at a time, got {x.shape}")
            window = jnp.concatenate([cache.inputs.astype(dtype), x], axis=1)  # [b, k, d]
            # As in the full call: inputs `lag` tokens back count only if they are in this
            # document (lag <= segment_pos).
            lag = jnp.arange(k - 1, -1, -1)
            valid = (lag[None] <= segment_pos[:, -1:]).astype(dtype)  # [b, k]
            y = jnp.einsum("bkd,kd->bd", window * valid[..., None], w)[:, None] + b[None, None]
            return y, Conv1DCache(window[:, 1:])
        t = x.shape[1]
        ids = segment_ids(segment_pos)
        y = jnp.zeros_like(x) + b[None, None]
        for shift in range(min(k, t)):
            xs = jnp.pad(x, ((0, 0), (shift, 0), (0, 0)))[:, :t]
            same = ids == jnp.pad(ids, ((0, 0), (shift, 0)), constant_values=-1)[:, :t]
            y = y + xs * same[..., None].astype(dtype) * w[None, None, k - 1 - shift]
        new_cache = None
        if return_cache:
            padded = jnp.pad(x, ((0, 0), (max(k - 1 - t, 0), 0), (0, 0)))
            new_cache = Conv1DCache(padded[:, padded.shape[1] - (k - 1) :])
        return y, new_cache

    def init_cache(self, batch_size: int, dim: int, dtype=jnp.float32) -> Conv1DCache:
        return Conv1DCache(jnp.zeros((batch_size, self.temporal_width - 1, dim), dtype))
