"""Mamba language model (Gu & Dao, 2023): a stack of pre-norm selective-SSM residual blocks.

    x = embed(tokens)
    x = x + SelectiveSSM(RMSNorm(x))      for each of `num_layers` blocks
    logits = lm_head(RMSNorm(x))          lm_head tied to the embedding unless `tie_embeddings`
                                          is False

The same layout as HuggingFace's `MambaForCausalLM` (`avjax.convert.mamba` imports its weights).
The residual stream is float32 when `residual_in_fp32` (HF's default), else in `dtype`.

`__call__` runs a whole sequence (training; `return_cache=True` also gives the decoding state,
i.e. prefill); with a `cache` it continues from that state (one token or more). `step` decodes
one token per sequence. The cache is a tuple over layers of `MambaCache` (constant size).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes
from avjax.nn.mamba import MambaCache, SelectiveSSM, init_mamba_cache
from avjax.nn.norms import RMSNorm
from avjax.nn.scan import DEFAULT_IMPL


class MambaBlock(nn.Module):
    """`x + SelectiveSSM(RMSNorm(x))`. `[batch, time, d_model] -> [batch, time, d_model]`."""

    d_model: int
    d_state: int
    conv_width: int
    d_inner: int
    dt_rank: int
    use_bias: bool
    norm_eps: float
    residual_in_fp32: bool
    scan_impl: str
    dtype: jnp.dtype

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        segment_pos: jax.Array | None,
        cache: MambaCache | None,
        want_cache: bool,
    ) -> tuple[jax.Array, MambaCache | None]:
        h = RMSNorm(self.norm_eps, self.dtype, scale_offset=False, name="norm")(x)
        h, new_cache = SelectiveSSM(
            self.d_model,
            d_state=self.d_state,
            conv_width=self.conv_width,
            d_inner=self.d_inner,
            dt_rank=self.dt_rank,
            use_bias=self.use_bias,
            scan_impl=self.scan_impl,
            dtype=self.dtype,
            name="mixer",
        )(h, segment_pos, cache, want_cache)
        res_dtype = jnp.float32 if self.residual_in_fp32 else self.dtype
        x = x.astype(res_dtype) + h.astype(res_dtype)
        return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED)), new_cache


class MambaLM(nn.Module):
    """Mamba decoder LM. tokens `[batch, time]` int32 -> logits `[batch, time, vocab]` float32.

    Attributes:
      vocab_size, d_model, num_layers: sizes.
      d_state: SSM state size per channel (HF `state_size`).
      conv_width: causal conv width (HF `conv_kernel`).
      expand: `d_inner = expand * d_model` unless `d_inner` is given (HF `intermediate_size`).
      dt_rank: Delta projection rank (HF `time_step_rank`; default `ceil(d_model / 16)`).
      use_bias: biases on the mixers' in/out projections (HF `use_bias`).
      norm_eps: RMSNorm epsilon (HF `layer_norm_epsilon`).
      tie_embeddings: logits use the embedding matrix (HF `tie_word_embeddings`).
      residual_in_fp32: keep the residual stream in float32 (HF `residual_in_fp32`).
      scan_impl: `avjax.nn.scan.linear_scan` implementation.
      dtype: activation dtype (params float32; the SSM recurrence float32).
    """

    vocab_size: int
    d_model: int
    num_layers: int
    d_state: int = 16
    conv_width: int = 4
    expand: int = 2
    d_inner: int | None = None
    dt_rank: int | None = None
    use_bias: bool = False
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    scan_impl: str = DEFAULT_IMPL
    dtype: jnp.dtype = jnp.float32

    @property
    def inner(self) -> int:
        return self.d_inner or self.expand * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        segment_pos: jax.Array | None = None,
        cache: tuple[MambaCache, ...] | None = None,
        return_cache: bool = False,
    ) -> tuple[jax.Array, tuple[MambaCache, ...] | None]:
        """Returns `(logits [batch, time, vocab] float32, cache or None)`.

        Args:
          tokens: int32 `[batch, time]`.
          segment_pos: optional `[batch, time]` positions; the state restarts where it is 0
            (packed documents). None: each row is one document (continuing `cache`).
          cache: decoding state after the preceding tokens (from `init_cache` or a prefill).
          return_cache: also return the state after `tokens` (implied by `cache`).
        """
        if cache is not None and len(cache) != self.num_layers:
            raise ValueError(f"cache has {len(cache)} layers, model has {self.num_layers}")
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=0.02), (axes.VOCAB, axes.EMBED)
            ),
            (self.vocab_size, self.d_model),
            jnp.float32,
        )
        x = jnp.take(embedding, tokens, axis=0).astype(self.dtype)
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        want_cache = return_cache or cache is not None
        new_caches = []
        for i in range(self.num_layers):
            x, c = MambaBlock(
                d_model=self.d_model,
                d_state=self.d_state,
                conv_width=self.conv_width,
                d_inner=self.inner,
                dt_rank=self.rank,
                use_bias=self.use_bias,
                norm_eps=self.norm_eps,
                residual_in_fp32=self.residual_in_fp32,
                scan_impl=self.scan_impl,
                dtype=self.dtype,
                name=f"blocks_{i}",
            )(x, segment_pos, None if cache is None else cache[i], want_cache)
            new_caches.append(c)
        x = RMSNorm(self.norm_eps, jnp.float32, scale_offset=False, name="final_norm")(x)
        if self.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, embedding)
        else:
            head = self.param(
                "lm_head",
                nn.with_logical_partitioning(
                    nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
                    (axes.EMBED, axes.VOCAB),
                ),
                (self.d_model, self.vocab_size),
                jnp.float32,
            )
            logits = jnp.einsum("btd,dv->btv", x, head)
        logits = nn.with_logical_constraint(logits, (axes.BATCH, axes.LENGTH, axes.VOCAB))
        return logits, (tuple(new_caches) if want_cache else None)

    def step(
        self,
        tokens: jax.Array,
        cache: tuple[MambaCache, ...],
        segment_pos: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[MambaCache, ...]]:
        """One token per sequence: `tokens [batch]` -> `(logits [batch, vocab], next cache)`.

        `segment_pos` `[batch]` (optional): 0 starts a new document at this token.
        """
        pos = None if segment_pos is None else segment_pos[:, None]
        logits, cache = self(tokens[:, None], pos, cache)
        return logits[:, 0], cache

    def init_cache(self, batch_size: int) -> tuple[MambaCache, ...]:
        """An empty decoding state for `batch_size` sequences: one `MambaCache` per layer."""
        return tuple(
            init_mamba_cache(batch_size, self.inner, self.d_state, self.conv_width, self.dtype)
            for _ in range(self.num_layers)
        )


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """The architecture of a `MambaLM` (everything but compute options), as RecurrentGemma's
    `GriffinConfig` is Griffin's. `make(**options)` builds the module (options: scan_impl,
    dtype). Presets: the sizes of the published Mamba LMs (`mamba_130m` ... `mamba_2_8b`:
    d_state 16, conv 4, expand 2, GPT-NeoX vocabulary 50,277 padded to a multiple of 8, tied
    embeddings). See `MambaLM` for the fields."""

    vocab_size: int
    d_model: int
    num_layers: int
    d_state: int = 16
    conv_width: int = 4
    expand: int = 2
    d_inner: int | None = None
    dt_rank: int | None = None
    use_bias: bool = False
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    residual_in_fp32: bool = True

    def make(self, **options: Any) -> MambaLM:
        """The module with this architecture and `options` (scan_impl, dtype)."""
        return MambaLM(**dataclasses.asdict(self), **options)

    @classmethod
    def mamba_130m(cls, vocab_size: int = 50_280) -> MambaConfig:
        """Mamba-130M: 24 layers, d_model 768."""
        return cls(vocab_size, 768, 24)

    @classmethod
    def mamba_370m(cls, vocab_size: int = 50_280) -> MambaConfig:
        """Mamba-370M: 48 layers, d_model 1024."""
        return cls(vocab_size, 1024, 48)

    @classmethod
    def mamba_790m(cls, vocab_size: int = 50_280) -> MambaConfig:
        """Mamba-790M: 48 layers, d_model 1536."""
        return cls(vocab_size, 1536, 48)

    @classmethod
    def mamba_1_4b(cls, vocab_size: int = 50_280) -> MambaConfig:
        """Mamba-1.4B: 48 layers, d_model 2048."""
        return cls(vocab_size, 2048, 48)

    @classmethod
    def mamba_2_8b(cls, vocab_size: int = 50_280) -> MambaConfig:
        """Mamba-2.8B: 64 layers, d_model 2560."""
        return cls(vocab_size, 2560, 64)
