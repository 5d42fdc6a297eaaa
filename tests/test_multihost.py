"""A real multi-process job on one machine: 2 processes x 4 CPU devices joined by
`jax.distributed` (gloo collectives), started through avjax.main's own multi-host path.

Checks that 2-process training equals 1-process 8-device training (per-process data shards
make the same global batches; only process 0 writes metrics), that a SIGTERM sent to one
process only stops both at one agreed step (JAX's preemption sync, as orbax's
`reached_preemption` uses), each writing its part of that step's orbax checkpoint and exiting
with code 143, and that the job resumes from there, here on another mesh: a multi-slice one
(`mesh.dcn_data=2`, one process per slice, `create_hybrid_device_mesh`).
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


def _run_two_processes(
    workdir: str, stop_after: int, mesh: dict, out: str, sigterm: str = "", expect: int = 0
) -> None:
    """Both processes of one job; raises with their logs unless both exit with `expect`."""
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
        cmd += [json.dumps(mesh), out] + ([sigterm] if sigterm else [])
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(c != expect for c in codes):
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

    # Job 1: 2 processes, fsdp over all 8 devices; process 1 alone gets a SIGTERM when it
    # draws batch 2. Both must stop at the same step, each writing its shards of that step's
    # checkpoint, and exit with 143 (requeue). Job 2: the same job resumed on a 2-slice mesh
    # (data across the processes as over DCN, fsdp=4 within each; `create_hybrid_device_mesh`
    # with one process per slice), restoring with resharding.
    work = str(tmp_path / "job")
    out = str(tmp_path / "params.npz")
    _run_two_processes(work, 0, {"fsdp": 8}, out, sigterm="1:2", expect=loop.EXIT_PREEMPTED)
    stopped = {int(open(f"{out}.stopped{p}").read()) for p in range(2)}
    assert len(stopped) == 1, stopped  # one agreed step
    (stop,) = stopped
    assert 2 <= stop < 8
    assert str(stop) in os.listdir(os.path.join(work, "checkpoints"))
    _run_two_processes(work, 0, {"fsdp": 4, "dcn_data": 2}, out)
    got = np.load(out)
    assert int(got["step"]) == 8 and int(got["process_count"]) == 2
    assert "8" in os.listdir(os.path.join(work, "checkpoints"))
    for name, ref in ref_params.items():
        np.testing.assert_allclose(got[name], ref, rtol=2e-4, atol=2e-5, err_msg=name)
    rows = metrics.read_jsonl(os.path.join(work, "metrics.jsonl"))  # process 0 only, no dups
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    ref_losses = {r["step"]: r["loss"] for r in ref_rows if "loss" in r}
    assert sorted(ref_losses) == [2, 4, 6, 8]
    assert sorted(losses) == sorted({2, 4, 6, 8, stop})  # the stop step's partial window too
    for s, v in ref_losses.items():
        if s - 1 != stop:  # a log window split by the stop averages fewer steps
            assert losses[s] == pytest.approx(v, rel=1e-4), s
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    ref_evals = [r["eval_loss"] for r in ref_rows if "eval_loss" in r]
    np.testing.assert_allclose(evals, ref_evals, rtol=1e-4)
