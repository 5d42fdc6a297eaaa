"""The train state and its update rules beyond one optimizer.

`TrainState` holds, besides step, params and optimizer state:
  - `model_state`: the model's non-param collections (e.g. `batch_stats`), updated by the
    loss in training (`train=True`) and read as-is in eval and sampling (`train=False`);
  - `ema_params`: an exponential moving average of the params (`config.train.ema_decay`).
Both are empty (`{}` / None) unless a task or config asks for them; empty fields are left out
of checkpoints (`checkpoint.save`), so checkpoints of plain runs keep their layout.

A task with named parts (`Task.parts`, e.g. a GAN's generator and discriminator) keeps one
param tree whose top-level keys are the parts; `opt_state` is then `{part: opt_state}`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree)."""

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any = flax.struct.field(default_factory=dict)
    ema_params: Any = None


def stream_id(name: str) -> int:
    """A stable 31-bit integer for an RNG stream name (the same in every process and run)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """The key of one train step: a function of (seed, step) only, so resume is exact."""
    return jax.random.fold_in(jax.random.key(seed), step)


def stream_keys(key: jax.Array, names: Sequence[str]) -> dict[str, jax.Array]:
    """`{name: fold_in(key, stream_id(name))}`: one independent key per named stream."""
    return {n: jax.random.fold_in(key, stream_id(n)) for n in names}


def part_key(key: jax.Array, part: str | None) -> jax.Array:
    """The key of one named part's update within a step (`key` itself for a single model)."""
    return key if part is None else jax.random.fold_in(key, stream_id("part:" + part))


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """`decay * ema + (1 - decay) * params`, leaf by leaf (float32 arithmetic)."""
    return jax.tree.map(
        lambda e, p: (decay * e.astype(jnp.float32) + (1.0 - decay) * p).astype(e.dtype),
        ema,
        params,
    )


def get_part(tree: Any, part: str | None) -> Any:
    """`tree[part]`, or `tree` itself for a single model (`part=None`)."""
    return tree if part is None else tree[part]


def set_part(tree: Any, part: str | None, value: Any) -> Any:
    """A copy of `tree` with `tree[part] = value` (or `value` for a single model)."""
    return value if part is None else {**tree, part: value}
