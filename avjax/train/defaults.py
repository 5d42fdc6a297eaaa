"""The `config.train` and `config.mesh` blocks every config starts from (big_vision's
`configs/common.py` role): a config states only what differs, e.g.

    c.train = train_config(steps=1500, batch_size=16, lr=1e-3)
    c.mesh = mesh_config()

so the keys the loop reads are written once. A float field given an int (`weight_decay=0`)
stays a float, so `--config.train.weight_decay=0.1` still overrides it.
"""

from __future__ import annotations

from typing import Any

import ml_collections

TRAIN: dict[str, Any] = {
    "steps": 1000,
    "batch_size": 16,
    "grad_accum": 1,
    "lr": 1e-3,
    "final_lr_frac": 0.1,  # cosine decay to lr * final_lr_frac
    "warmup_steps": 50,
    "weight_decay": 0.0,
    "b1": 0.9,
    "b2": 0.999,
    "clip_norm": 1.0,  # 0 = off
    "log_every": 50,
    "eval_every": 500,
    "eval_batches": 1,
    "checkpoint_every": 500,
    "keep_checkpoints": 2,
    "async_checkpoints": True,
    "reset_data_iterator": False,  # resume: restart the data stream instead of restoring it
    "init_from": "",  # a params-only checkpoint to start from
    "init_skip": "",  # regex of parameters init_from leaves freshly initialised
    "ema_decay": 0.0,  # 0 = no EMA copy of the parameters
    "eval_with_ema": False,
}

MESH: dict[str, Any] = {
    "preset": "",  # a named sharding preset (avjax.train.sharding), or "" for these axes
    "data": -1,  # -1: all devices not used by the other axes
    "fsdp": 1,
    "sequence": 1,
    "tensor": 1,
    "dcn_data": 1,  # data parallelism across slices
}


def _merged(defaults: dict[str, Any], overrides: dict[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; known {sorted(defaults)}")
    out = dict(defaults)
    for k, v in overrides.items():
        out[k] = float(v) if isinstance(defaults[k], float) and isinstance(v, int) else v
    return out


def train_config(**overrides: Any) -> ml_collections.ConfigDict:
    """`config.train`: `TRAIN` with `overrides` (unknown keys are an error)."""
    return ml_collections.ConfigDict(_merged(TRAIN, overrides, "train_config"))


def mesh_config(**overrides: Any) -> ml_collections.ConfigDict:
    """`config.mesh`: `MESH` with `overrides` (unknown keys are an error)."""
    return ml_collections.ConfigDict(_merged(MESH, overrides, "mesh_config"))
