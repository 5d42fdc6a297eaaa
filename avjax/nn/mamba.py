"""Mamba's selective state-space layer (Gu & Dao, 2023): `SelectiveSSM`.

Per channel d of the inner width and state index n, with input-dependent Delta, B, C:
  x, z   = in_proj(u)                      two branches [batch, time, d_inner]
  x      = silu(causal_depthwise_conv(x))
  dt_low, B, C = x_proj(x)                 ranks dt_rank, d_state, d_state
  Delta  = softplus(dt_proj(dt_low))       [batch, time, d_inner], float32
  A      = -exp(A_log)                     [d_inner, d_state], input-independent
  h_t    = exp(Delta_t A) * h_{t-1} + Delta_t B_t x_t        (zero-order hold for A,
                                                              Euler for B, as in Mamba)
  y_t    = C_t . h_t + D * x_t
  out    = out_proj(y * silu(z))
At a segment start (segment_pos == 0) the state restarts from zero. The discretisation, the
state and the recurrence are float32 whatever the activation dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes
from avjax.nn.conv import Conv1D, Conv1DCache
from avjax.nn.layers import dense
from avjax.nn.scan import DEFAULT_IMPL, linear_scan


class MambaCache(NamedTuple):
    """Decoding state of a `SelectiveSSM`: the conv's last inputs
    `[batch, conv_width - 1, d_inner]` (oldest first) and the SSM state
    `[batch, d_inner, d_state]` (float32)."""

    conv_state: jax.Array
    ssm_state: jax.Array


def init_mamba_cache(
    batch_size: int, d_inner: int, d_state: int, conv_width: int, dtype=jnp.float32
) -> MambaCache:
    """Zero state of a selective SSM (start of a sequence)."""
    return MambaCache(
        jnp.zeros((batch_size, conv_width - 1, d_inner), dtype),
        jnp.zeros((batch_size, d_inner, d_state), jnp.float32),
    )


def a_log_init(key, shape, dtype=jnp.float32):
    """S4D-real initialisation of `A_log [d_inner, d_state]`: A[:, n] = -(n + 1)."""
    del key
    d_inner, d_state = shape
    a = jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (d_inner, d_state))
    return jnp.log(a).astype(dtype)


def dt_bias_init(dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4):
    """Initialiser of the Delta bias: softplus(bias) is log-uniform in `[dt_min, dt_max]`."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape)
        dt = jnp.exp(u * (jnp.log(dt_max) - jnp.log(dt_min)) + jnp.log(dt_min))
        dt = jnp.maximum(dt, dt_floor)
        # inverse softplus: dt + log(1 - exp(-dt))
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


class SelectiveSSM(nn.Module):
    """Mamba mixer. `[batch, time, d_model] -> [batch, time, d_model]`.

    Attributes:
      d_model: model width.
      d_state: SSM state size N per channel.
      conv_width: temporal conv width (causal, depthwise).
      expand: `d_inner = expand * d_model` unless `d_inner` is given.
      dt_rank: rank of the Delta projection (default `ceil(d_model / 16)`).
      use_bias: biases on in_proj and out_proj.
      scan_impl: `avjax.nn.scan.linear_scan` implementation.
      scan_chunk_size: chunk length of the "chunked" implementation.
      dtype: activation dtype (parameters float32; Delta, the state and the scan float32).

    The conv is `avjax.nn.conv.Conv1D` (same causal depthwise formula as Mamba's, with bias);
    a checkpoint without conv bias imports as a zero bias.
    """

    d_model: int
    d_state: int = 16
    conv_width: int = 4
    expand: int = 2
    d_inner: int | None = None
    dt_rank: int | None = None
    use_bias: bool = False
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_floor: float = 1e-4
    dt_scale: float = 1.0
    scan_impl: str = DEFAULT_IMPL
    scan_chunk_size: int = 128
    dtype: jnp.dtype | None = None

    @property
    def inner(self) -> int:
        return self.d_inner or self.expand * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank or -(-self.d_model // 16)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        segment_pos: jax.Array | None = None,
        cache: MambaCache | None = None,
        return_cache: bool = False,
    ) -> tuple[jax.Array, MambaCache | None]:
        """Runs the mixer over `x [batch, time, d_model]`.

        Args:
          x: inputs `[batch, time, d_model]`.
          segment_pos: `[batch, time]` positions in the document; the state restarts where it
            is 0. None: one document (continuing `cache` if given).
          cache: state after the preceding tokens (any `time`, 1 for decoding).
          return_cache: also return the state after this sequence (implied by `cache`).

        Returns:
          `(y [batch, time, d_model], MambaCache or None)`.
        """
        dtype = self.dtype or x.dtype
        batch, t = x.shape[:2]
        if cache is not None and segment_pos is not None:
            # A document starting at the first token: forget the carried state.
            keep = (segment_pos[:, 0] != 0).astype(jnp.float32)
            cache = MambaCache(
                cache.conv_state * keep[:, None, None].astype(cache.conv_state.dtype),
                cache.ssm_state * keep[:, None, None],
            )
        xs, z = self._in_proj(x, dtype)
        want_cache = return_cache or cache is not None
        pos = jnp.full((batch, t), 2**30, jnp.int32) if segment_pos is None else segment_pos
        xs, conv_cache = self._conv(xs, pos, cache, want_cache, dtype)
        delta, b_in, c_out = self._delta_b_c(xs, dtype)
        a_log = self.param(
            "A_log",
            nn.with_logical_partitioning(a_log_init, (axes.RNN, None)),
            (self.inner, self.d_state),
            jnp.float32,
        )
        d_skip = self.param(
            "D",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.RNN,)),
            (self.inner,),
        )
        neg_a = -jnp.exp(a_log)  # [d_inner, d_state]

        # Discretisation and the recurrence over [batch, time, d_inner, d_state], float32.
        x32 = xs.astype(jnp.float32)
        decay = jnp.exp(delta[..., None] * neg_a[None, None])
        drive = (delta * x32)[..., None] * b_in[:, :, None, :]
        if segment_pos is not None:
            decay = jnp.where((segment_pos == 0)[..., None, None], 0.0, decay)
        h0 = None if cache is None else cache.ssm_state
        if t == 1 and h0 is not None:  # one decoding step: no scan needed
            h = decay * h0[:, None] + drive
            h_last = h[:, 0]
        else:
            h, h_last = linear_scan(
                decay, drive, h0, impl=self.scan_impl, chunk_size=self.scan_chunk_size
            )
        y = jnp.einsum("bten,btn->bte", h, c_out) + x32 * d_skip[None, None]
        y = y * jax.nn.silu(z.astype(jnp.float32))
        y = nn.with_logical_constraint(y.astype(dtype), (axes.BATCH, axes.LENGTH, axes.RNN))
        out = dense(
            self.d_model,
            (axes.RNN, axes.EMBED),
            use_bias=self.use_bias,
            dtype=dtype,
            name="out_proj",
        )(y)
        if not want_cache:
            return out, None
        return out, MambaCache(conv_cache.inputs, h_last)

    def _in_proj(self, x: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
        """The two branches `x, z [batch, time, d_inner]` of `in_proj(x)`."""
        e = self.inner
        in_kernel = self.param(
            "in_proj_kernel",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(
                    1.0, "fan_in", "normal", in_axis=0, out_axis=(1, 2)
                ),
                (axes.EMBED, None, axes.RNN),
            ),
            (self.d_model, 2, e),
            jnp.float32,
        )
        xz = jnp.einsum("btd,dke->btke", x.astype(dtype), in_kernel.astype(dtype))
        if self.use_bias:
            in_bias = self.param(
                "in_proj_bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, axes.RNN)),
                (2, e),
                jnp.float32,
            )
            xz = xz + in_bias.astype(dtype)[None, None]
        xs, z = xz[:, :, 0], xz[:, :, 1]
        return nn.with_logical_constraint(xs, (axes.BATCH, axes.LENGTH, axes.RNN)), z

    def _conv(
        self,
        xs: jax.Array,
        pos: jax.Array,
        cache: MambaCache | None,
        want_cache: bool,
        dtype: jnp.dtype,
    ) -> tuple[jax.Array, Conv1DCache | None]:
        """silu(causal depthwise conv) of `xs [batch, time, d_inner]`; a cached call sees the
        buffered inputs as a prefix. Returns `(xs, conv cache or None)`."""
        conv = Conv1D(self.conv_width, dtype, name="conv1d")
        batch, t = xs.shape[:2]
        if cache is not None and t == 1:
            xs, conv_cache = conv(xs, pos, Conv1DCache(cache.conv_state), True)
        elif cache is not None:
            k = self.conv_width - 1
            prefix = cache.conv_state.astype(dtype)
            full_pos = jnp.concatenate([jnp.ones((batch, k), pos.dtype), pos], axis=1)
            xs, conv_cache = conv(jnp.concatenate([prefix, xs], axis=1), full_pos, None, True)
            xs = xs[:, k:]
        else:
            xs, conv_cache = conv(xs, pos, None, want_cache)
        return jax.nn.silu(xs), conv_cache

    def _delta_b_c(self, xs: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Input-dependent `Delta [batch, time, d_inner]`, `B, C [batch, time, d_state]`,
        float32."""
        e, n, r = self.inner, self.d_state, self.rank
        proj = dense(r + 2 * n, (axes.RNN, None), use_bias=False, dtype=dtype, name="x_proj")(xs)
        dt_low = proj[..., :r].astype(jnp.float32)
        b_in = proj[..., r : r + n].astype(jnp.float32)
        c_out = proj[..., r + n :].astype(jnp.float32)
        dt_std = self.dt_scale * r**-0.5
        delta = nn.Dense(
            e,
            dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(_symmetric_uniform(dt_std), (None, axes.RNN)),
            bias_init=nn.with_logical_partitioning(
                dt_bias_init(self.dt_min, self.dt_max, self.dt_floor), (axes.RNN,)
            ),
            name="dt_proj",
        )(dt_low)
        return jax.nn.softplus(delta), b_in, c_out

    def step(
        self, x_t: jax.Array, cache: MambaCache, segment_pos: jax.Array | None = None
    ) -> tuple[jax.Array, MambaCache]:
        """One token: `x_t [batch, d_model]` -> `(y_t [batch, d_model], next cache)`.

        `segment_pos` `[batch]` (optional): 0 restarts the state at this token.
        """
        pos = None if segment_pos is None else segment_pos[:, None]
        y, cache = self(x_t[:, None], pos, cache)
        return y[:, 0], cache

    def init_cache(self, batch_size: int, dtype=jnp.float32) -> MambaCache:
        """Zero state for `batch_size` sequences (conv buffer in `dtype`, SSM state float32)."""
        return init_mamba_cache(batch_size, self.inner, self.d_state, self.conv_width, dtype)


def _symmetric_uniform(limit: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init
