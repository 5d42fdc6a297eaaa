"""Resuming safely: what a workdir keeps from a failed run, what a resume refuses or names,
and what is never written (non-finite states, `os.path.abspath` of URLs)."""

import os
import shutil

import jax
import numpy as np
import pytest
from toy_task import HookedToyTask, ToyTask, single_device_mesh, toy_config

from avjax import main as avjax_main
from avjax.tasks import REGISTRY
from avjax.train import checkpoint as ckpt_lib
from avjax.train import loop
from avjax.train import metrics as metrics_lib


def _train(cfg, workdir, task_cls=ToyTask, **kwargs):
    task = task_cls(cfg, str(workdir))
    return loop.train(task, cfg, str(workdir), single_device_mesh(), **kwargs)


def _cli_config(**train):
    cfg = toy_config(**train)
    cfg.mesh.update({"data": -1, "sequence": 1, "preset": "", "dcn_data": 1})
    return cfg


class _PrepareFails(ToyTask):
    def prepare(self):
        raise FileNotFoundError("data.manual_dir=/no/such/dir")


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(REGISTRY, "toy", "toy_task:ToyTask")
    monkeypatch.setitem(REGISTRY, "toy_prepare_fails", f"{__name__}:_PrepareFails")


def test_workdir_paths_keep_urls():
    assert os.fspath(ckpt_lib.checkpoint_dir("gs://b/run")) == "gs://b/run/checkpoints"
    assert os.fspath(ckpt_lib.checkpoint_dir("~/w")) == os.path.expanduser("~/w/checkpoints")


def test_jsonl_writer_rewrites_remote_files_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_lib, "is_remote", lambda p: True)  # object stores can't append
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n')
    w = metrics_lib.JsonlWriter(str(path))
    w.write_scalars(2, {"loss": 2.0})
    w.close()
    assert metrics_lib.read_jsonl(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}]


def test_failed_first_run_leaves_no_stamp_and_sample_needs_a_checkpoint(tmp_path, toy_registered):
    w = tmp_path / "w"
    bad = _cli_config(steps=2, eval_every=0)
    bad.task = "toy_prepare_fails"
    bad.model.width = 32  # another model: a stamp written now would refuse the next run
    with pytest.raises(FileNotFoundError, match="manual_dir"):
        avjax_main.run(bad, str(w), "train")
    assert ckpt_lib.saved_compatibility(w) is None
    # Sampling / evaluating a workdir without a checkpoint fails before any preparation
    # (this task's prepare() would raise another error) and writes nothing.
    for mode in ("sample", "eval"):
        with pytest.raises(FileNotFoundError, match=rf"--mode=train --workdir={w}"):
            avjax_main.run(bad, str(w), mode)
    assert not (w / "checkpoints").exists()
    # The corrected run trains; its first checkpoint writes the stamp.
    good = _cli_config(steps=2, eval_every=0)
    assert avjax_main.run(good, str(w), "train") == {"step": 2}
    assert ckpt_lib.saved_compatibility(w)["model"]["width"] == 16


def test_truncated_metrics_line_is_dropped_on_resume(tmp_path):
    cfg = toy_config(steps=4, log_every=1, eval_every=0)
    _train(cfg, tmp_path, stop_after=2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 2.')  # killed mid-write
    _train(cfg, tmp_path)
    rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")


def test_non_finite_state_is_never_checkpointed(tmp_path):
    """NaN from step 3 on, a checkpoint every 2 steps, logs every 8: the step-4 checkpoint
    would be NaN; training stops there and step 2 stays the newest checkpoint."""
    cfg = toy_config(steps=8, log_every=8, eval_every=0, checkpoint_every=2)

    class NaNFrom3(HookedToyTask):
        nan_from = 3

    with pytest.raises(FloatingPointError, match="step 4: not checkpointed"):
        _train(cfg, tmp_path, NaNFrom3)
    assert ckpt_lib.latest_step(tmp_path) == 2


def test_eval_batches_zero_never_reports_a_loss(tmp_path, toy_registered):
    cfg = _cli_config(steps=2, log_every=1, eval_every=1, eval_batches=0)
    avjax_main.run(cfg, str(tmp_path), "train")
    rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert rows and not any("eval_loss" in r for r in rows)
    with pytest.raises(ValueError, match="eval_batches"):
        avjax_main.run(cfg, str(tmp_path), "eval")
    trainer = loop.build_trainer(ToyTask(cfg, str(tmp_path)), cfg, single_device_mesh())
    with pytest.raises(ValueError, match="no held-out batches"):
        loop.evaluate_loss(trainer, None, [])


def test_resume_refuses_breaking_config_changes_by_field(tmp_path):
    cfg = toy_config(steps=4, log_every=1, eval_every=0)
    _train(cfg, tmp_path, stop_after=2)
    changed = toy_config(steps=4, log_every=1, eval_every=0, batch_size=4)
    changed.data.seq_len = 8
    with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
        _train(changed, tmp_path)
    assert "train.batch_size: 8 -> 4" in str(e.value)
    assert "data.seq_len: 16 -> 8" in str(e.value)
    # Benign changes (a longer run, other log intervals) are only logged.
    longer = toy_config(steps=6, log_every=3, eval_every=0)
    assert int(_train(longer, tmp_path).step) == 6


def test_newest_params_reads_another_workdir_and_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.model.expert_workdir=.*no checkpoint"):
        ckpt_lib.newest_params(tmp_path / "empty", "model.expert_workdir")
    cfg = toy_config(steps=3, log_every=1, eval_every=0, checkpoint_every=1)
    state = _train(cfg, tmp_path / "w")
    params, saved = ckpt_lib.newest_params(tmp_path / "w", "model.expert_workdir")
    want = jax.tree.leaves(jax.device_get(state.params))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), want, strict=True))
    assert saved["model"]["width"] == cfg.model.width


def test_restore_names_optimizer_chain_and_process_count_differences(tmp_path):
    cfg = toy_config(steps=4, log_every=1, eval_every=0)
    _train(cfg, tmp_path, stop_after=2)
    no_clip = toy_config(steps=4, log_every=1, eval_every=0, clip_norm=0.0)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="optimizer chain changed"):
        _train(no_clip, tmp_path)

    # The data iterator state of 2 processes cannot be restored by 1: named, and
    # reset_data_iterator=True restores params + optimizer state with fresh data.
    data = tmp_path / "checkpoints" / "2" / "data"
    shutil.move(data / "process_0-of-1.json", data / "process_0-of-2.json")
    shutil.copy(data / "process_0-of-2.json", data / "process_1-of-2.json")
    (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234").mkdir()  # a killed async save
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="saved by 2 process"):
        _train(cfg, tmp_path)
    reset = toy_config(steps=4, log_every=1, eval_every=0, reset_data_iterator=True)
    state = _train(reset, tmp_path)
    assert int(state.step) == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "2",
        "4",
        "compatibility.json",
    ]
