"""LoRA (`avjax.nn.lora`) and the quantised frozen base (`avjax.nn.quant`) on a tiny Llama.

LoRA: adapters only where the target regex matches, B = 0 so the adapted model starts equal to
the base, merged params give the adapted logits, only the adapters carry optimizer state and
change. Quantisation: the NF4 codebook is the normal-quantile construction of QLoRA, int8 / NF4
round trips stay within their bounds, a quantised base forward stays close to the float one and
holds the bytes its format implies."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avjax.nn.lora import (
    LoraConfig,
    LoraModel,
    add_adapters,
    lora_param_groups,
    lora_paths,
    merge_lora,
)
from avjax.nn.quant import (
    NF4_CODEBOOK,
    QTensor,
    dequantize,
    param_bytes,
    qmatmul,
    quantize,
    quantize_params,
)
from avjax.nn.transformer import DecoderConfig

VOCAB = 61
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0)


def _model(scan_layers=False):
    cfg = DecoderConfig.llama(
        vocab_size=VOCAB, width=64, mlp_width=128, num_heads=4, num_layers=2, num_kv_heads=2
    )
    model = cfg.make(max_len=16, decode_block=8, scan_layers=scan_layers)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 8)), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens))["params"]
    return model, params, tokens


def _perturb_b(params, scale=0.05):
    """Non-zero B (as after some training) so the adapters change the output."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x + scale * jnp.ones_like(x) if "lora_b" in jax.tree_util.keystr(p) else x,
        params,
    )


_APPLY = jax.jit(lambda m, v, t: m.apply(v, t)[0], static_argnums=0)


def test_lora_starts_at_base_and_merges():
    """On a `scan_layers` stack (the per-layer `blocks_i` path is the export test's)."""
    scan_layers = True
    model, params, tokens = _model(scan_layers)
    p = add_adapters(model, params, LORA, jax.random.key(1), tokens)
    prefix = "layers" if scan_layers else "blocks_0"
    assert f"{prefix}/attention/q" in lora_paths(p)
    assert all(path.split("/")[-1] in ("q", "k", "v", "out") for path in lora_paths(p))
    a = p["layers" if scan_layers else "blocks_0"]["attention"]["q"]["lora_a"]
    assert a.shape[-2:] == (64, 4) and a.shape[:-2] == ((2,) if scan_layers else ())
    lm = LoraModel(model, LORA)
    base = np.asarray(_APPLY(model, {"params": params}, tokens))
    np.testing.assert_array_equal(np.asarray(_APPLY(lm, {"params": p}, tokens)), base)
    p = _perturb_b(p)
    adapted = np.asarray(_APPLY(lm, {"params": p}, tokens))
    assert np.abs(adapted - base).max() > 0.1
    merged = merge_lora(p, LORA)
    assert not lora_paths(merged)
    np.testing.assert_allclose(
        np.asarray(_APPLY(model, {"params": merged}, tokens)), adapted, atol=2e-5
    )
    # logical axis names: the adapters shard like their kernel's in / out axes
    boxed = jax.eval_shape(lambda: LoraModel(model, LORA).init(jax.random.key(0), tokens))
    boxed = boxed["params"]
    a_box = boxed[prefix]["attention"]["q"]["lora_a"]
    assert tuple(a_box.names)[-2:] == ("embed", None)
    # dropout acts only in training and needs a rng
    drop = LoraModel(model, LoraConfig(rank=4, alpha=8.0, dropout=0.5), train=True)
    out = jax.jit(lambda v: drop.apply(v, tokens, rngs={"dropout": jax.random.key(2)})[0])(
        {"params": p}
    )
    assert np.abs(np.asarray(out) - adapted).max() > 1e-3
    off = jax.jit(lambda v: drop.apply(v, tokens, lora_train=False)[0])({"params": p})
    np.testing.assert_allclose(np.asarray(off), adapted, atol=1e-6)


def _leaves(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(p), x) for p, x in flat]


def test_nf4_codebook_is_normal_quantiles():
    ndtri = jax.scipy.special.ndtri
    offset = 0.9677083  # QLoRA: 0.5 * (1/(2*15) + 1/(2*16)) from 1
    pos = np.asarray(ndtri(jnp.linspace(offset, 0.5, 9)[:-1]))
    neg = -np.asarray(ndtri(jnp.linspace(offset, 0.5, 8)[:-1]))
    values = np.sort(np.concatenate([pos, [0.0], neg]))
    values = values / np.abs(values).max()
    np.testing.assert_allclose(NF4_CODEBOOK, values, atol=2e-6)
    assert len(np.unique(NF4_CODEBOOK)) == 16 and (NF4_CODEBOOK == 0).sum() == 1


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantize_roundtrip_bounds_and_bytes(kind):
    w = jax.random.normal(jax.random.key(0), (3, 128, 40)) * jnp.linspace(0.1, 2.0, 40)[None, None]
    q = quantize(w, kind)
    back = np.asarray(dequantize(q))
    err = np.abs(back - np.asarray(w))
    if kind == "int8":  # half a step of the per-channel scale
        bound = np.abs(np.asarray(w)).max(axis=-2, keepdims=True) / 127 / 2
        assert q.nbytes == w.size + 3 * 40 * 4
    else:  # half the widest codebook gap times the block's absmax
        blocks = np.abs(np.asarray(w)).reshape(3, 2, 64, 40).max(axis=2, keepdims=True)
        gap = np.diff(NF4_CODEBOOK).max() / 2
        bound = np.broadcast_to(blocks * gap, (3, 2, 64, 40)).reshape(3, 128, 40)
        assert q.nbytes == w.size // 2 + 3 * 2 * 40 * 4
        normed = back.reshape(3, 2, 64, 40) / blocks
        assert np.abs(normed[..., None] - NF4_CODEBOOK).min(-1).max() < 1e-6  # codebook values
    assert (err <= bound + 1e-6).all()
    assert err.max() > 0
    rel = np.linalg.norm(back - np.asarray(w)) / np.linalg.norm(np.asarray(w))
    assert rel < (0.01 if kind == "int8" else 0.12), rel
    x = jax.random.normal(jax.random.key(1), (5, 128))
    np.testing.assert_allclose(
        np.asarray(qmatmul(x, jax.tree.map(lambda a: a[1], q))),
        np.asarray(x @ dequantize(q)[1]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_quantized_base_forward_and_qlora_merge():
    scan_layers = True  # the stacked kernels are sliced per layer by nn.scan
    model, params, tokens = _model(scan_layers)
    p = _perturb_b(add_adapters(model, params, LORA, jax.random.key(1), tokens), 0.02)
    lm = LoraModel(model, LORA)
    ref = np.asarray(jax.jit(lambda v: lm.apply(v, tokens)[0])({"params": p}))
    sizes = {}
    for kind, tol in (("int8", 0.03), ("nf4", 0.3)):
        q = quantize_params(p, kind)
        kernels = [x for x in jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, QTensor))]
        assert sum(isinstance(x, QTensor) for x in kernels) == (6 if scan_layers else 12)
        out = np.asarray(jax.jit(lambda v: lm.apply(v, tokens)[0])({"params": q}))
        rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        print(f"{kind}: relative logit error {rel:.4f}")
        assert 0 < rel < tol
        sizes[kind] = param_bytes(q)
        # QLoRA export: merging dequantises the base; the merged float model equals it
        merged = merge_lora(q, LORA)
        np.testing.assert_allclose(
            np.asarray(_APPLY(model, {"params": merged}, tokens)), out, atol=2e-5
        )
    base_bytes = param_bytes(p)
    assert sizes["nf4"] < sizes["int8"] < base_bytes


def _lora_toy_task():
    from toy_task import ToyTask

    class LoraToyTask(ToyTask):
        name = "toy_lora"

        def build_model(self):
            arch = DecoderConfig.llama(
                vocab_size=32, width=32, mlp_width=64, num_heads=4, num_layers=2, num_kv_heads=2
            )
            return LoraModel(arch.make(max_len=16, decode_block=0), LORA)

    return LoraToyTask


def test_lora_finetune_through_the_train_loop(tmp_path):
    """A few real train-loop steps of a tiny Llama with LoRA: the base is bit-for-bit
    unchanged, every adapter moved, and Adam's state covers the adapters only."""
    from toy_task import single_device_mesh, toy_config

    from avjax.train import loop

    LoraToyTask = _lora_toy_task()
    cfg = toy_config(
        steps=3, log_every=1, eval_every=0, checkpoint_every=100, param_groups=lora_param_groups()
    )
    task = LoraToyTask(cfg, str(tmp_path))
    state = loop.train(task, cfg, str(tmp_path), single_device_mesh())
    trainer = loop.build_trainer(task, cfg, single_device_mesh())
    with jax.set_mesh(trainer.mesh):
        init = trainer.init_fn(jax.random.key(0))
    before, after = _leaves(jax.device_get(init.params)), _leaves(jax.device_get(state.params))
    n_adapter = 0
    for (path, x), (_, y) in zip(before, after, strict=True):
        moved = np.abs(np.asarray(x) - np.asarray(y)).max() > 0
        assert moved == ("lora_" in path), path
        n_adapter += x.size if "lora_" in path else 0
    assert n_adapter == 2 * (256 + 192 + 192 + 256)  # 2 layers x q, k, v, out: A [in, 4], B
    opt = [x for _, x in _leaves(jax.device_get(state.opt_state)) if x.dtype.kind == "f"]
    assert sum(x.size for x in opt) == 2 * n_adapter  # Adam's mu and nu: adapters only


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices")
def test_lora_step_sharded_over_8_devices_equals_single_device(tmp_path):
    """LoRA fine-tuning on a data x fsdp x tensor = 2 x 2 x 2 mesh: the adapters are sharded
    along their base kernel's axes and the steps equal the single-device ones."""
    from toy_task import single_device_mesh, toy_config

    from avjax.train import loop
    from avjax.train.metrics import read_jsonl
    from avjax.train.sharding import make_mesh

    LoraToyTask = _lora_toy_task()
    groups = lora_param_groups()
    cfg = toy_config(steps=2, log_every=1, eval_every=0, checkpoint_every=100, param_groups=groups)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    single = loop.train(LoraToyTask(cfg, a), cfg, a, single_device_mesh())
    cfg8 = toy_config(steps=2, log_every=1, eval_every=0, checkpoint_every=100, param_groups=groups)
    cfg8.mesh.update({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = loop.train(LoraToyTask(cfg8, b), cfg8, b, make_mesh(cfg8.mesh))
    q = sharded.params["blocks_0"]["attention"]["q"]
    assert q["kernel"].sharding.spec[0] == q["lora_a"].sharding.spec[0] == "fsdp"
    assert q["kernel"].sharding.spec[-1] == q["lora_b"].sharding.spec[-1] == "tensor"
    assert len(q["lora_a"].addressable_shards) == 8
    for (path, x), (_, y) in zip(
        _leaves(jax.device_get(single.params)), _leaves(jax.device_get(sharded.params)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-5, err_msg=path)
    la = [r["loss"] for r in read_jsonl(f"{a}/metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(f"{b}/metrics.jsonl") if "loss" in r]
    assert len(la) == 2
    np.testing.assert_allclose(la, lb, rtol=1e-5)
