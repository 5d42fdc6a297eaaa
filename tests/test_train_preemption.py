"""Preemption on one host: a SIGTERM checkpoints the step, stops with exit code 143 (so a
requeue wrapper reruns the job), and the rerun ends where an uninterrupted run ends.
(Several processes, SIGTERM to one of them: tests/test_multihost.py.)"""

import jax
import numpy as np
import pytest
from toy_task import HookedToyTask, ToyTask, single_device_mesh, toy_config

from avjax.train import checkpoint as ckpt_lib
from avjax.train import loop
from avjax.train.metrics import read_jsonl


class _SigtermAt3(HookedToyTask):
    sigterm_at = 3


def test_sigterm_checkpoints_exits_143_and_the_rerun_matches_a_straight_run(tmp_path):
    cfg = toy_config(steps=6, log_every=2, eval_every=0, checkpoint_every=100)
    mesh = single_device_mesh()
    straight = loop.train(ToyTask(cfg, str(tmp_path / "a")), cfg, str(tmp_path / "a"), mesh)
    w = str(tmp_path / "b")
    with pytest.raises(loop.Preempted) as stopped:
        loop.train(_SigtermAt3(cfg, w), cfg, w, mesh)
    assert stopped.value.code == loop.EXIT_PREEMPTED == 143
    assert stopped.value.step == 3 and ckpt_lib.latest_step(w) == 3
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "loss" in r] == [
        2,
        3,
    ]
    resumed = loop.train(ToyTask(cfg, w), cfg, w, mesh)
    a, b = jax.device_get(straight.params), jax.device_get(resumed.params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_without_the_preemption_service_processes_all_gather_their_flags(monkeypatch):
    """The fallback when `jax_enable_preemption_service` is off: any process's flag stops all."""
    watch = loop._PreemptionWatch()  # noqa: SLF001
    assert not watch.synced  # jax.distributed is not initialised here
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    gathered = []

    def allgather(flag):
        gathered.append(int(flag))
        return np.array([int(flag), 1 if len(gathered) > 1 else 0])  # the other process

    monkeypatch.setattr(loop.multihost_utils, "process_allgather", allgather)
    assert not watch.should_stop(1, None)
    assert watch.should_stop(2, None)  # the other process got the SIGTERM
    assert gathered == [0, 0]
