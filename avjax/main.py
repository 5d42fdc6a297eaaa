r"""avjax's single entry point: train, evaluate or sample any model from its config.

  python -m avjax.main --config=configs/speechssm.py --workdir=workdir/speechssm
  python -m avjax.main --config=configs/speechssm.py --workdir=workdir/speechssm --mode=sample
  python -m avjax.main --config=configs/speechssm.py --config.train.steps=100 ...

The config file names the task (`config.task`); everything else goes through the Task
interface. Re-running a train command resumes from the workdir's newest checkpoint.

Exit codes: 0 done; 143 (`loop.EXIT_PREEMPTED`) preempted: a SIGTERM reached a process, every
process saved the checkpoint of the same step and stopped; rerun the same command (requeue)
to resume. `--workdir` may be a URL (`gs://bucket/run`).
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/<model>.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Experiment directory (checkpoints, logs, samples)."
)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to run.")


def _maybe_initialize_distributed() -> None:
    """Joins a multi-process job on a TPU pod / SLURM cluster / plain cluster (no-op on one host).

    TPU VMs and SLURM are detected by JAX itself. Elsewhere (several GPU hosts without SLURM,
    or several processes on one machine) set `JAX_COORDINATOR_ADDRESS=host:port`,
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` on every process.
    """
    import jax

    multi_host = (
        bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    )
    if not multi_host:
        return
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        if not os.environ.get("JAX_PROCESS_ID"):
            raise ValueError("JAX_NUM_PROCESSES is set but JAX_PROCESS_ID is not (set both)")
        kwargs = {
            "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
            "process_id": int(os.environ["JAX_PROCESS_ID"]),
        }
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


class _QuietLibraries:
    """Drops INFO records from orbax/grain/jax internals (they log every file operation)."""

    NOISY = ("/orbax/", "/grain/", "/jax/_src/", "/absl/")

    def filter(self, record) -> bool:
        return record.levelno > 20 or not any(n in record.pathname for n in self.NOISY)


def run(config, workdir: str, mode: str, stop_after: int | None = None) -> dict:
    """Runs `mode` for `config` in `workdir`; returns a summary dict (also logged).

    `stop_after` (train): stop with a checkpoint after that many steps of this run, as a
    preempted job would (the learning-rate schedule still spans `config.train.steps`), and
    return. A real preemption raises `loop.Preempted` (a SystemExit with code 143) instead.
    `--mode=sample|eval` on a workdir without a checkpoint fails before preparing anything.
    """
    import jax

    from avjax.eval import evaluators
    from avjax.io import as_path
    from avjax.tasks import get_task, task_class
    from avjax.train import checkpoint as ckpt_lib
    from avjax.train import loop
    from avjax.train.sharding import apply_preset, make_mesh

    task_class(config)  # imports the task's module: evaluators it registers become known
    evals = evaluators.from_config(config)  # config.evals: unknown types fail before any work
    if mode == "eval" and evaluators.uses_heldout_loss(evals) and config.train.eval_batches <= 0:
        raise ValueError(
            "--mode=eval averages the held-out loss over config.train.eval_batches batches; "
            f"it is {config.train.eval_batches}: set --config.train.eval_batches=1 or more"
        )
    if mode == "train":
        as_path(workdir).mkdir(parents=True, exist_ok=True)
    else:  # before building any corpus or units
        ckpt_lib.require_checkpoint(workdir, mode)
    apply_preset(config)
    task = get_task(config, workdir)
    task.read_only = mode != "train"  # sample/eval never build or refit what a checkpoint uses
    mesh = make_mesh(config.mesh)
    logging.info("Devices: %s; mesh %s", jax.devices(), dict(mesh.shape))
    if mode == "train":
        state = loop.train(task, config, workdir, mesh, stop_after=stop_after)
        return {"step": int(state.step)}
    trainer, params, step = loop.restore_params(task, config, workdir, mesh, mode)
    task.model_state = trainer.model_state or {}  # batch statistics etc. for sample/eval
    if mode == "eval":  # every evaluator of config.evals (avjax.eval.evaluators)
        n = int(config.train.eval_batches)

        def heldout_loss(p):
            return loop.evaluate_loss(
                trainer, p, task.eval_batches(jax.process_index(), jax.process_count())[:n]
            )

        ctx = evaluators.EvalContext(
            task, trainer.model, params, step, workdir, "eval", heldout_loss
        )
        summary = {"step": step, **evaluators.run(evals, ctx)}
    else:
        summary = task.sample(trainer.model, params, step)
    logging.info("%s: %s", mode, json.dumps(summary, default=str))
    return summary


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    _maybe_initialize_distributed()
    run(_CONFIG.value, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
