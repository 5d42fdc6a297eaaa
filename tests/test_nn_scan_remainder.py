"""GriffinLM `scan_layers` at a depth that is not a multiple of the block period, and the
RecurrentGemma initialisation of the blocks' output projections."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avjax.nn.griffin import GriffinLM, pattern_period, stack_layers, unstack_layers

T = 12


def _model(**kw):
    cfg = dict(vocab_size=24, width=32, mlp_width=48, num_heads=2, num_layers=5, window=4)
    cfg.update(kw)
    return GriffinLM(**cfg, scan_impl="associative")


def _inputs():
    tok = jax.random.randint(jax.random.key(1), (2, T), 0, 24)
    pos = jnp.concatenate([jnp.arange(7), jnp.arange(T - 7)])  # a document restart at 7
    return tok, jnp.broadcast_to(pos, (2, T))


@pytest.fixture(scope="module")
def models_and_params():
    unrolled, scanned = _model(), _model(scan_layers=True)
    tok, pos = _inputs()
    params = nn.meta.unbox(jax.jit(unrolled.init)(jax.random.key(0), tok, pos))["params"]
    return unrolled, scanned, params


def test_period_and_layouts(models_and_params):
    unrolled, scanned, params = models_and_params
    assert pattern_period(scanned.types) == 3 and scanned.period == 3
    assert pattern_period(GriffinLM(1, 8, 8, 1, 26).types) == 3
    stacked = stack_layers(params, 5, 3)
    # Two periods would not fit in 5 layers: one scanned repeat, blocks_3 and blocks_4 unrolled.
    assert sorted(k for k in stacked if k.startswith("blocks_")) == ["blocks_3", "blocks_4"]
    assert stacked["layers"]["blocks_0"]["mlp"]["ffw_up_w"].shape == (1, 2, 32, 48)
    # The scanned model's own init has exactly the stacked layout.
    tok, pos = _inputs()
    own = nn.meta.unbox(jax.eval_shape(scanned.init, jax.random.key(0), tok, pos))["params"]
    assert jax.tree.structure(own) == jax.tree.structure(stacked)
    assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, stacked)
    assert jax.tree.map(jnp.shape, back := unstack_layers(stacked, 5, 3)) == jax.tree.map(
        jnp.shape, params
    )
    jax.tree.map(np.testing.assert_array_equal, back, params)


def _run(model, params):
    """Loss, logits and gradients, then a prefill and one decoding step (one compile)."""
    tok, pos = _inputs()

    def loss(p):
        logits, _ = model.apply({"params": p}, tok, pos)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    _, cache = model.apply({"params": params}, tok, pos, return_cache=True)
    step, _ = model.apply({"params": params}, tok[:, :1], pos[:, -1:] + 1, cache=cache)
    return value, logits, grads, cache, step


def test_scanned_equals_unrolled_logits_grads_and_cache(models_and_params):
    unrolled, scanned, params = models_and_params
    stacked = stack_layers(params, 5, 3)
    l_u, logits_u, g_u, _, step_u = jax.jit(_run, static_argnums=0)(unrolled, params)
    l_s, logits_s, g_s, cache_s, step_s = jax.jit(_run, static_argnums=0)(scanned, stacked)
    np.testing.assert_allclose(logits_s, logits_u, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_s, l_u, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        unstack_layers(g_s, 5, 3),
        g_u,
    )
    # The scanned cache is the stacked period then the 2 remaining layers; decoding agrees.
    assert len(cache_s) == 3 + 2
    assert jax.tree.structure(cache_s) == jax.tree.structure(scanned.init_cache(2))
    np.testing.assert_allclose(step_s, step_u, rtol=1e-5, atol=1e-5)


def test_hlo_has_one_while_loop_over_periods(models_and_params):
    _, _, params = models_and_params
    # 8 periods + a remainder of 2 layers (26 = 8 x 3 + 2, RecurrentGemma-2B's depth) at width 32.
    model = _model(num_layers=26, scan_layers=True)
    stacked = stack_layers(
        {**params, **{f"blocks_{i}": params[f"blocks_{i % 3}"] for i in range(26)}}, 26, 3
    )
    assert stacked["layers"]["blocks_2"]["temporal"]["q"]["kernel"].shape[0] == 8
    tok, pos = _inputs()
    text = jax.jit(lambda p: model.apply({"params": p}, tok, pos)[0]).lower(stacked).as_text()
    loops = re.findall(r"stablehlo\.while", text)
    assert len(loops) == 1, len(loops)
    assert "tensor<8x" in text  # the loop's stacked parameters: 8 repeats


def test_output_projection_init_variance():
    width, layers = 64, 3
    tok = jnp.zeros((1, 2), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(2), (1, 2))
    params = {
        scale: nn.meta.unbox(
            GriffinLM(8, width, width, 2, layers, window=2, out_init_scale=scale).init(
                jax.random.key(0), tok, pos
            )
        )["params"]
        for scale in ("rg", "unit")
    }
    out_kernels = [("blocks_0", "temporal", "linear_out"), ("blocks_2", "temporal", "out")]
    out_kernels += [(f"blocks_{i}", "mlp", "ffw_down") for i in range(layers)]
    for path in out_kernels:
        rg, unit = (params[s][path[0]][path[1]][path[2]]["kernel"] for s in ("rg", "unit"))
        # Fan-in normal: variance scale / fan_in; RecurrentGemma's scale is 2 / num_layers.
        np.testing.assert_allclose(jnp.var(unit), 1.0 / width, rtol=0.1)
        np.testing.assert_allclose(jnp.var(rg), 2.0 / layers / width, rtol=0.1)
        np.testing.assert_allclose(rg, unit * np.sqrt(2.0 / layers), rtol=1e-5, atol=1e-7)
    for path in [("blocks_0", "temporal", "linear_x"), ("blocks_2", "temporal", "q")]:
        rg, unit = (params[s][path[0]][path[1]][path[2]]["kernel"] for s in ("rg", "unit"))
        np.testing.assert_array_equal(rg, unit)  # the other projections are not rescaled
    with pytest.raises(ValueError, match="out_init_scale"):
        GriffinLM(8, width, width, 2, layers, out_init_scale="big").init(
            jax.random.key(0), tok, pos
        )
