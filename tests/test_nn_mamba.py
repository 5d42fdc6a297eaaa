"""Mamba's selective SSM and MambaLM: decoding equals the full call, scan variants agree in
values and gradients, bfloat16 activations keep the state float32, segment resets."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avjax.models.mamba import MambaLM
from avjax.nn.mamba import MambaCache, SelectiveSSM

D_MODEL, T = 16, 11


def _perturbed(variables, seed=7, scale=0.2):
    """Random non-trivial values everywhere (init leaves biases at zero, D at one, ...)."""
    params = nn.unbox(variables)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, leaves)


_LAYER = SelectiveSSM(d_model=D_MODEL, d_state=4, scan_impl="sequential")
_X = jax.random.normal(jax.random.key(0), (2, T, D_MODEL))


@functools.cache
def _layer_params():
    return _perturbed(jax.jit(_LAYER.init)(jax.random.key(1), _X))


def _layer():
    return _LAYER, _layer_params(), _X


def _jit_apply(model, method=None, **static):
    return jax.jit(lambda p, *a: model.apply(p, *a, method=method, **static))


def test_parameters_carry_logical_axis_names():
    layer = SelectiveSSM(d_model=D_MODEL, d_state=4, use_bias=True)
    boxed = jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((1, 3, D_MODEL)))["params"]
    names = {
        "/".join(k.key for k in path): leaf.names
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
        )
    }
    assert names["in_proj_kernel"] == ("embed", None, "rnn")
    assert names["A_log"] == ("rnn", None)
    assert names["D"] == ("rnn",)
    assert names["out_proj/kernel"] == ("rnn", "embed")
    assert names["dt_proj/kernel"] == (None, "rnn")
    # S4D-real initialisation: A = -(1..N) on every channel.
    a = -np.exp(
        np.asarray(nn.unbox(jax.jit(_LAYER.init)(jax.random.key(0), _X[:, :2]))["params"]["A_log"])
    )
    np.testing.assert_allclose(a, -np.broadcast_to(np.arange(1, 5), a.shape), rtol=1e-6)


def test_step_equals_full_call():
    layer, params, x = _layer()
    y_full, final = _jit_apply(layer, return_cache=True)(params, x)
    assert final.ssm_state.shape == (2, 2 * D_MODEL, 4) and final.ssm_state.dtype == jnp.float32
    assert final.conv_state.shape == (2, 3, 2 * D_MODEL)

    step = _jit_apply(layer, "step")
    cache = layer.init_cache(2)
    ys = []
    for t in range(T):
        y_t, cache = step(params, x[:, t], cache)
        ys.append(y_t)
    np.testing.assert_allclose(np.stack(ys, 1), y_full, atol=1e-5, rtol=0)
    np.testing.assert_allclose(cache.ssm_state, final.ssm_state, atol=1e-5, rtol=0)
    np.testing.assert_allclose(cache.conv_state, final.conv_state, atol=1e-6, rtol=0)
    # Prefill in two chunks (a multi-token call continuing a cache) equals one call.
    y1, c1 = _jit_apply(layer, return_cache=True)(params, x[:, :4])
    y2, c2 = _jit_apply(layer)(params, x[:, 4:], None, c1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y_full, atol=1e-5, rtol=0)
    np.testing.assert_allclose(c2.ssm_state, final.ssm_state, atol=1e-5, rtol=0)


def test_segment_reset_equals_separate_documents():
    layer, params, x = _layer()
    cut = 6
    pos = jnp.concatenate([jnp.arange(cut), jnp.arange(T - cut)])[None].repeat(2, 0)
    full = _jit_apply(layer)
    y_packed, _ = full(params, x, pos)
    y_a, _ = full(params, x[:, :cut])
    y_b, _ = full(params, x[:, cut:])
    np.testing.assert_allclose(y_packed, jnp.concatenate([y_a, y_b], 1), atol=1e-5, rtol=0)
    # The same reset while stepping.
    cache, ys, step = layer.init_cache(2), [], _jit_apply(layer, "step")
    for t in range(T):
        y_t, cache = step(params, x[:, t], cache, pos[:, t])
        ys.append(y_t)
    np.testing.assert_allclose(np.stack(ys, 1), y_packed, atol=1e-5, rtol=0)


_H0 = MambaCache(
    jax.random.normal(jax.random.key(3), (2, 3, 2 * D_MODEL)),
    jax.random.normal(jax.random.key(4), (2, 2 * D_MODEL, 4)),
)


@functools.partial(jax.jit, static_argnums=0)
@functools.partial(jax.value_and_grad, argnums=(1, 2))
def _loss_and_grad(layer, params, x):
    y, c = layer.apply(params, x, cache=_H0)
    return jnp.sum(jnp.sin(y)) + jnp.sum(c.ssm_state**2)


@pytest.mark.parametrize("impl", ["associative", "chunked"])
def test_scan_impls_agree_in_values_and_gradients(impl):
    ref_layer, params, x = _layer()
    layer = ref_layer.clone(scan_impl=impl, scan_chunk_size=4)  # 11 = 4 + 4 + 3: padded chunk
    v_ref, g_ref = _loss_and_grad(ref_layer, params, x)
    v, g = _loss_and_grad(layer, params, x)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g_ref)) > 1e-2  # non-trivial


def test_bfloat16_activations_keep_state_float32():
    layer32, params, x = _layer()
    layer16 = layer32.clone(dtype=jnp.bfloat16)
    x16 = x.astype(jnp.bfloat16)
    y16, c16 = _jit_apply(layer16, return_cache=True)(params, x16)
    y32, c32 = _jit_apply(layer32, return_cache=True)(params, x)
    assert y16.dtype == jnp.bfloat16
    assert c16.ssm_state.dtype == jnp.float32 and c16.conv_state.dtype == jnp.bfloat16
    scale = float(jnp.abs(y32).max())
    assert float(jnp.abs(y16.astype(jnp.float32) - y32).max()) < 0.05 * scale
    assert float(jnp.abs(c16.ssm_state - c32.ssm_state).max()) < 0.05 * float(
        jnp.abs(c32.ssm_state).max()
    )
    # The recurrence itself runs in float32: every scan's carry is float32.
    jaxpr = jax.make_jaxpr(lambda p, x: layer16.apply(p, x))(params, x16)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert scans
    for eqn in scans:
        n_carry = eqn.params["num_carry"]
        n_consts = eqn.params["num_consts"]
        carries = eqn.invars[n_consts : n_consts + n_carry]
        assert all(v.aval.dtype == jnp.float32 for v in carries), [v.aval for v in carries]
    # One decoding step in bfloat16 keeps the float32 state.
    _, c_step = _jit_apply(layer16, "step")(params, x16[:, 0], layer16.init_cache(2, jnp.bfloat16))
    assert c_step.ssm_state.dtype == jnp.float32


_LM = MambaLM(vocab_size=23, d_model=16, num_layers=2, d_state=4, tie_embeddings=False)
_TOK = jax.random.randint(jax.random.key(5), (2, T), 0, 23)


@functools.cache
def _lm_params():
    return _perturbed(jax.jit(_LM.init)(jax.random.key(6), _TOK), scale=0.1)


def test_lm_decoding_equals_full_call():
    model, params, tok = _LM.clone(scan_impl="associative"), _lm_params(), _TOK
    logits, _ = _jit_apply(model)(params, tok)
    assert logits.shape == (2, T, 23) and logits.dtype == jnp.float32
    prompt = 4
    _, cache = _jit_apply(model, return_cache=True)(params, tok[:, :prompt])
    step = _jit_apply(model, "step")
    for t in range(prompt, T):
        out, cache = step(params, tok[:, t], cache)
        np.testing.assert_allclose(out, logits[:, t], atol=1e-5, rtol=0)
    # From an empty cache too.
    cache = model.init_cache(2)
    for t in range(T):
        out, cache = step(params, tok[:, t], cache)
        np.testing.assert_allclose(out, logits[:, t], atol=1e-5, rtol=0)


def test_lm_packed_documents_and_bfloat16():
    model, params, tok = _LM, _lm_params(), _TOK[:, :10]
    pos = jnp.tile(jnp.arange(5), 2)[None].repeat(2, 0)  # two documents of 5 tokens per row
    full = _jit_apply(model)
    packed, _ = full(params, tok, pos)
    first, _ = full(params, tok[:, :5])
    second, _ = full(params, tok[:, 5:])
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), atol=1e-5, rtol=0)
    l16, c16 = _jit_apply(model.clone(dtype=jnp.bfloat16), return_cache=True)(params, tok, pos)
    assert l16.dtype == jnp.float32 and all(c.ssm_state.dtype == jnp.float32 for c in c16)
    assert float(jnp.abs(l16 - packed).max()) < 0.05 * float(jnp.abs(packed).max())


@pytest.mark.parametrize(
    "preset,count", [("mamba_130m", 129_135_360), ("mamba_2_8b", 2_768_345_600)]
)
def test_presets_have_the_published_sizes(preset, count):
    """`MambaConfig` presets: Mamba-130M / 2.8B (published: 129M / 2.77B with tied embeddings)."""
    from avjax.models.mamba import MambaConfig

    model = getattr(MambaConfig, preset)().make()
    shapes = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1, 4), jnp.int32)), jax.random.key(0)
    )
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count
