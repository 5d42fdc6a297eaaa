"""Griffin's RG-LRU and recurrent block (De et al., 2024; RecurrentGemma).

RG-LRU, per channel, with block-diagonal gate projections:
    r_t = sigmoid(W_a x_t + b_a)            recurrence gate
    i_t = sigmoid(W_x x_t + b_x)            input gate
    log a_t = -c * r_t * softplus(Lambda)   c = 8  (a = sigmoid(-Lambda)^(c r_t), in log space)
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)
At a segment start (segment_pos == 0): a_t = 0 and the sqrt(1 - a^2) factor is 1.
The state and the recurrence are float32 whatever the activation dtype.

Recurrent block: y = gelu(W_y x); h = RG-LRU(Conv1D(W_x x)); out = W_out(h * y).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes
from avjax.nn.conv import Conv1D, Conv1DCache
from avjax.nn.layers import BlockDiagonalLinear, dense, expand_to
from avjax.nn.scan import DEFAULT_IMPL, linear_scan

C = 8.0  # the fixed scalar c of the RG-LRU


@jax.custom_vjp
def sqrt_clipped_grad(x: jax.Array) -> jax.Array:
    """sqrt(x) whose gradient is bounded by 1000 (as at x = 1/(4 * 1000^2))."""
    return jnp.sqrt(x)


def _sqrt_fwd(x):
    return jnp.sqrt(x), x


def _sqrt_bwd(x, g):
    x = jnp.maximum(x, 1.0 / (4.0 * 1000.0**2))
    return (g * 0.5 / jnp.sqrt(x),)


sqrt_clipped_grad.defvjp(_sqrt_fwd, _sqrt_bwd)


def a_param_init(min_rad: float = 0.9, max_rad: float = 0.999):
    """Initialiser of `a_param` (= -Lambda of the paper).

    At gate value r = 1/c the decay is exp(-softplus(a_param)); its square is drawn uniform in
    [min_rad^2, max_rad^2] (uniform in area on a ring), as in Griffin.
    """

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape)
        log_radius = 0.5 * jnp.log(u * (max_rad**2 - min_rad**2) + min_rad**2 + 1e-8)
        # softplus(a_param) = -log_radius  =>  a_param = log(exp(-log_radius) - 1)
        return jnp.log(jnp.exp(-log_radius) - 1.0).astype(dtype)

    return init


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit. `[batch, time, width] -> [batch, time, width]`."""

    width: int
    num_heads: int
    scan_impl: str = DEFAULT_IMPL
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, segment_pos: jax.Array, h0: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Returns `(y [batch, time, width], h_last [batch, width] float32)`."""
        a_param = self.param(
            "a_param",
            nn.with_logical_partitioning(a_param_init(), (axes.RNN,)),
            (self.width,),
            jnp.float32,
        )
        gate_x = jax.nn.sigmoid(
            BlockDiagonalLinear(self.width, self.num_heads, self.dtype, name="input_gate")(x)
        )
        gate_a = jax.nn.sigmoid(
            BlockDiagonalLinear(self.width, self.num_heads, self.dtype, name="a_gate")(x)
        )
        log_a = -C * gate_a.astype(jnp.float32) * expand_to(jax.nn.softplus(a_param), x.ndim)
        a = jnp.exp(log_a)
        reset = (segment_pos == 0)[..., None]
        multiplier = jnp.where(reset, 1.0, sqrt_clipped_grad(1.0 - jnp.exp(2.0 * log_a)))
        b = (x * gate_x).astype(jnp.float32) * multiplier
        a = jnp.where(reset, 0.0, a)
        h, h_last = linear_scan(a, b, h0, impl=self.scan_impl)
        return h.astype(x.dtype), h_last

    def step(
        self, x_t: jax.Array, segment_pos_t: jax.Array, h: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """One token: `x_t [batch, width]`, `segment_pos_t [batch]`, state `h [batch, width]`
        (float32) -> `(y_t [batch, width], new state)`."""
        y, h = self(x_t[:, None], segment_pos_t[:, None], h)
        return y[:, 0], h


class RecurrentBlockCache(NamedTuple):
    """Decoding state of a recurrent block: RG-LRU state `[batch, lru_width]` (float32) and
    the conv's last inputs `[batch, conv_width - 1, lru_width]`."""

    rg_lru_state: jax.Array
    conv1d_state: jax.Array


class RecurrentBlock(nn.Module):
    """Griffin's temporal mixing block. `[batch, time, width] -> [batch, time, width]`."""

    width: int
    lru_width: int
    num_heads: int
    conv1d_width: int = 4
    scan_impl: str = DEFAULT_IMPL
    dtype: jnp.dtype | None = None
    out_scale: float = 1.0  # variance scale of `linear_out`'s kernel (RecurrentGemma: 2 / depth)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        segment_pos: jax.Array,
        cache: RecurrentBlockCache | None = None,
        return_cache: bool = False,
    ) -> tuple[jax.Array, RecurrentBlockCache | None]:
        y = dense(self.lru_width, (axes.EMBED, axes.RNN), dtype=self.dtype, name="linear_y")(x)
        y = jax.nn.gelu(y)
        h = dense(self.lru_width, (axes.EMBED, axes.RNN), dtype=self.dtype, name="linear_x")(x)
        h = nn.with_logical_constraint(h, (axes.BATCH, axes.LENGTH, axes.RNN))
        conv_cache = None if cache is None else Conv1DCache(cache.conv1d_state)
        h, new_conv = Conv1D(self.conv1d_width, self.dtype, name="conv_1d")(
            h, segment_pos, conv_cache, return_cache or cache is not None
        )
        h, h_last = RGLRU(
            self.lru_width, self.num_heads, self.scan_impl, self.dtype, name="rg_lru"
        )(h, segment_pos, None if cache is None else cache.rg_lru_state)
        out = dense(
            self.width,
            (axes.RNN, axes.EMBED),
            scale=self.out_scale,
            dtype=self.dtype,
            name="linear_out",
        )(h * y)
        if cache is None and not return_cache:
            return out, None
        return out, RecurrentBlockCache(h_last, new_conv.inputs)

    def step(
        self, x_t: jax.Array, segment_pos_t: jax.Array, cache: RecurrentBlockCache
    ) -> tuple[jax.Array, RecurrentBlockCache]:
        """One token: `x_t [batch, width]`, `segment_pos_t [batch]` -> `(y_t, new cache)`."""
        y, cache = self(x_t[:, None], segment_pos_t[:, None], cache)
        return y[:, 0], cache

    def init_cache(self, batch_size: int, dtype=jnp.float32) -> RecurrentBlockCache:
        return init_recurrent_cache(batch_size, self.lru_width, self.conv1d_width, dtype)


def init_recurrent_cache(
    batch_size: int, lru_width: int, conv1d_width: int, dtype=jnp.float32
) -> RecurrentBlockCache:
    """Zero state of a recurrent block (start of a sequence)."""
    return RecurrentBlockCache(
        jnp.zeros((batch_size, lru_width), jnp.float32),
        jnp.zeros((batch_size, conv1d_width - 1, lru_width), dtype),
    )
