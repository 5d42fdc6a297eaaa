"""Orbax checkpoints: train state + grain iterator state + config, async, keep last N.

A workdir holds one experiment. `check_compatible` compares this run's model facts with the
compatibility stamp of a workdir that holds checkpoints and refuses to go on (naming the
fields) if they differ, so a typo in `--workdir` never overwrites another model's checkpoints.
The stamp is written with the first checkpoint (`write_stamp`), so a run that fails before
its first checkpoint (a wrong `data.manual_dir`, say) leaves nothing that binds the next one.

Resuming also compares the saved config with this run's (`check_config_drift`): fields that
would break exact resumption (batch size, window length, packing, accumulation, seed) are
refused, other data/train changes are logged; and the stored tree is compared with this
model's train state before restoring (`state_differences`), so a mismatch names the parameter
or optimizer-state paths that differ instead of failing deep inside orbax.

All paths are `etils.epath` paths (`avjax.io.as_path`): a `gs://` workdir stays a URL.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from avjax.io import PathLike, as_path, write_text_atomic

STAMP = "compatibility.json"

# Config fields whose change makes a resumed run differ from an uninterrupted one (the data
# iterator position means other windows, or the step means another batch split).
RESUME_BREAKING = (
    "seed",
    "data.seq_len",
    "data.pack",
    "train.batch_size",
    "train.grad_accum",
)
# Sections whose other fields are compared and, when changed, logged as warnings.
DRIFT_SECTIONS = ("data", "train")
_NOT_COMPARED = ("train.reset_data_iterator",)


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model, shape, task or data setup."""


def checkpoint_dir(workdir: PathLike) -> epath.Path:
    """`<workdir>/checkpoints` (a URL stays a URL)."""
    return as_path(workdir) / "checkpoints"


def make_manager(
    workdir: PathLike, keep: int, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
    """A `CheckpointManager` with items `state`, `data` (grain iterator) and `config`.

    Writable managers create the folder and delete `*.orbax-checkpoint-tmp-*` leftovers of
    saves that a killed process never finished; read-only ones touch nothing.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max(int(keep), 1),
        save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=async_save and not read_only,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_names=("state", "data", "config")
    )


def latest_step(workdir: PathLike) -> int | None:
    """The newest finished checkpoint's step in `workdir`, or None; writes nothing."""
    folder = checkpoint_dir(workdir)
    if not folder.exists():
        return None
    return max(ocp.path.step.checkpoint_steps(folder), default=None)  # finalized ones only


def require_checkpoint(workdir: PathLike, mode: str) -> int:
    """The newest checkpoint's step; FileNotFoundError naming the train command if none."""
    step = latest_step(workdir)
    if step is None:
        raise FileNotFoundError(
            f"--mode={mode}: no checkpoint in {checkpoint_dir(workdir)}; train first with "
            f"the same --config and --mode=train --workdir={workdir}"
        )
    return step


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


def saved_compatibility(workdir: PathLike) -> dict[str, Any] | None:
    """The compatibility facts stored beside the checkpoints, or None if there are none."""
    path = checkpoint_dir(workdir) / STAMP
    if not path.exists():
        return None
    return json.loads(path.read_text())


def check_compatible(workdir: PathLike, compat: dict[str, Any]) -> None:
    """Raises CheckpointMismatchError if `workdir` holds checkpoints of another model.

    Only a workdir with a checkpoint binds: a stamp without one (left by a run that failed
    before its first checkpoint) is ignored and replaced by `write_stamp`. Writes nothing.
    """
    if latest_step(workdir) is None:
        return
    saved = saved_compatibility(workdir)
    if saved is None:
        raise CheckpointMismatchError(
            f"{checkpoint_dir(workdir)} holds checkpoints but no {STAMP}: not an avjax "
            "workdir (or a damaged one); choose another --workdir"
        )
    diffs = _diff(saved, json.loads(json.dumps(compat)))  # tuples -> lists, as stored
    if diffs:
        raise CheckpointMismatchError(
            f"--workdir={workdir} holds checkpoints of a different model; refusing to overwrite "
            "them. Differences (checkpoint vs this run):\n  " + "\n  ".join(diffs)
        )


def write_stamp(workdir: PathLike, compat: dict[str, Any]) -> None:
    """Writes the compatibility stamp (process 0, atomically) before the first checkpoint."""
    if jax.process_index() == 0:
        text = json.dumps(compat, indent=2, sort_keys=True)
        write_text_atomic(checkpoint_dir(workdir) / STAMP, text)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flat(v, name))
        else:
            out[name] = list(v) if isinstance(v, tuple) else v
    return out


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
    """The config saved with checkpoint `step` (JSON), or None if it has none."""
    try:
        restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except (FileNotFoundError, KeyError, ValueError):
        return None
    return restored.config


def config_drift(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """`(breaking, benign)` changes of `seed`, `data.*` and `train.*`, as "field: old -> new".

    Breaking ones (`RESUME_BREAKING`) make a resumed run differ from an uninterrupted one;
    fields present on one side only (a field added to the config since) are not compared.
    """
    sections = ("seed", *DRIFT_SECTIONS)
    old = _flat({k: saved[k] for k in sections if k in saved})
    new = _flat({k: current[k] for k in sections if k in current})
    breaking, benign = [], []
    for name in sorted(set(old) & set(new)):
        if name in _NOT_COMPARED or old[name] == new[name]:
            continue
        line = f"{name}: {old[name]!r} -> {new[name]!r}"
        (breaking if name in RESUME_BREAKING else benign).append(line)
    return breaking, benign


def check_config_drift(
    saved: dict[str, Any] | None, current: dict[str, Any], reset_data: bool, where: str
) -> None:
    """Refuses resume-breaking config changes since checkpoint `where`; logs the others.

    With `reset_data` (config.train.reset_data_iterator) breaking changes are allowed, as
    the data pipeline starts afresh anyway, and only logged.
    """
    if saved is None:
        return
    breaking, benign = config_drift(saved, current)
    if breaking and not reset_data:
        raise CheckpointMismatchError(
            f"the config changed since checkpoint {where} in fields that break exact "
            "resumption (checkpoint -> this run):\n  "
            + "\n  ".join(breaking)
            + "\nUse the checkpoint's values, another --workdir, or "
            "--config.train.reset_data_iterator=True to keep the parameters and optimizer "
            "state and start the data pipeline afresh."
        )
    for line in breaking + benign:
        logging.warning("Config changed since checkpoint %s: %s", where, line)


def _path_name(path: tuple) -> str:
    """ "params/blocks_0/mlp/kernel" for a tree path, whatever the node types."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {_path_name(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _listed(lines: list[str], limit: int = 12) -> list[str]:
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def state_differences(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> list[str]:
    """What differs between checkpoint `step`'s stored train state and `abstract_state`:
    parameter and optimizer-state paths missing on either side and shapes that differ."""
    meta = ocp.StandardCheckpointHandler().metadata(manager.directory / str(step) / "state")
    saved = _shapes(getattr(meta, "item_metadata", meta))
    want = _shapes(abstract_state)
    lines = [f"{k}: not in the checkpoint" for k in sorted(set(want) - set(saved))]
    lines += [f"{k}: in the checkpoint, not in this model" for k in sorted(set(saved) - set(want))]
    lines += [
        f"{k}: shape {saved[k]} in the checkpoint, {want[k]} in this model"
        for k in sorted(set(saved) & set(want))
        if saved[k] != want[k]
    ]
    params = [x for x in lines if x.startswith("params/")]
    opt = [x for x in lines if x.startswith("opt_state/")]
    other = [x for x in lines if x not in params and x not in opt]
    out = [f"parameters: {x}" for x in _listed(params)] + _listed(other)
    if opt:
        out.append(
            f"optimizer state: {len(opt)} paths differ (the optimizer chain changed, e.g. "
            "config.train.clip_norm or weight decay on/off):"
        )
        out += [f"  {x}" for x in _listed(opt, 6)]
    return out


def stored_tree(state: Any) -> Any:
    """What is checkpointed of a train state: a dataclass becomes a dict of its fields without
    the empty optional ones (`None`, `{}`), so checkpoints of runs without model state or EMA
    keep the `step/params/opt_state` layout of earlier versions."""
    if not dataclasses.is_dataclass(state):
        return state
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return {k: v for k, v in fields.items() if not (v is None or (isinstance(v, dict) and not v))}


def saved_process_count(manager: ocp.CheckpointManager, step: int) -> int | None:
    """How many processes wrote checkpoint `step`'s data iterator state (None if unknown)."""
    folder = manager.directory / str(step) / "data"
    for p in folder.glob("process_*-of-*.json"):
        m = re.fullmatch(r"process_\d+-of-(\d+)\.json", p.name)
        if m:
            return int(m.group(1))
    return None


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
            state=ocp.args.StandardSave(stored_tree(state)),
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
      CheckpointMismatchError: naming the parameter / optimizer-state paths whose presence
        or shape differ, or a data iterator state written by another number of processes.
    """
    where = f"{manager.directory}/{step}"
    stored = stored_tree(abstract_state)
    diffs = state_differences(manager, step, stored)
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {where} does not fit this run's train state:\n  " + "\n  ".join(diffs)
        )
    items = {"state": ocp.args.StandardRestore(stored)}
    if data_iter is not None:
        saved_n = saved_process_count(manager, step)
        if saved_n is not None and saved_n != jax.process_count():
            raise CheckpointMismatchError(
                f"checkpoint {where}: the data iterator state was saved by {saved_n} "
                f"process(es), this run has {jax.process_count()}; each process's position "
                "cannot be carried over. Set --config.train.reset_data_iterator=True to "
                "restore the parameters and optimizer state and start the data afresh."
            )
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointMismatchError(f"checkpoint {where} could not be restored: {e}") from e
    if dataclasses.is_dataclass(abstract_state):
        return dataclasses.replace(abstract_state, **restored.state)
    return restored.state


def newest_params(workdir: PathLike, field: str) -> tuple[Any, dict[str, Any] | None]:
    """`(params, saved config dict or None)` of the newest checkpoint in another workdir (a
    frozen expert, the previous training stage), as numpy arrays on the host.

    Args:
      workdir: the other run's workdir.
      field: the config field that named it (e.g. "model.sync_expert_workdir"), for errors.

    Raises:
      FileNotFoundError: naming `field`, the workdir and its checkpoint folder, if it holds
        no finished checkpoint.
    """
    import numpy as np

    step = latest_step(workdir)
    if step is None:
        raise FileNotFoundError(
            f"config.{field}={workdir}: no checkpoint under {checkpoint_dir(workdir)}"
        )
    state = ocp.StandardCheckpointer().restore(checkpoint_dir(workdir) / str(step) / "state")
    config = saved_config(make_manager(workdir, 1, read_only=True), step)
    return jax.tree.map(np.asarray, state["params"]), config


def load_init_params(path: PathLike, fresh_params: Any, skip: str = "") -> Any:
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
    import numpy as np

    root = as_path(path)
    src_dir = root / "params" if (root / "params").is_dir() else root
    if not src_dir.is_dir():
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
