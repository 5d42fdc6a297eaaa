"""Import HuggingFace `MambaForCausalLM` weights into `avjax.models.mamba.MambaLM`.

`from_hf_mamba(state_dict, hf_config)` takes the PyTorch state dict (torch tensors or numpy
arrays) and the config (`transformers.MambaConfig` or the `config.json` dict) and returns our
module and variables such that

    logits, _ = model.apply(variables, tokens)

equals `MambaForCausalLM(hf_config)(tokens).logits`. `load_hf_mamba(path)` does the same from a
local directory (`config.json` + `model.safetensors`, sharded safetensors, or
`pytorch_model.bin`); nothing is downloaded. transformers itself is not needed.

Name mapping (HF -> ours, `i` the layer):
  backbone.embeddings.weight [V, D]            -> embedding [V, D]
  backbone.layers.i.norm.weight [D]            -> blocks_i/norm/scale
  ...mixer.in_proj.weight [2E, D] (+ bias)     -> blocks_i/mixer/in_proj_kernel [D, 2, E]
  ...mixer.conv1d.weight [E, 1, K] (+ bias)    -> blocks_i/mixer/conv1d/w [K, E], b [E]
  ...mixer.x_proj.weight [R + 2N, E]           -> blocks_i/mixer/x_proj/kernel [E, R + 2N]
  ...mixer.dt_proj.weight [E, R], bias [E]     -> blocks_i/mixer/dt_proj/kernel [R, E], bias
  ...mixer.A_log [E, N], D [E]                 -> blocks_i/mixer/A_log, D
  ...mixer.out_proj.weight [D, E] (+ bias)     -> blocks_i/mixer/out_proj/kernel [E, D]
  backbone.norm_f.weight [D]                   -> final_norm/scale
  lm_head.weight [V, D] (untied only)          -> lm_head [D, V]

`save_converted` / `load_converted` write and read `DIR/params` (orbax) + `DIR/model.json`
(the MambaLM fields); `tools/convert_mamba.py` is the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from avjax.convert.common import index_shards, load_params_dir, save_params_dir
from avjax.models.mamba import MambaConfig, MambaLM

_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(MambaConfig))


def _cfg(hf_config: Any, key: str, default: Any = None) -> Any:
    if isinstance(hf_config, Mapping):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


def model_from_config(hf_config: Any, dtype: Any = jnp.float32, **overrides: Any) -> MambaLM:
    """Our `MambaLM` with the architecture of a HF `MambaConfig` (object or config.json dict)."""
    act = _cfg(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act={act!r}: only 'silu' is supported (Mamba's activation)")
    d_model = int(_cfg(hf_config, "hidden_size"))
    expand = int(_cfg(hf_config, "expand", 2))
    d_inner = int(_cfg(hf_config, "intermediate_size", None) or expand * d_model)
    rank = _cfg(hf_config, "time_step_rank", "auto")
    rank = math.ceil(d_model / 16) if rank in (None, "auto") else int(rank)
    arch = MambaConfig(
        vocab_size=int(_cfg(hf_config, "vocab_size")),
        d_model=d_model,
        num_layers=int(_cfg(hf_config, "num_hidden_layers")),
        d_state=int(_cfg(hf_config, "state_size", 16)),
        conv_width=int(_cfg(hf_config, "conv_kernel", 4)),
        expand=expand,
        d_inner=d_inner,
        dt_rank=rank,
        use_bias=bool(_cfg(hf_config, "use_bias", False)),
        norm_eps=float(_cfg(hf_config, "layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(_cfg(hf_config, "tie_word_embeddings", True)),
        residual_in_fp32=bool(_cfg(hf_config, "residual_in_fp32", True)),
    )
    arch = dataclasses.replace(arch, **{k: v for k, v in overrides.items() if k in _MODEL_FIELDS})
    options = {k: v for k, v in overrides.items() if k not in _MODEL_FIELDS}
    return arch.make(dtype=dtype, **options)


def _to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any dtype, bfloat16 included) or array-like as a float32 numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) != "torch.float32":
            x = x.float()
        return x.numpy()
    return np.asarray(x, np.float32)


def _expected_hf_shapes(model: MambaLM, use_conv_bias: bool) -> dict[str, tuple[int, ...]]:
    v, d, e = model.vocab_size, model.d_model, model.inner
    n, r, k = model.d_state, model.rank, model.conv_width
    shapes: dict[str, tuple[int, ...]] = {
        "backbone.embeddings.weight": (v, d),
        "backbone.norm_f.weight": (d,),
    }
    for i in range(model.num_layers):
        p = f"backbone.layers.{i}."
        m = p + "mixer."
        shapes[p + "norm.weight"] = (d,)
        shapes[m + "in_proj.weight"] = (2 * e, d)
        shapes[m + "conv1d.weight"] = (e, 1, k)
        shapes[m + "x_proj.weight"] = (r + 2 * n, e)
        shapes[m + "dt_proj.weight"] = (e, r)
        shapes[m + "dt_proj.bias"] = (e,)
        shapes[m + "A_log"] = (e, n)
        shapes[m + "D"] = (e,)
        shapes[m + "out_proj.weight"] = (d, e)
        if use_conv_bias:
            shapes[m + "conv1d.bias"] = (e,)
        if model.use_bias:
            shapes[m + "in_proj.bias"] = (2 * e,)
            shapes[m + "out_proj.bias"] = (d,)
    if not model.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def convert_state_dict(
    state_dict: Mapping[str, Any], model: MambaLM, use_conv_bias: bool = True
) -> dict[str, Any]:
    """Maps a HF Mamba state dict onto `model`'s params tree (float32 jax arrays).

    Raises `KeyError` naming missing or unexpected keys and `ValueError` naming a key whose
    shape differs from the one the config implies.
    """
    sd = dict(state_dict)
    if "backbone.embedding.weight" in sd and "backbone.embeddings.weight" not in sd:
        sd["backbone.embeddings.weight"] = sd.pop("backbone.embedding.weight")  # old name
    expected = _expected_hf_shapes(model, use_conv_bias)
    optional = set()
    if model.tie_embeddings:
        optional.add("lm_head.weight")  # a copy of the embedding when present
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected) - optional)
    if missing:
        raise KeyError(f"HF Mamba state dict: missing {missing}")
    if extra:
        raise KeyError(f"HF Mamba state dict: unexpected {extra}")
    arrays = {}
    for key, shape in expected.items():
        x = _to_numpy(sd[key])
        if tuple(x.shape) != shape:
            raise ValueError(
                f"HF Mamba state dict: {key} has shape {list(x.shape)}, expected "
                f"{list(shape)} from the config"
            )
        arrays[key] = x
    e, d = model.inner, model.d_model
    a = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    params: dict[str, Any] = {
        "embedding": a(arrays["backbone.embeddings.weight"]),
        "final_norm": {"scale": a(arrays["backbone.norm_f.weight"])},
    }
    for i in range(model.num_layers):
        p = f"backbone.layers.{i}."
        m = p + "mixer."
        conv_w = arrays[m + "conv1d.weight"][:, 0, :].T  # [K, E]
        conv_b = arrays[m + "conv1d.bias"] if use_conv_bias else np.zeros((e,), np.float32)
        mixer: dict[str, Any] = {
            "in_proj_kernel": a(arrays[m + "in_proj.weight"].T.reshape(d, 2, e)),
            "conv1d": {"w": a(conv_w), "b": a(conv_b)},
            "x_proj": {"kernel": a(arrays[m + "x_proj.weight"].T)},
            "dt_proj": {
                "kernel": a(arrays[m + "dt_proj.weight"].T),
                "bias": a(arrays[m + "dt_proj.bias"]),
            },
            "A_log": a(arrays[m + "A_log"]),
            "D": a(arrays[m + "D"]),
            "out_proj": {"kernel": a(arrays[m + "out_proj.weight"].T)},
        }
        if model.use_bias:
            mixer["in_proj_bias"] = a(arrays[m + "in_proj.bias"].reshape(2, e))
            mixer["out_proj"]["bias"] = a(arrays[m + "out_proj.bias"])
        params[f"blocks_{i}"] = {"norm": {"scale": a(arrays[p + "norm.weight"])}, "mixer": mixer}
    if not model.tie_embeddings:
        params["lm_head"] = a(arrays["lm_head.weight"].T)
    return params


def from_hf_mamba(
    state_dict: Mapping[str, Any], hf_config: Any, dtype: Any = jnp.float32
) -> tuple[MambaLM, dict[str, Any]]:
    """Returns `(model, variables)` equivalent to HF `MambaForCausalLM(hf_config)` with
    `state_dict` loaded. `hf_config`: a `transformers.MambaConfig` or its config.json dict."""
    model = model_from_config(hf_config, dtype)
    use_conv_bias = bool(_cfg(hf_config, "use_conv_bias", True))
    return model, {"params": convert_state_dict(state_dict, model, use_conv_bias)}


def read_hf_state_dict(path: str) -> dict[str, np.ndarray]:
    """The weights in a local HF model directory as float32 numpy arrays.

    Reads `model.safetensors`, `model.safetensors.index.json` (shards) or `pytorch_model.bin`.
    """
    path = os.path.abspath(path)
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(single) or os.path.exists(index):
        from safetensors import safe_open

        if os.path.exists(single):
            files = [single]
        else:
            files = index_shards(path, index)
        out: dict[str, np.ndarray] = {}
        for name in files:
            if not os.path.exists(name):
                raise FileNotFoundError(f"{name} (listed in {index}) not found")
            try:  # torch reads every dtype, bfloat16 included
                import torch  # noqa: F401

                with safe_open(name, framework="pt") as f:
                    out.update({k: _to_numpy(f.get_tensor(k)) for k in f.keys()})
            except ImportError:
                with safe_open(name, framework="np") as f:
                    out.update({k: _to_numpy(f.get_tensor(k)) for k in f.keys()})
        return out
    if os.path.exists(binary):
        import torch

        sd = torch.load(binary, map_location="cpu", weights_only=True)
        return {k: _to_numpy(v) for k, v in sd.items()}
    raise FileNotFoundError(
        f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def load_hf_mamba(path: str, dtype: Any = jnp.float32) -> tuple[MambaLM, dict[str, Any]]:
    """`from_hf_mamba` on a local directory as written by `save_pretrained` (no network)."""
    path = os.path.abspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: expected a HF Mamba model directory")
    with open(cfg_path) as f:
        hf_config = json.load(f)
    if hf_config.get("model_type", "mamba") != "mamba":
        raise ValueError(f"{cfg_path}: model_type={hf_config['model_type']!r}, expected 'mamba'")
    return from_hf_mamba(read_hf_state_dict(path), hf_config, dtype)


def save_converted(model: MambaLM, variables: dict[str, Any], out_dir: str) -> None:
    """Writes `out_dir/params` (orbax, float32) and `out_dir/model.json` (MambaLM fields)."""
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    save_params_dir(
        out_dir, {k: fields[k] for k in _MODEL_FIELDS}, variables.get("params", variables)
    )


def load_converted(out_dir: str, dtype: Any = jnp.float32) -> tuple[MambaLM, dict[str, Any]]:
    """Reads what `save_converted` wrote: `(model, {"params": ...})`."""
    kw, params = load_params_dir(out_dir, "tools/convert_mamba.py")
    unknown = sorted(set(kw) - set(_MODEL_FIELDS))
    if unknown:
        raise ValueError(f"{out_dir}/model.json: unknown MambaLM fields {unknown}")
    return MambaConfig(**kw).make(dtype=dtype), {"params": params}
