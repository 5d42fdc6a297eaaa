"""Import the official fairseq AV-HuBERT checkpoints into `avjax.nn.avhubert.AVHubertEncoder`.

`from_fairseq_avhubert(state_dict, cfg)` takes the `model` state dict of a checkpoint from
`facebookresearch/av_hubert` (pretrained `AVHubertModel`, or a fine-tuned `AVHubertSeq2Seq`
whose encoder keys start with `encoder.w2v_model.`) and returns `(model, variables)`
(`params` and the ResNet's `batch_stats`). Keys it does not use (the pretraining head
`final_proj`, `label_embs_concat`, `mask_emb`, a seq2seq decoder, BatchNorm step counters) are
logged; `convert_state_dict` returns them.

Layout changes: torch `Linear.weight [out, in]` -> `kernel [in, out]`; `ConvNd.weight
[out, in, *k]` -> `kernel [*k, in, out]`; norms' `weight` -> `scale`; BatchNorm `running_mean
/ running_var` -> `batch_stats` `mean / var`; PReLU `weight [C]` -> `a_param [C]`. The
positional conv is weight-normalised (`weight_g [1, 1, k]`, `weight_v`, norm over every axis
but the kernel axis) and folded into one kernel.

`load_avhubert(path)` reads a checkpoint file. Fairseq pickles its config (an argparse
`Namespace` or an omegaconf `DictConfig`) beside the tensors, which `torch.load(weights_only=
True)` refuses. It tries `weights_only=True` first (a checkpoint re-saved as tensors only);
otherwise it unpickles with a restricted unpickler: torch's tensor-rebuild functions,
`OrderedDict` and torch dtypes are admitted, and every other class the file names is replaced
by an inert record (`_Opaque`) that only stores the arguments and state it was given, so no
code named by the file runs. The encoder's shape comes from the tensors; the two fields the
shapes do not fix (`encoder_attention_heads`, `layer_norm_first`) are read from those records
when present, else the published values (64-wide heads, pre-LN) are assumed and logged.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import types
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np
from absl import logging

from avjax.convert import common
from avjax.convert.common import load_params_dir, save_params_dir
from avjax.convert.hubert import fold_weight_norm
from avjax.nn.avhubert import AVHubertConfig, AVHubertEncoder, variable_shapes

_FT_PREFIX = "encoder.w2v_model."
_VIDEO = "feature_extractor_video.resnet."
_POS = "encoder.pos_conv.0."
_TRANSPOSE = {  # torch layout -> flax layout, per kind
    "linear": (1, 0),
    "conv1d": (2, 1, 0),
    "conv2d": (2, 3, 1, 0),
    "conv3d": (2, 3, 4, 1, 0),
}


def _module_map(m: dict[str, tuple[str, str]], fs: str, ours: str, kind: str) -> None:
    """Adds the entries of one torch module `fs` (fairseq name) at our path `ours`."""
    if kind in ("linear", "conv1d"):
        m[f"{fs}.weight"] = (f"params/{ours}/kernel", kind)
        m[f"{fs}.bias"] = (f"params/{ours}/bias", "same")
    elif kind in ("conv2d", "conv3d"):
        m[f"{fs}.weight"] = (f"params/{ours}/kernel", kind)
    elif kind == "norm":
        m[f"{fs}.weight"] = (f"params/{ours}/scale", "same")
        m[f"{fs}.bias"] = (f"params/{ours}/bias", "same")
    elif kind == "bn":
        _module_map(m, fs, ours, "norm")
        m[f"{fs}.running_mean"] = (f"batch_stats/{ours}/mean", "same")
        m[f"{fs}.running_var"] = (f"batch_stats/{ours}/var", "same")
    elif kind == "prelu":
        m[f"{fs}.weight"] = (f"params/{ours}/a_param", "same")
    else:
        raise ValueError(kind)


def key_map(cfg: AVHubertConfig) -> dict[str, tuple[str, str]]:
    """Fairseq state-dict key -> (our `variables` path "params/a/b/kernel", layout kind)."""
    m: dict[str, tuple[str, str]] = {}
    v = "frontend/video_frontend"
    _module_map(m, "feature_extractor_audio.proj", "frontend/audio_proj", "linear")
    _module_map(m, "feature_extractor_video.proj", "frontend/video_proj", "linear")
    _module_map(m, _VIDEO + "frontend3D.0", f"{v}/stem", "conv3d")
    _module_map(m, _VIDEO + "frontend3D.1", f"{v}/stem_bn", "bn")
    _module_map(m, _VIDEO + "frontend3D.2", f"{v}/stem_act", "prelu")
    in_width = cfg.resnet_stem
    for i, (width, n) in enumerate(zip(cfg.resnet_widths, cfg.resnet_blocks, strict=True)):
        for j in range(n):
            fs, ours = f"{_VIDEO}trunk.layer{i + 1}.{j}", f"{v}/trunk/layer{i + 1}_{j}"
            for a, b, kind in (
                ("conv1", "conv1", "conv2d"),
                ("bn1", "bn1", "bn"),
                ("relu1", "act1", "prelu"),
                ("conv2", "conv2", "conv2d"),
                ("bn2", "bn2", "bn"),
                ("relu2", "act2", "prelu"),
            ):
                _module_map(m, f"{fs}.{a}", f"{ours}/{b}", kind)
            if j == 0 and (i > 0 or in_width != width):
                _module_map(m, f"{fs}.downsample.0", f"{ours}/down", "conv2d")
                _module_map(m, f"{fs}.downsample.1", f"{ours}/down_bn", "bn")
        in_width = width
    _module_map(m, "layer_norm", "frontend/layer_norm", "norm")
    if cfg.modality_fuse == "concat":
        _module_map(m, "post_extract_proj", "frontend/post_extract_proj", "linear")
    _module_map(m, _POS[:-1], "pos_conv_embed/conv", "conv1d")
    for i in range(cfg.encoder_layers):
        fs, ours = f"encoder.layers.{i}", f"layers_{i}"
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _module_map(m, f"{fs}.self_attn.{p}", f"{ours}/attention/{p}", "linear")
        _module_map(m, f"{fs}.self_attn_layer_norm", f"{ours}/layer_norm", "norm")
        _module_map(m, f"{fs}.final_layer_norm", f"{ours}/final_layer_norm", "norm")
        _module_map(m, f"{fs}.fc1", f"{ours}/feed_forward/intermediate_dense", "linear")
        _module_map(m, f"{fs}.fc2", f"{ours}/feed_forward/output_dense", "linear")
    _module_map(m, "encoder.layer_norm", "encoder_layer_norm", "norm")
    return m


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, np.float32)


def _from_torch(x: np.ndarray, kind: str) -> np.ndarray:
    return x if kind == "same" else np.transpose(x, _TRANSPOSE[kind])


def _to_torch(x: np.ndarray, kind: str) -> np.ndarray:
    return x if kind == "same" else np.transpose(x, np.argsort(_TRANSPOSE[kind]))


def _encoder_keys(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Strips a fine-tuned model's `encoder.w2v_model.` prefix; returns (encoder entries,
    keys outside the encoder)."""
    if not any(k.startswith(_FT_PREFIX) for k in state_dict):
        return dict(state_dict), []
    inside = {k[len(_FT_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_FT_PREFIX)}
    return inside, [k for k in state_dict if not k.startswith(_FT_PREFIX)]


def _fold_pos_conv(sd: dict[str, Any]) -> None:
    """Replaces the positional conv's weight-norm pair by one folded `weight` (in place)."""
    for g_name, v_name in (
        ("weight_g", "weight_v"),
        ("parametrizations.weight.original0", "parametrizations.weight.original1"),
    ):
        if _POS + g_name in sd and _POS + v_name in sd:
            g, v = _to_numpy(sd.pop(_POS + g_name)), _to_numpy(sd.pop(_POS + v_name))
            sd[_POS + "weight"] = fold_weight_norm(g, v, dim=2)


def infer_config(state_dict: Mapping[str, Any], **fields: Any) -> AVHubertConfig:
    """The encoder shape read from the tensors' shapes (encoder keys, prefix stripped);
    `fields` give what shapes do not fix (`encoder_attention_heads`, `layer_norm_first`)."""
    sd, _ = _encoder_keys(state_dict)

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ValueError(f"AV-HuBERT state dict has no {key!r}; is this an AV-HuBERT model?")
        return tuple(sd[key].shape)

    d, audio_dim = shape("feature_extractor_audio.proj.weight")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    pos = shape(_POS + "weight_v") if _POS + "weight_v" in sd else shape(_POS + "weight")
    widths, blocks = [], []
    while (key := f"{_VIDEO}trunk.layer{len(widths) + 1}.0.conv1.weight") in sd:
        widths.append(shape(key)[0])
        prefix = f"{_VIDEO}trunk.layer{len(widths)}."
        blocks.append(len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)}))
    kw = dict(
        encoder_embed_dim=d,
        encoder_layers=len(layers),
        encoder_ffn_embed_dim=shape("encoder.layers.0.fc1.weight")[0],
        audio_feat_dim=audio_dim,
        modality_fuse="concat" if "post_extract_proj.weight" in sd else "add",
        conv_pos=pos[2],
        conv_pos_groups=d // pos[1],
        resnet_stem=shape(_VIDEO + "frontend3D.0.weight")[0],
        resnet_widths=tuple(widths),
        resnet_blocks=tuple(blocks),
        encoder_attention_heads=max(d // 64, 1),
    )
    return AVHubertConfig(**{**kw, **fields})


def convert_state_dict(
    state_dict: dict[str, Any], cfg: AVHubertConfig
) -> tuple[dict[str, Any], list[str]]:
    """Fairseq state dict -> (`variables` {"params", "batch_stats"}, sorted unmapped keys).

    Entries are popped from `state_dict` one at a time as they are converted, so a caller that
    hands over its dict never holds a second full copy.

    Raises:
      ValueError: naming every key the config needs that is missing, or the first tensor
        whose shape disagrees (fairseq key, its shape, the shape our model expects).
    """
    state_keys = list(state_dict)
    sd, outside = _encoder_keys(state_dict)
    state_dict.clear()
    _fold_pos_conv(sd)
    kmap = key_map(cfg)
    missing = sorted(set(kmap) - set(sd))
    if missing:
        raise ValueError(f"AV-HuBERT state dict lacks keys the config needs: {missing}")
    expected = variable_shapes(cfg)
    variables = common.place_checked(
        (
            (key, path, _from_torch(_to_numpy(sd.pop(key)), kind))
            for key, (path, kind) in kmap.items()
        ),
        expected,
        "AV-HuBERT",
    )
    prefix = _FT_PREFIX if outside or any(k.startswith(_FT_PREFIX) for k in state_keys) else ""
    unmapped = sorted(outside + [prefix + k for k in sd])
    return variables, unmapped


def from_fairseq_avhubert(
    state_dict: Mapping[str, Any], cfg: AVHubertConfig | None = None, dtype: Any = None
) -> tuple[AVHubertEncoder, dict[str, Any]]:
    """`(model, variables)` from a fairseq AV-HuBERT state dict (`cfg` inferred from the
    tensor shapes when None); unmapped keys are logged."""
    cfg = cfg or infer_config(state_dict)
    variables, unmapped = convert_state_dict(dict(state_dict), cfg)
    if unmapped:
        logging.info("AV-HuBERT import: %d keys not mapped: %s", len(unmapped), unmapped)
    return AVHubertEncoder(cfg, dtype=dtype), variables


def to_fairseq_state_dict(variables: Mapping[str, Any], cfg: AVHubertConfig) -> dict[str, Any]:
    """Our `variables` -> fairseq-named numpy state dict (the positional conv as one folded
    `weight`, which the importer accepts as well as the weight-norm pair)."""
    variables = nn.meta.unbox(variables)
    out = {}
    for key, (path, kind) in key_map(cfg).items():
        node: Any = variables
        for p in path.split("/"):
            node = node[p]
        out[key] = np.ascontiguousarray(_to_torch(np.asarray(node, np.float32), kind))
    return out


class _Opaque:
    """An inert stand-in for a class a checkpoint names but we do not admit: it records the
    constructor arguments, pickled state and items it is given, and runs nothing else."""

    origin = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        obj = object.__new__(cls)
        obj.__dict__.update(_args=args, _state=None, _items={}, _list=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self._items[key] = value

    def append(self, value: Any) -> None:
        self._list.append(value)

    def extend(self, values: Any) -> None:
        self._list.extend(values)


_ADMITTED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("copyreg", "_reconstructor"),
    *(("builtins", n) for n in ("object", "dict", "list", "tuple", "set", "frozenset", "slice")),
    *(("builtins", n) for n in ("int", "float", "str", "bytes", "bool", "complex")),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits `_ADMITTED` globals and torch dtypes; anything else becomes an `_Opaque` type."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _ADMITTED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (_Opaque,), {"origin": f"{module}.{name}"})


_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="avjax_restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load(),
)


def _find_field(obj: Any, name: str, seen: set[int] | None = None) -> Any:
    """The first value stored under `name` anywhere in a checkpoint's config records (plain
    dicts, `_Opaque` records of argparse Namespaces or omegaconf nodes); None if absent."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, str | bytes | int | float | bool | type(None)):
        return None
    seen.add(id(obj))
    if isinstance(obj, _Opaque):
        children = [obj._state, obj._items, list(obj._args), obj._list]
    elif isinstance(obj, Mapping):
        if name in obj:
            value = obj[name]
            if isinstance(value, _Opaque) and isinstance(value._state, dict):
                return value._state.get("_val", value)
            return value
        children = list(obj.values())
    elif isinstance(obj, list | tuple):
        children = list(obj)
    else:
        return None
    for child in children:
        if (found := _find_field(child, name, seen)) is not None:
            return found
    return None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A fairseq checkpoint as a dict (`model`: the state dict; `cfg` / `args`: config
    records), read with `weights_only=True` when the file allows it, else with the restricted
    unpickler; memory-mapped when the file format allows."""
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: AV-HuBERT checkpoint not found")

    def load(**kw: Any) -> Any:
        try:
            return torch.load(path, map_location="cpu", mmap=True, **kw)
        except RuntimeError as e:  # a legacy (pre-zip) file cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", **kw)

    try:
        ckpt = load(weights_only=True)
    except pickle.UnpicklingError as e:
        logging.info("%s: not a weights-only file (%s); using the restricted unpickler", path, e)
        ckpt = load(weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if "model" not in ckpt:  # a bare state dict
        ckpt = {"model": ckpt}
    return dict(ckpt)


def load_avhubert(
    path: str | os.PathLike, dtype: Any = None
) -> tuple[AVHubertEncoder, dict[str, Any], list[str]]:
    """`(model, variables, unmapped keys)` from an official AV-HuBERT checkpoint file."""
    ckpt = read_checkpoint(path)
    records = [ckpt.get("cfg"), ckpt.get("args")]
    fields = {}
    for name in ("encoder_attention_heads", "layer_norm_first"):
        value = _find_field(records, name)
        if value is None:
            logging.warning(
                "%s: no %s in the checkpoint's config; assuming the default", path, name
            )
        else:
            fields[name] = type(getattr(AVHubertConfig(), name))(value)
    state_dict = ckpt.pop("model")
    cfg = infer_config(state_dict, **fields)
    variables, unmapped = convert_state_dict(state_dict, cfg)
    if unmapped:
        logging.info("AV-HuBERT import: %d keys not mapped: %s", len(unmapped), unmapped)
    return AVHubertEncoder(cfg, dtype=dtype), variables, unmapped


def save_converted(model: AVHubertEncoder, variables: dict[str, Any], out_dir: str) -> None:
    """Writes `out_dir/params` (orbax: `params` and `batch_stats`) and `out_dir/model.json`
    (the `AVHubertConfig` fields), atomically."""
    save_params_dir(out_dir, dataclasses.asdict(model.config), dict(variables))


def load_converted(
    out_dir: str, tool: str = "tools/convert_avhubert.py", dtype: Any = None
) -> tuple[AVHubertEncoder, dict[str, Any]]:
    """Reads what `save_converted` wrote: `(model, variables)`."""
    fields, variables = load_params_dir(out_dir, tool)
    known = {f.name for f in dataclasses.fields(AVHubertConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{out_dir}/model.json: unknown AVHubertConfig fields {unknown}")
    return AVHubertEncoder(AVHubertConfig(**fields), dtype=dtype), dict(variables)
