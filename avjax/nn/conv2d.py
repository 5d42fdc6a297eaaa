"""2D convolution blocks for image restoration: convs with logical axes, residual blocks
(conv - PReLU - conv + skip, no normalisation) and bilinear resampling with 1 x 1 convs.

Images are NHWC: `[batch, height, width, channels]`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes


def conv2d(
    features: int,
    kernel: int = 3,
    *,
    use_bias: bool = True,
    scale: float = 1.0,
    name: str | None = None,
) -> nn.Conv:
    """`nn.Conv` (SAME padding) whose kernel `[k, k, in, out]` carries logical axis names;
    `scale` scales the fan-in init variance (0: a zero kernel)."""
    init = (
        nn.initializers.zeros_init()
        if scale == 0
        else nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
    )
    return nn.Conv(
        features,
        (kernel, kernel),
        padding="SAME",
        use_bias=use_bias,
        kernel_init=nn.with_logical_partitioning(init, (axes.CONV, None, None, axes.EMBED)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.EMBED,)),
        name=name,
    )


class PReLU(nn.Module):
    """Parametric ReLU with learned slopes (init 0.25), as PyTorch's `nn.PReLU(num_parameters)`:
    one shared scalar slope (`num_parameters=1`) or one per channel (last axis)."""

    num_parameters: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = self.num_parameters
        shape, names = ((), ()) if n == 1 else ((n,), (axes.EMBED,))
        a = self.param(
            "a_param", nn.with_logical_partitioning(nn.initializers.constant(0.25), names), shape
        )
        a = jnp.reshape(a, (1,) * (x.ndim - a.ndim) + a.shape).astype(x.dtype)
        return jnp.where(x >= 0, x, a * x)


class ResBlock(nn.Module):
    """`x + conv(prelu(conv(x)))` with `features` channels in and out, `[b, h, w, c]`."""

    features: int
    kernel: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = conv2d(self.features, self.kernel, name="conv1")(x)
        h = PReLU(name="act")(h)
        return x + conv2d(self.features, self.kernel, name="conv2")(h)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of `[b, h, w, c]` to `[b, height, width, c]` (half-pixel centres, no
    antialiasing: PyTorch's `interpolate(mode="bilinear", align_corners=False)`)."""
    shape = (x.shape[0], height, width, x.shape[-1])
    return jax.image.resize(x, shape, "bilinear", antialias=False)


class Down(nn.Module):
    """Half resolution (bilinear) then a 1 x 1 conv to `features`: `[b, h, w, c] ->
    [b, h/2, w/2, features]`."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = resize_bilinear(x, x.shape[1] // 2, x.shape[2] // 2)
        return conv2d(self.features, 1, use_bias=False, name="proj")(x)


class Up(nn.Module):
    """Bilinear resize to `(height, width)` then a 1 x 1 conv to `features`."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, height: int, width: int) -> jax.Array:
        x = resize_bilinear(x, height, width)
        return conv2d(self.features, 1, use_bias=False, name="proj")(x)
