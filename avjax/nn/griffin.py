"""Griffin language model (De et al., 2024), laid out as RecurrentGemma.

    x = embed(tokens) * sqrt(width)
    for each residual block (pattern recurrent, recurrent, local attention):
        x = x + temporal_block(RMSNorm(x))      # RecurrentBlock or LocalAttention
        x = x + MLP(RMSNorm(x))                 # gelu(W_up0 x) * (W_up1 x) -> W_down
    logits = softcap(RMSNorm(x) @ embed^T)

Full-sequence call for training; `return_cache=True` also returns the decoding state after
the sequence (prefill); with a `cache` the call takes one token per sequence and returns the
next state. The cache has a constant size: RG-LRU states, conv buffers and ring buffers of
`window` keys/values.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn.attention import AttentionCache, LocalAttention, init_attention_cache
from avjax.nn.layers import dense
from avjax.nn.norms import RMSNorm
from avjax.nn.scan import DEFAULT_IMPL
from avjax.nn.ssm import RecurrentBlock, RecurrentBlockCache, init_recurrent_cache

RECURRENT, ATTENTION = "recurrent", "attention"
BlockCache = RecurrentBlockCache | AttentionCache


def griffin_pattern(num_layers: int) -> tuple[str, ...]:
    """Block types for `num_layers`: (recurrent, recurrent, attention) repeated."""
    return tuple((RECURRENT, RECURRENT, ATTENTION)[i % 3] for i in range(num_layers))


class MLPBlock(nn.Module):
    """Gated-GeLU MLP. `[batch, time, width] -> [batch, time, width]`."""

    width: int
    mlp_width: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param(
            "ffw_up_w",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=2),
                (None, "embed", "mlp"),
            ),
            (2, self.width, self.mlp_width),
            jnp.float32,
        )
        b = self.param(
            "ffw_up_b",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, "mlp")),
            (2, self.mlp_width),
            jnp.float32,
        )
        dtype = self.dtype or x.dtype
        up = (
            jnp.einsum("btd,cdf->cbtf", x.astype(dtype), w.astype(dtype))
            + b.astype(dtype)[:, None, None]
        )
        h = jax.nn.gelu(up[0]) * up[1]
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return dense(self.width, ("mlp", "embed"), dtype=self.dtype, name="ffw_down")(h)


class ResidualBlock(nn.Module):
    """Pre-norm residual block: temporal mixing then MLP."""

    kind: str
    width: int
    mlp_width: int
    num_heads: int
    lru_width: int
    window: int
    conv1d_width: int = 4
    scan_impl: str = DEFAULT_IMPL
    dtype: jnp.dtype | None = None

    def setup(self):
        self.temporal_pre_norm = RMSNorm(dtype=self.dtype)
        self.channel_pre_norm = RMSNorm(dtype=self.dtype)
        if self.kind == RECURRENT:
            self.temporal = RecurrentBlock(
                self.width,
                self.lru_width,
                self.num_heads,
                self.conv1d_width,
                self.scan_impl,
                self.dtype,
            )
        elif self.kind == ATTENTION:
            self.temporal = LocalAttention(
                self.width, self.num_heads, self.window, dtype=self.dtype
            )
        else:
            raise ValueError(f"block type {self.kind!r}: expected {RECURRENT!r} or {ATTENTION!r}")
        self.mlp = MLPBlock(self.width, self.mlp_width, self.dtype)

    def __call__(
        self,
        x: jax.Array,
        segment_pos: jax.Array,
        cache: BlockCache | None = None,
        return_cache: bool = False,
    ) -> tuple[jax.Array, BlockCache | None]:
        h, new_cache = self.temporal(self.temporal_pre_norm(x), segment_pos, cache, return_cache)
        x = x + h
        x = x + self.mlp(self.channel_pre_norm(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), new_cache


class GriffinLM(nn.Module):
    """Griffin decoder LM. tokens `[batch, time]` int32 -> logits `[batch, time, vocab]` f32.

    Attributes:
      block_types: per layer "recurrent" or "attention"; default `griffin_pattern`.
      lru_width: RG-LRU width (default `width`).
      window: local attention window (tokens).
      logit_softcap: logits -> c * tanh(logits / c); None disables.
      dtype: activation dtype (params stay float32; recurrence and softmax in float32).
    """

    vocab_size: int
    width: int
    mlp_width: int
    num_heads: int
    num_layers: int
    block_types: tuple[str, ...] | None = None
    lru_width: int | None = None
    window: int = 2048
    conv1d_width: int = 4
    logit_softcap: float | None = 30.0
    embed_scale: bool = True
    scan_impl: str = DEFAULT_IMPL
    dtype: jnp.dtype = jnp.float32

    @property
    def types(self) -> tuple[str, ...]:
        types = self.block_types or griffin_pattern(self.num_layers)
        if len(types) != self.num_layers:
            raise ValueError(f"{len(types)} block_types for num_layers={self.num_layers}")
        return tuple(types)

    def _block(self, i: int, kind: str) -> ResidualBlock:
        return ResidualBlock(
            kind,
            self.width,
            self.mlp_width,
            self.num_heads,
            self.lru_width or self.width,
            self.window,
            self.conv1d_width,
            self.scan_impl,
            self.dtype,
            name=f"blocks_{i}",
        )

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        segment_pos: jax.Array,
        cache: tuple[BlockCache, ...] | None = None,
        return_cache: bool = False,
    ) -> tuple[jax.Array, tuple[BlockCache, ...] | None]:
        """Returns `(logits [batch, time, vocab] float32, cache or None)`."""
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0 / math.sqrt(self.width)), ("vocab", "embed")
            ),
            (self.vocab_size, self.width),
            jnp.float32,
        )
        x = jnp.take(embedding, tokens, axis=0).astype(self.dtype)
        if self.embed_scale:  # the constant is rounded to bfloat16, as in RecurrentGemma
            x = x * jnp.sqrt(jnp.float32(self.width)).astype(jnp.bfloat16).astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        want_cache = return_cache or cache is not None
        new_caches = []
        for i, kind in enumerate(self.types):
            x, c = self._block(i, kind)(
                x, segment_pos, None if cache is None else cache[i], want_cache
            )
            new_caches.append(c)
        x = RMSNorm(dtype=self.dtype, name="final_norm")(x)
        logits = jnp.einsum("btd,vd->btv", x.astype(jnp.float32), embedding)
        if self.logit_softcap:
            logits = jnp.tanh(logits / self.logit_softcap) * self.logit_softcap
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits, (tuple(new_caches) if want_cache else None)

    def init_cache(self, batch_size: int) -> tuple[BlockCache, ...]:
        """An empty decoding state (constant size) for `batch_size` sequences."""
        lru = self.lru_width or self.width
        return tuple(
            init_recurrent_cache(batch_size, lru, self.conv1d_width, self.dtype)
            if kind == RECURRENT
            else init_attention_cache(
                batch_size, self.window, 1, self.width // self.num_heads, self.dtype
            )
            for kind in self.types
        )
