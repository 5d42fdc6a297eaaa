"""The generic train loop on a toy task: learning, exact resume, accumulation, sharding."""

import jax
import numpy as np
import pytest
from toy_task import ToyTask, single_device_mesh, toy_config

from avjax.train import checkpoint as ckpt_lib
from avjax.train import loop
from avjax.train.metrics import read_jsonl
from avjax.train.sharding import make_mesh


def _params(state):
    return jax.tree.map(np.asarray, jax.device_get(state.params))


def test_trains_and_logs(tmp_path):
    cfg = toy_config(steps=30, log_every=5, eval_every=10, checkpoint_every=10)
    loop.train(ToyTask(cfg, str(tmp_path)), cfg, str(tmp_path), single_device_mesh())
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20, 25, 30]
    assert losses[-1] < losses[0] - 0.5
    assert len(evals) == 3 and evals[-1] < np.log(32)
    assert all("tokens_per_s" in r for r in rows if "loss" in r)


def test_resume_is_exact(tmp_path):
    """2N straight steps == N steps + stop + resume + N steps (params and logged losses)."""
    cfg = toy_config(steps=8, log_every=1, eval_every=0)
    straight = loop.train(
        ToyTask(cfg, str(tmp_path / "a")), cfg, str(tmp_path / "a"), single_device_mesh()
    )
    mesh = single_device_mesh()
    loop.train(ToyTask(cfg, str(tmp_path / "b")), cfg, str(tmp_path / "b"), mesh, stop_after=4)
    first = read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))
    assert [r["step"] for r in first if "loss" in r] == [1, 2, 3, 4]
    resumed = loop.train(ToyTask(cfg, str(tmp_path / "b")), cfg, str(tmp_path / "b"), mesh)
    a, b = _params(straight), _params(resumed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    la = [r["loss"] for r in read_jsonl(str(tmp_path / "a" / "metrics.jsonl")) if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(str(tmp_path / "b" / "metrics.jsonl")) if "loss" in r]
    assert len(la) == len(lb) == 8
    np.testing.assert_allclose(la, lb, rtol=1e-6)


def test_grad_accumulation_matches_full_batch(tmp_path):
    cfg1 = toy_config(steps=3, log_every=1, eval_every=0)
    cfg2 = toy_config(steps=3, log_every=1, eval_every=0, grad_accum=4)
    s1 = loop.train(
        ToyTask(cfg1, str(tmp_path / "a")), cfg1, str(tmp_path / "a"), single_device_mesh()
    )
    s2 = loop.train(
        ToyTask(cfg2, str(tmp_path / "b")), cfg2, str(tmp_path / "b"), single_device_mesh()
    )
    for x, y in zip(jax.tree.leaves(_params(s1)), jax.tree.leaves(_params(s2)), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices (conftest forces them)")
def test_sharded_step_matches_single_device(tmp_path):
    cfg = toy_config(steps=3, log_every=1, eval_every=0)
    single = loop.train(
        ToyTask(cfg, str(tmp_path / "a")), cfg, str(tmp_path / "a"), single_device_mesh()
    )
    cfg8 = toy_config(steps=3, log_every=1, eval_every=0)
    cfg8.mesh.update({"data": 2, "fsdp": 2, "tensor": 2})
    mesh = make_mesh(cfg8.mesh)
    sharded = loop.train(ToyTask(cfg8, str(tmp_path / "b")), cfg8, str(tmp_path / "b"), mesh)
    emb = sharded.params["embed"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    for x, y in zip(
        jax.tree.leaves(_params(single)), jax.tree.leaves(_params(sharded)), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_refuses_workdir_of_another_model(tmp_path):
    cfg = toy_config(steps=2, eval_every=0)
    loop.train(ToyTask(cfg, str(tmp_path)), cfg, str(tmp_path), single_device_mesh())
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    other = toy_config(steps=4, eval_every=0)
    other.model.width = 32
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="model.width"):
        loop.train(ToyTask(other, str(tmp_path)), other, str(tmp_path), single_device_mesh())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_the_loop_stays_at_most_two_steps_ahead_of_the_device(tmp_path, monkeypatch):
    """Dispatch is asynchronous: unbounded, the Python loop queues many steps before the
    device runs them, and a preemption notice would be acted on only after all of them."""
    cfg = toy_config(steps=12, log_every=100, eval_every=0, checkpoint_every=100)
    cfg.model.width, cfg.data.seq_len = 512, 256  # a step far slower than its dispatch
    in_flight = []
    step = loop._Run._step

    def counting_step(self, state):
        state = step(self, state)
        in_flight.append(sum(not m["loss"].is_ready() for m in self.pending))
        return state

    monkeypatch.setattr(loop._Run, "_step", counting_step)
    loop.train(ToyTask(cfg, str(tmp_path)), cfg, str(tmp_path), single_device_mesh())
    assert len(in_flight) == 12 and max(in_flight) <= 2, in_flight
