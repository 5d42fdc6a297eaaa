"""avjax.nn.memory: addressing, reading, the associative bridge, its losses and stop-gradients,
multi-head addressing, and sharding slots over a mesh of 8 host devices."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from avjax.nn import memory
from avjax.train.sharding import logical_shardings, make_mesh

B, T, SLOTS, KEY, VALUE = 2, 3, 16, 8, 12


def _rand(seed: int, *shape: int) -> np.ndarray:
    # numpy, not jax.random, and numpy slicing below: eager jax ops compile once per shape
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


# Jitted entry points: one compile per function and shape instead of op-by-op dispatch.
address = jax.jit(memory.address, static_argnames="num_heads")
logits_of = jax.jit(memory.addressing_logits, static_argnames="num_heads")
read = jax.jit(memory.read)
read_heads = jax.jit(memory.read_heads)
entropy = jax.jit(memory.entropy)
alignment = jax.jit(memory.alignment_loss)
bridge_losses = jax.jit(memory.bridge_losses)


@functools.cache
def _jit_apply(model: nn.Module):
    return jax.jit(model.apply)


def _bridge(**kw) -> memory.AssociativeBridge:
    return memory.AssociativeBridge(num_slots=SLOTS, key_dim=KEY, value_dim=VALUE, **kw)


@pytest.fixture(scope="module")
def bridge_setup():
    model = _bridge()
    src, tgt = _rand(0, B, T, 10), _rand(1, B, T, VALUE)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(2), src, tgt))["params"]
    return model, params, src, tgt


def test_addressing_sums_to_one_over_slots():
    q, k = _rand(0, B, T, KEY), _rand(1, SLOTS, KEY)
    a = address(q, k, radius=16.0)
    assert a.shape == (B, T, SLOTS) and a.dtype == jnp.float32
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-6)
    a4 = address(q, k, radius=16.0, num_heads=4)
    assert a4.shape == (B, T, 4, SLOTS)
    np.testing.assert_allclose(a4.sum(-1), 1.0, atol=1e-6)
    # bfloat16 inputs still address in float32
    assert address(q.astype(jnp.bfloat16), k, 16.0).dtype == jnp.float32


def test_addressing_is_scaled_cosine():
    q, k = np.asarray(_rand(0, B, T, KEY)), np.asarray(_rand(1, SLOTS, KEY))
    cos = (q / np.linalg.norm(q, axis=-1, keepdims=True)) @ (
        k / np.linalg.norm(k, axis=-1, keepdims=True)
    ).T
    np.testing.assert_allclose(logits_of(q, k, 16.0), 16 * cos, atol=1e-5)
    # scale-invariant in query and keys
    np.testing.assert_allclose(address(3 * q, 0.1 * k, 16.0), address(q, k, 16.0), atol=1e-6)


def test_bigger_radius_sharpens_addressing():
    q, k = _rand(0, B, T, KEY), _rand(1, SLOTS, KEY)
    ents = [float(entropy(address(q, k, r)).mean()) for r in (1.0, 4.0, 16.0, 64.0)]
    assert all(a > b for a, b in zip(ents, ents[1:], strict=False)), ents
    assert ents[0] < np.log(SLOTS) and ents[-1] < 0.25 * ents[0]


def test_one_hot_read_returns_that_slot():
    values = _rand(3, SLOTS, VALUE)
    idx = np.array([[0, 5, 15], [7, 7, 2]])
    one_hot = np.eye(SLOTS, dtype=np.float32)
    out = read(one_hot[idx], values)
    np.testing.assert_allclose(out, values[idx], atol=1e-6)
    # multi-head: head h reads its own part of the chosen slot
    heads = np.stack([idx, (idx + 1) % SLOTS], axis=-1)  # [B, T, heads=2]
    out = np.asarray(read_heads(one_hot[heads], values))
    half = VALUE // 2
    np.testing.assert_allclose(out[..., :half], values[idx][..., :half], atol=1e-6)
    np.testing.assert_allclose(out[..., half:], values[(idx + 1) % SLOTS][..., half:], atol=1e-6)


def test_multi_head_is_per_head_single_head_concatenated():
    q, k, v = _rand(0, B, T, KEY), _rand(1, SLOTS, KEY), _rand(2, SLOTS, VALUE)
    # one head == single head
    a1 = np.asarray(address(q, k, 16.0))
    np.testing.assert_allclose(read_heads(a1[..., None, :], v), read(a1, v))
    one = memory.KeyValueMemory(SLOTS, KEY, VALUE, num_heads=1)
    params = jax.jit(one.init)(jax.random.key(0), q)
    heads1 = _jit_apply(one)(params, q)
    np.testing.assert_allclose(heads1.logits, logits_of(q, _kv(params)[0], 16.0))
    # h heads == single-head memories on the h splits, concatenated
    h = 2
    ah = np.asarray(address(q, k, 16.0, num_heads=h))
    out = np.asarray(read_heads(ah, v))
    qs, ks, vs = (np.split(x, h, axis=-1) for x in (q, k, v))
    for i in range(h):
        ai = address(qs[i], ks[i], 16.0)
        np.testing.assert_allclose(ah[..., i, :], ai, atol=1e-6)
        np.testing.assert_allclose(
            out[..., i * VALUE // h : (i + 1) * VALUE // h], read(ai, vs[i]), atol=1e-5
        )
    multi = _bridge(num_heads=4)
    src, tgt = _rand(5, B, T, 10), _rand(6, B, T, VALUE)
    o = _jit_apply(multi)(jax.jit(multi.init)(jax.random.key(0), src, tgt), src, tgt)
    assert o.source_logits.shape == (B, T, 4, SLOTS) and o.recalled.shape == (B, T, VALUE)
    assert all(np.isfinite(float(x)) for x in bridge_losses(o).values())


def _kv(params):
    p = nn.unbox(params)["params"]
    return p["keys"], p["values"]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_alignment_kl_zero_when_addressings_agree():
    logits = 16 * np.tanh(_rand(0, B, T, SLOTS))
    assert abs(float(alignment(logits, logits))) < 1e-6
    assert abs(float(alignment(logits, logits + 3.0))) < 1e-6  # same softmax
    other = 16 * np.tanh(_rand(1, B, T, SLOTS))
    kl = float(alignment(logits, other))
    assert kl > 0.01
    # KL(target || source): sum p_t (log p_t - log p_s), mean over frames
    pt, ps = _softmax(other), _softmax(logits)
    ref = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
    np.testing.assert_allclose(kl, ref, rtol=1e-4)


def test_loss_gradients_stop_on_the_target_side():
    src, tgt = 4 * _rand(0, B, T, SLOTS), 4 * _rand(1, B, T, SLOTS)
    g_src, g_tgt = jax.jit(jax.grad(memory.alignment_loss, argnums=(0, 1)))(src, tgt)
    assert np.all(np.asarray(g_tgt) == 0.0) and np.abs(g_src).max() > 0
    rec, goal = _rand(2, B, T, VALUE), _rand(3, B, T, VALUE)
    g_rec, g_goal = jax.jit(jax.grad(memory.reconstruction_loss, argnums=(0, 1)))(rec, goal)
    assert np.all(np.asarray(g_goal) == 0.0) and np.abs(g_rec).max() > 0


def _grads(model, params, src, tgt, which):
    def f(p, s, t):
        o = _jit_apply(model)({"params": p}, s, t)
        if which == "recalled":
            return jnp.sum(o.recalled**2)
        return bridge_losses(o)[which]

    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(params, src, tgt)


def _zero(tree) -> bool:
    return all(np.all(np.asarray(x) == 0.0) for x in jax.tree.leaves(tree))


def test_bridge_gradients_stop_where_the_papers_stop_them(bridge_setup):
    model, params, src, tgt = bridge_setup
    # Alignment KL(sg(A_tgt) || A_src): trains the source side only.
    gp, gs, gt = _grads(model, params, src, tgt, "alignment")
    assert _zero(gp["target_values"]) and _zero(gp["v_embd"]) and _zero(gt)
    assert not _zero(gp["source_keys"]) and not _zero(gp["q_embd"]) and not _zero(gs)
    # Reconstruction MSE(A_tgt V, sg(f_tgt)): trains the value memory and v_embd only.
    gp, gs, gt = _grads(model, params, src, tgt, "reconstruction")
    assert _zero(gp["source_keys"]) and _zero(gp["q_embd"]) and _zero(gs) and _zero(gt)
    assert not _zero(gp["target_values"]) and not _zero(gp["v_embd"])
    # Recalled A_src sg(V): a task loss on it trains the addressing, never the value memory.
    gp, gs, gt = _grads(model, params, src, tgt, "recalled")
    assert _zero(gp["target_values"]) and _zero(gp["v_embd"]) and _zero(gt)
    assert not _zero(gp["source_keys"]) and not _zero(gs)


def test_bridge_matches_numpy_reference(bridge_setup):
    model, params, src, tgt = bridge_setup
    o = _jit_apply(model)({"params": params}, src, tgt)
    p = jax.tree.map(np.asarray, params)
    s, t = np.asarray(src), np.asarray(tgt)

    def norm(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = s @ p["q_embd"]["kernel"] + p["q_embd"]["bias"]
    a_src = _softmax(16 * norm(q) @ norm(p["source_keys"]).T)
    v = t @ p["v_embd"]["kernel"] + p["v_embd"]["bias"]
    a_tgt = _softmax(16 * norm(v) @ norm(p["target_values"]).T)
    np.testing.assert_allclose(o.source_addressing, a_src, atol=1e-5)
    np.testing.assert_allclose(o.target_addressing, a_tgt, atol=1e-5)
    np.testing.assert_allclose(o.recalled, a_src @ p["target_values"], atol=1e-4)
    losses = bridge_losses(o)
    recon = np.mean((a_tgt @ p["target_values"] - t) ** 2)
    kl = np.mean(np.sum(a_tgt * (np.log(a_tgt) - np.log(a_src)), -1))
    np.testing.assert_allclose(losses["reconstruction"], recon, rtol=1e-4)
    np.testing.assert_allclose(losses["alignment"], kl, rtol=1e-3, atol=1e-6)
    # test time: the source alone gives the same recall
    np.testing.assert_allclose(_jit_apply(model)({"params": params}, src).recalled, o.recalled)
    # SyncTalkFace's storage target: the embedded (detached) target feature
    emb = _jit_apply(_bridge(reconstruct_embedded=True))({"params": params}, src, tgt)
    np.testing.assert_allclose(emb.target, v, atol=1e-5)


def test_mask_drops_padded_frames_and_bad_shapes_raise(bridge_setup):
    model, params, src, tgt = bridge_setup
    o = _jit_apply(model)({"params": params}, src, tgt)
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    noisy = np.array(tgt)
    noisy[0, 2] += 100.0
    noisy[1, 1:] += 100.0
    o2 = _jit_apply(model)({"params": params}, src, noisy)
    l1, l2 = bridge_losses(o, mask), bridge_losses(o2, mask)
    for k in l1:
        np.testing.assert_allclose(l1[k], l2[k], rtol=1e-5)
    with pytest.raises(ValueError, match="value_dim=12"):
        _jit_apply(model)({"params": params}, src, tgt[..., :5])
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        address(src, _rand(0, SLOTS, 10), 16.0, num_heads=3)
    with pytest.raises(ValueError, match="needs a BridgeOutput computed with a target"):
        bridge_losses(_jit_apply(model)({"params": params}, src))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices (conftest)")
def test_slots_shard_over_a_mesh_axis_with_unchanged_outputs(bridge_setup):
    model, params, src, tgt = bridge_setup
    want = _jit_apply(model)({"params": params}, src, tgt)
    mesh = make_mesh({"data": 2, "fsdp": 1, "sequence": 1, "tensor": 4})
    rules = [("batch", "data"), ("length", None), ("slots", "tensor"), ("embed", None)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(2), src, tgt))["params"]
        shardings = logical_shardings(boxed, mesh, rules)
        sharded = jax.device_put(params, shardings)
        assert sharded["source_keys"].sharding.spec == P("tensor", None)
        assert sharded["target_values"].sharding.spec == P("tensor", None)

        def step(p, s, t):
            o = _jit_apply(model)({"params": p}, s, t)
            return (
                o,
                bridge_losses(o),
                jax.grad(
                    lambda p: bridge_losses(_jit_apply(model)({"params": p}, s, t))["alignment"]
                )(p),
            )

        got, losses, grads = jax.jit(step)(sharded, src, tgt)
    assert got.source_logits.sharding.spec[-1] == "tensor"
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    ref_losses = bridge_losses(want)
    for k in losses:
        np.testing.assert_allclose(losses[k], ref_losses[k], rtol=1e-5, atol=1e-7)
    ref_grads = jax.grad(
        lambda p: bridge_losses(_jit_apply(model)({"params": p}, src, tgt))["alignment"]
    )(params)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
