"""Local (sliding-window) multi-query attention with RoPE and a ring-buffer KV cache.

A query at position q sees keys at positions k with q - window <= k <= q in its own document.
RoPE rotates the first half of each head's dimensions by the token's segment position, so
only relative distances (never beyond `window`) matter and generation can run far past the
training length. The decoding cache is a ring buffer of exactly `window` keys and values:
memory is constant however many tokens are generated.

The pieces (`project_qkv`: q/k/v projections + RoPE, `sequence_mask`, `attend`: the softmax in
float32 with grouped key/value heads, `project_out`) are shared with the global causal
attention of `avjax.nn.transformer`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes
from avjax.nn.layers import dense, segment_ids

NEG_INF = -2.3819763e38  # a large finite negative: masked rows never produce NaNs
ATTENTION_SCOPE = "attention_core"  # name scope of the attention core (AOT traffic breakdown)


class AttentionCache(NamedTuple):
    """Ring buffer: `keys`/`values [batch, window, kv_heads, head_dim]`; `positions [batch,
    window]` int32 stream index of each slot (-1 = empty); `index [batch]` tokens seen."""

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    index: jax.Array


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    max_wavelength: float = 10_000.0,
    rotary_fraction: float = 0.5,
    inv_freq: jax.Array | None = None,
) -> jax.Array:
    """Rotates the first `rotary_fraction` of the last axis of `x [batch, time, heads, dim]`.

    Of the first r = dim * rotary_fraction dims, dims i and i + r/2 turn by position times
    `max_wavelength ** (-2i / r)`, or times `inv_freq [r/2]` when given (e.g. Llama-3's scaled
    frequencies); the other dims pass through. 0.5 is Griffin's form, 1.0 Gemma's and Llama's.
    """
    r = int(x.shape[-1] * rotary_fraction)
    rope, rest = x[..., :r], x[..., r:]
    half = r // 2
    if inv_freq is None:
        freq = max_wavelength ** (-(2.0 * jnp.arange(half) / r))
    else:
        freq = jnp.asarray(inv_freq, jnp.float32)
    angle = (
        positions[..., None, None].astype(jnp.float32) * freq[None, None, None]
    )  # [b, t, 1, half]
    sin, cos = jnp.sin(angle).astype(x.dtype), jnp.cos(angle).astype(x.dtype)
    x1, x2 = rope[..., :half], rope[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q `[b, t, h, d]`, k/v `[b, s, kv, d]`, mask `[b, t, s]` -> `[b, t, h, d]` (f32 softmax)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    with jax.named_scope(ATTENTION_SCOPE):
        q = q.reshape(b, t, kv, h // kv, d)
        logits = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * d**-0.5
        logits = jnp.where(mask[:, None, None], logits, NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def project_qkv(
    x: jax.Array,
    segment_pos: jax.Array,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The query/key/value projections of an attention module, with RoPE on q and k.

    Call inside the `nn.compact` method of the attention module: it adds the bias-free dense
    submodules "q", "k" and "v" to that module. `x [batch, time, width]`, `segment_pos
    [batch, time]` -> q `[b, t, num_heads, head_dim]`, k and v `[b, t, num_kv_heads, head_dim]`.
    """
    b, t, _ = x.shape
    width = num_heads * head_dim
    q = dense(width, (axes.EMBED, axes.HEADS), use_bias=False, dtype=dtype, name="q")(x)
    k = dense(
        num_kv_heads * head_dim, (axes.EMBED, axes.KV), use_bias=False, dtype=dtype, name="k"
    )(x)
    v = dense(
        num_kv_heads * head_dim, (axes.EMBED, axes.KV), use_bias=False, dtype=dtype, name="v"
    )(x)
    q = apply_rope(q.reshape(b, t, num_heads, head_dim), segment_pos)
    k = apply_rope(k.reshape(b, t, num_kv_heads, head_dim), segment_pos)
    return q, k, v.reshape(b, t, num_kv_heads, head_dim)


def project_out(
    out: jax.Array,
    dtype: jnp.dtype | None = None,
    scale: float = 1.0,
    features: int | None = None,
) -> jax.Array:
    """The output projection (dense submodule "out", with bias) of the heads `out [batch,
    time, heads, head_dim]` -> `[batch, time, features]` (the model width; default
    `heads * head_dim`, which is the width of every Griffin); inside `nn.compact`. `scale` is
    the variance scale of its fan-in normal kernel."""
    b, t, h, d = out.shape
    out = nn.with_logical_constraint(
        out.reshape(b, t, h * d), (axes.BATCH, axes.LENGTH, axes.HEADS)
    )
    width = h * d if features is None else features
    return dense(width, (axes.HEADS, axes.EMBED), scale=scale, dtype=dtype, name="out")(out)


def sequence_mask(segment_pos: jax.Array, window: int | None = None) -> jax.Array:
    """`[batch, time, time]` bool: query i sees key j when j <= i in the same document (and,
    with a `window`, i - j <= window); documents restart where `segment_pos [b, t]` does."""
    pos = jnp.arange(segment_pos.shape[1])
    causal = pos[:, None] >= pos[None, :]
    if window is not None:
        causal &= pos[:, None] - pos[None, :] <= window
    ids = segment_ids(segment_pos)
    return causal[None] & (ids[:, :, None] == ids[:, None, :])


def _blocks(x: jax.Array, block: int, lead: int, num_blocks: int) -> jax.Array:
    """`x [b, t, ...]` -> `[b, num_blocks, block, ...]`, padded with `lead` blocks in front and
    at the end up to `(lead + num_blocks) * block` rows."""
    pad = [(lead * block, (num_blocks * block) - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, [(0, 0)] + pad)
    return x.reshape(x.shape[0], lead + num_blocks, block, *x.shape[2:])


def _band(x: jax.Array, lead: int, num_blocks: int) -> jax.Array:
    """Blocks `[b, lead + n, block, ...]` -> per query block its `lead` previous blocks and
    itself, concatenated: `[b, n, (lead + 1) * block, ...]`."""
    parts = [x[:, j : j + num_blocks] for j in range(lead + 1)]
    return jnp.concatenate(parts, axis=2)


def banded_local_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_pos: jax.Array, window: int, block: int
) -> jax.Array:
    """Local attention computed blockwise, in O(time x window) memory and FLOPs.

    Query block i (`block` queries) attends to key blocks i - ceil(window / block) .. i, the
    only ones that can intersect its window; the `[time, time]` mask and logits are never
    built. The sequence is padded to a multiple of `block`. Same result as
    `attend(q, k, v, sequence_mask(segment_pos, window))`.
    q `[b, t, h, d]`, k/v `[b, t, kv, d]`, segment_pos `[b, t]` -> `[b, t, h, d]`.
    """
    b, t, h, d = q.shape
    lead = -(-window // block)
    n = -(-t // block)
    qb = _blocks(q, block, 0, n).reshape(b * n, block, h, d)
    kb = _band(_blocks(k, block, lead, n), lead, n).reshape(b * n, -1, *k.shape[2:])
    vb = _band(_blocks(v, block, lead, n), lead, n).reshape(b * n, -1, *v.shape[2:])
    ids = segment_ids(segment_pos)
    q_ids = _blocks(ids, block, 0, n)  # [b, n, block]
    k_ids = _band(_blocks(ids, block, lead, n), lead, n)  # [b, n, (lead + 1) * block]
    q_pos = jnp.arange(n)[:, None] * block + jnp.arange(block)[None]  # [n, block]
    k_pos = (jnp.arange(n)[:, None] - lead) * block + jnp.arange((lead + 1) * block)[None]
    delta = q_pos[:, :, None] - k_pos[:, None, :]  # [n, block, (lead + 1) * block]
    valid = (k_pos >= 0)[:, None, :] & (delta >= 0) & (delta <= window)
    mask = valid[None] & (q_ids[..., :, None] == k_ids[..., None, :])
    out = attend(qb, kb, vb, mask.reshape(b * n, block, -1))
    return out.reshape(b, n * block, h, d)[:, :t]


def local_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_pos: jax.Array,
    window: int,
    block_size: int = 512,
) -> jax.Array:
    """Sliding-window attention over a whole sequence: q `[b, t, h, d]`, k/v `[b, t, kv, d]`
    -> `[b, t, h, d]`. Banded (`banded_local_attention`, blocks of `min(block_size, window)`)
    when that attends to fewer keys per query than the dense `[t, t]` path, else dense."""
    block = min(block_size, window)
    with jax.named_scope(ATTENTION_SCOPE):
        if (-(-window // block) + 1) * block < q.shape[1]:
            return banded_local_attention(q, k, v, segment_pos, window, block)
        return attend(q, k, v, sequence_mask(segment_pos, window))


class AttentionLayer(nn.Module):
    """The shape of every attention layer here. `[batch, time, width] -> [batch, time, width]`.

    `__call__(x, segment_pos, cache=None, return_cache=False) -> (out, cache or None)`:
    `project_qkv`, then either one decoding step against `cache` (`_decode`) or attention over
    the whole sequence (`_sequence`; with `return_cache` also the cache after it, a prefill),
    then `project_out`. Subclasses declare the fields `width`, `num_heads`, `num_kv_heads`
    and `dtype` and implement the two hooks.
    """

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        segment_pos: jax.Array,
        cache: Any = None,
        return_cache: bool = False,
    ) -> tuple[jax.Array, Any]:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}"
            )
        q, k, v = project_qkv(
            x, segment_pos, self.num_heads, self.num_kv_heads, self.head_dim, self.dtype
        )
        if cache is not None:
            out, new_cache = self._decode(q, k, v, cache)
        else:
            out, new_cache = self._sequence(q, k, v, segment_pos, return_cache)
        out = project_out(out, self.dtype, getattr(self, "out_scale", 1.0), self.width)
        return out, new_cache

    def _decode(
        self, q: jax.Array, k: jax.Array, v: jax.Array, cache: Any
    ) -> tuple[jax.Array, Any]:
        """New tokens' q `[b, t, h, d]`, k/v `[b, t, kv, d]` against `cache` -> (heads, cache)."""
        raise NotImplementedError

    def _sequence(
        self, q: jax.Array, k: jax.Array, v: jax.Array, segment_pos: jax.Array, return_cache: bool
    ) -> tuple[jax.Array, Any]:
        """Attention over the whole sequence -> (heads `[b, t, h, d]`, cache after it or None)."""
        raise NotImplementedError


class LocalAttention(AttentionLayer):
    """Multi-query local attention block. `[batch, time, width] -> [batch, time, width]`."""

    width: int
    num_heads: int
    window: int
    num_kv_heads: int = 1
    dtype: jnp.dtype | None = None
    out_scale: float = 1.0  # variance scale of the output projection's kernel
    block_size: int = 512  # query/key block of the banded training path

    def _decode(
        self, q: jax.Array, k: jax.Array, v: jax.Array, cache: AttentionCache
    ) -> tuple[jax.Array, AttentionCache]:
        b, t = q.shape[:2]
        if t != 1:
            raise ValueError(f"LocalAttention decoding takes one token at a time, got {t}")
        keys = jnp.concatenate([cache.keys.astype(k.dtype), k], axis=1)
        values = jnp.concatenate([cache.values.astype(v.dtype), v], axis=1)
        q_pos = cache.index[:, None]  # [b, 1]
        k_pos = jnp.concatenate([cache.positions, q_pos], axis=1)  # [b, window + 1]
        mask = ((k_pos >= 0) & (k_pos <= q_pos) & (q_pos - k_pos <= self.window))[:, None]
        out = attend(q, keys, values, mask)
        slot = cache.index % self.window
        rows = jnp.arange(b)
        return out, AttentionCache(
            cache.keys.at[rows, slot].set(k[:, 0].astype(cache.keys.dtype)),
            cache.values.at[rows, slot].set(v[:, 0].astype(cache.values.dtype)),
            cache.positions.at[rows, slot].set(cache.index),
            cache.index + 1,
        )

    def _sequence(
        self, q: jax.Array, k: jax.Array, v: jax.Array, segment_pos: jax.Array, return_cache: bool
    ) -> tuple[jax.Array, AttentionCache | None]:
        out = local_attention(q, k, v, segment_pos, self.window, self.block_size)
        return out, (self._cache_from_sequence(k, v) if return_cache else None)

    def _cache_from_sequence(self, k: jax.Array, v: jax.Array) -> AttentionCache:
        """The ring buffer after a prefill of `t` tokens: the last `window` keys at slot i % W."""
        b, t = k.shape[:2]
        n = min(t, self.window)
        idx = jnp.arange(t - n, t)
        slots = idx % self.window
        cache = self.init_cache(b, k.dtype)
        return AttentionCache(
            cache.keys.at[:, slots].set(k[:, t - n :]),
            cache.values.at[:, slots].set(v[:, t - n :]),
            cache.positions.at[:, slots].set(jnp.broadcast_to(idx, (b, n)).astype(jnp.int32)),
            jnp.full((b,), t, jnp.int32),
        )

    def init_cache(self, batch_size: int, dtype=jnp.float32) -> AttentionCache:
        return init_attention_cache(
            batch_size, self.window, self.num_kv_heads, self.head_dim, dtype
        )


def init_attention_cache(
    batch_size: int, window: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32
) -> AttentionCache:
    """An empty ring buffer of `window` slots."""
    shape = (batch_size, window, num_kv_heads, head_dim)
    return AttentionCache(
        jnp.zeros(shape, dtype),
        jnp.zeros(shape, dtype),
        jnp.full((batch_size, window), -1, jnp.int32),
        jnp.zeros((batch_size,), jnp.int32),
    )
