"""Import HuggingFace `LlamaForCausalLM` weights into `avjax.nn.transformer.TransformerLM`.

`from_hf_llama(state_dict, hf_config)` takes the PyTorch state dict (torch tensors, numpy
arrays, or any mapping that reads them lazily, e.g. `hf_tensors(dir)`) and the config
(`transformers.LlamaConfig` or the `config.json` dict) and returns our module and variables
such that

    logits, _ = model.apply(variables, input_ids)      # [batch, length, vocab]

equals `LlamaForCausalLM(hf_config)(input_ids).logits` (Llama 1-3, with or without Llama-3
RoPE frequency scaling, any KV-head count, tied or untied embeddings). `load_hf_llama(dir)` does
the same from a local directory (`config.json` + safetensors, sharded or not, or
`pytorch_model.bin`); nothing is downloaded and transformers itself is not needed. Safetensors
are read tensor by tensor: each HF tensor is converted and dropped before the next is read, so
at most one model's worth of converted arrays plus one tensor is in memory.

Name mapping (HF -> ours, `i` the layer; HF `Linear.weight` is `[out, in]`, our kernels
`[in, out]`):
  model.embed_tokens.weight [V, D]                  -> embedding [V, D]
  model.layers.i.input_layernorm.weight [D]         -> blocks_i/pre_attention_norm/scale
  ...self_attn.{q,k,v}_proj.weight [H*hd | KV*hd, D] -> blocks_i/attention/{q,k,v}/kernel (.T)
  ...self_attn.o_proj.weight [D, H*hd]              -> blocks_i/attention/out/kernel (.T)
  model.layers.i.post_attention_layernorm.weight    -> blocks_i/pre_mlp_norm/scale
  ...mlp.gate_proj, up_proj [F, D]                  -> blocks_i/mlp/ffw_up_w [2, D, F] (gate, up)
  ...mlp.down_proj [D, F]                           -> blocks_i/mlp/ffw_down/kernel [F, D]
  model.norm.weight [D]                             -> final_norm/scale
  lm_head.weight [V, D] (untied only)               -> lm_head [D, V]
Gemma shares this layout (`avjax.convert.gemma`); only the config translation differs.

`save_converted` / `load_converted` write and read `DIR/params` (orbax) + `DIR/model.json`
(the TransformerLM architecture); `tools/convert_llama.py` is the command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from avjax.convert.common import index_shards, load_params_dir, save_params_dir
from avjax.nn.transformer import DecoderConfig, Llama3RopeScaling, TransformerLM


def cfg_get(hf_config: Any, key: str, default: Any = None) -> Any:
    """`hf_config[key]` for a config.json dict or a `PretrainedConfig` object."""
    if isinstance(hf_config, Mapping):
        value = hf_config.get(key, default)
    else:
        value = getattr(hf_config, key, default)
    return default if value is None else value


def rope_from_config(hf_config: Any) -> tuple[float, Llama3RopeScaling | None]:
    """`(theta, Llama-3 scaling or None)` from `rope_parameters` (transformers >= 5) or the
    older `rope_theta` + `rope_scaling`. Raises `ValueError` for other RoPE types."""
    params = dict(cfg_get(hf_config, "rope_parameters", None) or {})
    scaling = dict(cfg_get(hf_config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", cfg_get(hf_config, "rope_theta", 10_000.0)))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"RoPE type {kind!r}: only 'default' and 'llama3' are supported")
    original = merged.get("original_max_position_embeddings") or cfg_get(
        hf_config, "max_position_embeddings"
    )
    return theta, Llama3RopeScaling(
        float(merged["factor"]),
        float(merged.get("low_freq_factor", 1.0)),
        float(merged.get("high_freq_factor", 4.0)),
        int(original),
    )


def shapes_from_config(hf_config: Any) -> dict[str, Any]:
    """The `DecoderConfig` shape fields shared by HF Llama and Gemma configs."""
    width = int(cfg_get(hf_config, "hidden_size"))
    heads = int(cfg_get(hf_config, "num_attention_heads"))
    for key in ("attention_bias", "mlp_bias"):
        if cfg_get(hf_config, key, False):
            raise ValueError(f"{key}=True is not supported (Llama and Gemma have no biases)")
    theta, scaling = rope_from_config(hf_config)
    return dict(
        vocab_size=int(cfg_get(hf_config, "vocab_size")),
        width=width,
        mlp_width=int(cfg_get(hf_config, "intermediate_size")),
        num_heads=heads,
        num_layers=int(cfg_get(hf_config, "num_hidden_layers")),
        num_kv_heads=int(cfg_get(hf_config, "num_key_value_heads", heads)),
        head_dim=int(cfg_get(hf_config, "head_dim", width // heads)),
        rope_theta=theta,
        rope_scaling=scaling,
    )


def llama_config(hf_config: Any) -> DecoderConfig:
    """Our `DecoderConfig` for a HF `LlamaConfig` (object or config.json dict)."""
    act = cfg_get(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act={act!r}: only 'silu' (SwiGLU) is supported for Llama")
    return DecoderConfig.llama(
        **shapes_from_config(hf_config),
        norm_eps=float(cfg_get(hf_config, "rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg_get(hf_config, "tie_word_embeddings", False)),
    )


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any dtype, bfloat16 included) or array-like as a float32 numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) != "torch.float32":
            x = x.float()
        return x.numpy()
    return np.asarray(x, np.float32)


def expected_hf_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a Llama/Gemma model of architecture `cfg`."""
    v, d, f = cfg.vocab_size, cfg.width, cfg.mlp_width
    hd = cfg.head_dim or d // cfg.num_heads
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _check_keys(keys: set[str], expected: Mapping[str, Any], cfg: DecoderConfig, what: str):
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()  # a copy when present
    optional |= {k for k in keys if k.endswith("rotary_emb.inv_freq")}  # older checkpoints
    missing = sorted(set(expected) - keys)
    extra = sorted(keys - set(expected) - optional)
    if missing:
        raise KeyError(f"HF {what} state dict: missing {missing[:8]} ({len(missing)} in all)")
    if extra:
        raise KeyError(f"HF {what} state dict: unexpected {extra[:8]} ({len(extra)} in all)")


def convert_state_dict(
    state_dict: Mapping[str, Any], cfg: DecoderConfig, what: str = "Llama"
) -> dict[str, Any]:
    """Maps a HF Llama/Gemma state dict onto the `TransformerLM` params (float32 jax arrays).

    Tensors are read one at a time (`state_dict` may be lazy). Raises `KeyError` naming
    missing or unexpected keys and `ValueError` naming a key whose shape differs from the one
    the config implies.
    """
    expected = expected_hf_shapes(cfg)
    _check_keys(set(state_dict.keys()), expected, cfg, what)

    def get(key: str) -> jnp.ndarray:
        x = to_numpy(state_dict[key])
        if tuple(x.shape) != expected[key]:
            raise ValueError(
                f"HF {what} state dict: {key} has shape {list(x.shape)}, expected "
                f"{list(expected[key])} from the config"
            )
        return jnp.asarray(x, jnp.float32)

    params: dict[str, Any] = {"embedding": get("model.embed_tokens.weight")}
    for i in range(cfg.num_layers):
        params[f"blocks_{i}"] = _convert_block(lambda k, i=i: get(f"model.layers.{i}.{k}"))
    params["final_norm"] = {"scale": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        params["lm_head"] = get("lm_head.weight").T
    return params


def _convert_block(get: Callable[[str], jnp.ndarray]) -> dict[str, Any]:
    """One decoder layer's params from `get(hf_name_within_the_layer)`."""
    attn = {n: {"kernel": get(f"self_attn.{n}_proj.weight").T} for n in ("q", "k", "v")}
    attn["out"] = {"kernel": get("self_attn.o_proj.weight").T}
    up = jnp.stack([get("mlp.gate_proj.weight").T, get("mlp.up_proj.weight").T])
    return {
        "pre_attention_norm": {"scale": get("input_layernorm.weight")},
        "attention": attn,
        "pre_mlp_norm": {"scale": get("post_attention_layernorm.weight")},
        "mlp": {"ffw_up_w": up, "ffw_down": {"kernel": get("mlp.down_proj.weight").T}},
    }


def from_hf_llama(
    state_dict: Mapping[str, Any], hf_config: Any, **options: Any
) -> tuple[TransformerLM, dict[str, Any]]:
    """`(model, variables)` equal to HF `LlamaForCausalLM(hf_config)` with `state_dict` loaded.

    `options` go to the module (max_len, decode_block, dtype, scan_layers, remat).
    """
    cfg = llama_config(hf_config)
    return cfg.make(**options), {"params": convert_state_dict(state_dict, cfg, "Llama")}


class HFTensors(Mapping):
    """The tensors of a local HF model directory, read lazily one at a time (float32 numpy).

    Safetensors (single or sharded by `model.safetensors.index.json`) are opened per access;
    a `pytorch_model.bin` is loaded whole (`torch.load(weights_only=True)`, memory-mapped).
    """

    def __init__(self, path: str):
        path = os.path.abspath(path)
        single = os.path.join(path, "model.safetensors")
        index = os.path.join(path, "model.safetensors.index.json")
        binary = os.path.join(path, "pytorch_model.bin")
        self._where: dict[str, str] = {}
        self._bin: dict[str, Any] | None = None
        if os.path.exists(single) or os.path.exists(index):
            from safetensors import safe_open

            files = [single] if os.path.exists(single) else index_shards(path, index)
            for name in files:
                if not os.path.exists(name):
                    raise FileNotFoundError(f"{name} (listed in {index}) not found")
                with safe_open(name, framework="np") as f:
                    self._where.update({k: name for k in f.keys()})
        elif os.path.exists(binary):
            import torch

            self._bin = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
        else:
            raise FileNotFoundError(
                f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
            )

    def __getitem__(self, key: str) -> np.ndarray:
        if self._bin is not None:
            return to_numpy(self._bin[key])
        from safetensors import safe_open

        try:  # torch reads every dtype, bfloat16 included
            import torch  # noqa: F401

            with safe_open(self._where[key], framework="pt") as f:
                return to_numpy(f.get_tensor(key))
        except ImportError:
            with safe_open(self._where[key], framework="np") as f:
                return to_numpy(f.get_tensor(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._bin if self._bin is not None else self._where)

    def __len__(self) -> int:
        return len(self._bin if self._bin is not None else self._where)


def read_hf_config(path: str, model_type: str) -> dict[str, Any]:
    """`path/config.json` as a dict; `ValueError` if its model_type is not `model_type`."""
    cfg_path = os.path.join(os.path.abspath(path), "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: expected a HF {model_type} directory")
    with open(cfg_path) as f:
        hf_config = json.load(f)
    if hf_config.get("model_type", model_type) != model_type:
        raise ValueError(
            f"{cfg_path}: model_type={hf_config['model_type']!r}, expected {model_type!r}"
        )
    return hf_config


def load_hf_llama(path: str, **options: Any) -> tuple[TransformerLM, dict[str, Any]]:
    """`from_hf_llama` on a local directory as written by `save_pretrained` (no network)."""
    return from_hf_llama(HFTensors(path), read_hf_config(path, "llama"), **options)


def save_converted(model: TransformerLM, variables: dict[str, Any], out_dir: str) -> None:
    """Writes `out_dir/params` (orbax, float32) and `out_dir/model.json` (the architecture)."""
    fields = dataclasses.asdict(model.config)
    save_params_dir(out_dir, fields, variables.get("params", variables))


def load_converted(
    out_dir: str, tool: str = "tools/convert_llama.py", **options: Any
) -> tuple[TransformerLM, dict[str, Any]]:
    """Reads what `save_converted` wrote: `(model, {"params": ...})`; `options` as in
    `from_hf_llama`."""
    fields, params = load_params_dir(out_dir, tool)
    names = {f.name for f in dataclasses.fields(DecoderConfig)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"{out_dir}/model.json: unknown TransformerLM fields {unknown}")
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = Llama3RopeScaling(*fields["rope_scaling"])
    return DecoderConfig(**fields).make(**options), {"params": params}


# ---------------------------------------------------------------------------------------------
# Export: our TransformerLM params -> a HF LlamaForCausalLM directory.


def hf_llama_config(cfg: DecoderConfig, max_position_embeddings: int = 8192) -> dict[str, Any]:
    """The `config.json` dict of HF `LlamaForCausalLM` for a Llama-layout `cfg`.

    RoPE is written as `rope_theta` + `rope_scaling` (read by transformers 4.x and 5.x).
    Raises `ValueError` when `cfg` is not Llama's layout (e.g. a Gemma or SpeechTransformer).
    """
    layout = DecoderConfig.llama(
        vocab_size=1, width=1, mlp_width=1, num_heads=1, num_layers=1, num_kv_heads=1
    )
    for name in ("rope_fraction", "mlp_activation", "use_bias", "embed_scale", "logit_softcap"):
        if getattr(cfg, name) != getattr(layout, name):
            raise ValueError(f"{name}={getattr(cfg, name)!r} is not Llama's layout")
    if cfg.norm_offset:
        raise ValueError("norm_offset=True ((1 + w) RMSNorm) is not Llama's layout")
    scaling = None
    if cfg.rope_scaling is not None:
        factor, low, high, original = Llama3RopeScaling(*cfg.rope_scaling)
        scaling = {
            "rope_type": "llama3",
            "factor": float(factor),
            "low_freq_factor": float(low),
            "high_freq_factor": float(high),
            "original_max_position_embeddings": int(original),
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_width,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim or cfg.width // cfg.num_heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": int(max_position_embeddings),
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": scaling,
        "torch_dtype": "float32",
    }


def _layer_params(params: Mapping[str, Any], cfg: DecoderConfig) -> Iterator[Mapping[str, Any]]:
    """Each block's params, from `blocks_i` or sliced from a `scan_layers` stack `layers`."""
    if "layers" in params:
        stack = params["layers"]
        for i in range(cfg.num_layers):
            yield _tree_index(stack, i)
    else:
        for i in range(cfg.num_layers):
            yield params[f"blocks_{i}"]


def _tree_index(tree: Any, i: int) -> Any:
    if isinstance(tree, Mapping):
        return {k: _tree_index(v, i) for k, v in tree.items()}
    return tree[i]


def _check_exportable(params: Any, path: str = "") -> None:
    """Raises on LoRA adapters or quantised kernels: `merge_lora` (which also dequantises)
    must run first."""
    if isinstance(params, Mapping):
        for k, v in params.items():
            if k in ("lora_a", "lora_b"):
                raise ValueError(f"{path}{k}: LoRA adapters; merge them (avjax.nn.lora.merge_lora)")
            _check_exportable(v, f"{path}{k}/")
    elif not hasattr(params, "shape") or not hasattr(params, "dtype"):
        raise ValueError(
            f"{path.rstrip('/')}: {type(params).__name__} is not an array; "
            "dequantise (avjax.nn.lora.merge_lora / nn.quant.dequantize_params)"
        )


def iter_hf_llama(variables: Mapping[str, Any], cfg: DecoderConfig) -> Iterator[tuple[str, Any]]:
    """`(HF name, float32 numpy [out, in] / [d])` one tensor at a time (the inverse of
    `convert_state_dict`; see the module doc for the names)."""
    params = variables.get("params", variables)
    _check_exportable(params)

    def arr(x: Any) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(x, np.float32))

    yield "model.embed_tokens.weight", arr(params["embedding"])
    for i, blk in enumerate(_layer_params(params, cfg)):
        p, attn, mlp = f"model.layers.{i}.", blk["attention"], blk["mlp"]
        yield p + "input_layernorm.weight", arr(blk["pre_attention_norm"]["scale"])
        for n in ("q", "k", "v"):
            yield p + f"self_attn.{n}_proj.weight", arr(np.asarray(attn[n]["kernel"]).T)
        yield p + "self_attn.o_proj.weight", arr(np.asarray(attn["out"]["kernel"]).T)
        yield p + "post_attention_layernorm.weight", arr(blk["pre_mlp_norm"]["scale"])
        up = np.asarray(mlp["ffw_up_w"])
        yield p + "mlp.gate_proj.weight", arr(up[0].T)
        yield p + "mlp.up_proj.weight", arr(up[1].T)
        yield p + "mlp.down_proj.weight", arr(np.asarray(mlp["ffw_down"]["kernel"]).T)
    yield "model.norm.weight", arr(params["final_norm"]["scale"])
    if not cfg.tie_embeddings:
        yield "lm_head.weight", arr(np.asarray(params["lm_head"]).T)


def to_hf_llama(variables: Mapping[str, Any], cfg: DecoderConfig) -> dict[str, np.ndarray]:
    """The HF `LlamaForCausalLM` state dict (float32 numpy) of our params (merged, float)."""
    return dict(iter_hf_llama(variables, cfg))


def save_hf_llama(
    variables: Mapping[str, Any],
    cfg: DecoderConfig,
    path: str,
    max_shard_bytes: int = 4 << 30,
    max_position_embeddings: int = 8192,
) -> str:
    """Writes a HF Llama directory: `config.json` + `model.safetensors` (or shards of at most
    `max_shard_bytes` with `model.safetensors.index.json`), float32. Tensors are converted
    one shard at a time; the directory is written under a temporary name and moved into place.
    `LlamaForCausalLM.from_pretrained(path)` then gives our logits. Returns `path`."""
    from safetensors.numpy import save_file

    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose a new directory for the export")
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=False)
    shards: list[dict[str, np.ndarray]] = [{}]
    files: list[str] = []
    weight_map: dict[str, str] = {}
    size = total = 0

    def flush(last: bool) -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], os.path.join(tmp, name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shards[-1]})
        if not last:
            shards[-1] = {}

    for name, x in iter_hf_llama(variables, cfg):
        if size and size + x.nbytes > max_shard_bytes:
            flush(last=False)
            size = 0
        shards[-1][name] = x
        size += x.nbytes
        total += x.nbytes
    flush(last=True)
    if len(files) == 1:
        os.rename(os.path.join(tmp, files[0]), os.path.join(tmp, "model.safetensors"))
    else:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_llama_config(cfg, max_position_embeddings), f, indent=2)
    os.rename(tmp, path)
    return path
