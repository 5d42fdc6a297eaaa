"""Wav2Lip-style talking-face networks: identity, audio and lip encoders, the U-Net face
decoder with identity skips, and the visual-quality discriminator.

Shared by talking-face papers (SyncTalkFace; later CALS, TAEM, AV2AV's renderer). Images are
NHWC. Sizes follow Wav2Lip (Prajwal et al., 2020) / SyncTalkFace (Park et al., 2022) at
`base=16, max_width=512, dim=512` on 128 x 128 faces; every width and the resolution are
configurable so CPU tests and configs can run 32 x 32 faces with widths of 4..32.

- `IdentityEncoder`: `[batch, S, S, 6]` (the target frame with its lower half masked, and a
  reference frame of the same person, on channels) -> a list of skip features, full
  resolution first: `[batch, S, S, w0], [batch, S/2, S/2, w1], ..., [batch, 1, 1, wb]`.
  A stride-1 stem, then stride-2 stages down to 2 x 2, then a valid conv to 1 x 1.
- `AudioEncoder`: mel windows `[batch, 80, 16, 1]` (0.2 s) -> `[batch, dim]`.
- `LipEncoder`: `[batch, 5, S, S, 3]` frames (upper half zeroed by the caller) -> one feature
  per frame `[batch, 5, dim]`: a Conv3d (kernel 5 x 7 x 7, spatial stride 2, time padded so
  each frame sees its +-2 neighbours) then 2D stride-2 convs per frame to 1 x 1.
- `FaceDecoder`: a code `[batch, code_dim]` and the identity skips -> `[batch, S, S, 3]` in
  (-1, 1) (tanh): transposed convs up from 1 x 1, concatenating the skip of each scale.
- `QualityDiscriminator`: lower face halves `[batch, S/2, S, 3]` -> realness logit `[batch]`
  (LeakyReLU 0.2 conv stack without normalisation, as Wav2Lip's `Wav2Lip_disc_qual`).

Conv blocks are conv -> GroupNorm -> (+ input) -> ReLU (`avjax.nn.syncnet.ConvNormReLU`);
Wav2Lip uses BatchNorm there (GroupNorm keeps the GAN's two parts free of running statistics
and is independent of the batch split under data parallelism).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes
from avjax.nn.syncnet import ConvNormReLU, ConvSpec


def _kernel_init(ndim: int):
    names = (axes.CONV,) + (None,) * (ndim - 1) + (None, axes.EMBED)
    return nn.with_logical_partitioning(nn.initializers.he_normal(), names)


def _bias_init():
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.EMBED,))


def stage_widths(size: int, base: int, max_width: int) -> list[int]:
    """Widths of the identity encoder's scales for `size` x `size` faces: `base` at full
    resolution, doubling per halving (capped at `max_width`), down to 2 x 2 (`size` must be a
    power of two >= 4). E.g. 128, 16, 512 -> [16, 32, 64, 128, 256, 512, 512]."""
    if size < 4 or size & (size - 1):
        raise ValueError(f"face size {size}: expected a power of two >= 4")
    n = size.bit_length() - 1  # size = 2 ** n; scales size .. 2: n of them
    return [min(base * 2**i, max_width) for i in range(n)]


class _Block(nn.Module):
    """`ConvNormReLU` then `residual` residual blocks at the same width."""

    spec: ConvSpec
    residual: int = 1
    norm_groups: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ConvNormReLU(self.spec, self.norm_groups, name="conv")(x)
        f = self.spec.features
        for i in range(self.residual):
            spec = ConvSpec(f, (3, 3), residual=True)
            x = ConvNormReLU(spec, self.norm_groups, name=f"res_{i}")(x)
        return x


class IdentityEncoder(nn.Module):
    """Masked target + reference `[batch, S, S, 6]` -> skips `[[batch, S/2^i, S/2^i, w_i]]`
    for each scale S .. 2, then the bottleneck `[batch, 1, 1, bottleneck]`."""

    base: int = 16
    max_width: int = 512
    bottleneck: int = 512
    residual: int = 2
    norm_groups: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        widths = stage_widths(x.shape[1], self.base, self.max_width)
        feats = []
        for i, w in enumerate(widths):
            spec = ConvSpec(w, (7, 7), padding=(3, 3)) if i == 0 else ConvSpec(w, (3, 3), (2, 2))
            x = _Block(spec, self.residual if i else 0, self.norm_groups, name=f"stage_{i}")(x)
            feats.append(x)
        spec = ConvSpec(self.bottleneck, (2, 2), padding=(0, 0))
        feats.append(_Block(spec, 0, self.norm_groups, name="bottleneck")(x))
        return feats


class AudioEncoder(nn.Module):
    """Mel windows `[batch, 80, 16, 1]` -> `[batch, dim]` (Wav2Lip's audio encoder: strides
    (3, 1), (3, 3), (3, 2) take 80 x 16 to 3 x 3, then a valid 3 x 3 conv to 1 x 1)."""

    base: int = 32
    dim: int = 512
    residual: int = 2
    norm_groups: int = 4

    @nn.compact
    def __call__(self, mel: jax.Array) -> jax.Array:
        if mel.shape[1:3] != (80, 16):
            raise ValueError(f"mel windows {mel.shape}: expected [batch, 80, 16, 1]")
        w = self.base
        stages = (
            ConvSpec(w, (3, 3)),
            ConvSpec(2 * w, (3, 3), (3, 1)),
            ConvSpec(4 * w, (3, 3), (3, 3)),
            ConvSpec(8 * w, (3, 3), (3, 2)),
            ConvSpec(self.dim, (3, 3), padding=(0, 0)),
        )
        x = mel
        for i, spec in enumerate(stages):
            res = self.residual if i < len(stages) - 1 else 0
            x = _Block(spec, res, self.norm_groups, name=f"stage_{i}")(x)
        return x.reshape(x.shape[0], self.dim)


class LipEncoder(nn.Module):
    """Frames `[batch, T, S, S, 3]` -> per-frame lip features `[batch, T, dim]`."""

    base: int = 64
    max_width: int = 512
    dim: int = 512
    norm_groups: int = 4

    @nn.compact
    def __call__(self, frames: jax.Array) -> jax.Array:
        b, t, s = frames.shape[:3]
        x = nn.Conv(
            self.base,
            (5, 7, 7),
            strides=(1, 2, 2),
            padding=((2, 2), (3, 3), (3, 3)),
            kernel_init=_kernel_init(3),
            bias_init=_bias_init(),
            name="conv3d",
        )(frames)  # [batch, T, S/2, S/2, base]
        x = nn.relu(x).reshape(b * t, s // 2, s // 2, self.base)
        widths = stage_widths(s // 2, self.base, self.max_width)[1:]
        for i, w in enumerate(widths):
            x = ConvNormReLU(ConvSpec(w, (3, 3), (2, 2)), self.norm_groups, name=f"down_{i}")(x)
        spec = ConvSpec(self.dim, (2, 2), padding=(0, 0))
        x = ConvNormReLU(spec, self.norm_groups, name="out")(x)
        return x.reshape(b, t, self.dim)


class _UpBlock(nn.Module):
    """Transposed conv (stride 2, or `valid` kernel 2 from 1 x 1) -> GroupNorm -> ReLU, then
    `residual` residual blocks."""

    features: int
    valid: bool = False
    residual: int = 1
    norm_groups: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.ConvTranspose(
            self.features,
            (2, 2) if self.valid else (3, 3),
            strides=(1, 1) if self.valid else (2, 2),
            padding="VALID" if self.valid else "SAME",
            kernel_init=_kernel_init(2),
            bias_init=_bias_init(),
            name="deconv",
        )(x)
        x = nn.GroupNorm(num_groups=min(self.norm_groups, self.features), name="norm")(x)
        x = nn.relu(x)
        for i in range(self.residual):
            spec = ConvSpec(self.features, (3, 3), residual=True)
            x = ConvNormReLU(spec, self.norm_groups, name=f"res_{i}")(x)
        return x


class FaceDecoder(nn.Module):
    """`code [batch, code_dim]` + identity skips (as `IdentityEncoder` returns them) ->
    `[batch, S, S, 3]` in (-1, 1).

    From 1 x 1: concatenate the bottleneck skip, up to 2 x 2; at each scale concatenate that
    scale's skip and go up (the last, full-resolution skip feeds the output convs)."""

    max_width: int = 512
    residual: int = 1
    norm_groups: int = 4

    @nn.compact
    def __call__(self, code: jax.Array, skips: Sequence[jax.Array]) -> jax.Array:
        *scales, bottleneck = skips
        x = code.reshape(code.shape[0], 1, 1, code.shape[-1])
        spec = ConvSpec(bottleneck.shape[-1], (1, 1), padding=(0, 0))
        x = ConvNormReLU(spec, self.norm_groups, name="in")(x)
        x = jnp.concatenate([x, bottleneck], axis=-1)
        width = min(2 * scales[-1].shape[-1], self.max_width)
        x = _UpBlock(width, True, self.residual, self.norm_groups, name="up_0")(x)  # 2 x 2
        for i, skip in enumerate(reversed(scales[1:])):
            x = jnp.concatenate([x, skip], axis=-1)
            width = min(2 * scales[-i - 2].shape[-1], self.max_width)
            x = _UpBlock(width, False, self.residual, self.norm_groups, name=f"up_{i + 1}")(x)
        x = jnp.concatenate([x, scales[0]], axis=-1)
        x = ConvNormReLU(ConvSpec(scales[0].shape[-1], (3, 3)), self.norm_groups, name="out")(x)
        x = nn.Conv(3, (1, 1), kernel_init=_kernel_init(2), bias_init=_bias_init(), name="rgb")(x)
        return jnp.tanh(x)


class QualityDiscriminator(nn.Module):
    """Lower face halves `[batch, S/2, S, 3]` in [-1, 1] -> realness logits `[batch]`.

    Stem conv 7 x 7, a (1, 2)-strided conv that squares the input, stride-2 convs (each
    followed by a stride-1 conv) down to 2 x 2, a valid conv to 1 x 1 and a 1 x 1 conv to the
    logit; LeakyReLU(0.2) after every conv, no normalisation (Wav2Lip's `nonorm` blocks)."""

    base: int = 32
    max_width: int = 512

    def _conv(self, x: jax.Array, w: int, k: int, stride=(1, 1), pad: int = 1, name=None):
        y = nn.Conv(
            w,
            (k, k),
            strides=stride,
            padding=[(pad, pad)] * 2,
            kernel_init=_kernel_init(2),
            bias_init=_bias_init(),
            name=name,
        )(x)
        return nn.leaky_relu(y, 0.2)

    @nn.compact
    def __call__(self, faces: jax.Array) -> jax.Array:
        h, w = faces.shape[1:3]
        if w != 2 * h:
            raise ValueError(f"lower face halves {faces.shape}: expected [batch, S/2, S, 3]")
        x = self._conv(faces, self.base, 7, pad=3, name="stem")
        x = self._conv(x, 2 * self.base, 5, (1, 2), 2, name="square")  # [b, S/2, S/2, 2 base]
        widths = stage_widths(h, 2 * self.base, self.max_width)[1:]
        for i, width in enumerate(widths):
            x = self._conv(x, width, 3, (2, 2), name=f"down_{i}")
            x = self._conv(x, width, 3, name=f"same_{i}")
        x = self._conv(x, x.shape[-1], 2, pad=0, name="valid")  # [b, 1, 1, width]
        logit = nn.Conv(1, (1, 1), kernel_init=_kernel_init(2), bias_init=_bias_init(), name="pred")
        return logit(x).reshape(x.shape[0])
