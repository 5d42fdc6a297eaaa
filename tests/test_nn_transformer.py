"""TransformerLM: cached decoding == full call, scanned layers == unrolled, sharded == 1 device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avjax.nn.transformer import TransformerLM, init_kv_cache, num_params, stack_layers
from avjax.train.sharding import DEFAULT_RULES, logical_shardings, make_mesh

B, T, V = 2, 24, 40


def _model(**kw):
    base = dict(vocab_size=V, width=32, mlp_width=48, num_heads=4, num_layers=3, max_len=32)
    return TransformerLM(**{**base, **kw})


def _inputs():
    tokens = jax.random.randint(jax.random.key(0), (B, T), 0, V)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    return tokens, pos


def _params(model, tokens, pos):
    return nn.meta.unbox(model.init(jax.random.key(1), tokens, pos)["params"])


@pytest.mark.parametrize(
    "kv_heads,block", [(1, 8), (2, 0), (4, 5)]
)  # MQA/GQA/MHA; blocked decode, whole buffer, and a block that does not divide max_len
def test_cached_decode_equals_full_call(kv_heads, block):
    model = _model(num_kv_heads=kv_heads, decode_block=block)
    tokens, pos = _inputs()
    params = _params(model, tokens, pos)
    assert sum(x.size for x in jax.tree.leaves(params)) == num_params(V, 32, 48, 4, kv_heads, 3)
    full, _ = model.apply({"params": params}, tokens, pos)
    prefix = 7
    _, cache = model.apply(
        {"params": params}, tokens[:, :prefix], pos[:, :prefix], return_cache=True
    )
    assert cache[0].keys.shape == (B, 32, kv_heads, 8)
    np.testing.assert_array_equal(cache[0].index, [prefix] * B)
    step = jax.jit(lambda c, x, p: model.apply({"params": params}, x, p, cache=c))
    outs = []
    for i in range(prefix, T):
        logits, cache = step(cache, tokens[:, i : i + 1], pos[:, i : i + 1])
        outs.append(logits[:, 0])
    np.testing.assert_allclose(np.stack(outs, 1), full[:, prefix:], atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(cache[0].index, [T] * B)
    # Several tokens at once against the cache (chunked prefill) agree too.
    _, cache = model.apply(
        {"params": params}, tokens[:, :prefix], pos[:, :prefix], return_cache=True
    )
    logits, _ = model.apply({"params": params}, tokens[:, prefix:T], pos[:, prefix:T], cache=cache)
    np.testing.assert_allclose(logits, full[:, prefix:], atol=2e-5, rtol=2e-5)


def test_decode_from_empty_cache_and_document_boundaries():
    model = _model(decode_block=8)
    tokens, pos = _inputs()
    params = _params(model, tokens, pos)
    # Two documents in one row: the second must not see the first.
    pos2 = jnp.concatenate([jnp.arange(10), jnp.arange(T - 10)])[None].repeat(B, 0)
    both, _ = model.apply({"params": params}, tokens, pos2)
    alone, _ = model.apply({"params": params}, tokens[:, 10:], pos2[:, 10:])
    np.testing.assert_allclose(both[:, 10:], alone, atol=2e-5, rtol=2e-5)
    # Token by token from an empty cache == the full call.
    full, _ = model.apply({"params": params}, tokens[:, :6], pos[:, :6])
    cache = model.init_cache(B)
    step = jax.jit(lambda c, x, p: model.apply({"params": params}, x, p, cache=c))
    for i in range(6):
        logits, cache = step(cache, tokens[:, i : i + 1], pos[:, i : i + 1])
        np.testing.assert_allclose(logits[:, 0], full[:, i], atol=2e-5, rtol=2e-5)


def test_scan_layers_equals_unrolled():
    model = _model(num_kv_heads=2, decode_block=8)
    scanned = model.clone(scan_layers=True)
    tokens, pos = _inputs()
    params = _params(model, tokens, pos)
    stacked = stack_layers(params, 3)
    boxed = scanned.init(jax.random.key(1), tokens, pos)["params"]
    assert jax.tree.map(jnp.shape, nn.meta.unbox(boxed)) == jax.tree.map(jnp.shape, stacked)
    assert boxed["layers"]["mlp"]["ffw_up_w"].names == ("layers", None, "embed", "mlp")
    full, _ = model.apply({"params": params}, tokens, pos)
    full_s, _ = scanned.apply({"params": stacked}, tokens, pos)
    np.testing.assert_allclose(full_s, full, atol=1e-5, rtol=1e-5)
    _, cache = scanned.apply({"params": stacked}, tokens[:, :5], pos[:, :5], return_cache=True)
    assert cache.keys.shape == (3, B, 32, 2, 8)
    logits, cache = scanned.apply({"params": stacked}, tokens[:, 5:6], pos[:, 5:6], cache=cache)
    np.testing.assert_allclose(logits[:, 0], full[:, 5], atol=2e-5, rtol=2e-5)
    empty = scanned.init_cache(B)
    assert jax.tree.map(jnp.shape, empty) == jax.tree.map(jnp.shape, cache)
    assert init_kv_cache(B, 32, 2, 8).keys.shape == (B, 32, 2, 8)
    # Remat changes nothing numerically.
    remat, _ = model.clone(remat="full").apply({"params": params}, tokens, pos)
    np.testing.assert_allclose(remat, full, atol=1e-6)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices")
def test_sharded_forward_and_decode_equal_one_device():
    model = _model(num_kv_heads=2, mlp_width=64, decode_block=8)
    tokens = jax.random.randint(jax.random.key(0), (4, T), 0, V)
    pos = jnp.broadcast_to(jnp.arange(T), (4, T))
    full, _ = model.apply({"params": _params(model, tokens, pos)}, tokens, pos)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = list(DEFAULT_RULES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(1), tokens, pos))["params"]
        shardings = logical_shardings(boxed, mesh, rules)
        params = jax.jit(
            lambda: nn.meta.unbox(model.init(jax.random.key(1), tokens, pos)["params"]),
            out_shardings=shardings,
        )()
        w = params["blocks_0"]["mlp"]["ffw_up_w"]
        assert w.sharding.spec == jax.P(None, "fsdp", "tensor")
        assert w.addressable_shards[0].data.shape == (2, 16, 32)
        batch = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
        tok_s, pos_s = jax.device_put(tokens, batch), jax.device_put(pos, batch)
        out, _ = jax.jit(lambda p, x, s: model.apply({"params": p}, x, s))(params, tok_s, pos_s)
        _, cache = jax.jit(lambda p, x, s: model.apply({"params": p}, x, s, return_cache=True))(
            params, tok_s[:, :5], pos_s[:, :5]
        )
        step, _ = jax.jit(lambda p, c, x, s: model.apply({"params": p}, x, s, cache=c))(
            params, cache, tok_s[:, 5:6], pos_s[:, 5:6]
        )
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(out, full, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(step[:, 0], full[:, 5], atol=2e-5, rtol=2e-5)
