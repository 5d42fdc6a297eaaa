"""A real multi-process job on one machine: 2 processes x 4 CPU devices joined by
`jax.distributed` (gloo collectives), started through avjax.main's own multi-host path.

Checks that 2-process training equals 1-process 8-device training (per-process data shards
make the same global batches; only process 0 writes metrics), that a job stopped mid-way
(every process writing its part of the orbax checkpoint) resumes, here on another mesh: a
multi-slice one (`mesh.dcn_data=2`, one process per slice, `create_hybrid_device_mesh`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from toy_task import ToyTask, toy_config

from avjax.train import loop, metrics
from avjax.train.sharding import make_mesh

HERE = os.path.dirname(os.path.abspath(__file__))
needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices (conftest)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two_processes(workdir: str, stop_after: int, mesh: dict, out: str) -> None:
    """Both processes of one job; raises with their logs if either fails."""
    port = _free_port()
    procs, logs = [], []
    for pid in range(2):
        env = dict(
            os.environ,
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
            WORKER_DEVICES="4",
            XLA_FLAGS="",
        )
        log = open(os.path.join(workdir + f".p{pid}.log"), "w+")  # noqa: SIM115
        logs.append(log)
        cmd = [sys.executable, os.path.join(HERE, "multihost_worker.py"), workdir, str(stop_after)]
        procs.append(
            subprocess.Popen(
                cmd + [json.dumps(mesh), out], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        )
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        text = []
        for pid, log in enumerate(logs):
            log.seek(0)
            text.append(f"--- process {pid} (exit {codes[pid]}) ---\n{log.read()[-4000:]}")
        raise AssertionError("multi-process run failed:\n" + "\n".join(text))
    for log in logs:
        log.close()


def _reference(workdir: str, steps: int) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The same training in this one process on 8 devices: final params and metric rows."""
    cfg = toy_config(steps=steps, checkpoint_every=4, eval_every=4)
    cfg.mesh.update({"fsdp": 8, "sequence": 1})
    task = ToyTask(cfg, workdir)
    state = loop.train(task, cfg, workdir, make_mesh(cfg.mesh))
    flat = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(state.params)
    }
    return flat, metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


@needs8
def test_two_processes_train_preempt_resume_on_multislice_mesh_match_one_process(tmp_path):
    ref_params, ref_rows = _reference(str(tmp_path / "ref"), 8)

    # Job 1: 2 processes, fsdp over all 8 devices, stopped after 4 of 8 steps (as if
    # preempted; every process writes its shards of the checkpoint). Job 2: the same job
    # resumed on a 2-slice mesh (data across the processes as over DCN, fsdp=4 within each;
    # `create_hybrid_device_mesh` with one process per slice), restoring with resharding.
    work = str(tmp_path / "job")
    out = str(tmp_path / "params.npz")
    _run_two_processes(work, 4, {"fsdp": 8}, out)
    assert int(np.load(out)["step"]) == 4
    _run_two_processes(work, 0, {"fsdp": 4, "dcn_data": 2}, out)
    got = np.load(out)
    assert int(got["step"]) == 8 and int(got["process_count"]) == 2
    assert sorted(os.listdir(os.path.join(work, "checkpoints")))[:2] == ["4", "8"]
    for name, ref in ref_params.items():
        np.testing.assert_allclose(got[name], ref, rtol=2e-4, atol=2e-5, err_msg=name)
    rows = metrics.read_jsonl(os.path.join(work, "metrics.jsonl"))  # process 0 only, no dups
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    ref_losses = {r["step"]: r["loss"] for r in ref_rows if "loss" in r}
    assert sorted(losses) == sorted(ref_losses) == [2, 4, 6, 8]
    for s, v in ref_losses.items():
        assert losses[s] == pytest.approx(v, rel=1e-4), s
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    ref_evals = [r["eval_loss"] for r in ref_rows if "eval_loss" in r]
    np.testing.assert_allclose(evals, ref_evals, rtol=1e-4)
