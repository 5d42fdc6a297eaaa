"""The on-disk layout of converted weights, shared by every converter.

A converted model is a directory with `params` (an orbax `StandardCheckpointer` tree, float32)
and `model.json` (the module's constructor fields). `config.train.init_from=DIR` reads the
`params` of such a directory.

Writing is all-or-nothing: `save_params_dir` builds the new directory under a unique temporary
name next to the output (`params` first, `model.json` last, so a directory with a `model.json`
is complete) and only then moves it into place. An existing output is replaced once the new
one is complete; a failure (or a kill) before that leaves it as it was.

Reading a HF checkpoint's shard index (`model.safetensors.index.json`) goes through
`index_shards`, which refuses `weight_map` entries that point outside the model folder.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

from absl import logging
from etils import epath

from avjax.io import PathLike, as_path, unique_tmp

# What a converted model directory holds; anything else in an existing output means it is not
# ours to replace.
_CONTENTS = ("model.json", "params")


def relative_inside(entry: Any, what: str) -> str:
    """`entry` if it is a relative path that stays inside its folder, else `ValueError`.

    Refuses absolute paths, `..` components, URLs, empty names and NUL bytes; `what` names the
    entry in the error (e.g. `"model.safetensors.index.json: weight_map['lm_head.weight']"`).
    """
    reason = None
    if not isinstance(entry, str) or not entry.strip():
        reason = "expected a non-empty file name"
    elif "\x00" in entry:
        reason = "contains a NUL byte"
    elif "://" in entry:
        reason = "is a URL"
    else:
        parts = pathlib.PurePosixPath(entry.replace("\\", "/")).parts
        if entry.startswith(("/", "\\")) or os.path.isabs(entry):
            reason = "is an absolute path"
        elif ".." in parts:
            reason = "contains '..'"
        elif not parts or all(p == "." for p in parts):
            reason = "names the folder itself"
    if reason is not None:
        raise ValueError(f"{what} = {entry!r} {reason}: it must be a path inside the folder")
    return entry


def index_shards(folder: str, index_file: str) -> list[str]:
    """The shard files a safetensors index lists, as paths under `folder` (sorted, unique).

    Raises:
      ValueError: the index has no `weight_map`, or an entry escapes `folder` (named).
    """
    with open(index_file) as f:
        index = json.load(f)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file}: no 'weight_map' (tensor name -> shard file)")
    name = os.path.basename(index_file)
    files = {
        os.path.join(folder, relative_inside(rel, f"{name}: weight_map[{key!r}]"))
        for key, rel in weight_map.items()
    }
    return sorted(files)


def _check_replaceable(out: epath.Path) -> None:
    """Refuses to replace something that is not a converted model directory."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory: choose another output")
    other = sorted(p.name for p in out.iterdir() if p.name not in _CONTENTS)
    if other:
        raise FileExistsError(
            f"{out} exists and is not a converted model directory (it holds {other[:5]}): "
            "choose another output or remove it"
        )


def _swap_into_place(new: epath.Path, out: epath.Path) -> None:
    """Moves the complete directory `new` to `out`, replacing an existing `out`.

    The old `out` is renamed aside first and deleted only after `new` is in place; if moving
    `new` fails, the old one is put back.
    """
    if not out.exists():
        new.rename(out)
        return
    old = unique_tmp(out)
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    old.rmtree()


def _remove_stale_tmps(out: epath.Path) -> None:
    """Removes `out.tmp-*` folders left by conversions killed mid-write.

    A complete one (with `model.json`) is removed only while `out` itself exists: a kill
    between moving the old output aside and moving the new one in leaves the only complete
    copy in such a folder, which is then kept (and named).
    """
    stale = sorted(out.parent.glob(f"{out.name}.tmp-*")) if out.parent.exists() else []
    for p in stale:
        if (p / "model.json").exists() and not out.exists():
            logging.warning("%s is missing; kept %s (an earlier complete conversion)", out, p)
            continue
        logging.info("Removing %s (left by a killed conversion)", p)
        p.rmtree()


def save_params_dir(out_dir: PathLike, fields: dict[str, Any], params: Any) -> None:
    """Writes `out_dir/params` (orbax) and then `out_dir/model.json` (`fields`), atomically.

    Everything is written to a unique temporary directory next to `out_dir` and moved into
    place at the end; an existing `out_dir` (a previous conversion) is replaced only then.

    Raises:
      FileExistsError: `out_dir` exists and holds more than a converted model.
    """
    import orbax.checkpoint as ocp

    out = as_path(out_dir)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmps(out)
    tmp = unique_tmp(out)
    ckpt = ocp.StandardCheckpointer()
    try:
        tmp.mkdir()
        ckpt.save(tmp / "params", params)
        ckpt.wait_until_finished()
        (tmp / "model.json").write_text(json.dumps(fields, indent=2))  # last: marks it complete
        _swap_into_place(tmp, out)
    finally:
        try:  # a failed save may still be writing in the background: let it end first
            ckpt.close()
        finally:
            if tmp.exists():
                tmp.rmtree()


def load_params_dir(out_dir: PathLike, tool: str) -> tuple[dict[str, Any], Any]:
    """Reads `(fields, params)` written by `save_params_dir`; `tool` names the writer in errors.

    Raises:
      FileNotFoundError: naming `model.json` and the tool that writes it.
    """
    import orbax.checkpoint as ocp

    out = as_path(out_dir)
    meta = out / "model.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta} not found: expected a directory written by {tool}")
    fields = json.loads(meta.read_text())
    return fields, ocp.StandardCheckpointer().restore(out / "params")


def place_checked(
    converted: Iterator[tuple[str, str, Any]], expected: dict[str, tuple[int, ...]], what: str
) -> dict[str, Any]:
    """The nested parameter tree of `converted` (source key, our "a/b/kernel" path, array),
    each array checked against `expected[path]` as it comes, so a conversion streams tensor
    by tensor.

    Raises:
      ValueError: naming the source key, its shape and the expected shape, on a mismatch.
      AssertionError: when a path of `expected` is never filled (a bug in the key map, not
        in the user's file).
    """
    import jax.numpy as jnp

    tree: dict[str, Any] = {}
    for key, path, value in converted:
        want = tuple(expected[path])
        if tuple(value.shape) != want:
            raise ValueError(
                f"{what} weight {key!r} gives shape {tuple(value.shape)}, but the config "
                f"expects {path} of shape {want}"
            )
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    filled = {"/".join(k) for k in _paths(tree)}
    unset = sorted(set(expected) - filled)
    if unset:
        raise AssertionError(f"{what} key map leaves parameters unset: {unset}")
    return tree


def _paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))
        else:
            yield (*prefix, k)
