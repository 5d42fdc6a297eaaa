"""Audio-visual sync encoders: the Wav2Lip lip-sync expert and SyncNet v2 (LSE metrics).

`SyncExpert` (Wav2Lip's `SyncNet_color` shape): a face encoder over the lower halves of 5
consecutive face frames stacked on channels `[batch, H/2, W, 15]` and an audio encoder over a
mel window `[batch, 80, 16, 1]` (0.2 s), both 2D conv stacks (conv -> norm -> ReLU, identity
residuals inside a stage) ending in ReLU'd embeddings that are L2-normalised; their cosine
similarity is the in-sync probability trained with BCE. Layer lists are given by the caller
(`ConvSpec`), so the paper's exact stack and small CPU variants are the same module.

`SyncNetV2` is the architecture of joonson/syncnet_python (used by every LSE-C / LSE-D
number in the literature): a lip branch (Conv3d over 5 RGB frames of a 224 x 224 face crop,
`[batch, 5, 224, 224, 3]`, pixel values 0..255) and an audio branch (13 MFCC x 20 frames at
100 Hz, `[batch, 13, 20, 1]`), each a conv stack with BatchNorm to 512 then two linear layers
to 1024. Parameter and statistic names follow the PyTorch module's Sequential indices so an
imported `syncnet_v2.model` maps one to one (`avjax.convert.syncnet`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avjax.nn import axes


class ConvSpec(NamedTuple):
    """One conv layer: `features`, `kernel (kh, kw)`, `stride (sh, sw)`, `padding (ph, pw)`,
    `residual` (add the input before the ReLU; needs stride 1 and equal widths)."""

    features: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    residual: bool = False


def _conv_kernel_axes(ndim: int) -> tuple:
    """The first kernel dimension is `conv` (a name may appear once), the rest unnamed."""
    return (axes.CONV,) + (None,) * (ndim - 1) + (None, axes.EMBED)


def _vec(axis: str = axes.EMBED):
    return lambda init: nn.with_logical_partitioning(init, (axis,))


class ConvNormReLU(nn.Module):
    """Wav2Lip's conv block: conv -> GroupNorm (or none) -> (+ input) -> ReLU.

    `norm_groups=0` drops the norm. Input/output `[batch, H, W, C]`.
    """

    spec: ConvSpec
    norm_groups: int = 8
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.spec
        y = nn.Conv(
            s.features,
            tuple(s.kernel),
            strides=tuple(s.stride),
            padding=[(p, p) for p in s.padding],
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.he_normal(), _conv_kernel_axes(2)
            ),
            bias_init=_vec()(nn.initializers.zeros_init()),
            name="conv",
        )(x)
        if self.norm_groups:
            y = nn.GroupNorm(
                num_groups=min(self.norm_groups, s.features),
                dtype=self.dtype,
                scale_init=_vec()(nn.initializers.ones_init()),
                bias_init=_vec()(nn.initializers.zeros_init()),
                name="norm",
            )(y)
        if s.residual:
            y = y + x
        return nn.relu(y)


class ConvEncoder(nn.Module):
    """A stack of `ConvNormReLU` layers, then a pooled embedding.

    `[batch, H, W, C] -> [batch, dim]` float32. `head="relu"` (Wav2Lip): every layer is
    conv -> norm -> ReLU and the embedding is the mean over what is left of H x W, so it is
    never negative. `head="linear"`: the last layer is a plain conv whose kernel covers all of
    what is left of H x W (no padding, no norm, no ReLU; `dim = layers[-1].features`), so the
    embedding is signed and keeps the spatial / temporal layout the mean would average away.
    """

    layers: Sequence[ConvSpec]
    norm_groups: int = 8
    dtype: jnp.dtype = jnp.float32
    head: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.head not in ("relu", "linear"):
            raise ValueError(f"head={self.head!r}: expected 'relu' or 'linear'")
        body = self.layers if self.head == "relu" else self.layers[:-1]
        for i, spec in enumerate(body):
            x = ConvNormReLU(ConvSpec(*spec), self.norm_groups, self.dtype, name=f"layer_{i}")(x)
        if self.head == "linear":
            x = nn.Conv(
                ConvSpec(*self.layers[-1]).features,
                x.shape[1:3],
                padding="VALID",
                dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), _conv_kernel_axes(2)
                ),
                bias_init=_vec()(nn.initializers.zeros_init()),
                name=f"layer_{len(body)}",
            )(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def centre_frames(faces: jax.Array, channels: int) -> jax.Array:
    """`[batch, H, W, frames * channels]` -> the same with each frame minus the window's mean
    frame: what stays is the motion inside the window (identity and background cancel)."""
    b, h, w, c = faces.shape
    x = faces.reshape(b, h, w, c // channels, channels)
    return (x - jnp.mean(x, axis=3, keepdims=True)).reshape(b, h, w, c)


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """`x / max(|x|, eps)` over the last axis (as `torch.nn.functional.normalize`)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class SyncExpert(nn.Module):
    """Wav2Lip lip-sync expert: face windows and mel windows -> unit embeddings -> sync logit.

    Attributes:
      face_layers: the face encoder's convs (input channels: C x frames).
      audio_layers: the audio encoder's convs (input: one channel).
      norm_groups: GroupNorm groups per conv (0: none).
      similarity: "cosine" (Wav2Lip: P(sync) is the cosine itself, the logit is its log-odds)
        or "scaled" (logit = a * cosine + b with learned `a`, `b`: faster to train).
    """

    face_layers: Sequence[ConvSpec]
    audio_layers: Sequence[ConvSpec]
    norm_groups: int = 8
    similarity: str = "cosine"
    dtype: jnp.dtype = jnp.float32
    head: str = "relu"
    centre: bool = False
    face_channels: int = 3

    def setup(self):
        if self.similarity not in ("cosine", "scaled"):
            raise ValueError(f"similarity={self.similarity!r}: expected 'cosine' or 'scaled'")
        enc = functools.partial(ConvEncoder, norm_groups=self.norm_groups, dtype=self.dtype)
        self.face_encoder = enc(self.face_layers, head=self.head)
        self.audio_encoder = enc(self.audio_layers, head=self.head)
        if self.similarity == "scaled":
            const = lambda v: nn.with_logical_partitioning(nn.initializers.constant(v), (None,))  # noqa: E731
            self.log_scale = self.param("log_scale", const(np.log(10.0)), (1,))
            self.bias = self.param("bias", const(-5.0), (1,))

    def embed_face(self, faces: jax.Array) -> jax.Array:
        """`[batch, H/2, W, frames * C]` in [0, 1] -> `[batch, dim]` unit vectors."""
        if self.centre:
            faces = centre_frames(faces, self.face_channels)
        return l2_normalize(self.face_encoder(faces))

    def embed_audio(self, mel: jax.Array) -> jax.Array:
        """`[batch, n_mels, mel_steps]` -> `[batch, dim]` unit vectors."""
        if self.centre:
            mel = mel - jnp.mean(mel, axis=-1, keepdims=True)
        return l2_normalize(self.audio_encoder(mel[..., None]))

    def sync_logit(self, face_emb: jax.Array, audio_emb: jax.Array) -> jax.Array:
        """Unit embeddings `[batch, dim]` -> `[batch]` log-odds of being in sync."""
        if self.similarity == "scaled":
            cos = jnp.sum(face_emb * audio_emb, axis=-1)
            return jnp.exp(self.log_scale[0]) * cos + self.bias[0]
        p = sync_probability(face_emb, audio_emb)
        return jnp.log(p) - jnp.log1p(-p)

    def __call__(self, faces: jax.Array, mel: jax.Array) -> tuple[jax.Array, ...]:
        """Returns `(logit [batch], face_emb [batch, dim], audio_emb [batch, dim])`."""
        face_emb, audio_emb = self.embed_face(faces), self.embed_audio(mel)
        return self.sync_logit(face_emb, audio_emb), face_emb, audio_emb

    def candidate_logits(self, faces: jax.Array, mels: jax.Array) -> jax.Array:
        """Sync logits of one face window against several mel windows of the same clip.

        `faces [batch, H/2, W, frames * C]`, `mels [batch, candidates, n_mels, mel_steps]` ->
        `[batch, candidates]` (the softmax over candidates of `models.syncnet.offset_loss`)."""
        b, k = mels.shape[:2]
        face_emb = self.embed_face(faces)  # [batch, dim]
        audio_emb = self.embed_audio(mels.reshape(b * k, *mels.shape[2:])).reshape(b, k, -1)
        face_emb = jnp.broadcast_to(face_emb[:, None], audio_emb.shape)
        return self.sync_logit(face_emb, audio_emb)


def sync_probability(face_emb: jax.Array, audio_emb: jax.Array, eps: float = 1e-7) -> jax.Array:
    """Cosine similarity of unit embeddings `[batch, dim]` -> `[batch]` in (0, 1): Wav2Lip's
    in-sync probability (the embeddings are ReLU'd, so the cosine is never negative)."""
    return jnp.clip(jnp.sum(face_emb * audio_emb, axis=-1), eps, 1.0 - eps)


# --- SyncNet v2 (joonson/syncnet_python) -------------------------------------------------------


def _bn() -> nn.BatchNorm:
    """PyTorch BatchNorm defaults (eps 1e-5, momentum 0.1); stored statistics at inference."""
    return nn.BatchNorm(
        momentum=0.9,
        epsilon=1e-5,
        scale_init=_vec()(nn.initializers.ones_init()),
        bias_init=_vec()(nn.initializers.zeros_init()),
    )


def _dense(features: int) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (axes.EMBED, axes.MLP)
        ),
        bias_init=_vec(axes.MLP)(nn.initializers.zeros_init()),
    )


def _conv(features: int, kernel: tuple, stride: tuple, pad: tuple) -> nn.Conv:
    return nn.Conv(
        features,
        kernel,
        strides=stride,
        padding=[(p, p) for p in pad],
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.he_normal(), _conv_kernel_axes(len(kernel))
        ),
        bias_init=_vec()(nn.initializers.zeros_init()),
    )


def _max_pool(x: jax.Array, window: tuple, stride: tuple, pad: tuple = ()) -> jax.Array:
    pads = [(p, p) for p in pad] if pad else "VALID"
    return nn.max_pool(x, window, strides=stride, padding=pads)


# (torch Sequential index of the conv, features, kernel, stride, padding, max pool after it:
#  (window, stride, padding) or None); each conv's BatchNorm is the next index.
_AUDIO_CNN = (
    (0, 64, (3, 3), (1, 1), (1, 1), None),
    (4, 192, (3, 3), (1, 1), (1, 1), ((3, 3), (1, 2), ())),
    (8, 384, (3, 3), (1, 1), (1, 1), None),
    (11, 256, (3, 3), (1, 1), (1, 1), None),
    (14, 256, (3, 3), (1, 1), (1, 1), ((3, 3), (2, 2), ())),
    (18, 512, (5, 4), (1, 1), (0, 0), None),
)
_LIP_CNN = (
    (0, 96, (5, 7, 7), (1, 2, 2), (0, 0, 0), ((1, 3, 3), (1, 2, 2), ())),
    (4, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1), ((1, 3, 3), (1, 2, 2), (0, 1, 1))),
    (8, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1), None),
    (11, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1), None),
    (14, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1), ((1, 3, 3), (1, 2, 2), ())),
    (18, 512, (1, 6, 6), (1, 1, 1), (0, 0, 0), None),
)


class SyncNetV2(nn.Module):
    """SyncNet v2 of joonson/syncnet_python (LSE-C / LSE-D), with PyTorch-style names:
    `netcnnaud_<i>`, `netfcaud_<i>`, `netcnnlip_<i>`, `netfclip_<i>` (`i` = Sequential index).

    Attributes:
      embed_dim: output width (1024 in the released model).
      train: BatchNorm uses batch statistics (and updates `batch_stats`) when True.
    """

    embed_dim: int = 1024
    train: bool = False

    def setup(self):
        def cnn(table: tuple) -> dict[str, nn.Module]:
            layers: dict[str, nn.Module] = {}
            for idx, feats, kernel, stride, pad, _ in table:
                layers[str(idx)] = _conv(feats, kernel, stride, pad)
                layers[str(idx + 1)] = _bn()
            return layers

        def fc() -> dict[str, nn.Module]:
            return {"0": _dense(512), "1": _bn(), "3": _dense(self.embed_dim)}

        self.netcnnaud, self.netfcaud = cnn(_AUDIO_CNN), fc()
        self.netcnnlip, self.netfclip = cnn(_LIP_CNN), fc()

    def _cnn(self, x: jax.Array, layers: dict, table: tuple) -> jax.Array:
        for idx, *_, pool in table:
            x = layers[str(idx)](x)
            x = nn.relu(layers[str(idx + 1)](x, use_running_average=not self.train))
            if pool is not None:
                x = _max_pool(x, *pool)
        return x.reshape(x.shape[0], -1)

    def _fc(self, x: jax.Array, layers: dict) -> jax.Array:
        x = nn.relu(layers["1"](layers["0"](x), use_running_average=not self.train))
        return layers["3"](x)

    def __call__(self, lips: jax.Array, mfcc: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`lips [batch, 5, 224, 224, 3]` (0..255), `mfcc [batch, 13, 20]` ->
        `(lip_emb, audio_emb)`, each `[batch, embed_dim]` (not normalised, as the original)."""
        return self.embed_lips(lips), self.embed_audio(mfcc)

    def embed_lips(self, lips: jax.Array) -> jax.Array:
        """`[batch, 5, H, W, 3]` float (0..255) -> `[batch, embed_dim]`."""
        return self._fc(self._cnn(lips, self.netcnnlip, _LIP_CNN), self.netfclip)

    def embed_audio(self, mfcc: jax.Array) -> jax.Array:
        """`[batch, 13, 20]` MFCC window -> `[batch, embed_dim]`."""
        return self._fc(self._cnn(mfcc[..., None], self.netcnnaud, _AUDIO_CNN), self.netfcaud)
