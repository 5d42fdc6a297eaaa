"""The train loop: one jitted, sharded step; checkpoints; eval; resume; preemption.

    state = init or restore            # sharded over the mesh by logical axis rules
    for step in range(start, steps):
        state, metrics = train_step(state, next(batches))
        log / eval / checkpoint; on SIGTERM: checkpoint and stop

Re-running the same command resumes from the newest checkpoint: parameters, optimizer state,
step and the grain iterator position are restored, so no step is repeated or lost.
"""

from __future__ import annotations

import functools
import json
import os
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
from absl import logging
from clu import periodic_actions

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
    )


def evaluate_loss(trainer: Trainer, params: Any, batches: list[Batch]) -> float:
    """Mean held-out loss per target over `batches`."""
    total, weight = 0.0, 0.0
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(list(trainer.rules)):
        for b in batches:
            out = trainer.eval_step(params, sharding_lib.put_batch(b, trainer.mesh, trainer.rules))
            total += float(out["loss_sum"])
            weight += float(out["weight"])
    return total / max(weight, 1.0)


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside some test runners)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: will checkpoint after this step and stop.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Drops rows logged after `last_step` (a crash after logging, before the checkpoint)."""
    if not os.path.exists(path):
        return
    rows = metrics_lib.read_jsonl(path)
    kept = [r for r in rows if r["step"] <= last_step]
    if len(kept) != len(rows):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)


def train(
    task: Task,
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh: jax.sharding.Mesh,
    stop_after: int | None = None,
) -> TrainState:
    """Trains `task` to `config.train.steps`, resuming from `workdir` if it holds checkpoints.

    Args:
      stop_after: stop (with a checkpoint) after this many steps of *this* run, as if
        preempted; used by tests of exact resumption.

    Returns:
      The final train state.
    """
    tc = config.train
    ckpt_lib.check_compatible(workdir, task.compatibility())
    facts = task.prepare()
    logging.info("Data: %s", facts)
    trainer = build_trainer(task, config, mesh)
    pi, pc = jax.process_index(), jax.process_count()
    train_ds = task.train_dataset(pi, pc)
    data_iter = iter(train_ds)
    manager = ckpt_lib.make_manager(workdir, tc.keep_checkpoints, tc.async_checkpoints)
    latest = manager.latest_step()
    if latest is not None:
        logging.info("Resuming from checkpoint step %d in %s", latest, manager.directory)
        state = ckpt_lib.restore(manager, latest, trainer.abstract_state, data_iter)
        _truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), latest)
    else:
        state = trainer.init_fn(jax.random.key(int(config.seed)))
        if tc.get("init_from"):
            params = ckpt_lib.load_init_params(tc.init_from, state.params, tc.get("init_skip", ""))
            state = trainer.fresh_state(params)
    start = int(state.step)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    logging.info(
        "Model: %s parameters; starting at step %d of %d", f"{n_params:,}", start, tc.steps
    )

    writer = metrics_lib.create_writer(workdir)
    if start == 0:
        writer.write_hparams({"num_params": n_params, **_flat(config.to_dict())})
    report = periodic_actions.ReportProgress(num_train_steps=int(tc.steps), writer=writer)
    eval_batches = task.eval_batches(pi, pc) if tc.eval_every else []
    config_dict = json.loads(config.to_json_best_effort())
    flops_per_token = task.flops_per_token()
    peak = hardware.peak_flops(jax.devices()[0].device_kind)  # None on CPU: no MFU logged

    pending: list[tuple[int, dict[str, jax.Array], int]] = []
    t_log, tokens_since = time.time(), 0
    step = start
    with _Preemption() as preempt, jax.set_mesh(mesh), nn.logical_axis_rules(list(trainer.rules)):
        while step < tc.steps:
            batch = next(data_iter)
            tokens_since += task.tokens_per_batch(batch) * pc
            state, metrics = trainer.train_step(
                state, sharding_lib.put_batch(batch, mesh, trainer.rules)
            )
            step += 1
            report(step)
            pending.append((step, metrics, 0))
            last = step == tc.steps
            if step % tc.log_every == 0 or last:
                rows = jax.device_get([m for _, m, _ in pending])
                dt = max(time.time() - t_log, 1e-9)
                scalars = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1]}
                scalars["tokens_per_s"] = tokens_since / dt
                scalars["steps_per_s"] = len(rows) / dt
                if flops_per_token:
                    per_device = flops_per_token * tokens_since / dt / jax.device_count()
                    scalars["tflops_per_s_per_device"] = per_device / 1e12
                    if peak:
                        scalars["mfu"] = per_device / peak
                if not np.isfinite(scalars["loss"]):
                    raise FloatingPointError(f"loss is {scalars['loss']} at step {step}")
                writer.write_scalars(step, scalars)
                logging.info(
                    "step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items())
                )
                pending.clear()
                t_log, tokens_since = time.time(), 0
            if eval_batches and (step % tc.eval_every == 0 or last):
                eval_loss = evaluate_loss(trainer, state.params, eval_batches)
                writer.write_scalars(step, {"eval_loss": eval_loss})
                logging.info("step %d: eval_loss=%.4f", step, eval_loss)
                t_log = time.time()
            stop = preempt.requested or (stop_after is not None and step - start >= stop_after)
            if step % tc.checkpoint_every == 0 or last or stop:
                ckpt_lib.save(manager, step, state, data_iter, config_dict, force=True)
            if stop:
                logging.warning("Stopping at step %d (checkpoint saved); rerun to resume.", step)
                break
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    return state


def restore_params(
    task: Task, config: ml_collections.ConfigDict, workdir: str, mesh
) -> tuple[Trainer, Any, int]:
    """The newest checkpoint's params (for eval and sampling), with the trainer that fits them."""
    ckpt_lib.check_compatible(workdir, task.compatibility())
    task.prepare()
    trainer = build_trainer(task, config, mesh)
    manager = ckpt_lib.make_manager(workdir, config.train.keep_checkpoints, async_save=False)
    latest = manager.latest_step()
    if latest is None:
        raise FileNotFoundError(
            f"no checkpoint in {manager.directory}: "
            f"train first with --mode=train --workdir={workdir}"
        )
    state = ckpt_lib.restore(manager, latest, trainer.abstract_state)
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
