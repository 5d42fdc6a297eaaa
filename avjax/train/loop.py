"""The train loop: one jitted, sharded step; checkpoints; eval; resume; preemption.

    state = init or restore            # sharded over the mesh by logical axis rules
    for step in range(start, steps):
        state, metrics = train_step(state, next(batches))
        log / eval / checkpoint (never a non-finite state)
        on a preemption notice (SIGTERM to any process): all processes agree on a step,
            checkpoint it and stop; the process exits with code 143 (`Preempted`)

Re-running the same command resumes from the newest checkpoint: parameters, optimizer state,
step and the grain iterator position are restored, so no step is repeated or lost. Config
changes that would break that (batch size, window length, packing, accumulation, seed) are
refused by field; `config.train.reset_data_iterator=True` keeps params and optimizer state
and starts the data afresh (e.g. after a change in the number of processes).
"""

from __future__ import annotations

import functools
import json
import signal
import time
from dataclasses import dataclass
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import periodic_actions
from jax.experimental import multihost_utils

from avjax.io import PathLike, as_path
from avjax.tasks.base import Batch, Task
from avjax.train import checkpoint as ckpt_lib
from avjax.train import hardware
from avjax.train import metrics as metrics_lib
from avjax.train import sharding as sharding_lib
from avjax.train.optim import build_optimizer, learning_rate_schedule


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree)."""

    step: jax.Array
    params: Any
    opt_state: Any


@dataclass
class Trainer:
    """Holds the compiled pieces of one experiment (built by `build_trainer`)."""

    task: Task
    model: nn.Module
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    rules: tuple
    state_shardings: Any
    abstract_state: Any
    init_fn: Any
    fresh_state: Any  # params -> TrainState at step 0 (fresh optimizer), sharded
    train_step: Any
    eval_step: Any
    all_finite: Any  # state -> scalar bool (replicated): every float leaf is finite


def _loss_and_grads(
    task: Task, model: nn.Module, params: Any, batch: Batch, rng: jax.Array, accum: int
):
    """Summed loss, summed metrics and summed gradients, over `accum` micro-batches."""
    grad_fn = jax.value_and_grad(lambda p, b, r: task.loss(model, p, b, r), has_aux=True)
    if accum == 1:
        (loss, metrics), grads = grad_fn(params, batch, rng)
        return loss, metrics, grads

    def split(x):
        if x.shape[0] % accum:
            raise ValueError(f"batch of {x.shape[0]} does not split into grad_accum={accum}")
        return x.reshape((accum, x.shape[0] // accum) + x.shape[1:])

    micro = jax.tree.map(split, batch)

    def body(carry, xs):
        mb, i = xs
        (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

    zeros = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng))
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), (zeros[0][0], zeros[0][1], zeros[1])
    )
    (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
    return loss, metrics, grads


def train_step_fn(
    task: Task,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    seed: int,
    accum: int,
    state: TrainState,
    batch: Batch,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch; returns the new state and mean metrics."""
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    loss_sum, metric_sums, grad_sums = _loss_and_grads(task, model, state.params, batch, rng, accum)
    weight = jnp.maximum(metric_sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grad_sums)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {k: v / weight for k, v in metric_sums.items() if k != "weight"}
    metrics["loss"] = loss_sum / weight
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    metrics["lr"] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step_fn(task: Task, model: nn.Module, params: Any, batch: Batch) -> dict[str, jax.Array]:
    """Summed loss and weight on one held-out batch."""
    loss_sum, metrics = task.loss(model, params, batch, jax.random.key(0))
    return {"loss_sum": loss_sum, "weight": metrics["weight"]}


def build_trainer(
    task: Task, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> Trainer:
    """Builds the model, optimizer, sharded init and the jitted train/eval steps."""
    rules = sharding_lib.rules_from_config(config.sharding_rules)
    model = task.build_model()
    tx = build_optimizer(config.train)
    schedule = learning_rate_schedule(config.train)
    dummy = task.dummy_batch()
    dp = sharding_lib.data_parallel_size(mesh, rules)
    gb = next(iter(dummy.values())).shape[0]
    if gb % dp:
        raise ValueError(
            f"config.train.batch_size={gb} is not divisible by the {dp}-way data-parallel mesh "
            f"(config.mesh={config.mesh.to_dict()})"
        )

    def init(rng: jax.Array) -> TrainState:
        variables = task.init_variables(model, rng, dummy)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    rng = jax.random.key(int(config.seed))
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        boxed = jax.eval_shape(init, rng)
        state_shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        nn.meta.unbox(boxed),
        state_shardings,
    )
    init_fn = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=state_shardings)
    fresh_state = jax.jit(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
        out_shardings=state_shardings,
    )

    batch_shardings = {
        k: sharding_lib.batch_sharding(mesh, rules, v.ndim) for k, v in dummy.items()
    }
    step = functools.partial(
        train_step_fn, task, model, tx, schedule, int(config.seed), int(config.train.grad_accum)
    )
    train_step = jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        functools.partial(eval_step_fn, task, model),
        in_shardings=(state_shardings.params, batch_shardings),
        out_shardings=sharding_lib.replicated(mesh),
    )
    return Trainer(
        task=task,
        model=model,
        tx=tx,
        mesh=mesh,
        rules=rules,
        state_shardings=state_shardings,
        abstract_state=abstract_state,
        init_fn=init_fn,
        fresh_state=fresh_state,
        train_step=train_step,
        eval_step=eval_step,
        all_finite=jax.jit(_all_finite, out_shardings=sharding_lib.replicated(mesh)),
    )


def evaluate_loss(trainer: Trainer, params: Any, batches: list[Batch]) -> float:
    """Mean held-out loss per target over `batches`.

    Raises:
      ValueError: there is nothing to evaluate (no batches, or batches without targets):
        never a made-up 0.0.
    """
    if not batches:
        raise ValueError("no held-out batches to evaluate (config.train.eval_batches=0?)")
    total, weight = 0.0, 0.0
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(list(trainer.rules)):
        for b in batches:
            out = trainer.eval_step(params, sharding_lib.put_batch(b, trainer.mesh, trainer.rules))
            total += float(out["loss_sum"])
            weight += float(out["weight"])
    if weight <= 0:
        raise ValueError(f"the {len(batches)} held-out batches hold no targets (all masked)")
    return total / weight


EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a shell reports for a job ended by SIGTERM


class Preempted(SystemExit):
    """`train` stopped at `step` on a preemption notice, after saving a checkpoint there.

    A `SystemExit` with code `EXIT_PREEMPTED` (143): uncaught, the process exits non-zero, so
    a requeue wrapper (SLURM `--requeue`, a queued-resource retry, a shell loop) reruns the
    same command, which resumes from that checkpoint.
    """

    def __init__(self, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.step = step


class _PreemptionWatch:
    """Says, identically on every process, whether to stop after a step for a preemption.

    One process: a SIGTERM handler sets a flag, read after each step. Several processes: the
    notice may reach one process only, and a process that stops alone leaves the others
    hanging in the next step's collectives, so all must agree on the step. With
    `jax.distributed` initialised, JAX's preemption sync manager (what orbax's
    `CheckpointManager.reached_preemption` asks) catches SIGTERM in whichever process gets it
    and agrees in the background on a step (the largest any process has reached, plus one) at
    which `reached_preemption` turns true everywhere; it must be asked after every step, and
    no Python handler may replace its own. With the preemption service turned off
    (`jax_enable_preemption_service=False`) the local flags are all-gathered after each step.
    """

    def __init__(self):
        self.requested = False
        self.synced = jax.distributed.is_initialized() and bool(
            jax.config.jax_enable_preemption_service
        )
        self._previous = None

    def __enter__(self) -> _PreemptionWatch:
        if not self.synced:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM received: will checkpoint after this step and stop.")
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int, manager: ocp.CheckpointManager) -> bool:
        """True on every process at the same `step` once any process got a SIGTERM."""
        if self.synced:
            return bool(manager.reached_preemption(step))
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.any(flags))


def _all_finite(tree: Any) -> jax.Array:
    """A scalar bool: every floating-point leaf of `tree` is finite."""
    ok = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(ok)) if ok else jnp.array(True)


def _init_or_restore(
    trainer: Trainer,
    manager: ocp.CheckpointManager,
    data_iter: Any,
    config: ml_collections.ConfigDict,
) -> TrainState:
    """The newest checkpoint's state (data iterator restored in place), else a fresh one.

    Resuming refuses config changes that break exact resumption and names what differs in
    the stored tree (see `checkpoint.check_config_drift`, `checkpoint.restore`);
    `config.train.reset_data_iterator=True` restores params and optimizer state only.
    """
    tc = config.train
    latest = manager.latest_step()
    if latest is None:
        state = trainer.init_fn(jax.random.key(int(config.seed)))
        if tc.get("init_from"):
            params = ckpt_lib.load_init_params(tc.init_from, state.params, tc.get("init_skip", ""))
            state = trainer.fresh_state(params)
        return state
    where = f"{manager.directory}/{latest}"
    reset = bool(tc.get("reset_data_iterator", False))
    current = json.loads(config.to_json_best_effort())
    ckpt_lib.check_config_drift(ckpt_lib.saved_config(manager, latest), current, reset, where)
    logging.info("Resuming from checkpoint step %d in %s", latest, manager.directory)
    if reset:
        logging.warning(
            "config.train.reset_data_iterator=True: parameters and optimizer state from %s; "
            "the data pipeline starts afresh (the saved position is not used)",
            where,
        )
    return ckpt_lib.restore(manager, latest, trainer.abstract_state, None if reset else data_iter)


class _Run:
    """One training run after init/restore: steps, logs, evals, checkpoints, preemption."""

    def __init__(
        self,
        task: Task,
        config: ml_collections.ConfigDict,
        workdir: PathLike,
        trainer: Trainer,
        manager: ocp.CheckpointManager,
        data_iter: Any,
        watch: _PreemptionWatch,
    ):
        self.task, self.config, self.workdir, self.trainer = task, config, workdir, trainer
        self.manager, self.data_iter, self.watch = manager, data_iter, watch
        self.compat = task.compatibility()
        self.stamped = manager.latest_step() is not None
        self.config_dict = json.loads(config.to_json_best_effort())
        self.writer = metrics_lib.create_writer(workdir)
        self.report = periodic_actions.ReportProgress(
            num_train_steps=int(config.train.steps), writer=self.writer
        )
        self.eval_batches = self._eval_batches()
        self.flops_per_token = task.flops_per_token()
        self.peak = hardware.peak_flops(jax.devices()[0].device_kind)  # None on CPU: no MFU
        self.pending: list[dict[str, jax.Array]] = []
        self.t_log, self.tokens_since = time.time(), 0

    def _eval_batches(self) -> list[Batch]:
        tc = self.config.train
        if not tc.eval_every:
            return []
        if int(tc.get("eval_batches", 1)) <= 0:
            logging.info("config.train.eval_batches=0: no held-out evaluation while training")
            return []
        batches = self.task.eval_batches(jax.process_index(), jax.process_count())
        if not batches:
            logging.warning("The task has no held-out batches: no evaluation while training")
        return batches

    def loop(self, state: TrainState, stop_after: int | None) -> tuple[TrainState, int | None]:
        """Trains to `config.train.steps`; returns the state and the step it was preempted
        at (None if it was not)."""
        tc, trainer = self.config.train, self.trainer
        step = start = int(state.step)
        if start == 0:
            n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
            self.writer.write_hparams({"num_params": n_params, **_flat(self.config.to_dict())})
        with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(list(trainer.rules)):
            while step < tc.steps:
                state = self._step(state)
                step += 1
                self.report(step)
                last = step == tc.steps
                preempted = self.watch.should_stop(step, self.manager) and not last
                stop = preempted or (stop_after is not None and step - start >= stop_after)
                if step % tc.log_every == 0 or last or stop:
                    self._log(step)
                if self.eval_batches and (step % tc.eval_every == 0 or last):
                    self._eval(step, state)
                if step % tc.checkpoint_every == 0 or last or stop:
                    self._save(step, state)
                if stop:
                    logging.warning(
                        "Stopping at step %d (checkpoint saved); rerun to resume.", step
                    )
                    return state, step if preempted else None
        return state, None

    def _step(self, state: TrainState) -> TrainState:
        batch = next(self.data_iter)
        self.tokens_since += self.task.tokens_per_batch(batch) * jax.process_count()
        state, metrics = self.trainer.train_step(
            state, sharding_lib.put_batch(batch, self.trainer.mesh, self.trainer.rules)
        )
        self.pending.append(metrics)
        return state

    def _log(self, step: int) -> None:
        rows = jax.device_get(self.pending)
        dt = max(time.time() - self.t_log, 1e-9)
        scalars = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1]}
        scalars["tokens_per_s"] = self.tokens_since / dt
        scalars["steps_per_s"] = len(rows) / dt
        if self.flops_per_token:
            per_device = self.flops_per_token * self.tokens_since / dt / jax.device_count()
            scalars["tflops_per_s_per_device"] = per_device / 1e12
            if self.peak:
                scalars["mfu"] = per_device / self.peak
        if not np.isfinite(scalars["loss"]):
            raise FloatingPointError(f"loss is {scalars['loss']} at step {step}")
        self.writer.write_scalars(step, scalars)
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
        self.pending.clear()
        self.t_log, self.tokens_since = time.time(), 0

    def _eval(self, step: int, state: TrainState) -> None:
        eval_loss = evaluate_loss(self.trainer, state.params, self.eval_batches)
        self.writer.write_scalars(step, {"eval_loss": eval_loss})
        logging.info("step %d: eval_loss=%.4f", step, eval_loss)
        self.t_log = time.time()

    def _save(self, step: int, state: TrainState) -> None:
        """Checkpoints a finite state (the first checkpoint writes the compatibility stamp)."""
        losses = jax.device_get([m["loss"] for m in self.pending])
        if not (np.all(np.isfinite(losses)) and bool(self.trainer.all_finite(state))):
            raise FloatingPointError(
                f"non-finite loss or train state at step {step}: not checkpointed; the newest "
                f"checkpoint in {self.manager.directory} holds the last finite state"
            )
        if not self.stamped:
            ckpt_lib.write_stamp(self.workdir, self.compat)
            self.stamped = True
        ckpt_lib.save(self.manager, step, state, self.data_iter, self.config_dict, force=True)

    def close(self) -> None:
        self.writer.flush()


def train(
    task: Task,
    config: ml_collections.ConfigDict,
    workdir: PathLike,
    mesh: jax.sharding.Mesh,
    stop_after: int | None = None,
) -> TrainState:
    """Trains `task` to `config.train.steps`, resuming from `workdir` if it holds checkpoints.

    Args:
      stop_after: stop (with a checkpoint) after this many steps of *this* run, as if
        preempted, and return; used by tests of exact resumption.

    Returns:
      The final train state.

    Raises:
      Preempted: after a preemption notice (SIGTERM to any process), once every process has
        saved the checkpoint of the step they agreed on (exits the process with code 143).
      FloatingPointError: the loss or the state became non-finite (nothing non-finite is
        ever checkpointed).
    """
    tc = config.train
    ckpt_lib.check_compatible(workdir, task.compatibility())
    with _PreemptionWatch() as watch:
        logging.info("Data: %s", task.prepare())
        trainer = build_trainer(task, config, mesh)
        data_iter = iter(task.train_dataset(jax.process_index(), jax.process_count()))
        manager = ckpt_lib.make_manager(workdir, tc.keep_checkpoints, tc.async_checkpoints)
        try:
            state = _init_or_restore(trainer, manager, data_iter, config)
            metrics_lib.truncate_jsonl(as_path(workdir) / "metrics.jsonl", int(state.step))
            n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
            logging.info(
                "Model: %s parameters; starting at step %d of %d",
                f"{n_params:,}",
                int(state.step),
                tc.steps,
            )
            run = _Run(task, config, workdir, trainer, manager, data_iter, watch)
            state, preempted_at = run.loop(state, stop_after)
            run.close()
        finally:
            manager.wait_until_finished()
            manager.close()
    if preempted_at is not None:
        logging.warning("Preempted at step %d: exiting with code %d", preempted_at, EXIT_PREEMPTED)
        raise Preempted(preempted_at)
    return state


def restore_params(
    task: Task, config: ml_collections.ConfigDict, workdir: PathLike, mesh, mode: str = "eval"
) -> tuple[Trainer, Any, int]:
    """The newest checkpoint's params (for eval and sampling), with the trainer that fits them.

    Fails at once, before any data preparation, when `workdir` has no checkpoint.
    """
    latest = ckpt_lib.require_checkpoint(workdir, mode)
    ckpt_lib.check_compatible(workdir, task.compatibility())
    task.prepare()
    trainer = build_trainer(task, config, mesh)
    manager = ckpt_lib.make_manager(workdir, config.train.keep_checkpoints, read_only=True)
    try:
        state = ckpt_lib.restore(manager, latest, trainer.abstract_state)
    finally:
        manager.close()
    return trainer, state.params, latest


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat(v, name))
        elif isinstance(v, (int, float, str, bool)):
            out[name] = v
        else:
            out[name] = str(v)
    return out
