"""Griffin core: scan variants agree, decoding equals the full call, cache is constant size."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avjax.nn.griffin import GriffinLM, griffin_pattern
from avjax.nn.scan import IMPLS, linear_scan


@pytest.mark.parametrize("impl", IMPLS)
def test_scan_impls_match_sequential_values_and_grads(impl):
    ka, kb, kh = jax.random.split(jax.random.key(0), 3)
    a = jax.random.uniform(ka, (2, 37, 5), minval=0.5, maxval=1.0)
    b = jax.random.normal(kb, (2, 37, 5))
    h0 = jax.random.normal(kh, (2, 5))
    ref_h, ref_last = linear_scan(a, b, h0, impl="sequential")
    h, last = linear_scan(a, b, h0, impl=impl, chunk_size=8)
    np.testing.assert_allclose(h, ref_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, ref_last, rtol=1e-5, atol=1e-5)

    def f(impl, a, b, h0):
        h, _ = linear_scan(a, b, h0, impl=impl, chunk_size=8)
        return jnp.sum(jnp.sin(h))

    g_ref = jax.grad(lambda *x: f("sequential", *x), argnums=(0, 1, 2))(a, b, h0)
    g = jax.grad(lambda *x: f(impl, *x), argnums=(0, 1, 2))(a, b, h0)
    for x, y in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def _model(**kw):
    cfg = dict(vocab_size=40, width=32, mlp_width=48, num_heads=2, num_layers=3, window=4)
    cfg.update(kw)
    return GriffinLM(**cfg)


def _params(model, t=8):
    tok = jnp.zeros((2, t), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    return nn.meta.unbox(model.init(jax.random.key(0), tok, pos))["params"]


def test_pattern():
    assert griffin_pattern(5) == ("recurrent", "recurrent", "attention", "recurrent", "recurrent")


@pytest.mark.parametrize("prefill", [0, 5])
def test_decoding_matches_full_call_past_the_window(prefill):
    model = _model()
    params = _params(model)
    t = 30  # the window (4) is exceeded many times
    tok = jax.random.randint(jax.random.key(1), (2, t), 0, 40)
    pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    full, _ = model.apply({"params": params}, tok, pos)
    outs = []
    if prefill:
        logits, cache = model.apply(
            {"params": params}, tok[:, :prefill], pos[:, :prefill], return_cache=True
        )
        outs.append(logits)
    else:
        cache = model.init_cache(2)
    shapes = jax.tree.map(lambda x: x.shape, cache)
    step = jax.jit(lambda p, x, s, c: model.apply({"params": p}, x, s, cache=c))
    for i in range(prefill, t):
        logits, cache = step(params, tok[:, i : i + 1], pos[:, i : i + 1], cache)
        outs.append(logits)
        assert jax.tree.map(lambda x: x.shape, cache) == shapes  # constant-size state
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-4, atol=1e-4)


def test_segment_reset_isolates_documents():
    """Tokens after a segment start do not see the previous document."""
    model = _model()
    params = _params(model)
    t = 12
    tok = jax.random.randint(jax.random.key(2), (1, t), 0, 40)
    pos = jnp.concatenate([jnp.arange(6), jnp.arange(6)])[None]
    both, _ = model.apply({"params": params}, tok, pos)
    alone, _ = model.apply({"params": params}, tok[:, 6:], pos[:, 6:])
    np.testing.assert_allclose(both[:, 6:], alone, rtol=1e-4, atol=1e-4)


def test_bfloat16_activations_keep_float32_state():
    model = _model(dtype=jnp.bfloat16)
    params = _params(model)
    tok = jnp.ones((2, 6), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    logits, cache = model.apply({"params": params}, tok, pos, return_cache=True)
    assert logits.dtype == jnp.float32
    assert cache[0].rg_lru_state.dtype == jnp.float32
    assert jax.tree.leaves(params)[0].dtype == jnp.float32


def test_params_carry_logical_axes():
    model = _model()
    tok = jnp.zeros((2, 8), jnp.int32)
    boxed = model.init(jax.random.key(0), tok, jnp.broadcast_to(jnp.arange(8), (2, 8)))
    specs = nn.get_partition_spec(boxed)["params"]
    assert specs["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
    assert specs["blocks_2"]["temporal"]["q"]["kernel"] == jax.sharding.PartitionSpec(
        "embed", "heads"
    )
    assert specs["blocks_0"]["temporal"]["rg_lru"]["a_param"] == jax.sharding.PartitionSpec("rnn")


def test_rg_lru_and_recurrent_block_step_equals_call():
    """`step` over a sequence (with a segment reset in it) equals the full call."""
    from avjax.nn.rglru import RGLRU, RecurrentBlock

    b, t, w = 2, 12, 16
    x = jax.random.normal(jax.random.key(0), (b, t, w))
    pos = jnp.concatenate([jnp.arange(7), jnp.arange(5)])[None].repeat(b, 0)  # reset at 7
    for module, state in (
        (RGLRU(w, 2), jnp.zeros((b, w), jnp.float32)),
        (RecurrentBlock(w, w, 2), RecurrentBlock(w, w, 2).init_cache(b)),
    ):
        variables = module.init(jax.random.key(1), x, pos)
        full = module.apply(variables, x, pos)[0]
        ys = []
        for i in range(t):
            y, state = module.apply(variables, x[:, i], pos[:, i], state, method="step")
            ys.append(y)
        np.testing.assert_allclose(jnp.stack(ys, 1), full, atol=1e-5)
