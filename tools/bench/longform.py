r"""Benchmark: long-form decoding, SpeechSSM (Griffin) vs the matched SpeechTransformer.

  python tools/bench/longform.py --quick --json=longform.json     # < 10 min on 2 CPU cores
  python tools/bench/longform.py                                  # more panels and repeats
  python tools/bench/longform.py --full_runs                      # + real end-to-end runs

Models: SpeechSSM from configs/speechssm.py's model section (GriffinLM) and the Transformer of
matched size from configs/speechtransformer.py (same width/heads/depth, MLP widened to match
the parameter count), random weights (speed and memory do not depend on them), float32, over
the configs' unit vocabulary. Lengths: 1, 4 and 16 minutes of 25 Hz units (1,500, 6,000 and
24,000 tokens); the Transformer's KV cache is sized to the length (rounded up to its decode
block), as a sampler for that length allocates it.

What is measured, per (model, length, batch), all in one process:
  ms_per_token      mean decode time per step (one token for every sequence of the batch)
                    over an N-token generation, estimated with the
                    midpoint rule: the jitted sampler chunk (`autoregressive.decode_chunk`,
                    `lax.scan` over `--steps` steps, sampling included) is timed from decoding
                    states at positions (k + 1/2) N / P, k < P (`--panels` P), median of
                    `--repeats` after a warm-up. The state's contents are random (zeros with
                    the write index at the position): the work of a step depends only on the
                    position. For the SSM every position costs the same; for the Transformer
                    the step at position p attends over p keys (its cost grows linearly, so
                    the midpoint rule is exact up to noise).
  ms_per_token_end  the same at the end of the generation (position N - steps).
  peak_bytes        decode-state memory: bytes of the sampler state pytree (caches, next-token
                    logits, positions) + the compiled decode chunk's temporary buffers
                    (XLA `memory_analysis().temp_size_in_bytes`); the state is donated, so it
                    is updated in place. Parameters are excluded (`param_bytes`, equal for
                    both). `rss_bytes` is the process's resident set after the row (a
                    process-wide figure, for reference only).
  tokens_per_s      batch / (ms_per_token / 1e3): throughput rows (`kind` = "throughput") at
                    `--throughput_tokens` (16.4k, the paper's figure) for batch 1 and 16;
                    `ssm_over_transformer` is the throughput ratio. `bytes_ratio` is what a
                    memory-bandwidth-bound decoder would give: bytes read per step (weights +
                    decoding state; the Transformer's cache half full on average), Transformer
                    over SSM.
With `--full_runs`, each length is also generated for real at batch 1 (prefill of a 10 s
prompt, then every 250-step decode chunk, as `autoregressive.generate` does), timed as a whole
(`ms_per_token_full_run`), a check of the midpoint estimate.

Rows (JSON list) carry `model`, `minutes`, `ms_per_token`, `peak_bytes` and the fields above.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from avjax.data.speech.units import UNIT_RATE  # noqa: E402
from avjax.models import speechssm as speechssm_lib  # noqa: E402
from avjax.models import speechtransformer as speechtransformer_lib  # noqa: E402
from avjax.nn.attention import AttentionCache  # noqa: E402
from avjax.nn.transformer import KVCache  # noqa: E402
from avjax.sample import autoregressive  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SSM, TRANSFORMER = "speechssm", "speechtransformer"


def _config(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, f"configs/{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(name: str, cfg, tokens: int):
    """The model for `tokens` generated tokens (the Transformer's cache holds them all)."""
    vocab = int(cfg.data.num_units)
    if name == SSM:
        return speechssm_lib.speechssm(cfg.model, vocab)
    block = int(cfg.model.decode_block) or 1
    return speechtransformer_lib.speechtransformer(cfg.model, vocab, -(-tokens // block) * block)


def state_at(model, batch: int, position: int, vocab: int) -> autoregressive.SamplerState:
    """A decoding state whose next token is at `position` (contents zero)."""
    pos = jnp.full((batch,), position, jnp.int32)

    def at(c):
        if isinstance(c, KVCache | AttentionCache):
            return c._replace(index=pos)
        return c

    cache = tuple(at(c) for c in model.init_cache(batch))
    state = autoregressive.SamplerState(
        cache=cache,
        logits=jnp.zeros((batch, vocab), jnp.float32),
        position=pos,
        step=jnp.asarray(position, jnp.int32),
    )
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)  # distinct buffers: donated


def measure(name, cfg, params_for, tokens, batch, args) -> dict:
    """Times decode chunks at the panel midpoints and at the end of a `tokens` generation."""
    vocab = int(cfg.data.num_units)
    model = build(name, cfg, tokens)
    params = params_for(model)
    fn = jax.jit(
        functools.partial(
            autoregressive.decode_chunk, model, num_tokens=args.steps, temperature=1.0
        ),
        donate_argnums=(1,),
    )
    key = jax.random.key(0)
    probe = state_at(model, batch, 0, vocab)
    state_bytes = _bytes(probe)
    compiled = fn.lower(params, probe, key).compile()
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem is not None else 0
    del probe

    def per_token(position: int) -> float:
        position = max(0, min(position, tokens - args.steps * (args.repeats + 1)))
        state = state_at(model, batch, position, vocab)
        state, out = compiled(params, state, key)  # warm-up
        jax.block_until_ready(out)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            state, out = compiled(params, state, key)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - t) / args.steps)
        return statistics.median(times)

    mids = [per_token(int((k + 0.5) * tokens / args.panels)) for k in range(args.panels)]
    end = per_token(tokens)
    return {
        "model": name,
        "minutes": tokens / UNIT_RATE / 60,
        "tokens": tokens,
        "batch": batch,
        "ms_per_token": 1e3 * statistics.mean(mids),
        "ms_per_token_end": 1e3 * end,
        "peak_bytes": state_bytes + temp,
        "state_bytes": state_bytes,
        "temp_bytes": temp,
        "param_bytes": _bytes(params),
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "tokens_per_s": batch / statistics.mean(mids),
        "rss_bytes": _rss_bytes(),
        "device": jax.devices()[0].device_kind,
    }


def full_run(name, cfg, params_for, tokens, chunk: int = 250) -> float:
    """ms per token of a real batch-1 generation: prefill of a 10 s prompt, then every decode
    chunk of `chunk` steps up to `tokens` (rounded up to whole chunks); compile excluded."""
    prompt_len = int(10 * UNIT_RATE)
    chunks = -(-tokens // chunk)
    model = build(name, cfg, prompt_len + chunks * chunk)
    params = params_for(model)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, int(cfg.data.num_units), (1, prompt_len)), jnp.int32)
    pre = jax.jit(functools.partial(autoregressive.prefill, model))
    dec = jax.jit(
        functools.partial(autoregressive.decode_chunk, model, num_tokens=chunk, temperature=1.0),
        donate_argnums=(1,),
    )
    key = jax.random.key(0)
    jax.block_until_ready(dec(params, pre(params, prompt), key))  # compile both
    t = time.perf_counter()
    state = pre(params, prompt)
    for _ in range(chunks):
        state, out = dec(params, state, key)
        jax.block_until_ready(out)  # as a sampler that streams each chunk out
    return 1e3 * (time.perf_counter() - t) / (chunks * chunk)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="64 steps, 3 panels, 3 repeats (< 10 min, 2 cores)"
    )
    ap.add_argument("--json", default=None, help="write rows here")
    ap.add_argument("--minutes", default="1,4,16", help="generated lengths, minutes at 25 Hz")
    ap.add_argument("--batches", default="1,16", help="batch sizes of the throughput rows")
    ap.add_argument("--throughput_tokens", type=int, default=16_400)
    ap.add_argument("--steps", type=int, default=0, help="decode steps per timed chunk")
    ap.add_argument("--panels", type=int, default=0, help="midpoint-rule panels per length")
    ap.add_argument("--repeats", type=int, default=0)
    ap.add_argument("--full_runs", action="store_true", help="also time real batch-1 runs")
    ap.add_argument(
        "--kv_heads", type=int, default=0, help="the Transformer's kv heads (0: its config's)"
    )
    args = ap.parse_args()
    args.steps = args.steps or (64 if args.quick else 128)
    args.panels = args.panels or (3 if args.quick else 4)
    args.repeats = args.repeats or (3 if args.quick else 5)

    configs = {SSM: _config("speechssm"), TRANSFORMER: _config("speechtransformer")}
    if args.kv_heads:
        configs[TRANSFORMER].model.num_kv_heads = args.kv_heads
    init_tokens = jnp.zeros((1, 8), jnp.int32)
    init_pos = jnp.broadcast_to(jnp.arange(8), (1, 8))
    param_cache: dict[str, object] = {}

    def params_getter(name):
        def get(model):  # parameters do not depend on the cache length: build them once
            if name not in param_cache:
                variables = jax.jit(model.init)(jax.random.key(0), init_tokens, init_pos)
                param_cache[name] = nn.meta.unbox(variables["params"])
            return param_cache[name]

        return get

    t0 = time.time()
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; float32, random weights; "
        f"{args.steps} steps/chunk, {args.panels} panels, {args.repeats} repeats; Transformer "
        f"kv heads {configs[TRANSFORMER].model.num_kv_heads}"
    )
    rows = []
    lengths = [int(round(float(m) * 60 * UNIT_RATE)) for m in args.minutes.split(",")]
    for tokens in lengths:
        for name in (SSM, TRANSFORMER):
            r = measure(name, configs[name], params_getter(name), tokens, 1, args)
            r["kind"] = "length"
            if args.full_runs:
                r["ms_per_token_full_run"] = full_run(
                    name, configs[name], params_getter(name), tokens
                )
            rows.append(r)
            print(f"  {name} {tokens} tokens: {r['ms_per_token']:.3f} ms/token", flush=True)
    for batch in [int(b) for b in args.batches.split(",")]:
        for name in (SSM, TRANSFORMER):
            r = measure(
                name, configs[name], params_getter(name), args.throughput_tokens, batch, args
            )
            r["kind"] = "throughput"
            rows.append(r)
            print(
                f"  {name} batch {batch} @ {args.throughput_tokens}: "
                f"{r['tokens_per_s']:.0f} tokens/s",
                flush=True,
            )
        ssm_row, tf_row = rows[-2], rows[-1]
        ratio = ssm_row["tokens_per_s"] / tf_row["tokens_per_s"]
        ssm_row["ssm_over_transformer"] = tf_row["ssm_over_transformer"] = ratio
        # Bandwidth model of a decode step: the weights plus the decoding state are read once;
        # the SSM's whole (constant) state, the Transformer's cache filled half on average.
        for r, fill in ((ssm_row, 1.0), (tf_row, 0.5)):
            r["bytes_per_step"] = r["param_bytes"] + fill * r["state_bytes"]
        ratio_model = tf_row["bytes_per_step"] / ssm_row["bytes_per_step"]
        ssm_row["bytes_ratio"] = tf_row["bytes_ratio"] = ratio_model

    by = {(r["model"], r["tokens"]): r for r in rows if r["kind"] == "length"}
    print()
    print("Per-token decode time and decode-state memory vs generated length (batch 1)")
    head = f"{'minutes':>8}{'tokens':>8}"
    for name in (SSM, TRANSFORMER):
        head += f"  {name + ' ms/tok':>24}{'mem':>12}"
    print(head)
    for tokens in lengths:
        line = f"{tokens / UNIT_RATE / 60:>8.3g}{tokens:>8}"
        for name in (SSM, TRANSFORMER):
            r = by[(name, tokens)]
            line += f"  {r['ms_per_token']:>10.3f} (end {r['ms_per_token_end']:>7.3f})"
            line += f"{_fmt_bytes(r['peak_bytes']):>12}"
        print(line)
    for name in (SSM, TRANSFORMER):
        first, last = by[(name, lengths[0])], by[(name, lengths[-1])]
        print(
            f"{name}: {lengths[-1]} / {lengths[0]} tokens: time x"
            f"{last['ms_per_token'] / first['ms_per_token']:.2f}, memory x"
            f"{last['peak_bytes'] / first['peak_bytes']:.2f}"
        )
    print()
    print(f"Batch throughput decoding {args.throughput_tokens} tokens (tokens/s, all sequences)")
    print(
        f"{'batch':>6}{SSM:>14}{TRANSFORMER:>20}{'ratio':>8}{'bytes ratio':>13}"
        f"{'ssm mem':>12}{'tf mem':>12}"
    )
    tp = [r for r in rows if r["kind"] == "throughput"]
    for s, t in zip(tp[::2], tp[1::2], strict=True):
        print(
            f"{s['batch']:>6}{s['tokens_per_s']:>14.0f}{t['tokens_per_s']:>20.0f}"
            f"{s['ssm_over_transformer']:>8.1f}{s['bytes_ratio']:>13.1f}"
            f"{_fmt_bytes(s['peak_bytes']):>12}"
            f"{_fmt_bytes(t['peak_bytes']):>12}"
        )
    print(
        "parameters: "
        + ", ".join(f"{n} {by[(n, lengths[0])]['num_params']:,}" for n in (SSM, TRANSFORMER))
    )
    print(f"total {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
