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


def load_init_params(path: str, fresh_params: Any, skip: str = "") -> Any:
    """Initial parameters from a parameters-only checkpoint (`path/params`, orbax), e.g. one
    written by `tools/convert_recurrentgemma.py`, placed like `fresh_params`.

    Args:
      path: directory holding `params` (or an orbax params checkpoint itself).
      fresh_params: the freshly initialised (sharded) params; gives the tree, shapes, dtypes
        and shardings, and the values of skipped parameters.
      skip: a regular expression over parameter paths ("blocks_0/mlp/ffw_down/kernel") that
        keep their fresh values, e.g. "^embedding$" for a new vocabulary.

    Raises:
      ValueError: naming every parameter that is missing, extra or of another shape.
    """
    import re

    import numpy as np

    root = os.path.abspath(path)
    src_dir = os.path.join(root, "params") if os.path.isdir(os.path.join(root, "params")) else root
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"config.train.init_from={path}: no such directory")
    source = ocp.StandardCheckpointer().restore(src_dir)

    def flat(tree: Any) -> dict[str, Any]:
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {
            "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in kp): v
            for kp, v in leaves
        }

    src, dst = flat(source), flat(fresh_params)
    pattern = re.compile(skip) if skip else None
    skipped = {k for k in dst if pattern is not None and pattern.search(k)}
    problems = [f"{k}: missing in {src_dir}" for k in dst if k not in src and k not in skipped]
    problems += [
        f"{k}: in {src_dir} but not in the model"
        for k in src
        if k not in dst and not (pattern is not None and pattern.search(k))
    ]
    problems += [
        f"{k}: shape {tuple(src[k].shape)} in {src_dir}, model expects {tuple(dst[k].shape)}"
        for k in dst
        if k in src and k not in skipped and tuple(src[k].shape) != tuple(dst[k].shape)
    ]
    if problems:
        raise ValueError(
            "config.train.init_from does not fit the model (config.train.init_skip can keep "
            "parameters fresh):\n  " + "\n  ".join(problems)
        )

    def place(kp, fresh):
        key = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in kp)
        if key in skipped:
            return fresh
        value = np.asarray(src[key]).astype(fresh.dtype)
        return jax.make_array_from_callback(value.shape, fresh.sharding, lambda i: value[i])

    logging.info(
        "Initialised %d parameters from %s; kept fresh: %s",
        len(dst) - len(skipped),
        src_dir,
        sorted(skipped) or "none",
    )
    return jax.tree_util.tree_map_with_path(place, fresh_params)
