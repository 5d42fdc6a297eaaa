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
