"""Optimizer: AdamW with linear warm-up, cosine decay and global-norm clipping.

Parameter groups (`config.train.param_groups`, a list of dicts, first match wins) give
parameters selected by a regular expression over their path ("encoder/dense/kernel") their
own rule: `{"regex": "^encoder/", "optimizer": "frozen"}` (no update and no optimizer state)
or `{"regex": "lora_", "lr_mult": 0.5, "weight_decay": 0.0}` (AdamW with its own learning
rate multiplier and decay). Unmatched parameters use the config's AdamW.

Named parts (`Task.parts`) may override optimizer fields in `config.train.parts.<name>`
(e.g. `{"discriminator": {"lr": 4e-4, "b1": 0.5}}`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
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
    rank), norms' scales or the RG-LRU `a` param. LoRA's `lora_a` and `lora_b` are matrices
    and decay alike (as PEFT under an AdamW trainer). A leading stacked axis of layers scanned
    with `nn.scan` (under a "layers" key) does not count as a matrix dimension."""

    def decay(path: tuple, p: Any) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        bias = names and names[-1].endswith("_b") and names[-1] != "lora_b"
        if names and (names[-1] in _NO_DECAY_NAMES or bias):
            return False
        return jnp.ndim(p) - ("layers" in names) >= 2

    return jax.tree_util.tree_map_with_path(decay, params)


def _adamw(train_cfg: Any, lr_mult: float = 1.0, weight_decay: float | None = None):
    schedule = learning_rate_schedule(train_cfg)
    return optax.adamw(
        learning_rate=schedule if lr_mult == 1.0 else (lambda s: lr_mult * schedule(s)),
        b1=float(train_cfg.b1),
        b2=float(train_cfg.b2),
        eps=1e-8,
        weight_decay=float(train_cfg.weight_decay if weight_decay is None else weight_decay),
        mask=_decay_mask,
    )


_GROUP_KEYS = {"regex", "optimizer", "lr_mult", "weight_decay"}
FROZEN = "frozen"


def param_groups(train_cfg: Any) -> list[dict[str, Any]]:
    """`config.train.param_groups` as checked dicts (errors name the group and the key)."""
    groups = [dict(g) for g in (train_cfg.get("param_groups") or ())]
    for i, g in enumerate(groups):
        where = f"config.train.param_groups[{i}]"
        if set(g) - _GROUP_KEYS or "regex" not in g:
            raise ValueError(
                f"{where}={g}: needs 'regex', may have {sorted(_GROUP_KEYS - {'regex'})}"
            )
        if g.get("optimizer", "adamw") not in ("adamw", FROZEN):
            raise ValueError(f"{where}: optimizer {g['optimizer']!r} is not 'adamw' or 'frozen'")
        re.compile(g["regex"])
    return groups


def path_name(path: tuple) -> str:
    """ "blocks_0/mlp/kernel" for a tree path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def group_labels(params: Any, groups: list[dict[str, Any]], prefix: str = "") -> Any:
    """Per leaf: the index (as a string) of the first group whose regex matches the leaf's
    path (`prefix` + path), or "default". A boxed leaf (`nn.Partitioned`) gets one label, so
    its optimizer state is masked whole (and stays shardable by its logical names)."""

    def label(path: tuple, _) -> str:
        name = prefix + path_name(path)
        for i, g in enumerate(groups):
            if re.search(g["regex"], name):
                return str(i)
        return "default"

    boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree_util.tree_map_with_path(label, params, is_leaf=boxed)


def frozen_leaves(train_cfg: Any, prefix: str = "") -> Callable[[Any], Any] | None:
    """`params -> bool per leaf` (True: in a `frozen` group), or None when nothing is frozen.

    The train step stops the gradient at these leaves, so their weight gradients are never
    computed (a frozen encoder or LLM base costs its forward and the backward through its
    activations only where something below it trains), not computed and then zeroed.
    """
    groups = param_groups(train_cfg)
    frozen_ids = {str(i) for i, g in enumerate(groups) if g.get("optimizer") == FROZEN}
    if not frozen_ids:
        return None
    return lambda params: jax.tree.map(
        lambda label: label in frozen_ids, group_labels(params, groups, prefix)
    )


def _zero_frozen(frozen: Any) -> optax.GradientTransformation:
    """Stateless: zeroes the gradients of frozen leaves (so clipping ignores them)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(
            lambda u, f: jnp.zeros_like(u) if f else u, updates, frozen(updates)
        ), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def part_config(train_cfg: Any, part: str | None) -> Any:
    """The train config of one named part: `config.train` with `train.parts.<part>` applied."""
    overrides = (train_cfg.get("parts") or {}).get(part) if part else None
    if not overrides:
        return train_cfg
    cfg = copy.deepcopy(train_cfg)
    unknown = set(dict(overrides)) - set(train_cfg)
    if unknown:
        raise ValueError(f"config.train.parts.{part}: unknown train fields {sorted(unknown)}")
    cfg.update(dict(overrides))
    return cfg


def build_optimizer(train_cfg: Any, prefix: str = "") -> optax.GradientTransformation:
    """`optax.adamw` with the config's schedule, preceded by global-norm clipping; with
    `train.param_groups`, an `optax.multi_transform` over the groups (`prefix` is prepended
    to parameter paths when matching, e.g. "discriminator/" for a named part)."""
    groups = param_groups(train_cfg)
    chain = []
    if groups:
        labels = lambda p: group_labels(p, groups, prefix)  # noqa: E731
        frozen_ids = {str(i) for i, g in enumerate(groups) if g.get("optimizer") == FROZEN}
        chain.append(_zero_frozen(lambda u: jax.tree.map(lambda x: x in frozen_ids, labels(u))))
    if train_cfg.clip_norm and float(train_cfg.clip_norm) > 0:
        chain.append(optax.clip_by_global_norm(float(train_cfg.clip_norm)))
    if not groups:
        chain.append(_adamw(train_cfg))
        return optax.chain(*chain)
    txs = {"default": _adamw(train_cfg)}
    for i, g in enumerate(groups):
        if g.get("optimizer") == FROZEN:
            txs[str(i)] = optax.set_to_zero()
        else:
            txs[str(i)] = _adamw(train_cfg, float(g.get("lr_mult", 1.0)), g.get("weight_decay"))
    chain.append(optax.multi_transform(txs, labels))
    return optax.chain(*chain)
