"""Import RecurrentGemma (Griffin) parameters into `avjax.nn.griffin.GriffinLM`.

`from_recurrentgemma(rg_params, rg_config)` takes the params tree of
`recurrentgemma.jax.Griffin` (as built or loaded with Google's library) and its
`GriffinConfig`, and returns our module and variables such that

    logits, cache = model.apply(variables, tokens, segment_pos)

equals RecurrentGemma's logits. The `recurrentgemma` package is only needed to *describe* the
config; the mapping itself is a renaming plus one reshape (the MLP's up-projection bias).

`tools/convert_recurrentgemma.py` runs this on a RecurrentGemma orbax checkpoint (as published)
and writes ours with `save_converted`: `DIR/params` (orbax) + `DIR/model.json` (the GriffinLM
fields). `config.train.init_from=DIR` then starts training from those weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from avjax.convert.common import load_params_dir, save_params_dir
from avjax.nn.griffin import ATTENTION, RECURRENT, GriffinConfig, GriffinLM, stack_layers


def _block_kind(block_type: Any) -> str:
    name = getattr(block_type, "name", str(block_type)).upper()
    if "RECURRENT" in name:
        return RECURRENT
    if "ATTENTION" in name:
        return ATTENTION
    raise ValueError(f"unknown RecurrentGemma block type {block_type!r}")


def model_from_config(rg_config: Any, dtype: Any = jnp.float32) -> GriffinLM:
    """Our `GriffinLM` with the architecture of a RecurrentGemma `GriffinConfig`."""
    return architecture_from_config(rg_config).make(dtype=dtype)


def architecture_from_config(rg_config: Any) -> GriffinConfig:
    """Our `GriffinConfig` for a RecurrentGemma `GriffinConfig`."""
    kinds = tuple(_block_kind(t) for t in rg_config.block_types)
    return GriffinConfig(
        vocab_size=rg_config.vocab_size,
        width=rg_config.width,
        mlp_width=rg_config.mlp_expanded_width,
        num_heads=rg_config.num_heads,
        num_layers=len(kinds),
        block_types=kinds,
        lru_width=rg_config.lru_width or rg_config.width,
        window=rg_config.attention_window_size,
        logit_softcap=rg_config.logits_soft_cap or None,
        embed_scale=bool(rg_config.embeddings_scale_by_sqrt_dim),
    )


def convert_params(rg_params: dict[str, Any], kinds: tuple[str, ...]) -> dict[str, Any]:
    """Renames a RecurrentGemma params tree (`{"params": ...}` or its content) to ours."""
    p = rg_params.get("params", rg_params)
    a = lambda x: jnp.asarray(np.asarray(x), jnp.float32)  # noqa: E731
    out: dict[str, Any] = {
        "embedding": a(p["embedder"]["input_embedding"]),
        "final_norm": {"scale": a(p["final_norm"]["scale"])},
    }
    for i, kind in enumerate(kinds):
        src = p.get(f"blocks.{i}") or p[f"blocks_{i}"]
        mlp = src["mlp_block"]
        blk: dict[str, Any] = {
            "temporal_pre_norm": {"scale": a(src["temporal_pre_norm"]["scale"])},
            "channel_pre_norm": {"scale": a(src["channel_pre_norm"]["scale"])},
            "mlp": {
                "ffw_up_w": a(mlp["ffw_up"]["w"]),
                "ffw_up_b": a(mlp["ffw_up"]["b"]).reshape(2, -1),
                "ffw_down": {k: a(v) for k, v in mlp["ffw_down"].items()},
            },
        }
        if kind == RECURRENT:
            rec = src["recurrent_block"]
            lru = rec["rg_lru"]
            blk["temporal"] = {
                "linear_x": {k: a(v) for k, v in rec["linear_x"].items()},
                "linear_y": {k: a(v) for k, v in rec["linear_y"].items()},
                "linear_out": {k: a(v) for k, v in rec["linear_out"].items()},
                "conv_1d": {"w": a(rec["conv_1d"]["w"]), "b": a(rec["conv_1d"]["b"])},
                "rg_lru": {
                    "a_param": a(lru["a_param"]),
                    "input_gate": {"w": a(lru["input_gate"]["w"]), "b": a(lru["input_gate"]["b"])},
                    "a_gate": {"w": a(lru["a_gate"]["w"]), "b": a(lru["a_gate"]["b"])},
                },
            }
        else:
            att = src["attention_block"]
            blk["temporal"] = {
                "q": {"kernel": a(att["proj_q"]["kernel"])},
                "k": {"kernel": a(att["proj_k"]["kernel"])},
                "v": {"kernel": a(att["proj_v"]["kernel"])},
                "out": {k: a(v) for k, v in att["proj_final"].items()},
            }
        out[f"blocks_{i}"] = blk
    return out


def from_recurrentgemma(
    rg_params: dict[str, Any], rg_config: Any, dtype: Any = jnp.float32
) -> tuple[GriffinLM, dict[str, Any]]:
    """Returns `(model, variables)` equivalent to `recurrentgemma.jax.Griffin(rg_config)`."""
    model = model_from_config(rg_config, dtype)
    return model, {"params": convert_params(rg_params, model.types)}


_MODEL_FIELDS = (
    "vocab_size",
    "width",
    "mlp_width",
    "num_heads",
    "num_layers",
    "block_types",
    "lru_width",
    "window",
    "conv1d_width",
    "logit_softcap",
    "embed_scale",
    "scan_layers",
)


def save_converted(model: GriffinLM, variables: dict[str, Any], out_dir: str) -> None:
    """Writes `out_dir/params` (orbax, float32) and `out_dir/model.json` (GriffinLM fields).

    With `model.scan_layers` the parameters are written in the stacked (scanned) layout.
    """
    params = variables.get("params", variables)
    if model.scan_layers and "layers" not in params:
        params = stack_layers(params, model.num_layers, model.period)
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    save_params_dir(out_dir, {k: fields[k] for k in _MODEL_FIELDS}, params)


def load_converted(out_dir: str, dtype: Any = jnp.float32) -> tuple[GriffinLM, dict[str, Any]]:
    """Reads what `save_converted` wrote: `(model, {"params": ...})` (numpy arrays)."""
    kw, params = load_params_dir(out_dir, "tools/convert_recurrentgemma.py")
    kw["block_types"] = tuple(kw["block_types"])
    return GriffinLM(**kw, dtype=dtype), {"params": params}
