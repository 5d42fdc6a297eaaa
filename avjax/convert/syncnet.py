"""SyncNet v2 weights (joonson/syncnet_python's `syncnet_v2.model`) -> `avjax.nn.syncnet.SyncNetV2`.

The released file is a PyTorch state dict of the module `S` (keys such as
`netcnnaud.0.weight`, `netcnnlip.1.running_mean`, `netfclip.3.bias`). It is read with
`torch.load(weights_only=True)` (no pickled code runs); nothing is downloaded: the user
supplies the file. Conv kernels go from `[out, in, *k]` to `[*k, in, out]`, linear weights are
transposed, BatchNorm `weight/bias/running_mean/running_var` become `scale/bias` params and
`mean/var` batch statistics; `num_batches_tracked` is dropped.

    variables, report = load_syncnet_v2("/path/syncnet_v2.model")
    lip_emb, aud_emb = SyncNetV2().apply(variables, lips, mfcc)

`report["unmapped"]` lists the file's tensors that have no place in the module (a prefix such
as `module.` or `__S__.` is stripped first); `report["missing"]` the module's that the file
lacks (an error unless `strict=False`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from avjax.nn.syncnet import SyncNetV2

_KEY = re.compile(r"^(netcnnaud|netfcaud|netcnnlip|netfclip)\.(\d+)\.(\w+)$")
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias")}
_STATS = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _strip(key: str) -> str:
    for prefix in ("module.", "__S__.", "S."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _target(key: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray] | None:
    """The (collection, module, leaf) path and converted array of one torch tensor."""
    m = _KEY.match(key)
    if m is None:
        return None
    seq, idx, leaf = m.groups()
    module = f"{seq}_{idx}"
    if leaf == "weight" and value.ndim >= 2:  # conv or linear
        if value.ndim == 2:
            return ("params", module, "kernel"), value.T
        return ("params", module, "kernel"), np.moveaxis(value, (0, 1), (-1, -2))
    if leaf == "bias" and not _is_bn(seq, int(idx)):
        return ("params", module, "bias"), value
    if leaf in _BN:
        col, name = _BN[leaf]
        return (col, module, name), value
    if leaf in _STATS:
        col, name = _STATS[leaf]
        return (col, module, name), value
    return None


def _is_bn(seq: str, idx: int) -> bool:
    if seq.startswith("netfc"):
        return idx == 1
    return idx in (1, 5, 9, 12, 15, 19)


def convert_state_dict(
    state_dict: Mapping[str, Any], embed_dim: int = 1024, strict: bool = True
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Torch state dict -> (`{"params", "batch_stats"}` of `SyncNetV2`, report).

    Raises:
      ValueError: a tensor's shape differs from the module's, or (strict) the file lacks some
        of the module's tensors; both name the keys.
    """
    want = jax.eval_shape(
        lambda: SyncNetV2(embed_dim).init(
            jax.random.key(0), jnp.zeros((1, 5, 224, 224, 3)), jnp.zeros((1, 13, 20))
        )
    )
    want = flax.traverse_util.flatten_dict(flax.linen.unbox(flax.core.unfreeze(want)))
    got: dict[tuple[str, ...], np.ndarray] = {}
    unmapped, bad = [], []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        hit = _target(_strip(key), _np(value).astype(np.float32))
        if hit is None or hit[0] not in want:
            unmapped.append(key)
            continue
        path, arr = hit
        if arr.shape != tuple(want[path].shape):
            bad.append(f"{key}: {arr.shape} -> {'/'.join(path)} wants {want[path].shape}")
        got[path] = arr
    missing = sorted("/".join(p) for p in want if p not in got)
    if bad:
        raise ValueError("SyncNet v2 tensors of the wrong shape: " + "; ".join(bad))
    if missing and strict:
        raise ValueError(f"SyncNet v2 weights lack {len(missing)} tensors: {missing[:8]} ...")
    variables = flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in got.items()})
    return variables, {"unmapped": sorted(unmapped), "missing": missing}


def load_syncnet_v2(
    path: str | os.PathLike, strict: bool = True
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Reads a user-supplied `syncnet_v2.model` (torch, `weights_only=True`) and converts it.

    Raises:
      FileNotFoundError: `path` does not exist (naming it and where the file comes from).
    """
    import torch

    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: no SyncNet v2 weights (the `syncnet_v2.model` file of "
            "joonson/syncnet_python; nothing is downloaded, supply it yourself)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if hasattr(state, "state_dict"):
        state = state.state_dict()
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return convert_state_dict(state, strict=strict)
