"""The train loop: one jitted, sharded step; checkpoints; eval; resume; preemption.

    state = init or restore            # sharded over the mesh by logical axis rules
    for step in range(start, steps):
        state, metrics = train_step(state, next(batches))
        log / eval / checkpoint (never a non-finite state)
        on a preemption notice (SIGTERM to any process): all processes agree on a step,
            checkpoint it and stop; the process exits with code 143 (`Preempted`)

Beyond params and one optimizer, the state holds what a task or config asks for (see
`avjax/train/state.py`): the model's non-param collections (`batch_stats`: updated with
`train=True` in the step, read as stored in eval), EMA params (`train.ema_decay`; eval and
sampling use them with `train.eval_with_ema`), per-group optimizers or frozen params
(`train.param_groups`, `optim.py`) and named parts stepped in alternation, each with its own
optimizer state (`Task.parts`: a GAN's generator and discriminator). Named RNG streams
(`Task.rng_streams`) are derived from (seed, step, name), so a resumed run draws the same.

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

from avjax.eval import evaluators as evaluators_lib
from avjax.io import PathLike, as_path
from avjax.tasks.base import Batch, LossContext, Task
from avjax.train import checkpoint as ckpt_lib
from avjax.train import hardware
from avjax.train import metrics as metrics_lib
from avjax.train import sharding as sharding_lib
from avjax.train import state as state_lib
from avjax.train.optim import (
    build_optimizer,
    frozen_leaves,
    learning_rate_schedule,
    part_config,
)
from avjax.train.state import TrainState


@dataclass
class Trainer:
    """Holds the compiled pieces of one experiment (built by `build_trainer`)."""

    task: Task
    model: nn.Module
    tx: optax.GradientTransformation  # with named parts: its `init` builds {part: state}
    mesh: jax.sharding.Mesh
    rules: tuple
    state_shardings: Any
    abstract_state: Any
    init_fn: Any
    fresh_state: Any  # (params, model_state) -> TrainState at step 0 (fresh optimizer), sharded
    train_step: Any
    eval_step: Any  # (params, model_state, batch) -> {"loss_sum", "weight"}
    all_finite: Any  # state -> scalar bool (replicated): every float leaf is finite
    txs: dict[str | None, optax.GradientTransformation] | None = None  # per part (None: one)
    eval_with_ema: bool = False
    model_state: Any = None  # the restored non-param collections (`restore_state`), for eval


def _loss_and_grads(
    task: Task,
    model: nn.Module,
    params: Any,
    model_state: Any,
    part: str | None,
    batch: Batch,
    rng: jax.Array,
    accum: int,
    frozen: Any = None,
):
    """Summed loss, summed metrics, summed gradients (with respect to `params[part]`, or all
    params) over `accum` micro-batches, and the model state after the last one. `frozen`
    (`params -> bool per leaf`) stops the gradient at frozen leaves: theirs are zeros."""
    sub = state_lib.get_part(params, part)
    is_frozen = frozen(sub) if frozen is not None else None

    def loss_fn(p, ms, b, r):
        if is_frozen is not None:
            p = jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, p, is_frozen)
        ctx = LossContext(True, r, state_lib.stream_keys(r, task.rng_streams), ms, part)
        loss, metrics, new_ms = task.apply_loss(model, state_lib.set_part(params, part, p), b, ctx)
        return loss, (metrics, new_ms)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (loss, (metrics, model_state)), grads = grad_fn(sub, model_state, batch, rng)
        return loss, metrics, grads, model_state

    def split(x):
        if x.shape[0] % accum:
            raise ValueError(f"batch of {x.shape[0]} does not split into grad_accum={accum}")
        return x.reshape((accum, x.shape[0] // accum) + x.shape[1:])

    micro = jax.tree.map(split, batch)

    def body(carry, xs):
        sums, ms = carry
        mb, i = xs
        (loss, (metrics, ms)), grads = grad_fn(sub, ms, mb, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, sums, (loss, metrics, grads)), ms), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: grad_fn(sub, model_state, first, rng))
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][0], shapes[0][1][0], shapes[1])
    )
    ((loss, metrics, grads), model_state), _ = jax.lax.scan(
        body, (zeros, model_state), (micro, jnp.arange(accum))
    )
    return loss, metrics, grads, model_state


def train_step_fn(
    task: Task,
    model: nn.Module,
    txs: dict[str | None, optax.GradientTransformation],
    schedule: optax.Schedule,
    seed: int,
    accum: int,
    ema_decay: float,
    frozen: dict[str | None, Any],
    state: TrainState,
    batch: Batch,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step per part (in `task.parts` order; one step for a single model) on a
    global batch; returns the new state and mean metrics (`<part>/<name>` for parts).
    `frozen[part]`: which leaves are frozen (`optim.frozen_leaves`), or None."""
    key = state_lib.step_key(seed, state.step)
    params, opt_state, model_state = state.params, state.opt_state, state.model_state
    metrics: dict[str, jax.Array] = {"loss": jnp.zeros((), jnp.float32)}
    for part in task.parts or (None,):
        rng = state_lib.part_key(key, part)
        loss_sum, sums, grad_sums, model_state = _loss_and_grads(
            task, model, params, model_state, part, batch, rng, accum, frozen[part]
        )
        weight = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g, w=weight: g / w, grad_sums)
        sub = state_lib.get_part(params, part)
        updates, part_opt = txs[part].update(grads, state_lib.get_part(opt_state, part), sub)
        params = state_lib.set_part(params, part, optax.apply_updates(sub, updates))
        opt_state = state_lib.set_part(opt_state, part, part_opt)
        part_metrics = {k: v / weight for k, v in sums.items() if k != "weight"}
        part_metrics["loss"] = loss_sum / weight
        part_metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["loss"] += part_metrics["loss"]
        prefix = "" if part is None else f"{part}/"
        metrics.update({prefix + k: v for k, v in part_metrics.items() if prefix or k != "loss"})
    metrics["param_norm"] = optax.tree.norm(params)
    metrics["lr"] = schedule(state.step)
    ema = state.ema_params
    if ema_decay > 0:
        ema = state_lib.ema_update(ema, params, ema_decay)
    new = TrainState(state.step + 1, params, opt_state, model_state, ema)
    return new, metrics


def eval_step_fn(
    task: Task, model: nn.Module, params: Any, model_state: Any, batch: Batch
) -> dict[str, jax.Array]:
    """Summed loss and weight on one held-out batch (`train=False`, stored statistics)."""
    rng = jax.random.key(0)
    ctx = LossContext(False, rng, state_lib.stream_keys(rng, task.rng_streams), model_state)
    loss_sum, metrics, _ = task.apply_loss(model, params, batch, ctx)
    return {"loss_sum": loss_sum, "weight": metrics["weight"]}


def _optimizers(task: Task, tc: ml_collections.ConfigDict):
    """`(tx, txs)`: one optimizer per part (key None for a single model) and a transform
    whose `init` builds the whole optimizer state (`{part: state}` for parts)."""
    if not task.parts:
        tx = build_optimizer(tc)
        return tx, {None: tx}
    txs = {p: build_optimizer(part_config(tc, p), prefix=f"{p}/") for p in task.parts}

    def init(params):
        return {p: txs[p].init(params[p]) for p in task.parts}

    def update(*_):
        raise TypeError("a task with parts is updated part by part (train_step_fn)")

    return optax.GradientTransformation(init, update), txs


def _check_batch_divides(dummy: Batch, config, mesh: jax.sharding.Mesh, rules: tuple) -> None:
    """The global batch must split evenly over the data-parallel devices."""
    dp = sharding_lib.data_parallel_size(mesh, rules)
    gb = next(iter(dummy.values())).shape[0]
    if gb % dp:
        raise ValueError(
            f"config.train.batch_size={gb} is not divisible by the {dp}-way data-parallel mesh "
            f"(config.mesh={config.mesh.to_dict()})"
        )


def build_trainer(
    task: Task, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> Trainer:
    """Builds the model, optimizer, sharded init and the jitted train/eval steps."""
    rules = sharding_lib.rules_from_config(config.sharding_rules)
    tc = config.train
    model = task.build_model()
    tx, txs = _optimizers(task, tc)
    ema_decay = float(tc.get("ema_decay", 0.0) or 0.0)
    dummy = task.dummy_batch()
    _check_batch_divides(dummy, config, mesh, rules)

    def new_state(params: Any, model_state: Any) -> TrainState:
        ema = jax.tree.map(jnp.copy, params) if ema_decay > 0 else None
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), model_state, ema)

    def init(rng: jax.Array) -> TrainState:
        variables = dict(task.init_variables(model, rng, dummy))
        params = variables.pop("params")
        return new_state(params, variables)

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
    fresh_state = jax.jit(new_state, out_shardings=state_shardings)

    batch_shardings = {
        k: sharding_lib.batch_sharding(mesh, rules, v.ndim) for k, v in dummy.items()
    }
    step = functools.partial(
        train_step_fn,
        task,
        model,
        txs,
        learning_rate_schedule(tc),
        int(config.seed),
        int(tc.grad_accum),
        ema_decay,
        {p: frozen_leaves(part_config(tc, p), f"{p}/" if p else "") for p in txs},
    )
    train_step = jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        functools.partial(eval_step_fn, task, model),
        in_shardings=(state_shardings.params, state_shardings.model_state, batch_shardings),
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
        txs=txs,
        eval_with_ema=bool(tc.get("eval_with_ema", False)) and ema_decay > 0,
    )


def inference_params(trainer: Trainer, state: TrainState) -> Any:
    """The params eval and sampling use: the EMA copy with `config.train.eval_with_ema`."""
    return state.ema_params if trainer.eval_with_ema else state.params


def evaluate_loss(
    trainer: Trainer, params: Any, batches: list[Batch], model_state: Any = None
) -> float:
    """Mean held-out loss per target over `batches` (`model_state`: the stored non-param
    collections, e.g. batch statistics; None: those `restore_state` restored, else a fresh
    init's).

    Raises:
      ValueError: there is nothing to evaluate (no batches, or batches without targets):
        never a made-up 0.0.
    """
    if not batches:
        raise ValueError("no held-out batches to evaluate (config.train.eval_batches=0?)")
    if model_state is None:
        model_state = trainer.model_state
    if model_state is None:
        model_state = _initial_model_state(trainer)
    total, weight = 0.0, 0.0
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(list(trainer.rules)):
        for b in batches:
            batch = sharding_lib.put_batch(b, trainer.mesh, trainer.rules)
            out = trainer.eval_step(params, model_state, batch)
            total += float(out["loss_sum"])
            weight += float(out["weight"])
    if weight <= 0:
        raise ValueError(f"the {len(batches)} held-out batches hold no targets (all masked)")
    return total / weight


def _initial_model_state(trainer: Trainer) -> Any:
    """The model state of a fresh init (`{}` for models without non-param collections)."""
    if not jax.tree.leaves(trainer.abstract_state.model_state):
        return trainer.abstract_state.model_state
    with jax.set_mesh(trainer.mesh):
        return trainer.init_fn(jax.random.key(0)).model_state


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
            state = trainer.fresh_state(params, state.model_state)
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
        self.evaluators = evaluators_lib.from_config(config)  # config.evals
        self.eval_batches = self._eval_batches()
        self.flops_per_token = task.flops_per_token()
        self.peak = hardware.peak_flops(jax.devices()[0].device_kind)  # None on CPU: no MFU
        self.pending: list[dict[str, jax.Array]] = []
        self.t_log, self.tokens_since = time.time(), 0

    def _eval_batches(self) -> list[Batch]:
        tc = self.config.train
        if not any(e.every for e in self.evaluators if e.type == "loss"):
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
                self._eval(step, state, last)
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
        if len(self.pending) > 1:
            # At most two steps in flight (one running, one queued): dispatch is asynchronous,
            # and a loop running ahead of the device would take its queue of steps past a
            # preemption notice (a GAN step ran 25 steps past a SIGTERM before this).
            jax.block_until_ready(self.pending[-2])
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

    def _eval(self, step: int, state: TrainState, last: bool) -> None:
        """Runs the evaluators of `config.evals` due at `step` (`avjax.eval.evaluators`);
        their scalars go to the run's writer (the default held-out loss: `eval_loss`)."""
        if not any(e.due(step, last) for e in self.evaluators):
            return
        batches, model_state = self.eval_batches, state.model_state

        def heldout_loss(params: Any) -> float:
            return evaluate_loss(self.trainer, params, batches, model_state)

        ctx = evaluators_lib.EvalContext(
            self.task,
            self.trainer.model,
            inference_params(self.trainer, state),
            step,
            self.workdir,
            "train",
            heldout_loss if batches else None,
        )
        evaluators_lib.run(self.evaluators, ctx, self.writer, last=last)
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


def restore_state(
    task: Task, config: ml_collections.ConfigDict, workdir: PathLike, mesh, mode: str = "eval"
) -> tuple[Trainer, TrainState, int]:
    """The newest checkpoint's whole train state, with the trainer that fits it.

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
    trainer.model_state = state.model_state
    return trainer, state, latest


def restore_params(
    task: Task, config: ml_collections.ConfigDict, workdir: PathLike, mesh, mode: str = "eval"
) -> tuple[Trainer, Any, int]:
    """The newest checkpoint's params for eval and sampling (the EMA copy with
    `config.train.eval_with_ema`), with the trainer that fits them. Models with non-param
    collections (batch statistics) need `restore_state(...)[1].model_state` as well.

    Fails at once, before any data preparation, when `workdir` has no checkpoint.
    """
    trainer, state, latest = restore_state(task, config, workdir, mesh, mode)
    return trainer, inference_params(trainer, state), latest


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
