r"""Benchmark: our Llama (`avjax.nn.transformer.TransformerLM`) vs transformers'
`LlamaForCausalLM` (PyTorch, CPU), same config and weights, side by side in one run.

  python tools/bench/llm.py [--json=llm.json] [--width=256 --layers=4 --batch=4 --seq=256]

Two workloads, each timed as the median of `--repeats` after a warm-up (ours jitted):
  * train step: forward + backward of the next-token cross-entropy over `[batch, seq]`
    tokens (ours `jax.value_and_grad`; PyTorch `loss.backward()`), reported as steps/s and
    tokens/s;
  * greedy decoding: a `[batch, prompt]` prompt, `--new` tokens with the KV cache (ours
    `avjax.sample.decode.generate`, one compiled `lax.while_loop`; PyTorch
    `generate(do_sample=False, use_cache=True)`), reported as generated tokens/s; whether the
    two produced the same tokens is recorded.
Each row also records CPU-seconds per step (process CPU time, all threads) and the machine's
load average, since other processes on a shared machine slow both sides. float32 throughout;
PyTorch uses its default intra-op threads (recorded). Timings are measurements of this
machine, never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from avjax.nn.transformer import DecoderConfig  # noqa: E402


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of `fn()` after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def _config(args: argparse.Namespace) -> DecoderConfig:
    return DecoderConfig.llama(
        vocab_size=args.vocab,
        width=args.width,
        mlp_width=args.mlp,
        num_heads=args.heads,
        num_layers=args.layers,
        num_kv_heads=args.kv_heads,
        rope_theta=500_000.0,
    )


def _ours(cfg: DecoderConfig, args: argparse.Namespace, tokens: np.ndarray, prompt: np.ndarray):
    """Our params and the two timed callables (train step, greedy decode)."""
    from avjax.sample.decode import generate

    model = cfg.make(max_len=args.prompt + args.new, decode_block=0)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.asarray(tokens[:1, :8])))

    def loss(p, t):
        logits, _ = model.apply(p, t[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], axis=-1))

    step = jax.jit(jax.value_and_grad(loss))
    toks, prm = jnp.asarray(tokens), jnp.asarray(prompt)

    def train():
        jax.block_until_ready(step(params, toks))

    def decode():
        return np.asarray(jax.block_until_ready(generate(model, params, prm, args.new)))

    return params, train, decode


def _torch(cfg: DecoderConfig, params: Any, args, tokens: np.ndarray, prompt: np.ndarray):
    """transformers' model with our weights and the two timed callables."""
    import torch
    import transformers

    from avjax.convert.llama import hf_llama_config, to_hf_llama

    hf_cfg = hf_llama_config(cfg, max_position_embeddings=args.seq + args.prompt + args.new)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).float()
    state = {k: torch.from_numpy(np.array(v)) for k, v in to_hf_llama(params, cfg).items()}
    model.load_state_dict(state, strict=False)
    toks, prm = torch.from_numpy(tokens).long(), torch.from_numpy(prompt).long()

    def train():
        model.train()
        model.zero_grad(set_to_none=True)
        model(toks, labels=toks).loss.backward()

    @torch.no_grad()
    def decode():
        model.eval()
        out = model.generate(
            prm,
            attention_mask=torch.ones_like(prm),
            max_new_tokens=args.new,
            min_new_tokens=args.new,
            do_sample=False,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=0,
        )
        return out[:, prm.shape[1] :].numpy()

    return train, decode, torch.get_num_threads()


def _rows(name: str, train: Callable, decode: Callable, args: argparse.Namespace) -> list[dict]:
    """The train-step and decode rows of one implementation."""
    tw, tc = _time(train, args.repeats)
    dw, dc = _time(decode, args.repeats)
    train_tokens = args.batch * args.seq
    new_tokens = args.batch * args.new
    return [
        {"impl": name, "workload": "train_step", "wall_s": tw, "cpu_s": tc,
         "steps_per_s": 1.0 / tw, "tokens_per_s": train_tokens / tw},
        {"impl": name, "workload": "greedy_decode", "wall_s": dw, "cpu_s": dc,
         "steps_per_s": args.new / dw, "tokens_per_s": new_tokens / dw},
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs both implementations; prints a table; returns (and optionally writes) the rows."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for name, default in (("vocab", 2048), ("width", 256), ("mlp", 768), ("heads", 8)):
        ap.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("kv_heads", 2), ("layers", 4), ("batch", 4), ("seq", 256)):
        ap.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("prompt", 16), ("new", 64), ("repeats", 5)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--json", default="", help="write the rows here")
    args = ap.parse_args(argv)
    cfg = _config(args)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
    prompt = rng.integers(1, args.vocab, (args.batch, args.prompt)).astype(np.int32)
    params, ours_train, ours_decode = _ours(cfg, args, tokens, prompt)
    ref_train, ref_decode, threads = _torch(cfg, params, args, tokens[:, :-1], prompt)
    rows = _rows("avjax", ours_train, ours_decode, args)
    rows += _rows("transformers", ref_train, ref_decode, args)
    same = bool(np.array_equal(ours_decode(), ref_decode()))
    out = {
        "config": {**vars(args), "params": cfg.num_params()},
        "torch_threads": threads,
        "jax_devices": [str(d) for d in jax.devices()],
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "same_greedy_tokens": same,
        "rows": rows,
    }
    print(
        f"{'impl':13s} {'workload':14s} {'wall ms':>8s} {'CPU s':>6s} {'steps/s':>8s} {'tok/s':>9s}"
    )
    for r in rows:
        print(
            f"{r['impl']:13s} {r['workload']:14s} {1e3 * r['wall_s']:8.1f} {r['cpu_s']:6.2f} "
            f"{r['steps_per_s']:8.2f} {r['tokens_per_s']:9.0f}"
        )
    print(f"same greedy tokens: {same}; load average {out['load_average']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
