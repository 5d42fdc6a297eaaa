"""Mesh presets on 8 host devices: each sharded train step equals the single-device step,
and parameters are laid out as the preset's rules say (read back from `.sharding`)."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from toy_task import GriffinToyTask, single_device_mesh, toy_config

from avjax.train import loop
from avjax.train.sharding import apply_preset, make_mesh, mesh_shape, put_batch

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices (conftest)")


def _two_steps(cfg, mesh, init_params=None):
    """Two train steps on one batch; `init_params` (host arrays) replace the initial params."""
    task = GriffinToyTask(cfg, "/tmp/unused")
    task.prepare()
    trainer = loop.build_trainer(task, cfg, mesh)
    batch = next(iter(task.train_dataset(0, 1)))
    with jax.set_mesh(mesh):
        state = trainer.init_fn(jax.random.key(0))
        if init_params is not None:
            params = jax.device_put(init_params, trainer.state_shardings.params)
            state = state.replace(params=params, opt_state=trainer.tx.init(params))
        for _ in range(2):
            state, metrics = trainer.train_step(state, put_batch(batch, mesh, trainer.rules))
    return state, float(metrics["loss"])


@pytest.fixture(scope="module")
def reference():
    cfg = toy_config()
    return _two_steps(cfg, single_device_mesh())


# preset -> (mesh overrides, expected mesh, expected embedding [vocab, embed] spec)
CASES = {
    "dp": ({}, {"data": 8, "fsdp": 1, "sequence": 1, "tensor": 1}, P()),
    "fsdp": ({}, {"data": 1, "fsdp": 8, "sequence": 1, "tensor": 1}, P(None, "fsdp")),
    "fsdp_tp": (
        {"tensor": 2},
        {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 2},
        P("tensor", "fsdp"),
    ),
    "fsdp_sp": (
        {"sequence": 2},
        {"data": 1, "fsdp": 4, "sequence": 2, "tensor": 1},
        P(None, "fsdp"),
    ),
}


def _spec(x: jax.Array) -> P:
    """`x.sharding.spec` without trailing unsharded dims (P(None, None) == P())."""
    axes = list(x.sharding.spec)
    while axes and axes[-1] is None:
        axes.pop()
    return P(*axes)


def _preset_config(preset, overrides):
    cfg = toy_config()
    cfg.mesh.update({"sequence": 1, "preset": preset, **overrides})
    return apply_preset(cfg)


@needs8
@pytest.mark.parametrize("preset", list(CASES))
def test_preset_step_matches_single_device(preset, reference):
    overrides, want_mesh, emb_spec = CASES[preset]
    cfg = _preset_config(preset, overrides)
    mesh = make_mesh(cfg.mesh)
    assert dict(mesh.shape) == want_mesh
    state, loss = _two_steps(cfg, mesh)
    ref_state, ref_loss = reference
    assert _spec(state.params["embedding"]) == emb_spec
    mlp_w = state.params["blocks_0"]["mlp"]["ffw_up_w"]  # [2, embed, mlp]
    expected = {
        "dp": P(),
        "fsdp": P(None, "fsdp"),
        "fsdp_tp": P(None, "fsdp", "tensor"),
        "fsdp_sp": P(None, "fsdp"),
    }[preset]
    assert _spec(mlp_w) == expected
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for x, y in zip(
        jax.tree.leaves(jax.device_get(state.params)),
        jax.tree.leaves(jax.device_get(ref_state.params)),
        strict=True,
    ):  # one Adam step: sharded reductions reorder sums (seen: 3.8e-5 on 1 of 1024, fsdp_tp)
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=6e-5)


@needs8
def test_scan_layers_and_remat_shard_and_match(reference):
    """nn.scan over layers (stacked params, leading 'layers' axis) + remat, FSDP+TP."""
    from avjax.nn.griffin import stack_layers, unstack_layers

    cfg = toy_config()
    task = GriffinToyTask(cfg, "/tmp/unused")
    with jax.set_mesh(single_device_mesh()):
        init = loop.build_trainer(task, cfg, single_device_mesh()).init_fn(jax.random.key(0))
    cfg = _preset_config("fsdp_tp", {"tensor": 2})
    cfg.model.update({"remat": "dots", "scan_layers": True})
    state, loss = _two_steps(
        cfg, make_mesh(cfg.mesh), stack_layers(jax.device_get(init.params), 6, 3)
    )
    stacked = state.params["layers"]["blocks_0"]["mlp"]["ffw_up_w"]  # [layers, 2, embed, mlp]
    assert stacked.shape[0] == 2
    assert _spec(stacked) == P(None, None, "fsdp", "tensor")
    ref_state, ref_loss = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    params = unstack_layers(jax.device_get(state.params), 6, 3)
    for x, y in zip(
        jax.tree.leaves(params), jax.tree.leaves(jax.device_get(ref_state.params)), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)


def test_preset_errors_name_the_field():
    cfg = toy_config()
    cfg.mesh.update({"preset": "fsdp_tp"})
    with pytest.raises(ValueError, match="config.mesh.tensor >= 2"):
        apply_preset(copy.deepcopy(cfg))
    cfg.mesh.preset = "zero3"
    with pytest.raises(ValueError, match="zero3"):
        apply_preset(cfg)


def test_mesh_shape_multislice():
    # 2 slices of 8: per-slice sizes; the data axis is spanned across slices by make_mesh.
    assert mesh_shape({"data": 1, "fsdp": -1, "tensor": 2, "dcn_data": 2}, 16) == (1, 4, 1, 2)
    with pytest.raises(ValueError, match="dcn_data=3"):
        mesh_shape({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 3}, 16)


def test_weight_decay_mask_ignores_stacked_layer_axis():
    from avjax.train.optim import _decay_mask

    params = {
        "embedding": np.zeros((4, 3)),
        "blocks_0": {
            "mlp": {"ffw_up_b": np.zeros((2, 5)), "ffw_down": {"kernel": np.zeros((5, 3))}},
            "q": {"lora_a": np.zeros((3, 2)), "lora_b": np.zeros((2, 3))},
        },
        "layers": {
            "blocks_0": {
                "norm": {"scale": np.zeros((2, 3))},
                "gate": {"w": np.zeros((2, 2, 3, 3)), "b": np.zeros((2, 2, 3))},
                "proj": {"bias": np.zeros((2, 3)), "kernel": np.zeros((2, 3, 3))},
            }
        },
    }
    mask = _decay_mask(params)
    assert mask["embedding"] and mask["blocks_0"]["mlp"]["ffw_down"]["kernel"]
    assert not mask["blocks_0"]["mlp"]["ffw_up_b"]
    assert mask["blocks_0"]["q"]["lora_a"] and mask["blocks_0"]["q"]["lora_b"]
    layer = mask["layers"]["blocks_0"]
    assert layer["gate"]["w"] and layer["proj"]["kernel"]
    assert not (layer["norm"]["scale"] or layer["gate"]["b"] or layer["proj"]["bias"])
