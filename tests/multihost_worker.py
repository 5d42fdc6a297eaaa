"""One process of a multi-process CPU job, driven by tests/test_multihost.py.

Runs avjax's own multi-host path: `avjax.main._maybe_initialize_distributed` (from the
`JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` environment), then
`avjax.main.run` on the toy task, a tiny LM with logically sharded params (per-process data
shards, global batches from `jax.make_array_from_process_local_data`, orbax checkpoints
written by every process, metrics by process 0), then restores the newest checkpoint and
gathers its params to process 0, which writes them to an .npz.

  python tests/multihost_worker.py WORKDIR STOP_AFTER MESH_JSON OUT_NPZ [PROCESS:BATCH]

The job is 8 steps long; STOP_AFTER > 0 stops it (with a checkpoint) after that many steps
of this run, as a preemption would. PROCESS:BATCH sends a real SIGTERM to that one process
when it draws that training batch (batches slowed to 0.3 s so the notice can spread): every
process then stops at one agreed step with a checkpoint, writes the step to
`OUT_NPZ.stopped<process>` and exits with code 143.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ.get("WORKER_DEVICES", "4")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from toy_task import HookedToyTask, toy_config  # noqa: E402

from avjax import main as avjax_main  # noqa: E402
from avjax.tasks import REGISTRY, get_task  # noqa: E402
from avjax.train import loop  # noqa: E402
from avjax.train.sharding import make_mesh  # noqa: E402


def main() -> None:
    workdir, stop_after, mesh_json, out = sys.argv[1:5]
    REGISTRY["toy"] = "toy_task:HookedToyTask"
    if len(sys.argv) > 5:
        process, batch = (int(x) for x in sys.argv[5].split(":"))
        HookedToyTask.sigterm_process, HookedToyTask.sigterm_at = process, batch
        HookedToyTask.batch_sleep = 0.3
    avjax_main._maybe_initialize_distributed()  # noqa: SLF001
    cfg = toy_config(steps=8, checkpoint_every=4, eval_every=4)
    cfg.mesh.update({"sequence": 1, "preset": "", "dcn_data": 1, **json.loads(mesh_json)})
    try:
        avjax_main.run(cfg, workdir, "train", stop_after=int(stop_after) or None)
    except loop.Preempted as e:
        with open(f"{out}.stopped{jax.process_index()}", "w") as f:
            f.write(str(e.step))
        raise
    task = get_task(cfg, workdir)
    _, params, step = loop.restore_params(task, cfg, workdir, make_mesh(cfg.mesh))
    flat = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(
            multihost_utils.process_allgather(params, tiled=True)
        )
    }
    if jax.process_index() == 0:
        np.savez(out, step=step, process_count=jax.process_count(), **flat)


if __name__ == "__main__":
    main()
