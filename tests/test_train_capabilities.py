"""The train loop beyond one model and one optimizer: batch statistics with a train flag,
named RNG streams, EMA params, parameter groups (frozen, learning-rate multipliers) and named
parts trained in alternation (a GAN). Each resumes exactly after a stop mid-run and gives the
same step sharded over 8 devices as on one."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from toy_capabilities import CapabilityToyTask, GanToyTask, capability_config, gan_config
from toy_task import ToyTask, single_device_mesh, toy_config

from avjax.train import checkpoint as ckpt_lib
from avjax.train import loop
from avjax.train import state as state_lib
from avjax.train.optim import build_optimizer
from avjax.train.sharding import apply_preset, make_mesh, put_batch

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices (conftest)")

TOYS = {"capabilities": (CapabilityToyTask, capability_config), "gan": (GanToyTask, gan_config)}


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-6):
    la, lb = jax.tree_util.tree_leaves_with_path(_host(a)), jax.tree.leaves(_host(b))
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb, strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=str(path))


def _train(task_cls, cfg, workdir, **kwargs):
    return loop.train(
        task_cls(cfg, str(workdir)), cfg, str(workdir), single_device_mesh(), **kwargs
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per toy: (a straight 4-step run, a run stopped after 2 steps and resumed, workdir)."""
    out = {}
    for name, (task_cls, make_cfg) in TOYS.items():
        evals = 2 if name == "capabilities" else 0  # eval with EMA params and batch stats
        cfg = make_cfg(steps=4, log_every=1, eval_every=evals, checkpoint_every=100)
        a, b = tmp_path_factory.mktemp(f"{name}_a"), tmp_path_factory.mktemp(f"{name}_b")
        straight = _train(task_cls, cfg, a)
        stopped = _train(task_cls, cfg, b, stop_after=2)
        assert int(stopped.step) == 2 and ckpt_lib.latest_step(b) == 2
        out[name] = (straight, _train(task_cls, cfg, b), b)
    return out


@pytest.mark.parametrize("name", list(TOYS))
def test_stop_and_resume_equals_a_straight_run(name, runs):
    straight, resumed, _ = runs[name]
    assert int(resumed.step) == 4
    _assert_trees_close(straight, resumed)  # params, optimizer state, batch stats, EMA


def test_capabilities_state(runs):
    """BatchNorm statistics are updated and used in eval; the frozen encoder keeps its values
    and has no optimizer state; the EMA copy is what restore_params returns."""
    state, _, workdir = runs["capabilities"]
    cfg = capability_config()
    task = CapabilityToyTask(cfg, str(workdir))
    trainer = loop.build_trainer(task, cfg, single_device_mesh())
    with jax.set_mesh(trainer.mesh):
        init = trainer.init_fn(jax.random.key(0))
    _assert_trees_close(state.params["encoder"], init.params["encoder"], rtol=0, atol=0)
    params, ema = _host(state.params), _host(state.ema_params)
    n_trainable = sum(x.size for x in jax.tree.leaves(params)) - sum(
        x.size for x in jax.tree.leaves(params["encoder"])
    )
    float_state = [x for x in jax.tree.leaves(_host(state.opt_state)) if x.dtype.kind == "f"]
    assert sum(x.size for x in float_state) == 2 * n_trainable  # Adam mu, nu; none for encoder
    stats = _host(state.model_state["batch_stats"])
    assert np.abs(stats["BatchNorm_0"]["mean"]).max() > 1e-3
    batches = task.eval_batches(0, 1)
    with_stats = loop.evaluate_loss(trainer, state.ema_params, batches, state.model_state)
    fresh = loop.evaluate_loss(trainer, state.ema_params, batches)
    assert with_stats != pytest.approx(fresh)
    assert not np.allclose(ema["lora_up"]["kernel"], params["lora_up"]["kernel"])
    restorer, restored, _ = loop.restore_params(task, cfg, str(workdir), single_device_mesh())
    _assert_trees_close(restored, state.ema_params, rtol=0, atol=0)
    # --mode=eval's held-out loss (no model state passed) uses the restored statistics.
    assert loop.evaluate_loss(restorer, restored, batches) == pytest.approx(with_stats)


def test_gan_parts_have_their_own_optimizer_state(runs):
    state, _, _ = runs["gan"]
    assert set(state.params) == set(state.opt_state) == {"generator", "discriminator"}
    cfg = gan_config()
    trainer = loop.build_trainer(GanToyTask(cfg, "/tmp/unused"), cfg, single_device_mesh())
    with jax.set_mesh(trainer.mesh):
        init = _host(trainer.init_fn(jax.random.key(0)).params)
    params = _host(state.params)
    for part in ("generator", "discriminator"):
        changed = [
            not np.allclose(x, y)
            for x, y in zip(jax.tree.leaves(params[part]), jax.tree.leaves(init[part]), strict=True)
        ]
        assert all(changed), part


def _two_steps(task_cls, cfg, mesh):
    task = task_cls(cfg, "/tmp/unused")
    task.prepare()
    trainer = loop.build_trainer(task, cfg, mesh)
    batch = next(iter(task.train_dataset(0, 1)))
    with jax.set_mesh(mesh):
        state = trainer.init_fn(jax.random.key(0))
        for _ in range(2):
            state, metrics = trainer.train_step(state, put_batch(batch, mesh, trainer.rules))
    return state, float(metrics["loss"])


@needs8
@pytest.mark.parametrize("name", list(TOYS))
def test_fsdp_step_equals_single_device(name):
    """Batch sharded 8 ways (and params over fsdp): BatchNorm statistics, dropout and noise
    draws, EMA and both GAN parts equal the single-device step."""
    task_cls, make_cfg = TOYS[name]
    ref_state, ref_loss = _two_steps(task_cls, make_cfg(), single_device_mesh())
    cfg = make_cfg()
    cfg.mesh.update({"sequence": 1, "preset": "fsdp"})
    cfg = apply_preset(cfg)
    state, loss = _two_steps(task_cls, cfg, make_mesh(cfg.mesh))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    _assert_trees_close(state, ref_state, rtol=2e-4, atol=2e-5)


def test_grad_accumulation_carries_batch_statistics():
    cfg = capability_config(grad_accum=2)
    task = CapabilityToyTask(cfg, "/tmp/unused")
    mesh = single_device_mesh()
    trainer = loop.build_trainer(task, cfg, mesh)
    batch = next(iter(task.train_dataset(0, 1)))
    with jax.set_mesh(mesh):
        init = trainer.init_fn(jax.random.key(0))
        stats0 = _host(init.model_state)
        state, metrics = trainer.train_step(init, put_batch(batch, mesh, trainer.rules))
    assert np.isfinite(float(metrics["loss"]))
    after = _host(state.model_state)["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(after, stats0["batch_stats"]["BatchNorm_0"]["mean"])


def test_rng_streams_depend_on_seed_step_and_name_only():
    k = state_lib.step_key(0, 3)
    a, b = state_lib.stream_keys(k, ("dropout", "noise")), state_lib.stream_keys(k, ("dropout",))
    assert np.array_equal(jax.random.key_data(a["dropout"]), jax.random.key_data(b["dropout"]))
    assert not np.array_equal(jax.random.key_data(a["dropout"]), jax.random.key_data(a["noise"]))
    other = state_lib.stream_keys(state_lib.step_key(0, 4), ("dropout",))
    assert not np.array_equal(
        jax.random.key_data(a["dropout"]), jax.random.key_data(other["dropout"])
    )


def test_param_groups_lr_mult_and_frozen():
    cfg = toy_config(weight_decay=0.0, clip_norm=0.0, warmup_steps=0)
    cfg.train.param_groups = [
        {"regex": "^frozen", "optimizer": "frozen"},
        {"regex": "lora", "lr_mult": 2.0},
    ]
    tx = build_optimizer(cfg.train)
    params = {
        "w": np.ones((2, 2), np.float32),
        "lora_w": np.ones((2, 2), np.float32),
        "frozen_w": np.ones((2, 2), np.float32),
    }
    grads = jax.tree.map(lambda x: np.full_like(x, 0.5), params)
    opt_state = tx.init(params)
    assert sum(x.size for x in jax.tree.leaves(opt_state) if x.dtype.kind == "f") == 2 * 8
    updates, _ = tx.update(grads, opt_state, params)
    updates = _host(updates)
    np.testing.assert_allclose(updates["lora_w"], 2 * updates["w"], rtol=1e-6)
    assert np.all(updates["frozen_w"] == 0) and np.all(updates["w"] != 0)
    cfg.train.param_groups = [{"regex": "x", "optimiser": "frozen"}]
    with pytest.raises(ValueError, match=r"param_groups\[0\]"):
        build_optimizer(cfg.train)


def test_plain_checkpoints_keep_their_layout():
    cfg = toy_config()
    trainer = loop.build_trainer(ToyTask(cfg, "/tmp/unused"), cfg, single_device_mesh())
    assert set(ckpt_lib.stored_tree(trainer.abstract_state)) == {"step", "params", "opt_state"}


def _dot_generals(cfg) -> int:
    """Matmuls in the traced train step of the capability toy under `cfg`."""
    trainer = loop.build_trainer(CapabilityToyTask(cfg, "/tmp/unused"), cfg, single_device_mesh())
    with jax.set_mesh(trainer.mesh):
        state = trainer.init_fn(jax.random.key(0))
        batch = trainer.task.dummy_batch()
        return str(trainer.train_step.trace(state, batch).jaxpr).count("dot_general")


def test_frozen_weights_get_no_weight_gradient():
    """A frozen leaf's gradient is stopped, not computed and zeroed: the frozen encoder's
    weight-gradient matmul is gone from the step (its input gradient, which `embed` needs,
    stays)."""
    frozen = capability_config()
    trainable = capability_config()
    trainable.train.param_groups = [g for g in trainable.train.param_groups if "lora" in g["regex"]]
    assert _dot_generals(frozen) == _dot_generals(trainable) - 1


def test_sample_mode_gets_the_checkpoint_batch_statistics(runs, monkeypatch):
    """`--mode=sample` hands the task the restored `batch_stats` (`Task.model_state`), so a
    BatchNorm model samples with its trained statistics."""
    from avjax import main
    from avjax.tasks import REGISTRY

    monkeypatch.setitem(REGISTRY, "toy_bn", "toy_capabilities:SamplingCapabilityToyTask")
    _, _, workdir = runs["capabilities"]
    cfg = capability_config(steps=4, log_every=1, eval_every=2, checkpoint_every=100)
    cfg.task = "toy_bn"
    cfg.mesh.data = -1  # main.run's mesh spans every device; restore reshards the checkpoint
    summary = main.run(cfg, str(workdir), "sample")
    assert summary == {"collections": ["batch_stats", "params"], "finite": True}


def test_loss_context_apply_without_collections_returns_the_output():
    """A model with params only: `ctx.apply` gives `(output, {})` in training as in eval."""
    import flax.linen as nn

    from avjax.tasks.base import LossContext

    model, x = nn.Dense(3), np.ones((2, 4), np.float32)
    params = model.init(jax.random.key(0), x)["params"]
    for train in (True, False):
        out, state = LossContext(train, jax.random.key(1)).apply(model, params, x)
        assert out.shape == (2, 3) and state == {}
