"""The linear recurrence h_t = a_t * h_{t-1} + b_t, in several interchangeable forms.

All forms compute in float32, agree to float32 tolerance, and are differentiable:
  - "sequential": `lax.scan` over time (O(T) depth, least memory).
  - "associative": `lax.associative_scan` (O(log T) depth).
  - "chunked": associative inside chunks of `chunk_size`, `lax.scan` carrying across chunks
    (the usual compromise on accelerators; bounded intermediate memory).
  - "auto" (the default): "sequential" on CPU, where a scan unrolled by 8 is fastest at every
    length we measured (tools/bench/ssm.py), "associative" on GPU/TPU (log-depth parallelism).

Sequence parallelism: when the logical axis "length" is mapped (flax logical axis rules) to a
mesh axis of size n > 1 in the current mesh, and time divides by n, the scan runs under
`jax.shard_map` over that axis: each shard scans its slice from a zero state, the shards
exchange their total decay and final state (an all-gather of `[n, batch, ...]`), each folds
the states of the shards before it into its incoming state, and corrects its slice with the
cumulative decay. Communication is two small all-gathers, independent of the length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from avjax.nn import axes

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


def _length_mesh_axis(time: int) -> str | None:
    """The mesh axis the "length" logical axis is sharded over, if it splits `time` evenly."""
    import flax.linen as nn

    rules = dict(nn.get_logical_axis_rules() or ())
    axis = rules.get(axes.LENGTH)
    mesh = jax.sharding.get_abstract_mesh()
    if not isinstance(axis, str) or mesh.empty or axis not in mesh.axis_names:
        return None
    n = mesh.shape[axis]
    return axis if n > 1 and time % n == 0 else None


def _sequence_parallel(
    a: jax.Array, b: jax.Array, h0: jax.Array, axis: str, local_scan
) -> jax.Array:
    """`local_scan` on each shard of the time axis, stitched across shards (see module doc)."""
    from jax.sharding import PartitionSpec as P

    def shard(a, b, h0):
        h = local_scan(a, b, jnp.zeros_like(h0))  # from a zero state, [batch, t_local, ...]
        idx = jax.lax.axis_index(axis)
        decays = jax.lax.all_gather(jnp.prod(a, axis=1), axis)  # [n, batch, ...]
        finals = jax.lax.all_gather(h[:, -1], axis)

        def fold(carry, xs):  # the state entering shard k+1, for shards before this one
            a_k, h_k, k = xs
            return jnp.where(k < idx, a_k * carry + h_k, carry), None

        n = decays.shape[0]
        carry, _ = jax.lax.scan(fold, h0, (decays, finals, jnp.arange(n)))
        return h + jnp.cumprod(a, axis=1) * carry[:, None]

    spec = P(None, axis)
    return jax.shard_map(
        shard, in_specs=(spec, spec, P()), out_specs=spec, axis_names={axis}, check_vma=False
    )(a, b, h0)


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
        local = _sequential
    elif impl == "associative":
        local = _associative
    else:

        def local(a, b, h0):
            return _chunked(a, b, h0, chunk_size)

    axis = _length_mesh_axis(a.shape[1])
    h = local(a, b, h0) if axis is None else _sequence_parallel(a, b, h0, axis, local)
    return h, h[:, -1]
