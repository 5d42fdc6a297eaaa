r"""Benchmark: our RG-LRU and Griffin recurrent block vs RecurrentGemma's, same run; our
banded local attention vs the dense masked path.

  python tools/bench/ssm.py                     # lengths 1k..64k, every scan impl, both layers
  python tools/bench/ssm.py --quick --json=ssm.json   # rg_lru 1k,16k; the block: default, 16k

For each layer (rg_lru, recurrent_block), scan implementation and length, times the jitted
forward and forward+backward (median of the repeats after a warm-up) of ours and of
RecurrentGemma's (`recurrentgemma.jax`, its default AUTO scan) on identical shapes and dtype,
and prints a table with the ratio ours / reference (< 1 is faster). Rows go to `--json`; the
row of the implementation our "auto" default picks on this backend has `"default": true`.

The local-attention rows (`--layers=local_attention`) time multi-query attention at width 256
(`--attn_heads` query heads, one key/value head), window 2,048, forward+backward at 4k and 16k
tokens: the banded blockwise path (`--block` 512) beside the dense `[T, T]` one; ratio =
banded / dense (< 1 is faster). Beside the wall time of forward+backward, each path's
CPU-seconds per call (process CPU time over the timed calls and the warm-up, all threads),
the bytes XLA allocates for the compiled forward+backward (arguments + outputs + temporaries,
`*_peak_bytes`) and the process's peak RSS after it (`*_maxrss_bytes`, cumulative: banded runs
first). The dense path at 16k holds several `[heads, T, T]` float32
arrays (1 GiB each per head; ~8 GiB peak at the default single head): mind the host memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from avjax.nn.scan import resolve_impl  # noqa: E402


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _xla_bytes(compiled) -> int:
    """Bytes XLA allocates for a compiled call: arguments + outputs + temporaries."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def _layers(kind: str, impl: str, width: int, heads: int, dtype):
    from recurrentgemma.jax import layers as rg_layers
    from recurrentgemma.jax import modules as rg_modules

    from avjax.nn.rglru import RGLRU, RecurrentBlock

    if kind == "rg_lru":
        ours = RGLRU(width, heads, scan_impl=impl, dtype=dtype)
        ref = rg_layers.RGLRU(width, heads, dtype=dtype)

        def call_ours(m, x, pos):
            return m(x, pos)[0]

        def call_ref(m, x, pos):
            return m(x, pos, return_cache=False)[0]
    else:
        ours = RecurrentBlock(width, width, heads, 4, impl, dtype)
        ref = rg_modules.RecurrentBlock(width, heads, width, dtype=dtype)

        def call_ours(m, x, pos):
            return m(x, pos)[0]

        def call_ref(m, x, pos):
            return m(x, pos, return_cache=False)[0]

    return (ours, call_ours), (ref, call_ref)


# RecurrentGemma's layers take ~50 s to compile forward+backward on 2 CPU cores at any length
# (ours: ~2 s); their timings do not depend on our scan impl, so each (layer, length) is
# measured once and shared by the rows of every impl.
_REFERENCE_CACHE: dict[tuple, dict[str, float]] = {}


def bench(kind, impl, length, width, heads, batch, dtype, repeats) -> dict:
    x = jax.random.normal(jax.random.key(0), (batch, length, width), dtype)
    pos = jnp.broadcast_to(jnp.arange(length), (batch, length))
    row = {
        "layer": kind,
        "impl": impl,
        "length": length,
        "width": width,
        "batch": batch,
        "dtype": jnp.dtype(dtype).name,
    }
    ref_key = (kind, length, width, heads, batch, row["dtype"], repeats)
    for name, (module, call) in zip(
        ("ours", "reference"), _layers(kind, impl, width, heads, dtype), strict=True
    ):
        if name == "reference" and ref_key in _REFERENCE_CACHE:
            row.update(_REFERENCE_CACHE[ref_key])
            continue
        # Parameters do not depend on the length: initialise on 8 steps (an eager init on
        # the full sequence cost more than the timing itself).
        params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(1), x[:, :8], pos[:, :8]))

        def fwd(p, x, module=module, call=call):
            return call(module.bind(p), x, pos)

        f = jax.jit(fwd)
        g = jax.jit(jax.grad(lambda p, x, f=fwd: jnp.sum(f(p, x).astype(jnp.float32) ** 2)))
        row[f"{name}_fwd_s"] = _time(f, params, x, repeats=repeats)
        row[f"{name}_s"] = _time(g, params, x, repeats=repeats)
    _REFERENCE_CACHE[ref_key] = {k: row[k] for k in ("reference_fwd_s", "reference_s")}
    row["default"] = impl == resolve_impl("auto")
    row["ratio"] = row["ours_s"] / row["reference_s"]
    row["fwd_ratio"] = row["ours_fwd_s"] / row["reference_fwd_s"]
    return row


def bench_local_attention(length, width, heads, window, block, batch, dtype, repeats) -> dict:
    """Local attention core (multi-query, head dim width / heads), forward+backward: the
    banded blockwise path against the dense `[T, T]` masked path, same inputs, same run."""
    from avjax.nn.attention import attend, banded_local_attention, sequence_mask

    d = width // heads
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (batch, length, heads, d), dtype)
    k = jax.random.normal(kk, (batch, length, 1, d), dtype)
    v = jax.random.normal(kv, (batch, length, 1, d), dtype)
    pos = jnp.broadcast_to(jnp.arange(length), (batch, length))
    # Positions are an argument, as in training: a constant would be folded into a [T, T] mask.
    paths = {
        "banded": lambda q, k, v, pos: banded_local_attention(q, k, v, pos, window, block),
        "dense": lambda q, k, v, pos: attend(q, k, v, sequence_mask(pos, window)),
    }
    row = {"layer": "local_attention", "impl": f"window {window}, block {block}"}
    row.update(length=length, width=width, batch=batch, dtype=jnp.dtype(dtype).name)
    for name, fn in paths.items():
        loss = lambda q, k, v, p, fn=fn: jnp.sum(fn(q, k, v, p).astype(jnp.float32) ** 2)  # noqa: E731
        row[f"{name}_fwd_s"] = _time(jax.jit(fn), q, k, v, pos, repeats=repeats)
        grad = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v, pos).compile()
        cpu0 = time.process_time()
        row[f"{name}_s"] = _time(grad, q, k, v, pos, repeats=repeats)
        row[f"{name}_cpu_s"] = (time.process_time() - cpu0) / (repeats + 1)
        row[f"{name}_peak_bytes"] = _xla_bytes(grad)
        row[f"{name}_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row["ratio"] = row["banded_s"] / row["dense_s"]
    row["fwd_ratio"] = row["banded_fwd_s"] / row["dense_fwd_s"]
    return row


def _attention_rows(args, dtype, repeats) -> list[dict]:
    """The local-attention rows (`--layers=local_attention`): banded vs dense, 4k and 16k."""
    rows = []
    print(
        f"{'layer':<16}{'impl':<22}{'length':>8}{'banded':>20}{'dense':>20}{'ratio':>8}"
        f"{'CPU-s b/d':>16}{'XLA MiB b/d':>16}"
    )
    for length in [int(n) for n in args.attn_lengths.split(",")]:
        r = bench_local_attention(
            length, args.width, args.attn_heads, args.window, args.block, args.batch, dtype, repeats
        )
        rows.append(r)
        print(
            f"{'local_attention':<16}{r['impl']:<22}{length:>8}"
            f"{r['banded_s']:>11.4f} ({r['banded_fwd_s']:.4f})"
            f"{r['dense_s']:>11.4f} ({r['dense_fwd_s']:.4f}){r['ratio']:>8.2f}"
            f"{r['banded_cpu_s']:>8.2f}/{r['dense_cpu_s']:<7.2f}"
            f"{r['banded_peak_bytes'] / 2**20:>8.0f}/{r['dense_peak_bytes'] / 2**20:<7.0f}",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="lengths 1k and 16k, fewer repeats")
    ap.add_argument("--json", default=None, help="write rows here")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--impls", default="sequential,associative,chunked")
    ap.add_argument("--layers", default="rg_lru,recurrent_block,local_attention")
    ap.add_argument("--window", type=int, default=2048, help="local_attention window")
    ap.add_argument("--block", type=int, default=512, help="local_attention block (banded)")
    ap.add_argument("--attn_heads", type=int, default=1, help="local_attention query heads")
    ap.add_argument("--attn_lengths", default="4096,16384", help="local_attention lengths")
    ap.add_argument("--attn_repeats", type=int, default=0, help="local_attention repeats")
    ap.add_argument(
        "--lengths", default="", help="comma list; default 1k,4k,16k,64k (quick: 1k,16k)"
    )
    args = ap.parse_args()
    if args.lengths:
        lengths = [int(n) for n in args.lengths.split(",")]
    else:
        # --quick: 4 RecurrentGemma compiles (~55 s each on 2 cores) took 4m49s with 4k too.
        lengths = [1024, 16384] if args.quick else [1024, 4096, 16384, 65536]
    repeats = 2 if args.quick else 5
    dtype = jnp.dtype(args.dtype)
    rows = []
    print(
        f"device: {jax.devices()[0].device_kind}; width {args.width}, batch {args.batch}, "
        f"{args.dtype}; times are forward+backward (forward in brackets), seconds; "
        f"* = our default ('auto') on this backend"
    )
    kinds = args.layers.split(",")
    if "local_attention" in kinds:
        kinds.remove("local_attention")
        rows += _attention_rows(args, dtype, args.attn_repeats or repeats)
    if kinds:
        print(
            f"{'layer':<16}{'impl':<13}{'length':>8}{'ours':>20}{'recurrentgemma':>22}{'ratio':>8}"
        )
    for kind in kinds:
        impls = args.impls.split(",")
        kind_lengths = lengths
        if args.quick and kind == "recurrent_block":
            # The block differs from rg_lru only around the scan: the default impl at the
            # longest length keeps --quick under 5 minutes on 2 cores.
            impls, kind_lengths = [resolve_impl("auto")], lengths[-1:]
        for impl in impls:
            for length in kind_lengths:
                r = bench(kind, impl, length, args.width, args.heads, args.batch, dtype, repeats)
                rows.append(r)
                name = impl + ("*" if r["default"] else "")
                print(
                    f"{kind:<16}{name:<13}{length:>8}"
                    f"{r['ours_s']:>11.4f} ({r['ours_fwd_s']:.4f})"
                    f"{r['reference_s']:>13.4f} ({r['reference_fwd_s']:.4f})"
                    f"{r['ratio']:>8.2f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
