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

Two options trade compute and compile time for memory at scale (MaxText's `remat_policy` and
`scan_layers`):
  - `remat`: "none" keeps every activation for the backward pass; "full" recomputes each
    residual block; "dots" saves only matmul outputs that have no batch dimension
    (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`) and recomputes the rest.
  - `scan_layers`: the layers are `num_layers // period` repeats of one period of the block
    pattern (3 for recurrent, recurrent, attention), run with `nn.scan` over stacked parameters
    (leading logical axis "layers"), so XLA compiles one period instead of every layer; the
    `num_layers % period` remaining layers (26 = 8 x 3 + 2: the final recurrent, recurrent)
    run unrolled after the scan and keep their unrolled names `blocks_{i}`. The cache is then
    a tuple over the period of caches with a leading repeats axis, followed by one cache per
    remaining layer. `stack_layers` / `unstack_layers` convert parameters between the layouts.

Initialisation follows RecurrentGemma: fan-in scaled normal kernels; the output projection of
every block (recurrent `linear_out`, attention `out`, MLP `ffw_down`) with variance scale
2 / num_layers (`out_init_scale="rg"`) so the residual stream's variance stays O(1) at depth;
`out_init_scale="unit"` uses 1.0 as before.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes
from avjax.nn.attention import AttentionCache, LocalAttention, init_attention_cache
from avjax.nn.layers import dense
from avjax.nn.norms import RMSNorm
from avjax.nn.rglru import RecurrentBlock, RecurrentBlockCache, init_recurrent_cache
from avjax.nn.scan import DEFAULT_IMPL

RECURRENT, ATTENTION = "recurrent", "attention"
BlockCache = RecurrentBlockCache | AttentionCache
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def griffin_pattern(num_layers: int) -> tuple[str, ...]:
    """Block types for `num_layers`: (recurrent, recurrent, attention) repeated."""
    return tuple((RECURRENT, RECURRENT, ATTENTION)[i % 3] for i in range(num_layers))


class MLPBlock(nn.Module):
    """Gated-GeLU MLP. `[batch, time, width] -> [batch, time, width]`."""

    width: int
    mlp_width: int
    dtype: jnp.dtype | None = None
    out_scale: float = 1.0  # variance scale of `ffw_down`'s kernel

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param(
            "ffw_up_w",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=2),
                (None, axes.EMBED, axes.MLP),
            ),
            (2, self.width, self.mlp_width),
            jnp.float32,
        )
        b = self.param(
            "ffw_up_b",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, axes.MLP)),
            (2, self.mlp_width),
            jnp.float32,
        )
        dtype = self.dtype or x.dtype
        up = (
            jnp.einsum("btd,cdf->cbtf", x.astype(dtype), w.astype(dtype))
            + b.astype(dtype)[:, None, None]
        )
        h = jax.nn.gelu(up[0]) * up[1]
        h = nn.with_logical_constraint(h, (axes.BATCH, axes.LENGTH, axes.MLP))
        return dense(
            self.width,
            (axes.MLP, axes.EMBED),
            scale=self.out_scale,
            dtype=self.dtype,
            name="ffw_down",
        )(h)


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
    out_scale: float = 1.0  # variance scale of the output projections (temporal and MLP)

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
                out_scale=self.out_scale,
            )
        elif self.kind == ATTENTION:
            self.temporal = LocalAttention(
                self.width, self.num_heads, self.window, dtype=self.dtype, out_scale=self.out_scale
            )
        else:
            raise ValueError(f"block type {self.kind!r}: expected {RECURRENT!r} or {ATTENTION!r}")
        self.mlp = MLPBlock(self.width, self.mlp_width, self.dtype, self.out_scale)

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
        return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED)), new_cache


def _residual_block_class(remat: str) -> type[ResidualBlock]:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; expected one of {list(REMAT_POLICIES)}")
    if remat == "none":
        return ResidualBlock
    # Argument 4 (return_cache, a Python bool) is static; `self` counts as argument 0.
    return nn.remat(ResidualBlock, policy=REMAT_POLICIES[remat], static_argnums=(4,))


def pattern_period(types: tuple[str, ...]) -> int:
    """The shortest period p with types[i] == types[i % p] for every layer i.

    The depth need not be a multiple of p: `scan_layers` scans `len(types) // p` repeats and
    unrolls the `len(types) % p` remaining layers (a prefix of the period).
    """
    n = len(types)
    for p in range(1, n + 1):
        if all(types[i] == types[i % p] for i in range(n)):
            return p
    return n


class BlockPeriod(nn.Module):
    """One period of the block pattern; the body of the layer scan.

    `(x [batch, time, width], segment_pos [batch, time], cache) -> (x, new_cache)`.
    """

    kinds: tuple[str, ...]
    block_kwargs: dict
    remat: str = "none"
    want_cache: bool = False

    @nn.compact
    def __call__(self, x, segment_pos, cache):
        block_cls = _residual_block_class(self.remat)
        new = []
        for j, kind in enumerate(self.kinds):
            x, c = block_cls(kind, **self.block_kwargs, name=f"blocks_{j}")(
                x, segment_pos, None if cache is None else cache[j], self.want_cache
            )
            new.append(c)
        return x, (tuple(new) if self.want_cache else None)


def stack_layers(params: dict, num_layers: int, period: int) -> dict:
    """Unrolled params (`blocks_0` .. `blocks_{L-1}`) -> the `scan_layers` layout.

    The first `(L // period) * period` blocks are stacked under `layers/blocks_{j}` (j < period,
    leading repeats axis); the remaining blocks keep their unrolled names.
    """
    repeats = num_layers // period
    out = {
        k: v
        for k, v in params.items()
        if not k.startswith("blocks_") or int(k.split("_")[1]) >= repeats * period
    }
    out["layers"] = {
        f"blocks_{j}": jax.tree.map(
            lambda *xs: jnp.stack(xs),
            *[params[f"blocks_{g * period + j}"] for g in range(repeats)],
        )
        for j in range(period)
    }
    return out


def unstack_layers(params: dict, num_layers: int, period: int) -> dict:
    """The `scan_layers` layout -> unrolled params (inverse of `stack_layers`)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for g in range(num_layers // period):
        for j in range(period):
            out[f"blocks_{g * period + j}"] = jax.tree.map(
                lambda x, g=g: x[g], params["layers"][f"blocks_{j}"]
            )
    return out


@dataclasses.dataclass(frozen=True)
class GriffinConfig:
    """The architecture of a `GriffinLM` (everything but compute options), as RecurrentGemma's
    `GriffinConfig`. `make(**options)` builds the module (options: scan_impl, remat,
    scan_layers, dtype); presets `recurrent_gemma_2b` / `recurrent_gemma_9b` / `speechssm_2b`.
    """

    vocab_size: int
    width: int
    mlp_width: int
    num_heads: int
    num_layers: int
    block_types: tuple[str, ...] | None = None  # None: griffin_pattern(num_layers)
    lru_width: int | None = None  # None: width
    window: int = 2048
    conv1d_width: int = 4
    logit_softcap: float | None = 30.0
    embed_scale: bool = True
    out_init_scale: str = "rg"

    def make(self, **options: Any) -> GriffinLM:
        """The module with this architecture and `options` (scan_impl, remat, ...)."""
        return GriffinLM(**dataclasses.asdict(self), **options)

    @classmethod
    def recurrent_gemma_2b(cls, vocab_size: int = 256_000) -> GriffinConfig:
        """RecurrentGemma-2B: 26 layers, width 2560, MLP 7680, 10 heads, window 2048."""
        return cls(vocab_size, 2560, 7680, 10, 26, griffin_pattern(26), 2560, window=2048)

    @classmethod
    def recurrent_gemma_9b(cls, vocab_size: int = 256_000) -> GriffinConfig:
        """RecurrentGemma-9B: 38 layers, width 4096, MLP 12288, 16 heads, window 2048."""
        return cls(vocab_size, 4096, 12_288, 16, 38, griffin_pattern(38), 4096, window=2048)

    @classmethod
    def speechssm_2b(cls, vocab_size: int = 32_768) -> GriffinConfig:
        """SpeechSSM-2B: RecurrentGemma-2B's backbone over 32,768 speech units."""
        return cls.recurrent_gemma_2b(vocab_size)


class GriffinLM(nn.Module):
    """Griffin decoder LM. tokens `[batch, time]` int32 -> logits `[batch, time, vocab]` f32.

    Attributes:
      block_types: per layer "recurrent" or "attention"; default `griffin_pattern`.
      lru_width: RG-LRU width (default `width`).
      window: local attention window (tokens).
      logit_softcap: logits -> c * tanh(logits / c); None disables.
      remat: activation checkpointing per residual block: "none", "full" or "dots".
      scan_layers: run the layers as `nn.scan` over repeats of the pattern's period (the
        remainder of the depth unrolled after it).
      out_init_scale: "rg" (RecurrentGemma: output projections of every block with variance
        scale 2 / num_layers) or "unit" (1.0).
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
    remat: str = "none"
    scan_layers: bool = False
    out_init_scale: str = "rg"
    dtype: jnp.dtype = jnp.float32

    @property
    def config(self) -> GriffinConfig:
        """This module's architecture."""
        names = [f.name for f in dataclasses.fields(GriffinConfig)]
        return GriffinConfig(**{n: getattr(self, n) for n in names})

    @property
    def types(self) -> tuple[str, ...]:
        types = self.block_types or griffin_pattern(self.num_layers)
        if len(types) != self.num_layers:
            raise ValueError(f"{len(types)} block_types for num_layers={self.num_layers}")
        return tuple(types)

    @property
    def period(self) -> int:
        """Layers per scanned repeat (`scan_layers`)."""
        return pattern_period(self.types)

    def _block_kwargs(self) -> dict:
        return dict(
            width=self.width,
            mlp_width=self.mlp_width,
            num_heads=self.num_heads,
            lru_width=self.lru_width or self.width,
            window=self.window,
            conv1d_width=self.conv1d_width,
            scan_impl=self.scan_impl,
            dtype=self.dtype,
            out_scale=self.out_scale,
        )

    @property
    def out_scale(self) -> float:
        """Variance scale of the blocks' output projections (`out_init_scale`)."""
        if self.out_init_scale == "rg":
            return 2.0 / self.num_layers
        if self.out_init_scale == "unit":
            return 1.0
        raise ValueError(f"out_init_scale={self.out_init_scale!r}; expected 'rg' or 'unit'")

    def _layers(self, x, segment_pos, cache, want_cache):
        """The residual stack: `x [batch, time, width]` -> `(x, caches or None)`."""
        block_cls = _residual_block_class(self.remat)
        first, new_caches = 0, []
        if self.scan_layers:
            p = self.period
            scanned = nn.scan(
                BlockPeriod,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, 0),
                length=self.num_layers // p,
                metadata_params={nn.PARTITION_NAME: axes.LAYERS},
            )
            x, period_caches = scanned(
                self.types[:p], self._block_kwargs(), self.remat, want_cache, name="layers"
            )(x, segment_pos, None if cache is None else tuple(cache[:p]))
            first = (self.num_layers // p) * p
            new_caches = list(period_caches or ())
            cache = None if cache is None else tuple(cache[p:])
        for i in range(first, self.num_layers):
            x, c = block_cls(self.types[i], **self._block_kwargs(), name=f"blocks_{i}")(
                x, segment_pos, None if cache is None else cache[i - first], want_cache
            )
            new_caches.append(c)
        return x, (tuple(new_caches) if want_cache else None)

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
                nn.initializers.normal(stddev=1.0 / math.sqrt(self.width)), (axes.VOCAB, axes.EMBED)
            ),
            (self.vocab_size, self.width),
            jnp.float32,
        )
        x = jnp.take(embedding, tokens, axis=0).astype(self.dtype)
        if self.embed_scale:  # the constant is rounded to bfloat16, as in RecurrentGemma
            x = x * jnp.sqrt(jnp.float32(self.width)).astype(jnp.bfloat16).astype(self.dtype)
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        want_cache = return_cache or cache is not None
        x, new_caches = self._layers(x, segment_pos, cache, want_cache)
        x = RMSNorm(dtype=self.dtype, name="final_norm")(x)
        logits = jnp.einsum("btd,vd->btv", x.astype(jnp.float32), embedding)
        if self.logit_softcap:
            logits = jnp.tanh(logits / self.logit_softcap) * self.logit_softcap
        logits = nn.with_logical_constraint(logits, (axes.BATCH, axes.LENGTH, axes.VOCAB))
        return logits, new_caches

    def init_cache(self, batch_size: int) -> tuple[BlockCache, ...]:
        """An empty decoding state (constant size) for `batch_size` sequences.

        A tuple over layers; with `scan_layers`, a tuple over one period whose leaves have a
        leading axis of `num_layers // period` repeats, then one per remaining layer.
        """
        lru = self.lru_width or self.width

        def one(kind: str) -> BlockCache:
            if kind == RECURRENT:
                return init_recurrent_cache(batch_size, lru, self.conv1d_width, self.dtype)
            return init_attention_cache(
                batch_size, self.window, 1, self.width // self.num_heads, self.dtype
            )

        if not self.scan_layers:
            return tuple(one(kind) for kind in self.types)
        p = self.period
        repeats = self.num_layers // p
        stacked = tuple(
            jax.tree.map(lambda x: jnp.broadcast_to(x, (repeats,) + x.shape), one(kind))
            for kind in self.types[:p]
        )
        return stacked + tuple(one(kind) for kind in self.types[repeats * p :])
