"""Import HuggingFace Whisper encoder weights into `avjax.nn.whisper.WhisperEncoder`.

`from_hf_whisper_encoder(state_dict, hf_config)` takes the state dict of a `WhisperModel`
(keys `encoder.*`), a `WhisperForConditionalGeneration` (`model.encoder.*`) or a bare
`WhisperEncoder`, as torch tensors, numpy arrays or a lazy mapping (`HFTensors(dir)`), and the
config (`transformers.WhisperConfig` or the config.json dict), and returns our module and
variables such that

    hidden = model.apply(variables, input_features)   # [batch, num_mel_bins, frames] ->
                                                      # [batch, frames // 2, d_model]

equals `WhisperModel(hf_config).encoder(input_features).last_hidden_state`. Decoder tensors
are not read. `load_hf_whisper_encoder(dir)` does the same from a local `save_pretrained`
directory; tensors are read one at a time.

Name mapping (HF under the encoder prefix -> ours; `Linear.weight [out, in]` -> kernel
`[in, out]`, `Conv1d.weight [out, in, 3]` -> kernel `[3, in, out]`):
  conv1.{weight,bias}, conv2.*                   -> conv1/{kernel,bias}, conv2/*
  embed_positions.weight [P, D]                  -> positions [P, D]
  layers.i.self_attn.{q,v,out}_proj.{weight,bias}-> layers_i/self_attn/{q,v,out}/{kernel,bias}
  layers.i.self_attn.k_proj.weight (no bias)     -> layers_i/self_attn/k/kernel
  layers.i.self_attn_layer_norm.{weight,bias}    -> layers_i/self_attn_norm/{scale,bias}
  layers.i.fc1.*, fc2.*                          -> layers_i/fc1/*, layers_i/fc2/*
  layers.i.final_layer_norm.*                    -> layers_i/mlp_norm/*
  layer_norm.{weight,bias}                       -> final_norm/{scale,bias}
`save_converted` / `load_converted` write and read `DIR/params` + `DIR/model.json`;
`tools/convert_whisper.py` is the command line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from avjax.convert.common import load_params_dir, save_params_dir
from avjax.convert.llama import HFTensors, cfg_get, read_hf_config, to_numpy
from avjax.nn.whisper import WhisperEncoder

_PREFIXES = ("model.encoder.", "encoder.", "")


def encoder_from_config(hf_config: Any, **options: Any) -> WhisperEncoder:
    """Our `WhisperEncoder` for a HF `WhisperConfig` (object or config.json dict)."""
    return WhisperEncoder(
        num_mel_bins=int(cfg_get(hf_config, "num_mel_bins", 80)),
        width=int(cfg_get(hf_config, "d_model")),
        num_layers=int(cfg_get(hf_config, "encoder_layers")),
        num_heads=int(cfg_get(hf_config, "encoder_attention_heads")),
        mlp_width=int(cfg_get(hf_config, "encoder_ffn_dim")),
        max_source_positions=int(cfg_get(hf_config, "max_source_positions", 1500)),
        activation=str(cfg_get(hf_config, "activation_function", "gelu")),
        **options,
    )


def expected_hf_shapes(model: WhisperEncoder) -> dict[str, tuple[int, ...]]:
    """HF encoder tensor name (without prefix) -> shape for `model`'s architecture."""
    d, f, m = model.width, model.mlp_width, model.num_mel_bins
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (d, m, 3),
        "conv1.bias": (d,),
        "conv2.weight": (d, d, 3),
        "conv2.bias": (d,),
        "embed_positions.weight": (model.max_source_positions, d),
        "layer_norm.weight": (d,),
        "layer_norm.bias": (d,),
    }
    for i in range(model.num_layers):
        p = f"layers.{i}."
        for n in ("q", "k", "v", "out"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (d, d)
            if n != "k":
                shapes[p + f"self_attn.{n}_proj.bias"] = (d,)
        for n in ("self_attn_layer_norm", "final_layer_norm"):
            shapes |= {p + n + ".weight": (d,), p + n + ".bias": (d,)}
        shapes |= {p + "fc1.weight": (f, d), p + "fc1.bias": (f,)}
        shapes |= {p + "fc2.weight": (d, f), p + "fc2.bias": (d,)}
    return shapes


def encoder_prefix(keys: set[str]) -> str:
    """The prefix under which `keys` hold the encoder ("model.encoder.", "encoder." or "")."""
    for prefix in _PREFIXES:
        if prefix + "conv1.weight" in keys:
            return prefix
    raise KeyError("HF Whisper state dict: no conv1.weight under any of " + repr(_PREFIXES))


def convert_state_dict(state_dict: Mapping[str, Any], model: WhisperEncoder) -> dict[str, Any]:
    """The `WhisperEncoder` params (float32) from a HF state dict, read tensor by tensor.

    Raises `KeyError` naming missing or unexpected encoder keys, `ValueError` naming a key
    whose shape differs from the one the config implies.
    """
    keys = set(state_dict.keys())
    prefix = encoder_prefix(keys)
    expected = expected_hf_shapes(model)
    mine = {k[len(prefix) :] for k in keys if k.startswith(prefix)}
    missing = sorted(set(expected) - mine)
    extra = sorted(mine - set(expected))
    if missing:
        raise KeyError(f"HF Whisper encoder: missing {missing[:8]} ({len(missing)} in all)")
    if extra:
        raise KeyError(f"HF Whisper encoder: unexpected {extra[:8]} ({len(extra)} in all)")

    def get(key: str) -> jnp.ndarray:
        x = to_numpy(state_dict[prefix + key])
        if tuple(x.shape) != expected[key]:
            raise ValueError(
                f"HF Whisper encoder: {prefix}{key} has shape {list(x.shape)}, expected "
                f"{list(expected[key])} from the config"
            )
        return jnp.asarray(x, jnp.float32)

    params: dict[str, Any] = {
        "conv1": {"kernel": get("conv1.weight").transpose(2, 1, 0), "bias": get("conv1.bias")},
        "conv2": {"kernel": get("conv2.weight").transpose(2, 1, 0), "bias": get("conv2.bias")},
        "positions": get("embed_positions.weight"),
    }
    for i in range(model.num_layers):
        params[f"layers_{i}"] = _convert_layer(lambda k, i=i: get(f"layers.{i}.{k}"))
    params["final_norm"] = {"scale": get("layer_norm.weight"), "bias": get("layer_norm.bias")}
    return params


def _convert_layer(get: Callable[[str], jnp.ndarray]) -> dict[str, Any]:
    """One encoder layer's params from `get(hf_name_within_the_layer)`."""

    def linear(name: str, bias: bool = True) -> dict[str, jnp.ndarray]:
        out = {"kernel": get(f"{name}.weight").T}
        return out | ({"bias": get(f"{name}.bias")} if bias else {})

    def norm(name: str) -> dict[str, jnp.ndarray]:
        return {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}

    attn = {n: linear(f"self_attn.{n}_proj", n != "k") for n in ("q", "k", "v", "out")}
    return {
        "self_attn_norm": norm("self_attn_layer_norm"),
        "self_attn": attn,
        "mlp_norm": norm("final_layer_norm"),
        "fc1": linear("fc1"),
        "fc2": linear("fc2"),
    }


class _EncoderOnly(Mapping):
    """The encoder tensors of a Whisper state dict (decoder and head keys hidden)."""

    def __init__(self, tensors: Mapping[str, Any]):
        self._tensors = tensors
        prefix = encoder_prefix(set(tensors.keys()))
        self._keys = [k for k in tensors if k.startswith(prefix)]

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return self._tensors[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def from_hf_whisper_encoder(
    state_dict: Mapping[str, Any], hf_config: Any, **options: Any
) -> tuple[WhisperEncoder, dict[str, Any]]:
    """`(model, variables)` equal to the encoder of HF `WhisperModel(hf_config)` with
    `state_dict` loaded; `options` go to the module (dtype)."""
    model = encoder_from_config(hf_config, **options)
    return model, {"params": convert_state_dict(_EncoderOnly(state_dict), model)}


def load_hf_whisper_encoder(path: str, **options: Any) -> tuple[WhisperEncoder, dict[str, Any]]:
    """`from_hf_whisper_encoder` on a local directory as written by `save_pretrained`."""
    return from_hf_whisper_encoder(HFTensors(path), read_hf_config(path, "whisper"), **options)


def save_converted(model: WhisperEncoder, variables: dict[str, Any], out_dir: str) -> None:
    """Writes `out_dir/params` (orbax, float32) and `out_dir/model.json` (the architecture)."""
    save_params_dir(out_dir, model.fields(), variables.get("params", variables))


def load_converted(
    out_dir: str, tool: str = "tools/convert_whisper.py", **options: Any
) -> tuple[WhisperEncoder, dict[str, Any]]:
    """Reads what `save_converted` wrote: `(model, {"params": ...})`."""
    fields, params = load_params_dir(out_dir, tool)
    unknown = sorted(set(fields) - set(WhisperEncoder().fields()))
    if unknown:
        raise ValueError(f"{out_dir}/model.json: unknown WhisperEncoder fields {unknown}")
    return WhisperEncoder(**fields, **options), {"params": params}
