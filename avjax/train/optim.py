"""Optimizer: AdamW with linear warm-up, cosine decay and global-norm clipping."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(train_cfg: Any) -> optax.Schedule:
    """Linear warm-up over `warmup_steps` to `lr`, then cosine decay to `lr * final_lr_frac`."""
    warmup = max(int(train_cfg.warmup_steps), 0)
    total = max(int(train_cfg.steps), warmup + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else float(train_cfg.lr),
        peak_value=float(train_cfg.lr),
        warmup_steps=warmup,
        decay_steps=total,
        end_value=float(train_cfg.lr) * float(train_cfg.final_lr_frac),
    )


_NO_DECAY_NAMES = ("bias", "b", "scale", "a_param")


def _decay_mask(params: Any) -> Any:
    """Weight decay on weight matrices only: not on biases (`bias`, `b`, `*_b`, whatever their
    rank), norms' scales or the RG-LRU `a` param. A leading stacked axis of layers scanned with
    `nn.scan` (under a "layers" key) does not count as a matrix dimension."""

    def decay(path: tuple, p: Any) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if names and (names[-1] in _NO_DECAY_NAMES or names[-1].endswith("_b")):
            return False
        return jnp.ndim(p) - ("layers" in names) >= 2

    return jax.tree_util.tree_map_with_path(decay, params)


def build_optimizer(train_cfg: Any) -> optax.GradientTransformation:
    """`optax.adamw` with the config's schedule, preceded by global-norm clipping."""
    chain = []
    if train_cfg.clip_norm and float(train_cfg.clip_norm) > 0:
        chain.append(optax.clip_by_global_norm(float(train_cfg.clip_norm)))
    chain.append(
        optax.adamw(
            learning_rate=learning_rate_schedule(train_cfg),
            b1=float(train_cfg.b1),
            b2=float(train_cfg.b2),
            eps=1e-8,
            weight_decay=float(train_cfg.weight_decay),
            mask=_decay_mask,
        )
    )
    return optax.chain(*chain)
