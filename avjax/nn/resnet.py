"""Lip-reading visual front-end: a 3D-conv stem and a 2D ResNet-18 applied per frame.

The front-end of MAB (Kim et al., ICCV 2021) and of most LRW lip readers since Stafylakis &
Tzimiropoulos (2017): mouth crops `[batch, time, H, W, 1]` ->

    Conv3d(1 -> stem, kernel (5, 7, 7), stride (1, 2, 2)) + BatchNorm + PReLU
    MaxPool3d(kernel (1, 3, 3), stride (1, 2, 2))
    ResNet-18 trunk per frame: 4 stages of 2 BasicBlocks (3x3 convs, BatchNorm, PReLU),
        widths (64, 128, 256, 512), strides (1, 2, 2, 2)
    global average pool                               -> [batch, time, widths[-1]]

Convolutions use PyTorch's explicit paddings so spatial sizes match the reference (112 x 112
frames -> 28 x 28 after the stem -> 4 x 4 after the trunk). Widths and block counts are
attributes so CPU configs and tests use tiny trunks. BatchNorm follows PyTorch's defaults
(momentum 0.1, i.e. flax's 0.9; eps 1e-5): with `train=True` it normalises with the batch
statistics and updates `batch_stats`; with `train=False` it uses the stored running
statistics. Under `jax.jit` with a batch-sharded input the statistics are global means over
the whole (sharded) batch, so data-parallel training equals single-device training.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes
from avjax.nn.conv2d import PReLU


def batch_norm(train: bool, name: str | None = None, dtype: jnp.dtype | None = None) -> nn.Module:
    """`nn.BatchNorm` over the last (channel) axis with PyTorch's defaults and logical axes."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axes.EMBED,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.EMBED,)),
        name=name,
    )


def conv(
    features: int,
    kernel: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: Sequence[int] | None = None,
    name: str | None = None,
    dtype: jnp.dtype | None = None,
) -> nn.Conv:
    """A bias-free N-d conv (N = len(kernel)) with PyTorch's symmetric `padding` (default
    `k // 2`) and He-normal init (torchvision's ResNet); kernel axes `(conv.., in, embed)`."""
    pad = padding if padding is not None else [k // 2 for k in kernel]
    names = (axes.CONV,) + (None,) * len(kernel) + (axes.EMBED,)
    init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    return nn.Conv(
        features,
        tuple(kernel),
        strides=tuple(strides or (1,) * len(kernel)),
        padding=[(p, p) for p in pad],
        use_bias=False,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(init, names),
        name=name,
    )


class BasicBlock(nn.Module):
    """ResNet BasicBlock with PReLU: `prelu(bn(conv(prelu(bn(conv(x))))) + shortcut(x))`.

    `[n, H, W, in] -> [n, H / stride, W / stride, features]`; the shortcut is a strided 1x1
    conv + BatchNorm when the shape changes, identity otherwise.
    """

    features: int
    stride: int = 1
    dtype: jnp.dtype | None = None
    prelu_channels: bool = False  # one PReLU slope per channel (AV-HuBERT) instead of one

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        s = (self.stride, self.stride)
        h = conv(self.features, (3, 3), s, name="conv1", dtype=self.dtype)(x)
        n = self.features if self.prelu_channels else 1
        h = PReLU(n, name="act1")(batch_norm(train, "bn1", self.dtype)(h))
        h = conv(self.features, (3, 3), name="conv2", dtype=self.dtype)(h)
        h = batch_norm(train, "bn2", self.dtype)(h)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = conv(self.features, (1, 1), s, (0, 0), name="down", dtype=self.dtype)(x)
            x = batch_norm(train, "down_bn", self.dtype)(x)
        return PReLU(n, name="act2")(h + x)


class ResNetTrunk(nn.Module):
    """The 2D ResNet stages: `[n, H, W, C] -> [n, widths[-1]]` (global average pool)."""

    widths: Sequence[int] = (64, 128, 256, 512)
    blocks: Sequence[int] = (2, 2, 2, 2)
    dtype: jnp.dtype | None = None
    prelu_channels: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i, (width, n) in enumerate(zip(self.widths, self.blocks, strict=True)):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(
                    width, stride, self.dtype, self.prelu_channels, name=f"layer{i + 1}_{j}"
                )(x, train)
        return jnp.mean(x, axis=(1, 2))


class VisualFrontend(nn.Module):
    """3D-conv stem + per-frame ResNet: `video [batch, time, H, W, C] -> [batch, time, D]`.

    `D = widths[-1]` (512 in the paper). Input is float (normalised grey frames); `C` is 1
    for grey crops. Attributes: `stem_features` (64), `widths`, `blocks` (ResNet-18:
    (2, 2, 2, 2)), `dtype` of the activations, `prelu_channels` (per-channel PReLU slopes, as
    AV-HuBERT's `nn.PReLU(num_parameters=planes)`; default one shared slope).
    """

    stem_features: int = 64
    widths: Sequence[int] = (64, 128, 256, 512)
    blocks: Sequence[int] = (2, 2, 2, 2)
    dtype: jnp.dtype | None = None
    prelu_channels: bool = False

    @nn.compact
    def __call__(self, video: jax.Array, train: bool = False) -> jax.Array:
        b, t = video.shape[:2]
        x = nn.with_logical_constraint(video, (axes.BATCH, axes.FRAMES, None, None, None))
        x = conv(self.stem_features, (5, 7, 7), (1, 2, 2), (2, 3, 3), "stem", self.dtype)(x)
        n = self.stem_features if self.prelu_channels else 1
        x = PReLU(n, name="stem_act")(batch_norm(train, "stem_bn", self.dtype)(x))
        x = nn.max_pool(x, (1, 3, 3), (1, 2, 2), ((0, 0), (1, 1), (1, 1)))
        x = x.reshape((b * t,) + x.shape[2:])  # frames as a batch of images
        trunk = ResNetTrunk(self.widths, self.blocks, self.dtype, self.prelu_channels, name="trunk")
        x = trunk(x, train)
        x = x.reshape(b, t, x.shape[-1])
        return nn.with_logical_constraint(x, (axes.BATCH, axes.FRAMES, None))
