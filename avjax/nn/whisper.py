"""Whisper's audio encoder (Radford et al., 2022), with a shared bidirectional attention.

    x = GELU(Conv1d_k3(log_mel))                  # [batch, frames, width], stride 1
    x = GELU(Conv1d_k3_stride2(x)) + positions    # [batch, ceil(frames / 2), width], 50 Hz
    for each of num_layers blocks (pre-LN, biases):
        x = x + SelfAttention(LayerNorm(x))       # q, v, out with bias; k without
        x = x + fc2(GELU(fc1(LayerNorm(x))))
    out = LayerNorm(x)

Input is the log-mel spectrogram `[batch, num_mel_bins, frames]` of
`avjax.data.speech.whisper_features` (100 frames per second; 3000 for Whisper's 30 s window), as
`WhisperModel`'s encoder takes it. The positions are Whisper's fixed sinusoids; they are a
parameter here (initialised to the sinusoids) so imported checkpoints are copied bit for bit;
freeze them with the rest of the encoder. Unlike transformers, which insists on exactly
`2 * max_source_positions` frames, any length up to that is accepted (positions `[:t]`).

`MultiHeadAttention` is the bidirectional self-/cross-attention with per-projection biases
that the BLIP-2 Q-Former (`avjax.nn.qformer`) shares; the softmax is `avjax.nn.attention.attend`.
`WHISPER_SIZES` lists the published encoder shapes.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avjax.nn import axes
from avjax.nn.attention import attend
from avjax.nn.layers import dense
from avjax.nn.norms import layer_norm

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

# Encoder shapes of the released checkpoints: (num_mel_bins, width, num_layers, num_heads,
# mlp_width); all have max_source_positions 1500 (30 s).
WHISPER_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (80, 384, 4, 6, 1536),
    "base": (80, 512, 6, 8, 2048),
    "small": (80, 768, 12, 12, 3072),
    "medium": (80, 1024, 24, 16, 4096),
    "large-v2": (80, 1280, 32, 20, 5120),
    "large-v3": (128, 1280, 32, 20, 5120),
}


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> np.ndarray:
    """Whisper's positions `[length, channels]` float32: sin of the first half of the
    timescales (geometric from 1 to `max_timescale`), then cos."""
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {channels}")
    step = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-step * np.arange(channels // 2, dtype=np.float64))
    t = np.arange(length, dtype=np.float64)[:, None] * inv[None]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


class MultiHeadAttention(nn.Module):
    """Bidirectional multi-head attention, self or cross, with per-projection biases.

    `x [batch, time, width]` attends over `context [batch, source, context_dim]` (None: `x`
    itself) -> `[batch, time, width]`. Submodules "q", "k", "v" (kernels `[in, heads*head_dim]`)
    and "out"; `bias` says which of them have a bias (Whisper: q, v, out; BERT: all).
    `mask [batch, source]` bool marks the keys that may be attended to (None: all).
    """

    width: int
    num_heads: int
    bias: tuple[bool, bool, bool, bool] = (True, True, True, True)  # q, k, v, out
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
        context = x if context is None else context
        h, d = self.num_heads, self.width // self.num_heads
        qb, kb, vb, ob = self.bias

        def proj(name: str, y: jax.Array, use_bias: bool, kind: str) -> jax.Array:
            layer = dense(
                self.width, (axes.EMBED, kind), use_bias=use_bias, dtype=self.dtype, name=name
            )
            return layer(y).reshape(y.shape[:2] + (h, d))

        q = proj("q", x, qb, axes.HEADS)
        k = proj("k", context, kb, axes.KV)
        v = proj("v", context, vb, axes.KV)
        if mask is None:
            keep = jnp.ones((1, 1, context.shape[1]), bool)
        else:
            keep = mask.astype(bool)[:, None, :]  # [batch, 1, source]
        out = attend(q, k, v, keep)  # [batch, time, heads, head_dim]
        b, t = out.shape[:2]
        out = nn.with_logical_constraint(
            out.reshape(b, t, self.width), (axes.BATCH, axes.LENGTH, axes.HEADS)
        )
        layer = dense(
            self.width, (axes.HEADS, axes.EMBED), use_bias=ob, dtype=self.dtype, name="out"
        )
        return layer(out)


def _conv(features: int, stride: int, name: str) -> nn.Conv:
    """Conv1d, kernel 3, padding 1 (PyTorch's), kernel `[3, in, out]`."""
    return nn.Conv(
        features,
        (3,),
        strides=(stride,),
        padding=((1, 1),),
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "normal"), (axes.CONV, None, axes.EMBED)
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.EMBED,)),
        name=name,
    )


class WhisperEncoderLayer(nn.Module):
    """Pre-LN block: `x + attn(LN(x))`, then `x + fc2(act(fc1(LN(x))))`. `[b, t, width]`."""

    width: int
    num_heads: int
    mlp_width: int
    activation: str = "gelu"
    norm_eps: float = 1e-5
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        attn = MultiHeadAttention(
            self.width, self.num_heads, (True, False, True, True), self.dtype, name="self_attn"
        )
        h = layer_norm(self.norm_eps, name="self_attn_norm")(x).astype(dtype)
        x = x + attn(h)
        h = layer_norm(self.norm_eps, name="mlp_norm")(x).astype(dtype)
        h = dense(self.mlp_width, (axes.EMBED, axes.MLP), dtype=self.dtype, name="fc1")(h)
        h = nn.with_logical_constraint(
            ACTIVATIONS[self.activation](h), (axes.BATCH, axes.LENGTH, axes.MLP)
        )
        x = x + dense(self.width, (axes.MLP, axes.EMBED), dtype=self.dtype, name="fc2")(h)
        return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))


class WhisperEncoder(nn.Module):
    """Log-mel `[batch, num_mel_bins, frames]` -> hidden states `[batch, ceil(frames/2), width]`.

    Fields are the architecture (JSON-friendly, the `model.json` of a converted directory) and
    `dtype` (activations; params float32, LayerNorm statistics and softmax float32).
    """

    num_mel_bins: int = 80
    width: int = 384
    num_layers: int = 4
    num_heads: int = 6
    mlp_width: int = 1536
    max_source_positions: int = 1500
    activation: str = "gelu"
    norm_eps: float = 1e-5
    dtype: jnp.dtype | None = None

    def fields(self) -> dict[str, Any]:
        """The architecture fields (everything but dtype)."""
        names = ("num_mel_bins", "width", "num_layers", "num_heads", "mlp_width")
        names += ("max_source_positions", "activation", "norm_eps")
        return {n: getattr(self, n) for n in names}

    @nn.compact
    def __call__(self, input_features: jax.Array) -> jax.Array:
        b, mels, frames = input_features.shape
        if mels != self.num_mel_bins:
            raise ValueError(f"input_features has {mels} mel bins, expected {self.num_mel_bins}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; expected one of {list(ACTIVATIONS)}")
        dtype = self.dtype or jnp.float32
        act = ACTIVATIONS["gelu"]  # the stem's GELU is exact whatever `activation` says
        x = input_features.astype(dtype).transpose(0, 2, 1)  # [b, frames, mels]
        x = act(_conv(self.width, 1, "conv1")(x))
        x = act(_conv(self.width, 2, "conv2")(x))
        t = x.shape[1]
        if t > self.max_source_positions:
            raise ValueError(
                f"{frames} frames give {t} positions > max_source_positions="
                f"{self.max_source_positions} (at most {2 * self.max_source_positions} frames)"
            )
        table = sinusoids(self.max_source_positions, self.width)
        positions = self.param(
            "positions",
            nn.with_logical_partitioning(lambda *_: jnp.asarray(table), (None, axes.EMBED)),
            table.shape,
        )
        x = x + positions[None, :t].astype(dtype)
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        for i in range(self.num_layers):
            x = WhisperEncoderLayer(
                self.width,
                self.num_heads,
                self.mlp_width,
                self.activation,
                self.norm_eps,
                self.dtype,
                name=f"layers_{i}",
            )(x)
        return layer_norm(self.norm_eps, name="final_norm")(x).astype(dtype)
