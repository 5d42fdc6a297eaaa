r"""Measured: the memory a QLoRA base takes, per format, at Llama-3.2 size (no weights needed).

  python tools/bench/qlora_memory.py [--model=llama3_2_1b|llama3_2_3b|tiny] [--tokens=256]
                                     [--json=PATH]

For the base kept in float32, bfloat16, int8 (per channel) and NF4 (blocks of 64), with LoRA
(r 16, alpha 32) on q/k/v/o as MMS-LLaMA trains it, this builds the parameter tree abstractly
(`jax.eval_shape`: nothing is materialised), quantises it the way `avjax.nn.quant` does, and
compiles (XLA, this machine's backend) one LoRA training step: loss and gradient with respect
to the adapters only, on `[1, tokens]` tokens. It reports:

  * base weight bytes as held (`quant.param_bytes`) and per base-weight parameter: what the
    format implies is 4 / 2 / 1 + 4/in / 0.5 + 4/64 bytes for the quantised projections (the
    embedding and norms stay float32 in every row);
  * the compiled step's argument bytes and temporaries (`compiled.memory_analysis()`), i.e.
    what the step holds at once besides its outputs: the measured footprint of a QLoRA step.

Run once; JSON with `--json`. The figures are the compiler's accounting for the host backend;
on TPU / GPU the same tree takes the same argument bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from avjax.nn import quant  # noqa: E402
from avjax.nn.lora import LoraConfig, LoraModel, _is_adapter  # noqa: E402
from avjax.nn.transformer import DecoderConfig, TransformerLM  # noqa: E402

LORA = LoraConfig(rank=16, alpha=32.0, dropout=0.0)
FORMATS = ("float32", "bfloat16", "int8", "nf4")


def build(name: str, tokens: int) -> tuple[TransformerLM, Any]:
    """The model (scanned layers, bfloat16 activations) and its abstract LoRA param tree."""
    if name == "tiny":
        cfg = DecoderConfig.llama(
            vocab_size=512, width=128, mlp_width=256, num_heads=4, num_layers=2, num_kv_heads=2
        )
    else:
        cfg = getattr(DecoderConfig, name)()
    model = TransformerLM(
        **cfg.__dict__, max_len=tokens, scan_layers=True, dtype=jnp.bfloat16, remat="dots"
    )
    ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
    init = lambda k, x: LoraModel(model, LORA).init(k, x)["params"]  # noqa: E731
    boxed = jax.eval_shape(init, jax.random.key(0), ids)
    import flax.linen as nn

    return model, nn.meta.unbox(boxed)


def base_as(params: Any, fmt: str) -> Any:
    """The abstract tree with the base projections (`quant.BASE_WEIGHTS`) in `fmt`; the
    embedding, norms and adapters stay float32."""
    if fmt in ("int8", "nf4"):
        return jax.eval_shape(lambda p: quant.quantize_params(p, fmt), params)
    dtype, pattern = jnp.dtype(fmt), re.compile(quant.BASE_WEIGHTS)

    def cast(path: tuple, x: Any) -> Any:
        if not pattern.search(quant.path_str(path)):
            return x
        return jax.ShapeDtypeStruct(x.shape, dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def _split(params: Any) -> tuple[Any, Any]:
    """(adapters, base) trees with None where the other one's leaves are."""
    is_q = lambda x: isinstance(x, quant.QTensor)  # noqa: E731
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: x if _is_adapter(p) else None, params, is_leaf=is_q
    )
    base = jax.tree_util.tree_map_with_path(
        lambda p, x: None if _is_adapter(p) else x, params, is_leaf=is_q
    )
    return adapters, base


def _merge(a: Any, b: Any) -> Any:
    is_q = lambda x: x is None or isinstance(x, quant.QTensor)  # noqa: E731
    return jax.tree.map(lambda x, y: y if x is None else x, a, b, is_leaf=is_q)


def compile_step(model: TransformerLM, params: Any, tokens: int) -> Any:
    """One LoRA step (loss and adapter gradients), compiled for the abstract `params`."""
    adapters, base = _split(params)
    lm = LoraModel(model, LORA)

    def loss(adapters: Any, base: Any, ids: jax.Array) -> jax.Array:
        base = jax.tree.map(
            lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 and x.ndim >= 2 else x,
            base,
        )
        logits, _ = lm.apply({"params": _merge(adapters, base)}, ids)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

    ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
    return jax.jit(jax.value_and_grad(loss)).lower(adapters, base, ids).compile()


def _base_weight_count(params: Any) -> int:
    """Parameters of the projections that quantisation replaces."""
    pattern = re.compile(quant.BASE_WEIGHTS)
    return sum(
        int(np.prod(x.shape))
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if pattern.search(quant.path_str(p))
    )


def measure(model_name: str, tokens: int) -> list[dict[str, Any]]:
    model, params = build(model_name, tokens)
    n_base = _base_weight_count(params)
    float_bytes = quant.param_bytes(params)
    rows = []
    for fmt in FORMATS:
        tree = base_as(params, fmt)
        held = quant.param_bytes(tree)
        rest = float_bytes - 4 * n_base  # embedding, norms, adapters: float32 in every row
        t0 = time.time()
        mem = compile_step(model, tree, tokens).memory_analysis()
        rows.append(
            {
                "model": model_name,
                "format": fmt,
                "params_bytes": held,
                "bytes_per_base_weight": (held - rest) / n_base,
                "step_argument_bytes": int(mem.argument_size_in_bytes),
                "step_temp_bytes": int(mem.temp_size_in_bytes),
                "compile_s": time.time() - t0,
            }
        )
        r = rows[-1]
        print(
            f"{fmt:9s} params {held / 2**30:7.3f} GiB  {r['bytes_per_base_weight']:.4f} B/weight"
            f"  step args {r['step_argument_bytes'] / 2**30:7.3f} GiB  temps "
            f"{r['step_temp_bytes'] / 2**30:6.3f} GiB  (compiled in {r['compile_s']:.0f} s)",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3_2_1b")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    rows = measure(args.model, args.tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
