"""The BLIP-2 Querying Transformer (Q-Former; Li et al., 2023): BERT-style, post-LN.

    x = LayerNorm(query_embeds)                                  # [batch, queries, width]
    for layer i in 0 .. num_layers - 1:
        x = LayerNorm(x + SelfAttention(x))
        if i % cross_attention_frequency == 0:
            x = LayerNorm(x + CrossAttention(x, encoder_states))  # keys/values from the encoder
        x = LayerNorm(x + W_out act(W_in x))                     # the queries' feed-forward

The learned query embeddings are an input (the model using the Q-Former owns them, as
`Blip2Model.query_tokens`), so the query count can vary per call (MMS-LLaMA derives it from
the input duration). Only the query path is built: BLIP-2's text branch (word embeddings and
the text feed-forward) is not used when the Q-Former reads queries only. Attention is
`avjax.nn.whisper.MultiHeadAttention` with biases on all four projections.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes
from avjax.nn.layers import dense
from avjax.nn.norms import layer_norm
from avjax.nn.whisper import ACTIVATIONS, MultiHeadAttention


class QFormerLayer(nn.Module):
    """One post-LN layer; `has_cross` adds cross-attention to the encoder states.

    `(x [batch, queries, width], context [batch, source, encoder_width], mask [batch,
    source] | None) -> [batch, queries, width]`.
    """

    width: int
    num_heads: int
    mlp_width: int
    has_cross: bool
    activation: str = "gelu"
    norm_eps: float = 1e-12
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None) -> jax.Array:
        dtype = self.dtype or x.dtype

        def residual_norm(name: str, x: jax.Array, h: jax.Array) -> jax.Array:
            return layer_norm(self.norm_eps, name=name)(x + h).astype(dtype)

        attn = MultiHeadAttention(self.width, self.num_heads, dtype=self.dtype, name="self_attn")
        x = residual_norm("self_attn_norm", x, attn(x))
        if self.has_cross:
            cross = MultiHeadAttention(
                self.width, self.num_heads, dtype=self.dtype, name="cross_attn"
            )
            x = residual_norm("cross_attn_norm", x, cross(x, context, mask))
        h = dense(self.mlp_width, (axes.EMBED, axes.MLP), dtype=self.dtype, name="mlp_in")(x)
        h = ACTIVATIONS[self.activation](h)
        h = nn.with_logical_constraint(h, (axes.BATCH, axes.LENGTH, axes.MLP))
        h = dense(self.width, (axes.MLP, axes.EMBED), dtype=self.dtype, name="mlp_out")(h)
        x = residual_norm("mlp_norm", x, h)
        return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))


class QFormer(nn.Module):
    """`(query_embeds [batch, queries, width], encoder_hidden_states [batch, source,
    encoder_width], encoder_mask [batch, source] bool | None) -> [batch, queries, width]`.

    Fields are the architecture (JSON-friendly: a converted directory's `model.json`) and
    `dtype` (activations; params, LayerNorm statistics and softmax in float32). BLIP-2's
    defaults: width 768, 12 layers of 12 heads, MLP 3072, cross-attention every 2nd layer
    (layers 0, 2, ...), encoder width 1408 (EVA ViT-g), LayerNorm eps 1e-12.
    """

    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_width: int = 3072
    encoder_width: int = 1408
    cross_attention_frequency: int = 2
    activation: str = "gelu"
    norm_eps: float = 1e-12
    dtype: jnp.dtype | None = None

    def fields(self) -> dict[str, Any]:
        """The architecture fields (everything but dtype)."""
        names = ("width", "num_layers", "num_heads", "mlp_width", "encoder_width")
        names += ("cross_attention_frequency", "activation", "norm_eps")
        return {n: getattr(self, n) for n in names}

    def has_cross(self, layer: int) -> bool:
        """Whether layer `layer` cross-attends (BLIP-2: `layer % frequency == 0`)."""
        return layer % self.cross_attention_frequency == 0

    @nn.compact
    def __call__(
        self,
        query_embeds: jax.Array,
        encoder_hidden_states: jax.Array,
        encoder_mask: jax.Array | None = None,
    ) -> jax.Array:
        if query_embeds.shape[-1] != self.width:
            raise ValueError(f"query_embeds width {query_embeds.shape[-1]}, expected {self.width}")
        if encoder_hidden_states.shape[-1] != self.encoder_width:
            raise ValueError(
                f"encoder_hidden_states width {encoder_hidden_states.shape[-1]}, expected "
                f"encoder_width={self.encoder_width}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; expected one of {list(ACTIVATIONS)}")
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency={self.cross_attention_frequency} < 1")
        dtype = self.dtype or jnp.float32
        x = layer_norm(self.norm_eps, name="input_norm")(query_embeds).astype(dtype)
        context = encoder_hidden_states.astype(dtype)
        for i in range(self.num_layers):
            x = QFormerLayer(
                self.width,
                self.num_heads,
                self.mlp_width,
                self.has_cross(i),
                self.activation,
                self.norm_eps,
                self.dtype,
                name=f"layers_{i}",
            )(x, context, encoder_mask)
        return x
