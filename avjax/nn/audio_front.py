"""The 2D-conv audio front-end of MAB: log-mel at 4x the video rate -> features at 25 fps.

`mel [batch, 4T, mels]` (100 Hz, T video frames at 25 fps) is treated as a one-channel image
and reduced 4x in time and frequency by two stride-2 convs, then one ResNet BasicBlock; each
output time step's `[mels / 4, channels]` map is flattened and projected:

    Conv2d(1 -> c1, 3x3, stride 2) + BatchNorm + PReLU          [batch, 2T, mels/2, c1]
    Conv2d(c1 -> c2, 3x3, stride 2) + BatchNorm + PReLU         [batch, T, mels/4, c2]
    BasicBlock(c2)                                              [batch, T, mels/4, c2]
    flatten + Linear(mels/4 * c2 -> dim)                        [batch, T, dim]

The paper: 80 mels, c1 = 128, c2 = 256, dim = 512, aligned one-to-one with the video frames.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes, layers
from avjax.nn.conv2d import PReLU
from avjax.nn.resnet import BasicBlock, batch_norm, conv


class AudioFrontend(nn.Module):
    """`mel [batch, 4T, mels] -> [batch, T, dim]` (see the module docstring).

    Attributes: `channels` (c1, c2), `dim` the output size, `dtype` of the activations.
    `4T` and `mels` must be multiples of 4.
    """

    channels: tuple[int, int] = (128, 256)
    dim: int = 512
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, mel: jax.Array, train: bool = False) -> jax.Array:
        b, steps, mels = mel.shape
        if steps % 4 or mels % 4:
            raise ValueError(f"mel {layers.shape_str(mel.shape)}: time and mels must be * 4")
        x = nn.with_logical_constraint(mel, (axes.BATCH, axes.LENGTH, None))[..., None]
        for i, c in enumerate(self.channels):
            x = conv(c, (3, 3), (2, 2), name=f"conv{i + 1}", dtype=self.dtype)(x)
            x = PReLU(name=f"act{i + 1}")(batch_norm(train, f"bn{i + 1}", self.dtype)(x))
        x = BasicBlock(self.channels[-1], dtype=self.dtype, name="block")(x, train)
        x = x.reshape(b, steps // 4, -1)
        x = layers.dense(self.dim, (None, axes.EMBED), dtype=self.dtype, name="proj")(x)
        return nn.with_logical_constraint(x, (axes.BATCH, axes.FRAMES, None))
