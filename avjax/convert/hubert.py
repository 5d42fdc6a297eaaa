"""Import HuggingFace HuBERT weights into `avjax.nn.hubert.HubertEncoder`.

`from_hf_hubert(state_dict, hf_config)` takes a `HubertModel` state dict (torch tensors or
numpy arrays; keys with or without the `hubert.` prefix that `HubertForCTC` & co. use) and its
config (`transformers.HubertConfig` or the `config.json` dict) and returns `(model, variables)`
such that `model.apply(variables, wav)` equals `HubertModel(wav)` (eval mode).

The mapping is a renaming plus layout changes: torch `Linear.weight [out, in]` -> Flax
`kernel [in, out]`; `Conv1d.weight [out, in / groups, k]` -> `kernel [k, in / groups, out]`;
`LayerNorm/GroupNorm.weight` -> `scale`. The positional conv is weight-normalised in HF
(`weight_g`/`weight_v`, or `parametrizations.weight.original0/1` in newer PyTorch) with the
norm over every axis but the kernel axis (dim 2); it is folded here into one kernel
`w = g * v / ||v||`.

`load_hf_hubert(path)` reads a local directory (`config.json` + `model.safetensors` or
`pytorch_model.bin`, as `save_pretrained` writes or a hub snapshot holds); it never touches the
network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from absl import logging

from avjax.convert import common
from avjax.convert.common import index_shards
from avjax.nn.hubert import HubertConfig, HubertEncoder, param_shapes

# State-dict entries that hold no encoder weights: the SpecAugment mask embedding and the heads
# of HubertForCTC / HubertForSequenceClassification.
_IGNORED_KEYS = ("masked_spec_embed",)
_IGNORED_PREFIXES = ("lm_head.", "projector.", "classifier.", "layer_weights")

_POS = "encoder.pos_conv_embed.conv."
_WEIGHT_NORM_NAMES = (
    ("parametrizations.weight.original0", "parametrizations.weight.original1"),
    ("weight_g", "weight_v"),
)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, np.float32)


def fold_weight_norm(g: np.ndarray, v: np.ndarray, dim: int = 2) -> np.ndarray:
    """PyTorch weight norm: `g * v / ||v||`, the norm over every axis of `v` but `dim`."""
    axes = tuple(a for a in range(v.ndim) if a != dim)
    norm = np.sqrt(np.sum(np.square(v.astype(np.float64)), axis=axes, keepdims=True))
    return (g.astype(np.float64) * v / norm).astype(np.float32)


def _linear(w: np.ndarray) -> np.ndarray:
    return w.T


def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 1, 0))


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _key_map(cfg: HubertConfig) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """HF state-dict key -> (our parameter path, transform)."""
    m: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {}

    def norm(hf: str, ours: str) -> None:
        m[f"{hf}.weight"] = (f"{ours}/scale", _same)
        m[f"{hf}.bias"] = (f"{ours}/bias", _same)

    def linear(hf: str, ours: str) -> None:
        m[f"{hf}.weight"] = (f"{ours}/kernel", _linear)
        m[f"{hf}.bias"] = (f"{ours}/bias", _same)

    for i in range(len(cfg.conv_dim)):
        hf, ours = f"feature_extractor.conv_layers.{i}", f"feature_extractor/conv_layers_{i}"
        m[f"{hf}.conv.weight"] = (f"{ours}/conv/kernel", _conv)
        if cfg.conv_bias:
            m[f"{hf}.conv.bias"] = (f"{ours}/conv/bias", _same)
        if cfg.feat_extract_norm == "layer" or i == 0:
            norm(f"{hf}.layer_norm", f"{ours}/layer_norm")
    if cfg.feat_proj_layer_norm:
        norm("feature_projection.layer_norm", "feature_projection_layer_norm")
    linear("feature_projection.projection", "feature_projection")
    m[_POS + "weight"] = ("pos_conv_embed/conv/kernel", _conv)  # after weight-norm folding
    m[_POS + "bias"] = ("pos_conv_embed/conv/bias", _same)
    norm("encoder.layer_norm", "encoder_layer_norm")
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"encoder.layers.{i}", f"layers_{i}"
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{hf}.attention.{p}", f"{ours}/attention/{p}")
        norm(f"{hf}.layer_norm", f"{ours}/layer_norm")
        norm(f"{hf}.final_layer_norm", f"{ours}/final_layer_norm")
        linear(f"{hf}.feed_forward.intermediate_dense", f"{ours}/feed_forward/intermediate_dense")
        linear(f"{hf}.feed_forward.output_dense", f"{ours}/feed_forward/output_dense")
    return m


def _normalise_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Numpy float32 values; the `hubert.` prefix stripped; head / mask entries dropped."""
    keys = list(state_dict)
    prefixed = any(k.startswith("hubert.") for k in keys)
    out: dict[str, np.ndarray] = {}
    dropped = []
    for k in keys:
        name = k
        if prefixed:
            if not k.startswith("hubert."):
                if k.startswith(_IGNORED_PREFIXES) or k in _IGNORED_KEYS:
                    dropped.append(k)
                    continue
                raise ValueError(
                    f"unexpected key {k!r} in a HuBERT state dict whose encoder keys start "
                    "with 'hubert.'"
                )
            name = k[len("hubert.") :]
        if name in _IGNORED_KEYS or name.startswith(_IGNORED_PREFIXES):
            dropped.append(k)
            continue
        out[name] = _to_numpy(state_dict[k])
    if dropped:
        logging.info("HuBERT import: ignoring %d non-encoder entries: %s", len(dropped), dropped)
    return out


def _fold_pos_conv(sd: dict[str, np.ndarray]) -> None:
    """Replaces the weight-norm pair of the positional conv by its folded `weight` (in place)."""
    for g_name, v_name in _WEIGHT_NORM_NAMES:
        g_key, v_key = _POS + g_name, _POS + v_name
        if g_key in sd or v_key in sd:
            if g_key not in sd or v_key not in sd:
                raise ValueError(
                    f"HuBERT state dict has only one of the weight-norm pair {g_key!r} / {v_key!r}"
                )
            if _POS + "weight" in sd:
                raise ValueError(
                    f"HuBERT state dict has both {_POS}weight and the weight-norm pair {g_key}"
                )
            g, v = sd.pop(g_key), sd.pop(v_key)
            if g.shape != (1, 1, v.shape[2]):
                raise ValueError(
                    f"{g_key} has shape {g.shape}; expected (1, 1, {v.shape[2]}) (weight norm "
                    f"over dim 2 of {v_key} {v.shape})"
                )
            sd[_POS + "weight"] = fold_weight_norm(g, v, dim=2)


def convert_state_dict(state_dict: Mapping[str, Any], config: HubertConfig) -> dict[str, Any]:
    """HF `HubertModel` state dict -> our `params` tree (nested dicts of float32 jnp arrays).

    Raises:
      ValueError: naming every missing key, every unexpected key, or the first shape mismatch
        (HF key, its shape, the shape our model expects).
    """
    sd = _normalise_keys(state_dict)
    _fold_pos_conv(sd)
    kmap = _key_map(config)
    missing = sorted(set(kmap) - set(sd))
    extra = sorted(set(sd) - set(kmap))
    if missing or extra:
        msg = []
        if missing:
            msg.append(f"missing keys {missing}")
        if extra:
            msg.append(f"unexpected keys {extra}")
        raise ValueError(
            "HuBERT state dict does not match the config "
            f"({config.num_hidden_layers} layers, {len(config.conv_dim)} conv layers, "
            f"feat_extract_norm={config.feat_extract_norm!r}, conv_bias={config.conv_bias}): "
            + "; ".join(msg)
        )
    expected = param_shapes(config)
    return common.place_checked(
        ((hf_key, path, fn(sd[hf_key])) for hf_key, (path, fn) in kmap.items()),
        {p: tuple(s) for p, s in expected.items()},
        "HuBERT",
    )


def from_hf_hubert(
    state_dict: Mapping[str, Any], hf_config: Any, dtype: Any = None
) -> tuple[HubertEncoder, dict[str, Any]]:
    """Returns `(model, variables)` equivalent to `transformers.HubertModel(hf_config)`."""
    config = hf_config if isinstance(hf_config, HubertConfig) else HubertConfig.from_hf(hf_config)
    model = HubertEncoder(config, dtype=dtype)
    return model, {"params": convert_state_dict(state_dict, config)}


def read_hf_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The weights in a local HF model dir: `model.safetensors` (preferred, also sharded with
    `model.safetensors.index.json`) or `pytorch_model.bin` (read with torch, weights only)."""
    path = os.fspath(path)
    st = os.path.join(path, "model.safetensors")
    st_index = os.path.join(path, "model.safetensors.index.json")
    pt = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st) or os.path.exists(st_index):
        files = [st]
        if not os.path.exists(st):
            files = index_shards(path, st_index)
        out: dict[str, Any] = {}
        for file in files:
            out.update(_read_safetensors(file))
        return out
    if os.path.exists(pt):
        import torch

        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _read_safetensors(file: str) -> dict[str, Any]:
    try:
        from safetensors.numpy import load_file

        return dict(load_file(file))
    except (TypeError, ValueError):  # e.g. bfloat16, which numpy cannot hold: go through torch
        from safetensors.torch import load_file as load_torch

        return dict(load_torch(file))


def load_hf_hubert(
    path: str | os.PathLike, dtype: Any = None
) -> tuple[HubertEncoder, dict[str, Any]]:
    """`(model, variables)` from a local HF HuBERT directory (no network access).

    Raises:
      FileNotFoundError: the directory, its `config.json` or its weights file is missing.
      ValueError: the config is not a HuBERT config or the weights do not match it.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: HuBERT model directory not found")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: HuBERT config.json not found")
    with open(cfg_path) as f:
        hf_config = json.load(f)
    model_type = hf_config.get("model_type")
    if model_type not in (None, "hubert"):
        raise ValueError(f"{cfg_path}: model_type is {model_type!r}, expected 'hubert'")
    try:
        return from_hf_hubert(read_hf_state_dict(path), hf_config, dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
