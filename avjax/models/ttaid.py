"""TTAID (Gunawan, Nugroho, Park, 2022): a multi-task denoiser that adapts to each image.

The restoration network is an MPRNet-style encoder-decoder without normalisation: three
levels of residual blocks, `features` channels at full resolution and `scale_step` more per
level down, bilinear resampling with 1 x 1 convs, skips added on the way up. Two heads read
its full-resolution features:

  primary head    residual blocks -> conv -> residual;  clean = noisy + residual
  auxiliary head  concat(clean, residual) -> conv -> residual blocks -> conv -> noisy'

and a mask network (conv, residual blocks, conv, sigmoid) weighs the self-supervised
auxiliary loss `mean(|noisy - noisy'| * mask)` (the paper's) or its masked mean (`aux_loss`,
`norm="mask"`: a collapsing mask cannot shrink it), which needs no clean image, so the heads
can be adapted to each test image. Parameters are grouped `body`, `head`, `aux`, `mask`.
Images are `[batch, height, width, 3]` in [0, 1]; height and width divisible by 4.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn.conv2d import Down, PReLU, ResBlock, Up, conv2d

BODY, HEAD, AUX, MASK = "body", "head", "aux", "mask_net"
HEADS = (HEAD, AUX)  # what the meta-transfer inner loop and test-time adaptation update


class Body(nn.Module):
    """Encoder-decoder `[b, h, w, 3] -> [b, h, w, features]`."""

    features: int = 32
    scale_step: int = 16
    blocks: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f, s = self.features, self.scale_step
        widths = (f, f + s, f + 2 * s)
        h = conv2d(f, 3, name="shallow")(x)
        skips = []
        for lvl, w in enumerate(widths):
            if lvl:
                h = Down(w, name=f"down{lvl}")(h)
            for i in range(self.blocks):
                h = ResBlock(w, name=f"enc{lvl}_{i}")(h)
            skips.append(h)
        for lvl in (2, 1, 0):
            if lvl < 2:
                hs, ws = skips[lvl].shape[1:3]
                h = Up(widths[lvl], name=f"up{lvl}")(h, hs, ws) + skips[lvl]
            for i in range(self.blocks):
                h = ResBlock(widths[lvl], name=f"dec{lvl}_{i}")(h)
        return h


class PrimaryHead(nn.Module):
    """Features `[b, h, w, f]` -> residual `[b, h, w, 3]`."""

    features: int = 32
    blocks: int = 2

    @nn.compact
    def __call__(self, feats: jax.Array) -> jax.Array:
        h = feats
        for i in range(self.blocks):
            h = ResBlock(self.features, name=f"block{i}")(h)
        return conv2d(3, 3, scale=0.0, name="out")(h)  # starts as the identity denoiser


class AuxHead(nn.Module):
    """`(clean, residual)` `[b, h, w, 3]` each -> the reconstructed noisy input."""

    features: int = 32
    blocks: int = 2

    @nn.compact
    def __call__(self, clean: jax.Array, residual: jax.Array) -> jax.Array:
        h = conv2d(self.features, 3, name="inp")(jnp.concatenate([clean, residual], -1))
        for i in range(self.blocks):
            h = ResBlock(self.features, name=f"block{i}")(h)
        return conv2d(3, 3, name="out")(h)


class MaskNet(nn.Module):
    """Noisy image `[b, h, w, 3]` -> mask `[b, h, w, 1]` in (0, 1)."""

    features: int = 32
    blocks: int = 3

    @nn.compact
    def __call__(self, noisy: jax.Array) -> jax.Array:
        h = PReLU(name="act")(conv2d(self.features, 3, name="inp")(noisy))
        for i in range(self.blocks):
            h = ResBlock(self.features, name=f"block{i}")(h)
        return jax.nn.sigmoid(conv2d(1, 3, name="out")(h))


class TTAIDNet(nn.Module):
    """Body + primary head + auxiliary head + mask network.

    `__call__(noisy)` -> dict of `clean`, `residual`, `recon` `[b, h, w, 3]` and `mask`
    `[b, h, w, 1]`; `denoise(noisy)` skips the mask network; `mask(noisy)` runs it alone.
    """

    features: int = 32
    scale_step: int = 16
    body_blocks: int = 2
    head_blocks: int = 2
    mask_blocks: int = 3

    def setup(self):
        f = self.features
        self.body = Body(f, self.scale_step, self.body_blocks)
        self.head = PrimaryHead(f, self.head_blocks)
        self.aux = AuxHead(f, self.head_blocks)
        self.mask_net = MaskNet(f, self.mask_blocks)

    def denoise(self, noisy: jax.Array) -> dict[str, jax.Array]:
        residual = self.head(self.body(noisy))
        clean = noisy + residual
        return {"clean": clean, "residual": residual, "recon": self.aux(clean, residual)}

    def mask(self, noisy: jax.Array) -> jax.Array:
        return self.mask_net(noisy)

    def __call__(self, noisy: jax.Array) -> dict[str, jax.Array]:
        return {**self.denoise(noisy), "mask": self.mask(noisy)}


def aux_loss(
    noisy: jax.Array, recon: jax.Array, mask: jax.Array | None, norm: str = "mean"
) -> jax.Array:
    """The masked self-supervised loss (float32 scalar) of `noisy`, `recon` `[b, h, w, 3]`
    and `mask` `[b, h, w, 1]`: `norm="mean"` is the paper's `mean(|noisy - recon| * mask)`,
    which a mask shrinking towards 0 makes vanish; `norm="mask"` is the masked mean
    `sum(|noisy - recon| * mask) / (3 sum(mask))`, whose scale the mask cannot change."""
    err = jnp.abs(noisy.astype(jnp.float32) - recon.astype(jnp.float32))
    if mask is None:
        return jnp.mean(err)
    m = mask.astype(jnp.float32)
    if norm == "mean":
        return jnp.mean(err * m)
    if norm != "mask":
        raise ValueError(f"aux_loss: norm={norm!r} is not 'mean' or 'mask'")
    return jnp.sum(err * m) / (err.shape[-1] * jnp.sum(m) + 1e-6)


def l1(a: jax.Array, b: jax.Array) -> jax.Array:
    """`mean(|a - b|)` in float32."""
    return jnp.mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))


def mask_smoothness(mask: jax.Array, norm: str = "mean") -> jax.Array:
    """Mean absolute spatial gradient (total variation) of a mask `[b, h, w, 1]`; with
    `norm="mask"` divided by the mask's mean, so that (like the masked-mean auxiliary loss) it
    does not reward shrinking the whole mask towards 0."""
    dy = jnp.abs(mask[:, 1:] - mask[:, :-1])
    dx = jnp.abs(mask[:, :, 1:] - mask[:, :, :-1])
    tv = jnp.mean(dy) + jnp.mean(dx)
    return tv / (jnp.mean(mask) + 1e-6) if norm == "mask" else tv
