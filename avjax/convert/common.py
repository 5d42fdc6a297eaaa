"""The on-disk layout of converted weights, shared by every converter.

A converted model is a directory with `params` (an orbax `StandardCheckpointer` tree, float32)
and `model.json` (the module's constructor fields). `config.train.init_from=DIR` reads the
`params` of such a directory.
"""

from __future__ import annotations

import json
import os
from typing import Any


def save_params_dir(out_dir: str, fields: dict[str, Any], params: Any) -> None:
    """Writes `out_dir/model.json` (`fields`) and `out_dir/params` (orbax)."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "model.json"), "w") as f:
        json.dump(fields, f, indent=2)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(out_dir, "params"), params, force=True)
    ckpt.wait_until_finished()


def load_params_dir(out_dir: str, tool: str) -> tuple[dict[str, Any], Any]:
    """Reads `(fields, params)` written by `save_params_dir`; `tool` names the writer in errors.

    Raises:
      FileNotFoundError: naming `model.json` and the tool that writes it.
    """
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    meta = os.path.join(out_dir, "model.json")
    if not os.path.exists(meta):
        raise FileNotFoundError(f"{meta} not found: expected a directory written by {tool}")
    with open(meta) as f:
        fields = json.load(f)
    return fields, ocp.StandardCheckpointer().restore(os.path.join(out_dir, "params"))
