"""AV-HuBERT audio-visual speech encoder (Shi et al. 2022), laid out as the fairseq model.

Inputs at 25 Hz (one video frame = 40 ms):
- video: grey mouth crops `[batch, time, 88, 88]` (or `[..., 1]`), normalised as the official
  data pipeline does (`(x / 255 - 0.421) / 0.165`);
- audio: log filterbank features stacked 4 at a time, `[batch, time, 104]` (26 filterbanks at
  100 Hz, see `stack_audio_features`), normalised per utterance over time and features.

1. Visual front-end: `avjax.nn.resnet.VisualFrontend` (Conv3d 5x7x7 stem, BatchNorm, PReLU,
   max pool, ResNet-18 with per-channel PReLU, global average pool) -> `[batch, time, 512]`
   -> Linear to the encoder width D (`video_proj`).
2. Audio front-end: Linear(104 -> D) (`audio_proj`).
3. Fusion: concatenation `[audio, video]` (2D, fairseq's order) or sum; a missing modality is
   zeros. In training, modality dropout zeroes one modality: with probability
   `modality_dropout` a modality is dropped, the audio with probability `audio_dropout`, else
   the video. Fairseq draws once per batch; here the draw is per example (`dropout` rng).
4. LayerNorm over the fused width, Linear to D when fused by concatenation.
5. The HuBERT transformer (`avjax.nn.hubert`: conv positional embedding + GELU, post-LN or
   pre-LN layers as `layer_norm_first` says; both published checkpoints are pre-LN).

Output `[batch, time, D]` at 25 Hz. With `lengths` (valid frames per row), padded frames are
zeroed before the positional conv and masked as attention keys, so each row's valid frames do
not depend on the padding (in eval mode; BatchNorm in training uses batch statistics that
include padded frames).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes
from avjax.nn.hubert import EncoderLayer, HubertConfig, PositionalConvEmbedding
from avjax.nn.layers import dense
from avjax.nn.norms import layer_norm
from avjax.nn.resnet import VisualFrontend


@dataclasses.dataclass(frozen=True)
class AVHubertConfig:
    """Fields of fairseq's `AVHubertConfig` the encoder uses (same names; Base defaults)."""

    encoder_embed_dim: int = 768
    encoder_layers: int = 12
    encoder_attention_heads: int = 12
    encoder_ffn_embed_dim: int = 3072
    layer_norm_first: bool = True
    conv_pos: int = 128
    conv_pos_groups: int = 16
    audio_feat_dim: int = 104
    modality_fuse: str = "concat"
    modality_dropout: float = 0.5
    audio_dropout: float = 0.5
    resnet_stem: int = 64
    resnet_widths: tuple[int, ...] = (64, 128, 256, 512)
    resnet_blocks: tuple[int, ...] = (2, 2, 2, 2)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "resnet_widths", tuple(int(w) for w in self.resnet_widths))
        object.__setattr__(self, "resnet_blocks", tuple(int(b) for b in self.resnet_blocks))
        if self.modality_fuse not in ("concat", "add"):
            raise ValueError(f"modality_fuse must be 'concat' or 'add', got {self.modality_fuse!r}")
        if len(self.resnet_widths) != len(self.resnet_blocks):
            raise ValueError(
                f"resnet_widths {self.resnet_widths} and resnet_blocks {self.resnet_blocks} "
                "must have the same length"
            )
        self.hubert()  # validates widths, heads and groups

    def hubert(self) -> HubertConfig:
        """The transformer's settings as the shared HuBERT encoder core reads them."""
        return HubertConfig(
            hidden_size=self.encoder_embed_dim,
            num_hidden_layers=self.encoder_layers,
            num_attention_heads=self.encoder_attention_heads,
            intermediate_size=self.encoder_ffn_embed_dim,
            num_conv_pos_embeddings=self.conv_pos,
            num_conv_pos_embedding_groups=self.conv_pos_groups,
            do_stable_layer_norm=self.layer_norm_first,
            layer_norm_eps=self.layer_norm_eps,
        )

    @classmethod
    def base(cls, **kw: Any) -> AVHubertConfig:
        """AV-HuBERT Base: 12 layers, width 768, 12 heads, FFN 3072 (~103 M parameters)."""
        return cls(**kw)

    @classmethod
    def large(cls, **kw: Any) -> AVHubertConfig:
        """AV-HuBERT Large: 24 layers, width 1024, 16 heads, FFN 4096 (~325 M parameters)."""
        fields = dict(
            encoder_embed_dim=1024,
            encoder_layers=24,
            encoder_attention_heads=16,
            encoder_ffn_embed_dim=4096,
        )
        return cls(**{**fields, **kw})

    @classmethod
    def tiny(cls, **kw: Any) -> AVHubertConfig:
        """A few-thousand-parameter encoder for tests and CPU configs."""
        fields = dict(
            encoder_embed_dim=32,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_embed_dim=64,
            conv_pos=4,
            conv_pos_groups=4,
            resnet_stem=8,
            resnet_widths=(8, 16),
            resnet_blocks=(1, 1),
        )
        return cls(**{**fields, **kw})


def stack_audio_features(feats: jax.Array, stack: int = 4) -> jax.Array:
    """Stacks `stack` consecutive 100 Hz frames: `[batch, 4 * T, F] -> [batch, T, 4 * F]`.

    A trailing remainder is zero-padded to a whole group, as the official data loader does.
    """
    b, t, f = feats.shape
    pad = (-t) % stack
    feats = jnp.pad(feats, ((0, 0), (0, pad), (0, 0)))
    return feats.reshape(b, (t + pad) // stack, stack * f)


def _modality_dropout(
    module: nn.Module, audio: jax.Array, video: jax.Array, cfg: AVHubertConfig
) -> tuple[jax.Array, jax.Array]:
    """Zeroes one modality per example: `audio`, `video [batch, time, D]` -> same shapes."""
    u = jax.random.uniform(module.make_rng("dropout"), (2, audio.shape[0]))
    drop = u[0] < cfg.modality_dropout
    drop_audio = drop & (u[1] < cfg.audio_dropout)
    drop_video = drop & ~(u[1] < cfg.audio_dropout)
    audio = jnp.where(drop_audio[:, None, None], 0.0, audio).astype(audio.dtype)
    video = jnp.where(drop_video[:, None, None], 0.0, video).astype(video.dtype)
    return audio, video


def _zero_padded(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Zeroes frames where `mask [batch, time]` is False; `x [batch, time, ...]`."""
    m = mask.reshape(mask.shape + (1,) * (x.ndim - 2))
    return jnp.where(m, x, 0.0).astype(x.dtype)


class AVHubertFrontend(nn.Module):
    """Per-modality front-ends + fusion: -> `[batch, time, D]` (before the transformer).

    `audio [batch, time, audio_feat_dim]` and/or `video [batch, time, H, W(, 1)]`; at least
    one must be given; both must have the same number of frames.
    """

    config: AVHubertConfig
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(
        self, audio: jax.Array | None, video: jax.Array | None, train: bool = False
    ) -> jax.Array:
        cfg = self.config
        d = cfg.encoder_embed_dim
        dtype = self.dtype or jnp.float32
        if audio is None and video is None:
            raise ValueError("AV-HuBERT needs audio, video or both; got neither")
        if audio is not None and video is not None and audio.shape[:2] != video.shape[:2]:
            raise ValueError(
                f"audio {audio.shape} and video {video.shape} must share [batch, time] "
                "(both 25 Hz; trim them to the same length)"
            )
        feats = {}
        if audio is not None:
            if audio.ndim != 3 or audio.shape[-1] != cfg.audio_feat_dim:
                raise ValueError(
                    f"audio must be [batch, time, {cfg.audio_feat_dim}], got {audio.shape}"
                )
            feats["audio"] = dense(d, (None, axes.EMBED), dtype=self.dtype, name="audio_proj")(
                audio.astype(dtype)
            )
        if video is not None:
            if video.ndim == 4:
                video = video[..., None]
            if video.ndim != 5 or video.shape[-1] != 1:
                raise ValueError(f"video must be [batch, time, H, W(, 1)], got {video.shape}")
            v = VisualFrontend(
                cfg.resnet_stem,
                cfg.resnet_widths,
                cfg.resnet_blocks,
                self.dtype,
                prelu_channels=True,
                name="video_frontend",
            )(video.astype(dtype), train)
            feats["video"] = dense(d, (None, axes.EMBED), dtype=self.dtype, name="video_proj")(v)
        ref = next(iter(feats.values()))
        audio_f = feats.get("audio", jnp.zeros_like(ref))
        video_f = feats.get("video", jnp.zeros_like(ref))
        if train and cfg.modality_dropout > 0 and len(feats) == 2:
            audio_f, video_f = _modality_dropout(self, audio_f, video_f, cfg)
        if cfg.modality_fuse == "concat":
            x = jnp.concatenate([audio_f, video_f], axis=-1)
        else:
            x = audio_f + video_f
        x = layer_norm(cfg.layer_norm_eps, name="layer_norm")(x).astype(dtype)
        if cfg.modality_fuse == "concat":
            x = dense(d, (None, axes.EMBED), dtype=self.dtype, name="post_extract_proj")(x)
        return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))


class AVHubertEncoder(nn.Module):
    """AV-HuBERT: 25 Hz audio features and/or mouth crops -> `[batch, time, D]`.

    Returns `dict(last_hidden_state [batch, time, D], hidden_states: tuple of layers + 1 arrays
    [batch, time, D] (entry 0 the first layer's input, entry i layer i's output),
    frame_lengths [batch] int32)`. Parameters float32; `dtype` for activations.
    Training (`train=True`) needs a `dropout` rng when `modality_dropout > 0` and updates
    the ResNet's `batch_stats` (pass `mutable=["batch_stats"]`).
    """

    config: AVHubertConfig
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(
        self,
        audio: jax.Array | None = None,
        video: jax.Array | None = None,
        lengths: jax.Array | None = None,
        *,
        train: bool = False,
        num_layers: int | None = None,
    ) -> dict[str, Any]:
        """`lengths [batch]`: valid frames per row (None = all). `num_layers` stops early
        (no final pre-LN LayerNorm then; `last_hidden_state` is `hidden_states[num_layers]`)."""
        cfg = self.config
        hcfg = cfg.hubert()
        dtype = self.dtype or jnp.float32
        b, t = (audio if audio is not None else video).shape[:2]
        mask = None
        if lengths is None:
            lengths = jnp.full((b,), t, jnp.int32)
        else:
            lengths = jnp.asarray(lengths, jnp.int32)
            mask = jnp.arange(t)[None, :] < lengths[:, None]
            # Padded input frames are zeros (as the official collater pads): the 3D stem's
            # temporal kernel then sees what a shorter unpadded clip's zero padding gives.
            audio, video = (None if z is None else _zero_padded(z, mask) for z in (audio, video))
        x = AVHubertFrontend(cfg, self.dtype, name="frontend")(audio, video, train)
        if mask is not None:
            x = jnp.where(mask[..., None], x, 0.0).astype(dtype)
        x = x + PositionalConvEmbedding(hcfg, self.dtype, name="pos_conv_embed")(x)
        final_ln = layer_norm(cfg.layer_norm_eps, name="encoder_layer_norm")
        if not cfg.layer_norm_first:
            x = final_ln(x).astype(dtype)
        n = cfg.encoder_layers if num_layers is None else int(num_layers)
        if not 0 <= n <= cfg.encoder_layers:
            raise ValueError(f"num_layers must be in [0, {cfg.encoder_layers}], got {n}")
        hidden = [x]
        for i in range(n):
            x = EncoderLayer(hcfg, self.dtype, name=f"layers_{i}")(x, mask)
            x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
            hidden.append(x)
        if cfg.layer_norm_first and n == cfg.encoder_layers:
            x = final_ln(x).astype(dtype)
        return {"last_hidden_state": x, "hidden_states": tuple(hidden), "frame_lengths": lengths}


def variable_shapes(config: AVHubertConfig, height: int = 88) -> dict[str, tuple[int, ...]]:
    """`{"params/a/b/kernel": shape, "batch_stats/...": shape}` without allocating weights."""
    model = AVHubertEncoder(config)
    audio = jax.ShapeDtypeStruct((1, 1, config.audio_feat_dim), jnp.float32)
    video = jax.ShapeDtypeStruct((1, 1, height, height), jnp.float32)
    tree = jax.eval_shape(lambda a, v: model.init(jax.random.key(0), a, v), audio, video)
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(tree))[0]
    return {"/".join(str(p.key) for p in path): tuple(leaf.shape) for path, leaf in flat}
