"""Pre-norm Transformer decoder LM with a full-length KV cache (the SpeechTransformer core).

    x = embed(tokens) * sqrt(width)
    for each of num_layers identical blocks:
        x = x + CausalAttention(RMSNorm(x))    # MHA / GQA / MQA, RoPE, causal within documents
        x = x + MLP(RMSNorm(x))                # gelu(W_up0 x) * (W_up1 x) -> W_down
    logits = softcap(RMSNorm(x) @ embed^T)

The calling convention is GriffinLM's (`avjax.nn.griffin`), so `avjax.sample` drives either:
`__call__(tokens, segment_pos, cache=None, return_cache=False) -> (logits, cache)`. The full
call trains (and with `return_cache` also prefills); with a `cache` the call appends the new
tokens to the cache and attends over everything before them.

Unlike Griffin's ring buffers, the cache here holds every key and value of the stream:
`KVCache` is preallocated at `max_len` tokens per block, so decoding memory grows linearly with
the length to generate, and the attention work of one decode step grows with the position.
Decoding attends either over the whole buffer with a mask (`decode_block=0`) or, by default,
block by block over only the filled prefix with an online softmax (`decode_block` keys per
block, a `lax.fori_loop` whose trip count is the number of filled blocks), so the cost of the
step at position p is ~p, not `max_len` (the causal half on average over a run).

RoPE, the attention kernel and the gated MLP are Griffin's (`avjax.nn.attention`,
`avjax.nn.griffin.MLPBlock`): RoPE rotates the first half of each head's dims by the absolute
segment position. `scan_layers` runs the identical blocks with `nn.scan` over stacked params
(leading logical axis "layers") and a stacked cache.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes
from avjax.nn.attention import NEG_INF, AttentionLayer, attend, sequence_mask
from avjax.nn.griffin import REMAT_POLICIES, MLPBlock
from avjax.nn.norms import RMSNorm


class KVCache(NamedTuple):
    """Full-length cache of one attention block.

    `keys`/`values [batch, max_len, kv_heads, head_dim]`: slot i holds the i-th token of the
    stream; `index [batch]` int32: tokens written so far (the next slot).
    """

    keys: jax.Array
    values: jax.Array
    index: jax.Array


def init_kv_cache(
    batch_size: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32
) -> KVCache:
    """An empty cache of `max_len` slots."""
    shape = (batch_size, max_len, num_kv_heads, head_dim)
    return KVCache(
        jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch_size,), jnp.int32)
    )


def _blocked_attend(
    q: jax.Array, keys: jax.Array, values: jax.Array, q_slot: jax.Array, block: int
) -> jax.Array:
    """Attention of queries at cache slots `q_slot [b, t]` over slots `<= q_slot`, by blocks.

    q `[b, t, h, d]`, keys/values `[b, L, kv, d]` with `L % block == 0` -> `[b, t, h, d]`.
    Only the blocks up to the furthest query are visited (online softmax in float32).
    """
    b, t, h, d = q.shape
    kv = keys.shape[2]
    qg = q.reshape(b, t, kv, h // kv, d)
    n_blocks = (jnp.max(q_slot) + block) // block  # blocks holding slots 0 .. max(q_slot)
    m0 = jnp.full((b, kv, h // kv, t), NEG_INF, jnp.float32)
    d0 = jnp.zeros((b, kv, h // kv, t), jnp.float32)
    acc0 = jnp.zeros((b, kv, h // kv, t, d), jnp.float32)

    def body(i, carry):
        m, denom, acc = carry
        start = i * block
        k = jax.lax.dynamic_slice_in_dim(keys, start, block, axis=1).astype(q.dtype)
        v = jax.lax.dynamic_slice_in_dim(values, start, block, axis=1).astype(q.dtype)
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) * d**-0.5
        slots = start + jnp.arange(block)
        mask = slots[None, None, :] <= q_slot[:, :, None]  # [b, t, s]
        logits = jnp.where(mask[:, None, None], logits, NEG_INF)
        m_new = jnp.maximum(m, logits.max(-1))
        p = jnp.exp(logits - m_new[..., None])
        corr = jnp.exp(m - m_new)
        denom = denom * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p, v.astype(jnp.float32))
        return m_new, denom, acc

    _, denom, acc = jax.lax.fori_loop(0, n_blocks, body, (m0, d0, acc0))
    out = (acc / denom[..., None]).astype(q.dtype)  # [b, kv, g, t, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


class CausalAttention(AttentionLayer):
    """Causal multi-head / grouped-query / multi-query attention with RoPE.

    `[batch, time, width] -> [batch, time, width]`. `num_kv_heads` = `num_heads` is MHA, 1 is
    MQA, anything dividing `num_heads` is GQA. Parameter names follow `LocalAttention`.
    """

    width: int
    num_heads: int
    num_kv_heads: int = 1
    max_len: int = 2048
    decode_block: int = 256
    dtype: jnp.dtype | None = None

    def _decode(
        self, q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Appends the new tokens (one or more) and attends over the filled prefix."""
        new_cache = _append(cache, k, v)
        q_slot = cache.index[:, None] + jnp.arange(q.shape[1])[None]  # [b, t]
        length = cache.keys.shape[1]
        if self.decode_block and length % self.decode_block == 0:
            out = _blocked_attend(q, new_cache.keys, new_cache.values, q_slot, self.decode_block)
        else:
            mask = jnp.arange(length)[None, None, :] <= q_slot[:, :, None]
            out = attend(q, new_cache.keys.astype(q.dtype), new_cache.values.astype(q.dtype), mask)
        return out, new_cache

    def _sequence(
        self, q: jax.Array, k: jax.Array, v: jax.Array, segment_pos: jax.Array, return_cache: bool
    ) -> tuple[jax.Array, KVCache | None]:
        out = attend(q, k, v, sequence_mask(segment_pos))
        if not return_cache:
            return out, None
        b, t = k.shape[:2]
        if t > self.max_len:
            raise ValueError(f"prefill of {t} tokens > cache max_len={self.max_len}")
        empty = init_kv_cache(b, self.max_len, self.num_kv_heads, self.head_dim, k.dtype)
        return out, _append(empty, k, v)


def _append(cache: KVCache, k: jax.Array, v: jax.Array) -> KVCache:
    """Writes `k`/`v [b, t, kv, d]` at slots `index .. index + t - 1` of each sequence."""

    def write(buf, new, i):  # one sequence: buf [L, kv, d], new [t, kv, d]
        return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), i, axis=0)

    return KVCache(
        jax.vmap(write)(cache.keys, k, cache.index),
        jax.vmap(write)(cache.values, v, cache.index),
        cache.index + k.shape[1],
    )


class DecoderBlock(nn.Module):
    """Pre-norm residual block: causal attention then gated MLP.

    `(x [batch, time, width], segment_pos [batch, time], cache) -> (x, new_cache)`; the
    signature `nn.scan` needs (the cache is the scanned input/output).
    """

    width: int
    mlp_width: int
    num_heads: int
    num_kv_heads: int = 1
    max_len: int = 2048
    decode_block: int = 256
    want_cache: bool = False
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, segment_pos: jax.Array, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        attn = CausalAttention(
            self.width,
            self.num_heads,
            self.num_kv_heads,
            self.max_len,
            self.decode_block,
            self.dtype,
            name="attention",
        )
        h, new_cache = attn(
            RMSNorm(dtype=self.dtype, name="pre_attention_norm")(x),
            segment_pos,
            cache,
            self.want_cache,
        )
        x = x + h
        mlp = MLPBlock(self.width, self.mlp_width, self.dtype, name="mlp")
        x = x + mlp(RMSNorm(dtype=self.dtype, name="pre_mlp_norm")(x))
        return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED)), new_cache


def _block_class(remat: str) -> type[DecoderBlock]:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; expected one of {list(REMAT_POLICIES)}")
    if remat == "none":
        return DecoderBlock
    return nn.remat(DecoderBlock, policy=REMAT_POLICIES[remat])


class TransformerLM(nn.Module):
    """Decoder-only Transformer LM. tokens `[batch, time]` int32 -> logits `[b, t, vocab]` f32.

    Attributes:
      num_kv_heads: key/value heads (1 = multi-query, as Gemma-2B; `num_heads` = MHA).
      max_len: KV-cache length in tokens (prompt + generated) for decoding.
      decode_block: keys per block of the decode attention loop (0: attend over the whole
        buffer every step; also used when it does not divide `max_len`).
      logit_softcap: logits -> c * tanh(logits / c); None disables.
      remat: activation checkpointing per block: "none", "full" or "dots".
      scan_layers: `nn.scan` over the identical blocks (params and cache stacked on a leading
        "layers" axis).
      dtype: activation dtype (params float32; softmax in float32).
    """

    vocab_size: int
    width: int
    mlp_width: int
    num_heads: int
    num_layers: int
    num_kv_heads: int = 1
    max_len: int = 2048
    decode_block: int = 256
    logit_softcap: float | None = 30.0
    embed_scale: bool = True
    remat: str = "none"
    scan_layers: bool = False
    dtype: jnp.dtype = jnp.float32

    def _block_kwargs(self, want_cache: bool) -> dict:
        return dict(
            width=self.width,
            mlp_width=self.mlp_width,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            max_len=self.max_len,
            decode_block=self.decode_block,
            want_cache=want_cache,
            dtype=self.dtype,
        )

    def _layers(self, x, segment_pos, cache, want_cache):
        block_cls = _block_class(self.remat)
        if not self.scan_layers:
            new = []
            for i in range(self.num_layers):
                x, c = block_cls(**self._block_kwargs(want_cache), name=f"blocks_{i}")(
                    x, segment_pos, None if cache is None else cache[i]
                )
                new.append(c)
            return x, (tuple(new) if want_cache else None)
        scanned = nn.scan(
            block_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, 0),
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: axes.LAYERS},
        )
        return scanned(**self._block_kwargs(want_cache), name="layers")(x, segment_pos, cache)

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        segment_pos: jax.Array,
        cache: tuple[KVCache, ...] | KVCache | None = None,
        return_cache: bool = False,
    ) -> tuple[jax.Array, tuple[KVCache, ...] | KVCache | None]:
        """Returns `(logits [batch, time, vocab] float32, cache or None)`."""
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0 / math.sqrt(self.width)), (axes.VOCAB, axes.EMBED)
            ),
            (self.vocab_size, self.width),
            jnp.float32,
        )
        x = jnp.take(embedding, tokens, axis=0).astype(self.dtype)
        if self.embed_scale:
            x = x * jnp.sqrt(jnp.float32(self.width)).astype(self.dtype)
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        want_cache = return_cache or cache is not None
        x, new_cache = self._layers(x, segment_pos, cache, want_cache)
        x = RMSNorm(dtype=self.dtype, name="final_norm")(x)
        logits = jnp.einsum("btd,vd->btv", x.astype(jnp.float32), embedding)
        if self.logit_softcap:
            logits = jnp.tanh(logits / self.logit_softcap) * self.logit_softcap
        logits = nn.with_logical_constraint(logits, (axes.BATCH, axes.LENGTH, axes.VOCAB))
        return logits, new_cache

    def init_cache(self, batch_size: int) -> tuple[KVCache, ...] | KVCache:
        """An empty cache: a tuple over layers, or with `scan_layers` one `KVCache` whose
        leaves have a leading `num_layers` axis."""

        def one() -> KVCache:  # fresh buffers per layer, so the cache can be donated
            return init_kv_cache(
                batch_size,
                self.max_len,
                self.num_kv_heads,
                self.width // self.num_heads,
                self.dtype,
            )

        if self.scan_layers:
            return jax.tree.map(lambda x: jnp.zeros((self.num_layers,) + x.shape, x.dtype), one())
        return tuple(one() for _ in range(self.num_layers))


def stack_layers(params: dict, num_layers: int) -> dict:
    """Unrolled params (`blocks_0` .. `blocks_{L-1}`) -> the `scan_layers` layout."""
    out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    out["layers"] = jax.tree.map(
        lambda *xs: jnp.stack(xs), *[params[f"blocks_{i}"] for i in range(num_layers)]
    )
    return out


def num_params(
    vocab_size: int, width: int, mlp_width: int, num_heads: int, num_kv_heads: int, num_layers: int
) -> int:
    """Parameter count of `TransformerLM` (tied embedding)."""
    hd = width // num_heads
    attn = 2 * width * width + 2 * width * num_kv_heads * hd + width  # q, k, v, out (+ out bias)
    mlp = 3 * width * mlp_width + 2 * mlp_width + width  # up (2), down, biases
    return vocab_size * width + num_layers * (attn + mlp + 2 * width) + width
