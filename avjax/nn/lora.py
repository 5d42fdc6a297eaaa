"""LoRA adapters on chosen Dense projections, without touching the model's code.

    y = x W (+ b)  +  (alpha / rank) * dropout(x) A B        A [in, rank], B [rank, out] = 0

A Flax method interceptor (`lora_scope`) wraps every `nn.Dense.__call__` whose module path
("blocks_0/attention/q", or "layers/attention/q" with `scan_layers`) matches `LoraConfig.target`
(a regex): it adds the adapter params `lora_a` / `lora_b` beside the Dense's `kernel` (so the
param paths are `.../attention/q/lora_a`), and computes the low-rank term. `B` starts at zero,
so the adapted model starts equal to the base. The same interceptor multiplies a kernel that
`avjax.nn.quant` replaced by a `QTensor` (int8 / NF4) with the dequantise-on-the-fly matmul, so
a QLoRA base runs the same way.

Training: `lora_param_groups()` is a `config.train.param_groups` list that trains only the
adapters (AdamW) and freezes everything else (`avjax.train.optim`: frozen leaves are
stop-gradient'ed and carry no optimizer state). `merge_lora` folds `scale * A B` into the
kernels (dequantising a quantised base) and drops the adapters: the merged params run without
the interceptor and export like the base (`avjax.convert.llama.to_hf_llama`).

`LoraModel(model, cfg)` wraps a module so its `init` / `apply` run under the scope (anything
that calls `model.apply`, e.g. `avjax.sample.decode`, then sees the adapted model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn.quant import QTensor, dequantize, dequantize_params, qmatmul

LORA_A, LORA_B = "lora_a", "lora_b"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r), dropout on the adapter's input, and
    `target`: a regex searched in each Dense module's path. The default is the paper's
    (MMS-LLaMA: q/k/v/o, r 16, alpha 32, dropout 0.05)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target: str = r"attention/(q|k|v|out)$"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _kernel_names(module: nn.Module) -> tuple[Any, Any]:
    """Logical axis names of the Dense kernel (from its box at init), or (None, None)."""
    if module.has_variable("params", "kernel"):
        box = module.get_variable("params", "kernel")
        if isinstance(box, nn.LogicallyPartitioned):
            return tuple(box.names)[-2:]
    return None, None


def _adapter(module: nn.Module, x: jax.Array, cfg: LoraConfig, train: bool) -> jax.Array:
    """The low-rank term `scale * dropout(x) A B` of a Dense `module`; `x [..., in]`."""
    n_in, n_out = x.shape[-1], module.features
    names_in, names_out = _kernel_names(module)
    a_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
    b_init = nn.initializers.zeros_init()
    if names_in is not None or names_out is not None:
        a_init = nn.with_logical_partitioning(a_init, (names_in, None))
        b_init = nn.with_logical_partitioning(b_init, (None, names_out))
    a = module.param(LORA_A, a_init, (n_in, cfg.rank), jnp.float32)
    b = module.param(LORA_B, b_init, (cfg.rank, n_out), jnp.float32)
    dtype = module.dtype or x.dtype
    h = x.astype(dtype)
    if train and cfg.dropout > 0:
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.dropout, h.shape)
        h = jnp.where(keep, h / (1.0 - cfg.dropout), 0).astype(dtype)
    h = jnp.einsum("...i,ir->...r", h, a.astype(dtype))
    return jnp.einsum("...r,ro->...o", h, b.astype(dtype)) * jnp.asarray(cfg.scale, dtype)


def _quantized_dense(module: nn.Dense, x: jax.Array, kernel: QTensor) -> jax.Array:
    """`nn.Dense` with a quantised kernel: `qmatmul` plus the float bias, if any."""
    y = qmatmul(x, kernel, module.dtype or x.dtype)
    if module.use_bias:
        y = y + module.get_variable("params", "bias").astype(y.dtype)
    return y


def make_interceptor(cfg: LoraConfig | None, train: bool = False):
    """The Flax method interceptor: LoRA on targeted Dense modules (`cfg` None: none) and
    quantised kernels multiplied on the fly."""
    pattern = re.compile(cfg.target) if cfg is not None else None

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        x = args[0]
        kernel = (
            module.get_variable("params", "kernel")
            if module.has_variable("params", "kernel")
            else None
        )
        if isinstance(kernel, QTensor):
            y = _quantized_dense(module, x, kernel)
        else:
            y = next_fun(*args, **kwargs)
        if pattern is not None and pattern.search("/".join(module.path)):
            y = y + _adapter(module, x, cfg, train).astype(y.dtype)
        return y

    return interceptor


@contextlib.contextmanager
def lora_scope(cfg: LoraConfig | None, train: bool = False) -> Iterator[None]:
    """Within it, `init` / `apply` of any module see LoRA on the targeted Dense layers (and
    multiply quantised kernels on the fly). Tracing must happen inside: jit inside the scope.
    `train` enables the adapter dropout (needs a "dropout" rng)."""
    with nn.intercept_methods(make_interceptor(cfg, train)):
        yield


class LoraModel:
    """`model` whose `init` / `apply` run under `lora_scope(cfg, train)`; other attributes
    (max_len, scan_layers, config, ...) are the wrapped module's."""

    def __init__(self, model: nn.Module, cfg: LoraConfig | None, train: bool = False):
        self.model, self.lora, self.train = model, cfg, train

    def init(self, *args: Any, **kwargs: Any) -> Any:
        with lora_scope(self.lora, self.train):
            return self.model.init(*args, **kwargs)

    def apply(self, *args: Any, lora_train: bool | None = None, **kwargs: Any) -> Any:
        """`model.apply` under the scope; `lora_train` (e.g. a Task's `ctx.train`) overrides
        the wrapper's `train` for this call (adapter dropout on / off)."""
        with lora_scope(self.lora, self.train if lora_train is None else lora_train):
            return self.model.apply(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("model", "lora", "train"):  # not yet set (copy / unpickling)
            raise AttributeError(name)
        return getattr(self.model, name)


def add_adapters(
    model: nn.Module, params: Any, cfg: LoraConfig, rng: jax.Array, *args: Any
) -> dict[str, Any]:
    """Base `params` (float or quantised) plus freshly initialised adapters for `cfg`.

    `args` are example inputs of `model` (e.g. tokens `[batch, time]`). Raises if `cfg.target`
    matches no Dense module.
    """

    def adapters_only(key: jax.Array) -> Any:  # jitted: the base init is dead code, dropped
        tree = nn.meta.unbox(LoraModel(model, cfg).init(key, *args)["params"])
        return jax.tree_util.tree_map_with_path(lambda p, x: x if _is_adapter(p) else None, tree)

    adapters = jax.jit(adapters_only)(rng)
    merged = _merge_trees(params, adapters)
    if not lora_paths(merged):
        raise ValueError(f"LoRA target {cfg.target!r} matches no Dense module")
    return merged


def _is_adapter(path: tuple) -> bool:
    last = getattr(path[-1], "key", path[-1])
    return last in (LORA_A, LORA_B)


def _merge_trees(base: Any, extra: Any) -> Any:
    """Nested dicts: `base` with the non-None leaves of `extra` added."""
    if not isinstance(extra, dict):
        return base if extra is None else extra
    out = dict(base) if isinstance(base, dict) else {}
    for k, v in extra.items():
        sub = _merge_trees(out.get(k), v)
        if sub is not None and not (isinstance(sub, dict) and not sub):
            out[k] = sub
    return out


def lora_paths(params: Any) -> list[str]:
    """Paths of the modules holding adapters ("blocks_0/attention/q", ...)."""
    found: list[str] = []

    def walk(tree: Any, prefix: str) -> None:
        if isinstance(tree, dict):
            if LORA_A in tree and LORA_B in tree:
                found.append(prefix.rstrip("/"))
            for k, v in tree.items():
                walk(v, f"{prefix}{k}/")

    walk(params, "")
    return found


def merge_lora(params: Any, cfg: LoraConfig, dtype: Any = jnp.float32) -> Any:
    """Folds every adapter into its kernel (`W + scale * A B`) and drops `lora_a` / `lora_b`;
    quantised kernels are dequantised to `dtype`: float params for the plain model."""
    return dequantize_params(_merge(params, cfg, dtype), dtype)


def _merge(params: Any, cfg: LoraConfig, dtype: Any) -> Any:
    if isinstance(params, dict):
        if LORA_A in params and LORA_B in params:
            out = {k: v for k, v in params.items() if k not in (LORA_A, LORA_B)}
            w = out["kernel"]
            w = dequantize(w, dtype) if isinstance(w, QTensor) else jnp.asarray(w, dtype)
            delta = jnp.einsum("...ir,...ro->...io", params[LORA_A], params[LORA_B])
            out["kernel"] = w + (cfg.scale * delta).astype(dtype)
            return out
        return {k: _merge(v, cfg, dtype) for k, v in params.items()}
    return params


def lora_param_groups() -> list[dict[str, Any]]:
    """`config.train.param_groups` training only the adapters: AdamW on `lora_a` / `lora_b`,
    everything else frozen (no gradient, no optimizer state)."""
    return [
        {"regex": rf"({LORA_A}|{LORA_B})$", "optimizer": "adamw"},
        {"regex": ".", "optimizer": "frozen"},
    ]
