"""Orbax checkpoints: train state + grain iterator state + config, async, keep last N.

A workdir holds one experiment. Before anything is written, `check_compatible` compares the
saved config's model facts with this run's and refuses to go on (naming the fields) if they
differ, so a typo in `--workdir` never overwrites another model's checkpoints.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model, shape or task."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """A `CheckpointManager` with items `state`, `data` (grain iterator) and `config`."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(int(keep), 1),
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=options,
        item_names=("state", "data", "config"),
    )


def _diff(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON-like trees."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in saved:
                out.append(f"{name}: not in checkpoint, now {current[k]!r}")
            elif k not in current:
                out.append(f"{name}: {saved[k]!r} in checkpoint, absent now")
            else:
                out += _diff(saved[k], current[k], name)
        return out
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        saved, current = list(saved), list(current)
    return [] if saved == current else [f"{prefix}: {saved!r} in checkpoint, now {current!r}"]


def saved_compatibility(workdir: str) -> dict[str, Any] | None:
    """The compatibility facts stored beside the checkpoints, or None for a fresh workdir."""
    path = os.path.join(checkpoint_dir(workdir), "compatibility.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_compatible(workdir: str, compat: dict[str, Any]) -> None:
    """Raises CheckpointMismatchError if `workdir` holds checkpoints of another model.

    Writes the compatibility stamp for a fresh workdir (process 0 only).
    """
    compat = json.loads(json.dumps(compat))  # tuples -> lists, as stored
    saved = saved_compatibility(workdir)
    if saved is None:
        ckpt = checkpoint_dir(workdir)
        if os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt)):
            raise CheckpointMismatchError(
                f"{ckpt} holds checkpoints but no compatibility.json: not an avjax workdir "
                "(or a damaged one); choose another --workdir"
            )
        if jax.process_index() == 0:
            os.makedirs(checkpoint_dir(workdir), exist_ok=True)
            tmp = os.path.join(checkpoint_dir(workdir), "compatibility.json.tmp")
            with open(tmp, "w") as f:
                json.dump(compat, f, indent=2, sort_keys=True)
            os.replace(tmp, tmp[: -len(".tmp")])
        return
    diffs = _diff(saved, compat)
    if diffs:
        raise CheckpointMismatchError(
            f"--workdir={workdir} holds checkpoints of a different model; refusing to overwrite "
            "them. Differences (checkpoint vs this run):\n  " + "\n  ".join(diffs)
        )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iter: grain.DatasetIterator,
    config_dict: dict[str, Any],
    force: bool = False,
) -> bool:
    """Saves (asynchronously) the train state, the data iterator position and the config."""
    saved = manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config_dict),
        ),
        force=force,
    )
    if saved:
        logging.info("Saving checkpoint at step %d to %s", step, manager.directory)
    return saved


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: Any,
    data_iter: grain.DatasetIterator | None = None,
) -> Any:
    """Restores state onto the shardings of `abstract_state` (and the iterator, in place).

    Raises:
      CheckpointMismatchError: the stored tree's structure or shapes differ from this model's.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointMismatchError(
            f"checkpoint {manager.directory}/{step} does not match this model's parameters "
            f"(shapes or structure): {e}"
        ) from e
    return restored.state
