"""Banded (blockwise) local attention equals the dense `[T, T]` masked path."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avjax.nn.attention import (
    attend,
    banded_local_attention,
    local_attention,
    sequence_mask,
)


def _qkv(t, h=4, kv=2, d=8, b=2):
    kq, kk, kv_ = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(kq, (b, t, h, d))
    k = jax.random.normal(kk, (b, t, kv, d))
    v = jax.random.normal(kv_, (b, t, kv, d))
    return q, k, v


def _positions(t):
    # Row 0: one document starting mid-stream (positions do not start at 0); row 1: resets.
    row0 = jnp.arange(5, 5 + t)
    row1 = jnp.concatenate([jnp.arange(9), jnp.arange(t - 9 - 4), jnp.arange(4)])
    return jnp.stack([row0, row1]).astype(jnp.int32)


@pytest.mark.parametrize(
    "t,window,block",
    [
        (37, 8, 4),  # window a multiple of the block, T not a multiple (padding)
        (37, 10, 4),  # window not a multiple of the block
        (40, 5, 8),  # block larger than the window
        (37, 3, 3),  # a block per window
    ],
)
def test_banded_equals_dense_values_and_grads(t, window, block):
    q, k, v = _qkv(t)
    pos = _positions(t)

    w = jax.random.normal(jax.random.key(9), q.shape)

    def value_and_grads(f):
        """`f(q, k, v)` and the gradients of a random projection of it (one compile)."""
        loss = lambda *a: jnp.sum(f(*a) * w)  # noqa: E731
        return f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    dense = jax.jit(lambda: value_and_grads(lambda *a: attend(*a, sequence_mask(pos, window))))()
    banded = jax.jit(
        lambda: value_and_grads(lambda *a: banded_local_attention(*a, pos, window, block))
    )()
    np.testing.assert_allclose(banded[0], dense[0], rtol=1e-5, atol=1e-5)
    for g_dense, g_banded in zip(dense[1], banded[1], strict=True):
        np.testing.assert_allclose(g_banded, g_dense, rtol=1e-4, atol=1e-5)


def test_no_time_by_time_array_and_dispatch():
    t, window, block = 96, 8, 8
    q, k, v = _qkv(t, h=2, kv=1, d=4, b=1)
    pos = jnp.arange(t)[None]
    text = jax.jit(lambda q, k, v: local_attention(q, k, v, pos, window, block)).lower(q, k, v)
    text = text.as_text()
    # Nothing of shape [.., 96, 96]: the largest logits block is [block, 2 * block].
    assert not re.search(r"96x96", text)
    assert re.search(r"12x8x16", text) or re.search(r"x8x16x", text), "banded blocks missing"
    # Short sequences (no fewer keys per query when banded) keep the dense path.
    short = jax.jit(lambda q, k, v: local_attention(q, k, v, pos[:, :16], window, block))
    assert "16x16" in short.lower(q[:, :16], k[:, :16], v[:, :16]).as_text()


def test_flops_count_the_clipped_context():
    from avjax.models.speechssm import mean_local_context

    for window, t in [(4, 3), (4, 11), (2048, 6000)]:
        expected = np.mean([min(i, window) + 1 for i in range(t)])
        np.testing.assert_allclose(mean_local_context(window, t), expected)
    assert mean_local_context(2048, 6000) < 2049 and mean_local_context(2048, 6000) > 1690


def test_traffic_breakdown_sees_the_attention_core():
    from avjax.train.aot import hlo_bytes_by_category

    t, window, block = 128, 16, 16
    q, k, v = _qkv(t, h=2, kv=1, d=8, b=1)
    pos = jnp.arange(t)[None]
    w = jnp.ones((8, 8))
    traffic = {}
    for name, fn in {
        "banded": lambda q, k, v, pos: local_attention(q, k, v, pos, window, block),
        "dense": lambda q, k, v, pos: attend(q, k, v, sequence_mask(pos, window)),
    }.items():
        f = jax.jit(lambda q, k, v, pos, fn=fn: jnp.tanh(fn(q, k, v, pos) @ w))
        traffic[name] = hlo_bytes_by_category(f.lower(q, k, v, pos).compile().as_text())
        assert traffic[name]["attention"] > 0 and traffic[name]["matmul"] > 0
    # O(T x window) against O(T^2): the banded core moves several times fewer bytes.
    assert traffic["banded"]["attention"] < 0.5 * traffic["dense"]["attention"], traffic


def test_layer_output_has_the_model_width_when_heads_do_not_divide_it():
    """width 14 over 3 heads (head_dim 4): the output projection maps the 12 head features
    back to the 14-wide residual stream, not to heads * head_dim."""
    import flax.linen as nn

    from avjax.nn.attention import LocalAttention

    layer = LocalAttention(width=14, num_heads=3, window=4)
    x = jax.random.normal(jax.random.key(0), (2, 6, 14))
    pos = jnp.tile(jnp.arange(6), (2, 1))
    variables = layer.init(jax.random.key(1), x, pos)
    out, _ = layer.apply(variables, x, pos)
    assert out.shape == (2, 6, 14)
    assert nn.unbox(variables)["params"]["out"]["kernel"].shape == (12, 14)
