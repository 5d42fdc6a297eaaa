"""HuBERT speech encoder (Hsu et al. 2021), laid out as HuggingFace's `HubertModel`.

Waveform `[batch, samples]` (16 kHz, float) -> frames at 50 Hz (20 ms, the product of the conv
strides: 320 samples for the published models).

A shared encoder core (imports only `avjax.nn`): `avjax.convert.hubert` loads HuggingFace
weights into it and `avjax.data.speech.features` makes HuBERT speech units with it.

1. Feature encoder: a stack of strided 1-D convolutions (no padding) with GELU. Norm
   `feat_extract_norm="group"` (base): a per-channel GroupNorm over time on the first layer
   only; `"layer"` (large): a LayerNorm over channels after every conv.
2. Feature projection: LayerNorm + Dense to `hidden_size`.
3. Relative positional embedding: one grouped conv over time (kernel `num_conv_pos_embeddings`,
   zero padding `kernel // 2`, the extra trailing frame dropped when the kernel is even) and a
   GELU, added to the projected features. HF keeps this conv weight-normalised (norm over every
   axis but the kernel axis); here it is a plain kernel and `avjax.convert.hubert` folds
   `g * v / ||v||` into it.
4. Transformer encoder, bidirectional multi-head attention with biases, GELU MLP, two layouts:
   post-LN (`do_stable_layer_norm=False`, base: LayerNorm after the positional add and after
   each residual) and pre-LN (`True`, large: LayerNorm before attention and MLP, one final
   LayerNorm).

Attention is written here (plain MHA with q/k/v/out biases, scale `head_dim ** -0.5`, float32
softmax): `avjax.nn.attention` is causal local MQA with RoPE, which HuBERT does not use.

`hidden_states` follows transformers 5's `HubertModel`: `num_hidden_layers + 1` entries, entry
0 the input of the first transformer layer, entry `i` the output of layer `i`. In the pre-LN
layout `last_hidden_state` is the final LayerNorm of `hidden_states[-1]` (transformers 4.x put
that normed tensor in `hidden_states[-1]` instead); in the post-LN layout they are equal.
"Layer 6 of HuBERT base" (GSLM) is `hidden_states[6]`.

Padded batches: with `lengths` (valid samples per row) every row's valid frames equal the
unpadded single-row run exactly: the first-layer GroupNorm takes its statistics over valid
frames only, padded frames are zeroed before the positional conv (as its zero padding would
be), and attention ignores padded keys. Frames past `num_frames(length)` are padding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes
from avjax.nn.layers import dense
from avjax.nn.norms import layer_norm

NEG_INF = -2.3819763e38


@dataclasses.dataclass(frozen=True)
class HubertConfig:
    """The `transformers.HubertConfig` fields the encoder uses (same names, base defaults)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    feat_extract_activation: str = "gelu"
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    feat_extract_norm: str = "group"
    feat_proj_layer_norm: bool = True
    do_stable_layer_norm: bool = False
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "conv_dim", tuple(int(d) for d in self.conv_dim))
        object.__setattr__(self, "conv_stride", tuple(int(d) for d in self.conv_stride))
        object.__setattr__(self, "conv_kernel", tuple(int(d) for d in self.conv_kernel))
        if not len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel):
            raise ValueError(
                f"conv_dim {self.conv_dim}, conv_stride {self.conv_stride} and conv_kernel "
                f"{self.conv_kernel} must have the same length"
            )
        if self.feat_extract_norm not in ("group", "layer"):
            raise ValueError(
                f"feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}"
            )
        for act in (self.hidden_act, self.feat_extract_activation):
            if act not in ACTIVATIONS:
                raise ValueError(f"unsupported activation {act!r}; known: {sorted(ACTIVATIONS)}")

    @property
    def samples_per_frame(self) -> int:
        """Total conv stride: 320 samples (20 ms at 16 kHz, 50 Hz) for the published models."""
        return math.prod(self.conv_stride)

    def num_frames(self, num_samples: int) -> int:
        """Frames the conv feature encoder gives for `num_samples` samples (0 if too short)."""
        n = int(num_samples)
        for k, s in zip(self.conv_kernel, self.conv_stride, strict=True):
            if n < k:
                return 0
            n = (n - k) // s + 1
        return n

    @classmethod
    def from_hf(cls, hf_config: Any) -> HubertConfig:
        """From a `transformers.HubertConfig` or its `config.json` dict.

        Raises `ValueError` for HF options this encoder does not implement (a batch-normed
        positional conv, attention adapters).
        """
        get = (
            hf_config.get
            if isinstance(hf_config, Mapping)
            else lambda k, d=None: getattr(hf_config, k, d)
        )
        if get("conv_pos_batch_norm", False):
            raise ValueError("HuBERT config has conv_pos_batch_norm=True, which is not supported")
        if get("adapter_attn_dim", None) is not None:
            raise ValueError("HuBERT config has adapter_attn_dim set; adapters are not supported")
        kw = {}
        for f in dataclasses.fields(cls):
            v = get(f.name, None)
            if v is not None:
                kw[f.name] = tuple(v) if isinstance(v, list | tuple) else v
        n = get("num_feat_extract_layers", None)
        dims = kw.get("conv_dim", cls().conv_dim)
        if n is not None and n != len(dims):
            raise ValueError(f"num_feat_extract_layers {n} disagrees with conv_dim {dims}")
        return cls(**kw)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
}


def _valid_mask(lengths: jax.Array | None, frames: int) -> jax.Array | None:
    """`[batch, frames]` bool (True = valid) from `lengths [batch]`, or None."""
    if lengths is None:
        return None
    return jnp.arange(frames)[None, :] < lengths[:, None]


def _conv_lengths(lengths: jax.Array, kernel: int, stride: int) -> jax.Array:
    return jnp.maximum((lengths - kernel) // stride + 1, 0)


class ConvLayer(nn.Module):
    """One feature-encoder layer: valid strided conv, optional norm, activation.

    `[batch, time, in] -> [batch, (time - kernel) // stride + 1, out]`. `norm` is "group"
    (per-channel statistics over valid time steps), "layer" (over channels) or "none".
    Parameters: `conv/kernel [kernel, in, out]` (+ `conv/bias [out]`), `layer_norm/{scale,bias}`.
    """

    features: int
    kernel: int
    stride: int
    use_bias: bool
    norm: str
    activation: str = "gelu"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """`mask [batch, out_time]` marks valid output steps (for the group norm)."""
        conv = nn.Conv(
            self.features,
            (self.kernel,),
            strides=(self.stride,),
            padding="VALID",
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.he_normal(), (axes.CONV, None, axes.EMBED)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.EMBED,)),
            name="conv",
        )
        y = conv(x)
        if self.norm == "group":
            y = ChannelNorm(name="layer_norm")(y, mask)
        elif self.norm == "layer":
            y = layer_norm(1e-5, name="layer_norm")(y)
        return ACTIVATIONS[self.activation](y).astype(self.dtype or x.dtype)


class ChannelNorm(nn.Module):
    """GroupNorm with one group per channel: each channel normalised over (valid) time.

    `[batch, time, channels] -> same`, float32; `mask [batch, time]` marks valid steps.
    """

    eps: float = 1e-5

    @nn.compact
    def __call__(self, y: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        c = y.shape[-1]
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.EMBED,)),
            (c,),
            jnp.float32,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.EMBED,)),
            (c,),
            jnp.float32,
        )
        y = y.astype(jnp.float32)
        w = jnp.ones(y.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
        w = w[..., None]
        n = jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
        mean = jnp.sum(y * w, axis=1, keepdims=True) / n
        var = jnp.sum(jnp.square(y - mean) * w, axis=1, keepdims=True) / n
        return (y - mean) * jax.lax.rsqrt(var + self.eps) * scale[None, None] + bias[None, None]


class FeatureEncoder(nn.Module):
    """Conv stack: waveform `[batch, samples]` -> `[batch, frames, conv_dim[-1]]`."""

    config: HubertConfig
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(
        self, wav: jax.Array, lengths: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """Returns features and the valid frame counts `[batch]` (None without `lengths`)."""
        cfg = self.config
        x = wav[..., None]
        for i, (dim, k, s) in enumerate(
            zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride, strict=True)
        ):
            if x.shape[1] < k:
                raise ValueError(
                    f"input of {wav.shape[1]} samples is too short for the HuBERT conv stack "
                    f"(layer {i} has {x.shape[1]} steps, kernel {k})"
                )
            if cfg.feat_extract_norm == "layer":
                norm = "layer"
            else:
                norm = "group" if i == 0 else "none"
            if lengths is not None:
                lengths = _conv_lengths(lengths, k, s)
            t_out = (x.shape[1] - k) // s + 1
            x = ConvLayer(
                dim,
                k,
                s,
                cfg.conv_bias,
                norm,
                cfg.feat_extract_activation,
                dtype=self.dtype,
                name=f"conv_layers_{i}",
            )(x, _valid_mask(lengths, t_out))
        return x, lengths


class PositionalConvEmbedding(nn.Module):
    """Grouped conv over time + GELU: `[batch, frames, hidden] -> [batch, frames, hidden]`.

    Parameters `conv/kernel [kernel, hidden / groups, hidden]` (weight norm folded in) and
    `conv/bias [hidden]`.
    """

    config: HubertConfig
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        k = cfg.num_conv_pos_embeddings
        t = x.shape[1]
        y = nn.Conv(
            cfg.hidden_size,
            (k,),
            padding=[(k // 2, k // 2)],
            feature_group_count=cfg.num_conv_pos_embedding_groups,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.he_normal(), (axes.CONV, None, axes.EMBED)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.EMBED,)),
            name="conv",
        )(x)
        return ACTIVATIONS[cfg.feat_extract_activation](y[:, :t])


class Attention(nn.Module):
    """Bidirectional multi-head attention with biases: `[b, t, hidden] -> [b, t, hidden]`."""

    config: HubertConfig
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """`mask [batch, frames]`: True for keys that may be attended to."""
        cfg = self.config
        b, t, _ = x.shape
        h = cfg.num_attention_heads
        d = cfg.hidden_size // h

        def proj(name: str) -> jax.Array:
            y = dense(cfg.hidden_size, (axes.EMBED, axes.HEADS), dtype=self.dtype, name=name)(x)
            return y.reshape(b, t, h, d)

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * d**-0.5
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :], logits, NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, cfg.hidden_size)
        out = nn.with_logical_constraint(out, (axes.BATCH, axes.LENGTH, axes.HEADS))
        return dense(cfg.hidden_size, (axes.HEADS, axes.EMBED), dtype=self.dtype, name="out_proj")(
            out
        )


class FeedForward(nn.Module):
    """`[b, t, hidden] -> [b, t, hidden]`: Dense(intermediate) -> act -> Dense(hidden)."""

    config: HubertConfig
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        y = dense(
            cfg.intermediate_size,
            (axes.EMBED, axes.MLP),
            dtype=self.dtype,
            name="intermediate_dense",
        )(x)
        y = ACTIVATIONS[cfg.hidden_act](y)
        y = nn.with_logical_constraint(y, (axes.BATCH, axes.LENGTH, axes.MLP))
        return dense(
            cfg.hidden_size, (axes.MLP, axes.EMBED), dtype=self.dtype, name="output_dense"
        )(y)


class EncoderLayer(nn.Module):
    """One transformer layer, post-LN or pre-LN (`config.do_stable_layer_norm`)."""

    config: HubertConfig
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        attn = Attention(cfg, self.dtype, name="attention")
        ff = FeedForward(cfg, self.dtype, name="feed_forward")
        ln1 = layer_norm(cfg.layer_norm_eps, name="layer_norm")
        ln2 = layer_norm(cfg.layer_norm_eps, name="final_layer_norm")
        dtype = self.dtype or x.dtype
        if cfg.do_stable_layer_norm:
            x = x + attn(ln1(x).astype(dtype), mask)
            x = x + ff(ln2(x).astype(dtype))
        else:
            x = ln1(x + attn(x, mask)).astype(dtype)
            x = ln2(x + ff(x)).astype(dtype)
        return x


class HubertEncoder(nn.Module):
    """HuBERT: waveform `[batch, samples]` -> 50 Hz frames `[batch, frames, hidden_size]`.

    Returns `dict(last_hidden_state [batch, frames, hidden], hidden_states: tuple of
    num_hidden_layers + 1 arrays [batch, frames, hidden], frame_lengths [batch] int32 valid
    frames per row)`; see the module docstring for the `hidden_states` convention.
    Parameters are float32; `dtype` sets the activation dtype (norms, softmax in float32).
    """

    config: HubertConfig
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(
        self,
        wav: jax.Array,
        lengths: jax.Array | None = None,
        *,
        num_layers: int | None = None,
    ) -> dict[str, Any]:
        """`wav [batch, samples]`; `lengths [batch]` valid samples per row (None = all).

        `num_layers` stops after that many transformer layers (for layer-L features, cheaper
        than running all); the pre-LN final LayerNorm is then not applied and
        `last_hidden_state` is `hidden_states[num_layers]`.
        """
        cfg = self.config
        if wav.ndim != 2:
            raise ValueError(f"HubertEncoder expects wav [batch, samples], got {wav.shape}")
        dtype = self.dtype or jnp.float32
        wav = wav.astype(dtype)
        if lengths is not None:
            lengths = jnp.asarray(lengths, jnp.int32)
        x, frame_lengths = FeatureEncoder(cfg, self.dtype, name="feature_extractor")(wav, lengths)
        t = x.shape[1]
        mask = _valid_mask(frame_lengths, t)
        if cfg.feat_proj_layer_norm:
            x = layer_norm(cfg.layer_norm_eps, name="feature_projection_layer_norm")(x)
        x = dense(cfg.hidden_size, (None, axes.EMBED), dtype=self.dtype, name="feature_projection")(
            x.astype(dtype)
        )
        if mask is not None:
            x = jnp.where(mask[..., None], x, 0.0)
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        x = x + PositionalConvEmbedding(cfg, self.dtype, name="pos_conv_embed")(x)
        final_ln = layer_norm(cfg.layer_norm_eps, name="encoder_layer_norm")
        if not cfg.do_stable_layer_norm:
            x = final_ln(x).astype(dtype)
        n = cfg.num_hidden_layers if num_layers is None else int(num_layers)
        if not 0 <= n <= cfg.num_hidden_layers:
            raise ValueError(f"num_layers must be in [0, {cfg.num_hidden_layers}], got {n}")
        hidden: list[jax.Array] = [x]
        for i in range(n):
            x = EncoderLayer(cfg, self.dtype, name=f"layers_{i}")(x, mask)
            x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
            hidden.append(x)
        if cfg.do_stable_layer_norm and n == cfg.num_hidden_layers:
            x = final_ln(x).astype(dtype)
        if frame_lengths is None:
            frame_lengths = jnp.full((wav.shape[0],), t, jnp.int32)
        return {
            "last_hidden_state": x,
            "hidden_states": tuple(hidden),
            "frame_lengths": frame_lengths,
        }


def param_shapes(config: HubertConfig) -> dict[str, Any]:
    """The `params` tree's shapes `{"a/b/kernel": shape}` (no allocation), e.g. for checks."""
    model = HubertEncoder(config)
    wav = jax.ShapeDtypeStruct((1, _min_samples(config)), jnp.float32)
    tree = jax.eval_shape(lambda w: model.init(jax.random.key(0), w), wav)
    tree = nn.meta.unbox(tree)["params"]
    return {"/".join(str(p.key) for p in path): leaf.shape for path, leaf in _flatten(tree)}


def _min_samples(config: HubertConfig) -> int:
    """The shortest input that gives one frame."""
    n = 1
    for k, s in zip(reversed(config.conv_kernel), reversed(config.conv_stride), strict=True):
        n = (n - 1) * s + k
    return n


def _flatten(tree: Any) -> Sequence[tuple[Any, Any]]:
    return jax.tree_util.tree_flatten_with_path(tree)[0]
