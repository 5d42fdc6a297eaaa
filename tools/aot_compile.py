r"""Ahead-of-time fit check: compile a config's real train step for a TPU topology, on a CPU.

  pip install -e '.[tpu]'     # libtpu, for TPU topologies without a TPU
  python tools/aot_compile.py --config=configs/speechssm.py:2b --topology=v5e:16x16 \
      --json=aot.json

Compiles the sharded train step (same code as training) for the topology's devices and prints
the per-chip memory (parameters, optimizer state, batch, temporaries) against the chip's HBM,
the compiler's FLOPs and the implied step time and MFU (useful FLOPs over peak x a step time
that counts remat's recomputation: the FLOPs executed are the largest of the compiler's count,
the analytic one and the compiled HLO's matmuls times their loop trip counts), and the bytes
accessed per step with their split by op category (attention, recurrence, matmul, other;
estimated from the compiled HLO, scaled to the compiler's total). `--topology=cpu:8` compiles
for host CPU devices instead (for testing the tool itself without libtpu).

`--mode=decode` compiles one cached sampling step instead (one token for each of `--batch`
sequences, the model's decoding cache donated and updated in place; layers unscanned, no
remat; a KV cache of `--cache_tokens` where the model has one, e.g. 24,000 = 16 minutes of
25 Hz units), with the parameters in training's sharding cast to the model's dtype, and
reports per chip: parameters, cache, temporaries and peak against HBM; the bytes one step
touches (the floor "every parameter and the whole cache read once" and the compiler's count,
an upper estimate) and from them the memory-roofline time per step, i.e. per generated token
of each sequence, and the tokens/s of the whole topology; and the largest batch that fits,
extrapolated linearly from the compiled one, with its tokens/s:

  python tools/aot_compile.py --mode=decode --config=configs/speechssm.py:2b \
      --config.mesh.preset=dp --topology=v5e:2x4 --batch=64
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avjax.train.aot import (  # noqa: E402
    _bytes_per_device,
    compile_report,
    hlo_bytes_by_category,
    topology_devices,
)


def _define_flags() -> dict[str, Any]:
    """The command line's flags (defined only when run as a script, so the module imports
    beside `avjax.main`, which defines its own --config and --mode)."""
    return {
        "config": config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True),
        "topology": flags.DEFINE_string(
            "topology",
            "v5e:16x16",
            "TPU topology 'v5e:16x16', 'v5p:4x4x4', 'v4:4x4x4' or 'cpu:N'.",
        ),
        "json": flags.DEFINE_string("json", None, "Write the report as JSON here."),
        "mode": flags.DEFINE_enum(
            "mode", "train", ["train", "decode"], "Compile the train step or one decode step."
        ),
        "batch": flags.DEFINE_integer("batch", 64, "decode: sequences decoded together."),
        "cache_tokens": flags.DEFINE_integer(
            "cache_tokens",
            24_000,
            "decode: KV-cache length of models with one (config.model.max_len).",
        ),
        "param_dtype": flags.DEFINE_string(
            "param_dtype", "", "decode: parameter dtype ('' = config.model.dtype)."
        ),
    }


_FLAGS: dict[str, Any] = {}


def _gib(b: float) -> str:
    return f"{b / 2**30:8.2f} GiB"


def _decode_config(config: Any, cache_tokens: int) -> Any:
    """A copy of `config` for decoding: layers unscanned (one cache per layer, batch first),
    no remat, and a KV cache of `cache_tokens` where the model has one (`model.max_len`)."""
    import ml_collections

    cfg = ml_collections.ConfigDict(config.to_dict())
    for key, value in (("scan_layers", False), ("remat", "none"), ("max_len", cache_tokens)):
        if key in cfg.model:
            cfg.model[key] = value
    return cfg


def _abstract_params(task: Any, model: Any, mesh: Any, rules: Any, dtype: Any) -> Any:
    """The model's parameters as ShapeDtypeStructs in training's sharding, floating leaves
    cast to `dtype`."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from avjax.train.sharding import logical_shardings

    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        boxed = jax.eval_shape(
            lambda: task.init_variables(model, jax.random.key(0), task.dummy_batch())
        )["params"]
        shardings = logical_shardings(boxed, mesh, rules)

    def cast(s: Any, sh: Any) -> Any:
        dt = dtype if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype
        return jax.ShapeDtypeStruct(s.shape, dt, sharding=sh)

    return jax.tree.map(cast, nn.meta.unbox(boxed), shardings)


def _batch_placed(tree: Any, mesh: Any, rules: Any) -> Any:
    """ShapeDtypeStructs of `tree` (leaves `[batch, ...]`) with the batch axis sharded as
    training shards it when the batch divides the data-parallel size, else replicated."""
    import jax

    from avjax.train.sharding import batch_sharding, data_parallel_size, replicated

    batch = jax.tree.leaves(tree)[0].shape[0]
    split = batch % data_parallel_size(mesh, rules) == 0

    def place(s: Any) -> Any:
        sh = batch_sharding(mesh, rules, s.ndim) if split and s.ndim else replicated(mesh)
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)

    return jax.tree.map(place, tree)


def _compile_decode_step(model: Any, params: Any, cache: Any, mesh: Any, rules: Any) -> Any:
    """Compiles one cached greedy step `(params, cache, token [b], position [b]) -> (next
    token [b], cache)`, the cache donated (updated in place, as the sampler does)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    batch = jax.tree.leaves(cache)[0].shape[0]
    tok = _batch_placed(jax.ShapeDtypeStruct((batch,), jnp.int32), mesh, rules)

    def step(p: Any, c: Any, token: jax.Array, position: jax.Array) -> tuple[jax.Array, Any]:
        logits, c = model.apply({"params": p}, token[:, None], position[:, None], cache=c)
        return jnp.argmax(logits[:, -1].astype(jnp.float32), axis=-1).astype(jnp.int32), c

    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        return jax.jit(step, donate_argnums=1).lower(params, cache, tok, tok).compile()


def _decode_traffic(compiled: Any, floor: int, chip: dict, batch: int) -> dict[str, Any]:
    """Bytes one decode step touches per chip and the memory-roofline time per step.

    The roofline is taken at the floor (every parameter and the whole cache read once from
    HBM) and, as an upper estimate, at the compiler's "bytes accessed" (which also counts
    reads of weights already staged in on-chip memory and the embedding table twice). The
    HLO walk's figure is kept for reference only: it counts TPU async copy/slice start and done
    ops each with their operands, several times the real traffic.
    """
    cost = compiled.cost_analysis()
    cost = dict((cost[0] if isinstance(cost, list) else cost) or {})
    by_cat = hlo_bytes_by_category(compiled.as_text())
    compiler_b = float(cost.get("bytes accessed", 0.0))
    upper = _decode_traffic_roofline(max(compiler_b, float(floor)), chip, batch)
    return {
        "bytes_accessed_per_chip": compiler_b,
        "bytes_accessed_hlo_estimate_per_chip": sum(by_cat.values()),
        "bytes_accessed_by_category_per_chip": by_cat,
        "bytes_floor_per_chip": floor,
        **_decode_traffic_roofline(float(floor), chip, batch),
        "memory_bound_s_per_step_compiler": upper["memory_bound_s_per_step"],
        "tokens_per_s_compiler": upper["tokens_per_s"],
    }


def _decode_traffic_roofline(nbytes: float, chip: dict, batch: int) -> dict[str, Any]:
    """Memory-bound time of a decode step touching `nbytes` per chip (one token for each of
    `batch` sequences) and the tokens/s it implies; None without an HBM bandwidth."""
    step_s = nbytes / chip["hbm_bw"] if chip.get("hbm_bw") else None
    return {"memory_bound_s_per_step": step_s, "tokens_per_s": batch / step_s if step_s else None}


# The TPU runtime keeps part of HBM: XLA refuses programs over 15.75 of v5e's 16 GiB.
_HBM_RESERVED_FRACTION = 1 / 64


def _max_batch(r: dict[str, Any], chip: dict, seqs_per_chip: int) -> dict[str, Any]:
    """The largest batch that fits in HBM less the runtime's reserve, extrapolated linearly
    from the compiled one (each sequence on a chip costs its cache and its share of the
    temporaries; temporaries grow slower than that, so it errs low), and the floor roofline's
    tokens/s there; None on host devices."""
    if not r["hbm_bytes_per_chip"]:
        return {"max_batch_estimate": None, "tokens_per_s_at_max_batch": None}
    per_seq = (r["cache_bytes_per_chip"] + r["temp_bytes_per_chip"]) / seqs_per_chip
    usable = r["hbm_bytes_per_chip"] * (1 - _HBM_RESERVED_FRACTION)
    free = usable - r["params_bytes_per_chip"] - r["code_bytes_per_chip"]
    fit = max(int(free // per_seq), 0)
    cache_seq = r["cache_bytes_per_chip"] / seqs_per_chip
    max_batch = fit * (r["batch"] // seqs_per_chip)
    step = _decode_traffic_roofline(r["params_bytes_per_chip"] + fit * cache_seq, chip, max_batch)
    return {"max_batch_estimate": max_batch, "tokens_per_s_at_max_batch": step["tokens_per_s"]}


def decode_report(
    config: Any, topology: str, batch: int, cache_tokens: int, param_dtype: str = ""
) -> dict[str, Any]:
    """Compiles one decode step of `config`'s model for `topology` at `batch` sequences;
    returns per-chip memory (parameters, cache, temporaries, peak) and the memory roofline."""
    import jax
    import numpy as np

    from avjax.models.speechssm import DTYPES
    from avjax.tasks import get_task
    from avjax.train.sharding import apply_preset, make_mesh, rules_from_config

    cfg = apply_preset(_decode_config(config, cache_tokens))
    devices, chip = topology_devices(topology, int(cfg.mesh.get("dcn_data", 1)))
    mesh, rules = make_mesh(cfg.mesh, devices=devices), rules_from_config(cfg.sharding_rules)
    task = get_task(cfg, "/tmp/avjax_aot_unused")
    model = task.build_model()
    dtype = DTYPES[param_dtype or cfg.model.dtype]
    params = _abstract_params(task, model, mesh, rules, dtype)
    cache = _batch_placed(jax.eval_shape(lambda: model.init_cache(batch)), mesh, rules)
    compiled = _compile_decode_step(model, params, cache, mesh, rules)
    mem = compiled.memory_analysis()
    p_b, c_b = _bytes_per_device(params), _bytes_per_device(cache)
    temp_b = int(getattr(mem, "temp_size_in_bytes", 0))
    code_b = int(getattr(mem, "generated_code_size_in_bytes", 0))
    peak_b = p_b + c_b + temp_b + code_b  # the cache is donated: updated in place
    cache_total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(cache))
    report = {
        "mode": "decode",
        "config": cfg.get("task"),
        "topology": topology,
        "num_chips": len(devices),
        "mesh": dict(mesh.shape),
        "batch": batch,
        "cache_tokens": int(cfg.model.max_len) if "max_len" in cfg.model else None,
        "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
        "param_dtype": np.dtype(dtype).name,
        "hbm_bytes_per_chip": chip["hbm"],
        "params_bytes_per_chip": p_b,
        "cache_bytes_per_chip": c_b,
        "cache_bytes_per_sequence": cache_total // batch,
        "temp_bytes_per_chip": temp_b,
        "code_bytes_per_chip": code_b,
        "peak_bytes_per_chip": peak_b,
        "fits": bool(chip["hbm"] == 0 or peak_b <= chip["hbm"]),
        **_decode_traffic(compiled, p_b + c_b, chip, batch),
    }
    seqs_per_chip = max(1, round(c_b * batch / cache_total)) if cache_total else batch
    return {**report, **_max_batch(report, chip, seqs_per_chip)}


def _print_decode(r: dict[str, Any]) -> None:
    print(
        f"{r['topology']}: {r['num_chips']} chips, mesh {r['mesh']}, {r['params']:,} params "
        f"({r['param_dtype']}), decode step at batch {r['batch']}"
        + (f", KV cache of {r['cache_tokens']:,} tokens" if r["cache_tokens"] else "")
    )
    for k in ("params", "cache", "temp", "code", "peak"):
        print(f"  {k:<10} {_gib(r[f'{k}_bytes_per_chip'])} per chip")
    print(f"  cache      {r['cache_bytes_per_sequence'] / 2**20:10.2f} MiB per sequence")
    if r["hbm_bytes_per_chip"]:
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        print(f"  HBM        {_gib(r['hbm_bytes_per_chip'])} per chip -> {verdict}")
    print(
        f"  traffic    floor (params + cache) {_gib(r['bytes_floor_per_chip'])}, compiler "
        f"{_gib(r['bytes_accessed_per_chip'])} per chip and step (HLO walk "
        f"{_gib(r['bytes_accessed_hlo_estimate_per_chip'])})"
    )
    if r["memory_bound_s_per_step"]:
        print(
            f"  roofline   {1e3 * r['memory_bound_s_per_step']:.2f} ms per step (token) at the "
            f"floor, {1e3 * r['memory_bound_s_per_step_compiler']:.2f} ms at the compiler's "
            f"bytes: {r['tokens_per_s']:,.0f} / {r['tokens_per_s_compiler']:,.0f} tokens/s"
        )
        print(
            f"  max batch  ~{r['max_batch_estimate']:,} sequences fit (linear in the batch): "
            f"{r['tokens_per_s_at_max_batch']:,.0f} tokens/s at the floor roofline"
        )


def main(argv: list[str]) -> None:
    del argv
    fv = {k: v.value for k, v in _FLAGS.items()}
    if fv["mode"] == "decode":
        report = decode_report(
            fv["config"], fv["topology"], fv["batch"], fv["cache_tokens"], fv["param_dtype"]
        )
        _print_decode(report)
    else:
        report = compile_report(fv["config"], fv["topology"])
        _print_train(report)
    if fv["json"]:
        with open(fv["json"], "w") as out:
            json.dump(report, out, indent=2)
        print(f"wrote {fv['json']}")


def _print_train(r: dict[str, Any]) -> None:
    print(f"{r['topology']}: {r['num_chips']} chips, mesh {r['mesh']}, {r['params']:,} params")
    for k in ("params", "optimizer", "batch", "temp", "code", "peak"):
        print(f"  {k:<10} {_gib(r[f'{k}_bytes_per_chip'])} per chip")
    if r["hbm_bytes_per_chip"]:
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        print(f"  HBM        {_gib(r['hbm_bytes_per_chip'])} per chip -> {verdict}")
    analytic = r["analytic_flops_per_step"]
    if r.get("cost_analysis_undercounts_loops"):
        print(
            "  note       the compiler's FLOPs/bytes count each scanned (while) body once: the "
            "roofline uses the HLO walk's FLOPs and bytes (loop bodies x trip counts)"
        )
    print(
        f"  FLOPs/step compiler {r['flops_per_step']:.3e}, "
        + (f"analytic {analytic:.3e}" if analytic else "analytic n/a (MFU from the compiler's)")
        + f", matmuls executed (HLO walk) {r['hlo_matmul_flops_per_step']:.3e}: "
        + f"{r['executed_flops_per_step']:.3e} executed ({r['executed_flops_source']}, "
        + f"x{r['recompute_factor'] or 0:.2f} the useful FLOPs)"
    )
    if r["compute_bound_s"] is not None:
        mem = r["memory_bound_s"]
        print(
            f"  roofline   compute {r['compute_bound_s']:.3f} s, memory "
            + (f"{mem:.3f} s" if mem is not None else "n/a")
            + f" ({r['bytes_accessed_per_chip'] / 2**30:.1f} GiB accessed per chip)"
        )
    total = r["bytes_accessed_per_chip"]
    if total:
        shares = ", ".join(
            f"{k} {100 * v / total:.0f}%"
            for k, v in r["bytes_accessed_by_category_per_chip"].items()
        )
        print(f"  traffic    {total / 2**30:.2f} GiB per chip per step: {shares}")
    if r["estimated_step_s"]:
        mfu = r["estimated_mfu"]
        print(
            f"  est. step  {r['estimated_step_s']:.3f} s ({r['estimated_step_source']}), MFU "
            + (f"{100 * mfu:.1f}%" if mfu is not None and math.isfinite(mfu) else "n/a")
        )


if __name__ == "__main__":
    _FLAGS.update(_define_flags())
    flags.mark_flag_as_required("config")
    app.run(main)
