"""The linear recurrence h_t = a_t * h_{t-1} + b_t, in several interchangeable forms.

All forms compute in float32, agree to float32 tolerance, and are differentiable:
  - "sequential": `lax.scan` over time (O(T) depth, least memory).
  - "associative": `lax.associative_scan` (O(log T) depth).
  - "chunked": associative inside chunks of `chunk_size`, `lax.scan` carrying across chunks
    (the usual compromise on accelerators; bounded intermediate memory).
  - "auto" (the default): "sequential" on CPU, where a scan unrolled by 8 is fastest at every
    length we measured (tools/bench/ssm.py), "associative" on GPU/TPU (log-depth parallelism).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("sequential", "associative", "chunked")
DEFAULT_IMPL = "auto"


def resolve_impl(impl: str) -> str:
    """The concrete implementation `impl` stands for on the default backend."""
    if impl == "auto":
        return "sequential" if jax.default_backend() == "cpu" else "associative"
    if impl not in IMPLS:
        raise ValueError(f"linear_scan: impl={impl!r}; expected 'auto' or one of {IMPLS}")
    return impl


def _combine(left: tuple[jax.Array, jax.Array], right: tuple[jax.Array, jax.Array]):
    """Composition of two affine maps h -> a h + b (left applied first)."""
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _sequential(a: jax.Array, b: jax.Array, h0: jax.Array) -> jax.Array:
    def step(h, ab):
        a_t, b_t = ab
        h = a_t * h + b_t
        return h, h

    _, h = jax.lax.scan(step, h0, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)), unroll=8)
    return jnp.swapaxes(h, 0, 1)


def _associative(a: jax.Array, b: jax.Array, h0: jax.Array) -> jax.Array:
    b = b.at[:, 0].add(a[:, 0] * h0)
    _, h = jax.lax.associative_scan(_combine, (a, b), axis=1)
    return h


def _chunked(a: jax.Array, b: jax.Array, h0: jax.Array, chunk_size: int) -> jax.Array:
    batch, t = a.shape[:2]
    rest = a.shape[2:]
    c = min(chunk_size, t)
    pad = (-t) % c
    if pad:  # a = 1, b = 0 leaves the state unchanged
        widths = [(0, 0), (0, pad)] + [(0, 0)] * len(rest)
        a = jnp.pad(a, widths, constant_values=1.0)
        b = jnp.pad(b, widths)
    n = a.shape[1] // c
    a_c = a.reshape((batch, n, c) + rest)
    b_c = b.reshape((batch, n, c) + rest)
    # Within each chunk, from a zero state: cumulative decay and local state.
    a_cum, h_local = jax.lax.associative_scan(_combine, (a_c, b_c), axis=2)

    def across(h, xs):
        a_k, h_k = xs  # [batch, c, ...]
        h_all = a_k * h[:, None] + h_k
        return h_all[:, -1], h_all

    _, h = jax.lax.scan(across, h0, (jnp.swapaxes(a_cum, 0, 1), jnp.swapaxes(h_local, 0, 1)))
    h = jnp.swapaxes(h, 0, 1).reshape((batch, n * c) + rest)
    return h[:, :t]


def linear_scan(
    a: jax.Array,
    b: jax.Array,
    h0: jax.Array | None = None,
    *,
    impl: str = DEFAULT_IMPL,
    chunk_size: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """Runs h_t = a_t * h_{t-1} + b_t along axis 1.

    Args:
      a: decay `[batch, time, ...]`.
      b: input `[batch, time, ...]` (same shape as `a`).
      h0: initial state `[batch, ...]`, zeros if None.
      impl: "auto" or one of `IMPLS`.
      chunk_size: chunk length for "chunked".

    Returns:
      `(h [batch, time, ...], h_last [batch, ...])`, float32.
    """
    if a.shape != b.shape:
        raise ValueError(f"linear_scan: a {a.shape} and b {b.shape} differ")
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    h0 = (
        jnp.zeros((a.shape[0],) + a.shape[2:], jnp.float32)
        if h0 is None
        else h0.astype(jnp.float32)
    )
    impl = resolve_impl(impl)
    if impl == "sequential":
        h = _sequential(a, b, h0)
    elif impl == "associative":
        h = _associative(a, b, h0)
    else:
        h = _chunked(a, b, h0, chunk_size)
    return h, h[:, -1]
