"""Import HuggingFace BLIP-2 Q-Former weights into `avjax.nn.qformer.QFormer`.

`from_hf_qformer(state_dict, hf_config)` takes the state dict of a `Blip2QFormerModel` (or of
a whole BLIP-2 model, whose Q-Former lives under `qformer.`), as torch tensors, numpy arrays
or a lazy mapping, and the config (`transformers.Blip2QFormerConfig`, a BLIP-2 config, or the
config.json dict), and returns our module and variables such that

    hidden = model.apply(variables, query_embeds, encoder_hidden_states)   # [b, queries, width]

equals `Blip2QFormerModel(hf_config)(query_embeds, encoder_hidden_states=...).last_hidden_state`
(with `encoder_mask` as its `encoder_attention_mask`). `load_hf_qformer(dir)` does the same
from a local `save_pretrained` directory (model_type `blip_2_qformer` or `blip-2`), reading one
tensor at a time. The text branch (`intermediate.*`, `output.*` with
`use_qformer_text_input`) is not used by the query path and is skipped; it is named in
`SKIPPED_TEXT_BRANCH`.

Name mapping (HF `encoder.layer.i.` -> ours `layers_i/`; `Linear.weight [out, in]` -> kernel
`[in, out]`; `LayerNorm.{weight,bias}` -> `{scale,bias}`):
  layernorm                                    -> input_norm
  attention.attention.{query,key,value}        -> self_attn/{q,k,v}
  attention.output.dense, .LayerNorm           -> self_attn/out, self_attn_norm
  crossattention.attention.{query,key,value}   -> cross_attn/{q,k,v}   (cross layers only)
  crossattention.output.dense, .LayerNorm      -> cross_attn/out, cross_attn_norm
  intermediate_query.dense                     -> mlp_in
  output_query.dense, .LayerNorm               -> mlp_out, mlp_norm
`save_converted` / `load_converted` write and read `DIR/params` + `DIR/model.json`;
`tools/convert_qformer.py` is the command line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp

from avjax.convert.common import load_params_dir, save_params_dir
from avjax.convert.llama import HFTensors, cfg_get, to_numpy
from avjax.nn.qformer import QFormer

SKIPPED_TEXT_BRANCH = ("intermediate.dense", "output.dense", "output.LayerNorm")


def qformer_config(hf_config: Any) -> Any:
    """The Q-Former part of a config: `qformer_config` of a BLIP-2 config, else itself."""
    inner = cfg_get(hf_config, "qformer_config", None)
    return hf_config if inner is None else inner


def qformer_from_config(hf_config: Any, **options: Any) -> QFormer:
    """Our `QFormer` for a HF `Blip2QFormerConfig` / `Blip2Config` (object or dict)."""
    cfg = qformer_config(hf_config)
    kind = cfg_get(cfg, "position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"position_embedding_type={kind!r}: only 'absolute' is supported")
    return QFormer(
        width=int(cfg_get(cfg, "hidden_size")),
        num_layers=int(cfg_get(cfg, "num_hidden_layers")),
        num_heads=int(cfg_get(cfg, "num_attention_heads")),
        mlp_width=int(cfg_get(cfg, "intermediate_size")),
        encoder_width=int(cfg_get(cfg, "encoder_hidden_size")),
        cross_attention_frequency=int(cfg_get(cfg, "cross_attention_frequency", 2)),
        activation=str(cfg_get(cfg, "hidden_act", "gelu")),
        norm_eps=float(cfg_get(cfg, "layer_norm_eps", 1e-12)),
        **options,
    )


def _linear_shapes(name: str, n_out: int, n_in: int) -> dict[str, tuple[int, ...]]:
    return {name + ".weight": (n_out, n_in), name + ".bias": (n_out,)}


def _attention_shapes(p: str, d: int, kv_in: int) -> dict[str, tuple[int, ...]]:
    shapes = _linear_shapes(p + "attention.query", d, d)
    shapes |= _linear_shapes(p + "attention.key", d, kv_in)
    shapes |= _linear_shapes(p + "attention.value", d, kv_in)
    shapes |= _linear_shapes(p + "output.dense", d, d)
    return shapes | {p + "output.LayerNorm.weight": (d,), p + "output.LayerNorm.bias": (d,)}


def expected_hf_shapes(model: QFormer) -> dict[str, tuple[int, ...]]:
    """HF tensor name (within `Blip2QFormerModel`) -> shape for `model`'s architecture."""
    d, f = model.width, model.mlp_width
    shapes: dict[str, tuple[int, ...]] = {"layernorm.weight": (d,), "layernorm.bias": (d,)}
    for i in range(model.num_layers):
        p = f"encoder.layer.{i}."
        shapes |= _attention_shapes(p + "attention.", d, d)
        if model.has_cross(i):
            shapes |= _attention_shapes(p + "crossattention.", d, model.encoder_width)
        shapes |= _linear_shapes(p + "intermediate_query.dense", f, d)
        shapes |= _linear_shapes(p + "output_query.dense", d, f)
        shapes |= {
            p + "output_query.LayerNorm.weight": (d,),
            p + "output_query.LayerNorm.bias": (d,),
        }
    return shapes


def _is_text_branch(key: str) -> bool:
    rest = key.split(".", 3)[-1]  # encoder.layer.i.<rest>
    return key.startswith("encoder.layer.") and rest.startswith(SKIPPED_TEXT_BRANCH)


def convert_state_dict(state_dict: Mapping[str, Any], model: QFormer) -> dict[str, Any]:
    """The `QFormer` params (float32) from a `Blip2QFormerModel` state dict, tensor by tensor.

    Raises `KeyError` naming missing or unexpected keys, `ValueError` naming a key whose shape
    differs from the one the config implies.
    """
    expected = expected_hf_shapes(model)
    keys = {k for k in state_dict.keys() if not _is_text_branch(k)}
    missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing:
        raise KeyError(f"HF Q-Former state dict: missing {missing[:8]} ({len(missing)} in all)")
    if extra:
        raise KeyError(f"HF Q-Former state dict: unexpected {extra[:8]} ({len(extra)} in all)")

    def get(key: str) -> jnp.ndarray:
        x = to_numpy(state_dict[key])
        if tuple(x.shape) != expected[key]:
            raise ValueError(
                f"HF Q-Former state dict: {key} has shape {list(x.shape)}, expected "
                f"{list(expected[key])} from the config"
            )
        return jnp.asarray(x, jnp.float32)

    params: dict[str, Any] = {"input_norm": _norm(get, "layernorm")}
    for i in range(model.num_layers):
        layer = lambda k, i=i: get(f"encoder.layer.{i}.{k}")  # noqa: E731
        params[f"layers_{i}"] = _convert_layer(layer, model.has_cross(i))
    return params


def _norm(get: Callable[[str], jnp.ndarray], name: str) -> dict[str, jnp.ndarray]:
    return {"scale": get(name + ".weight"), "bias": get(name + ".bias")}


def _linear(get: Callable[[str], jnp.ndarray], name: str) -> dict[str, jnp.ndarray]:
    return {"kernel": get(name + ".weight").T, "bias": get(name + ".bias")}


def _convert_layer(get: Callable[[str], jnp.ndarray], has_cross: bool) -> dict[str, Any]:
    """One layer's params from `get(hf_name_within_the_layer)`."""

    def attention(p: str) -> dict[str, Any]:
        names = {"q": "query", "k": "key", "v": "value"}
        out = {ours: _linear(get, f"{p}.attention.{hf}") for ours, hf in names.items()}
        return out | {"out": _linear(get, f"{p}.output.dense")}

    params = {
        "self_attn": attention("attention"),
        "self_attn_norm": _norm(get, "attention.output.LayerNorm"),
    }
    if has_cross:
        params["cross_attn"] = attention("crossattention")
        params["cross_attn_norm"] = _norm(get, "crossattention.output.LayerNorm")
    return params | {
        "mlp_in": _linear(get, "intermediate_query.dense"),
        "mlp_out": _linear(get, "output_query.dense"),
        "mlp_norm": _norm(get, "output_query.LayerNorm"),
    }


class _Prefixed(Mapping):
    """The tensors under `prefix` of a mapping, with the prefix removed."""

    def __init__(self, tensors: Mapping[str, Any], prefix: str):
        self._tensors, self._prefix = tensors, prefix
        self._keys = [k[len(prefix) :] for k in tensors if k.startswith(prefix)]

    def __getitem__(self, key: str) -> Any:
        return self._tensors[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def from_hf_qformer(
    state_dict: Mapping[str, Any], hf_config: Any, **options: Any
) -> tuple[QFormer, dict[str, Any]]:
    """`(model, variables)` equal to HF `Blip2QFormerModel(hf_config)` with `state_dict`
    loaded (a whole BLIP-2 state dict: its `qformer.` part); `options` go to the module."""
    model = qformer_from_config(hf_config, **options)
    if "qformer.layernorm.weight" in state_dict:
        state_dict = _Prefixed(state_dict, "qformer.")
    return model, {"params": convert_state_dict(state_dict, model)}


def load_hf_qformer(path: str, **options: Any) -> tuple[QFormer, dict[str, Any]]:
    """`from_hf_qformer` on a local `save_pretrained` directory of a `Blip2QFormerModel`
    (model_type `blip_2_qformer`) or a whole BLIP-2 model (`blip-2`); no network."""
    cfg_path = os.path.join(os.path.abspath(path), "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: expected a HF BLIP-2 Q-Former directory")
    with open(cfg_path) as f:
        hf_config = json.load(f)
    kind = hf_config.get("model_type")
    if kind not in ("blip_2_qformer", "blip-2"):
        raise ValueError(f"{cfg_path}: model_type={kind!r}, expected 'blip_2_qformer' or 'blip-2'")
    return from_hf_qformer(HFTensors(path), hf_config, **options)


def save_converted(model: QFormer, variables: dict[str, Any], out_dir: str) -> None:
    """Writes `out_dir/params` (orbax, float32) and `out_dir/model.json` (the architecture)."""
    save_params_dir(out_dir, model.fields(), variables.get("params", variables))


def load_converted(
    out_dir: str, tool: str = "tools/convert_qformer.py", **options: Any
) -> tuple[QFormer, dict[str, Any]]:
    """Reads what `save_converted` wrote: `(model, {"params": ...})`."""
    fields, params = load_params_dir(out_dir, tool)
    unknown = sorted(set(fields) - set(QFormer().fields()))
    if unknown:
        raise ValueError(f"{out_dir}/model.json: unknown QFormer fields {unknown}")
    return QFormer(**fields, **options), {"params": params}
