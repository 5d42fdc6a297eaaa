r"""Convert a HuggingFace `LlamaForCausalLM` directory into avjax's `TransformerLM` layout.

  python tools/convert_llama.py --hf_dir=/models/Llama-3.2-1B --out=/models/avjax_llama1b \
      [--check]

`--hf_dir` is a local directory as written by `save_pretrained` (config.json +
model.safetensors, sharded safetensors, or pytorch_model.bin); nothing is downloaded; the
safetensors are read tensor by tensor. Writes `OUT/params` (orbax `StandardCheckpointer`) and
`OUT/model.json` (the architecture; read both back with `avjax.convert.llama.load_converted`),
moved into place when complete. `--export` goes the other way (Llama only): it reads `--out`
(e.g. params saved after merging LoRA adapters) and writes a new HF directory `--hf_dir`
(config.json + float32 safetensors, `avjax.convert.llama.save_hf_llama`). `--check` also runs
transformers' PyTorch model (CPU, float32) and ours on random tokens and prints the max
absolute logit difference.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(argv: list[str] | None, family: str, doc: str) -> float | None:
    """The command line of `tools/convert_<family>.py` (family "llama" or "gemma")."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hf_dir", required=True, help=f"local HF {family} model directory")
    ap.add_argument("--out", required=True, help="where to write avjax params + model.json")
    ap.add_argument(
        "--export",
        action="store_true",
        help="the reverse (llama): read --out (avjax, e.g. LoRA-merged) and write a new HF "
        "directory --hf_dir",
    )
    ap.add_argument("--check", action="store_true", help="compare logits with transformers")
    ap.add_argument("--check_len", type=int, default=32, help="tokens per row for --check")
    args = ap.parse_args(argv)

    import importlib

    import jax
    import numpy as np

    from avjax.convert.llama import save_converted

    hf_dir = os.path.abspath(args.hf_dir)
    module = importlib.import_module(f"avjax.convert.{family}")
    if args.export:
        if family != "llama":
            raise ValueError(f"--export writes HF Llama directories only, not {family}")
        model, variables = module.load_converted(args.out)
        module.save_hf_llama(variables, model.config, hf_dir)
        print(f"wrote {hf_dir}: HF LlamaForCausalLM (config.json + float32 safetensors)")
    else:
        if not os.path.isdir(hf_dir):
            raise FileNotFoundError(f"--hf_dir={hf_dir}: not a directory")
        model, variables = getattr(module, f"load_hf_{family}")(hf_dir)
        save_converted(model, variables, args.out)
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
        print(
            f"wrote {args.out}: {n:,} parameters, {model.num_layers} layers, width "
            f"{model.width}, {model.num_heads} heads / {model.num_kv_heads} KV heads, tied "
            f"{model.tie_embeddings}"
        )
    if not args.check:
        return None
    import torch
    import transformers

    cls = {"llama": "LlamaForCausalLM", "gemma": "GemmaForCausalLM"}[family]
    hf = getattr(transformers, cls).from_pretrained(hf_dir, local_files_only=True)
    hf = hf.float().eval()
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, (2, args.check_len))
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.numpy()
    ours, _ = jax.jit(model.apply)(variables, tokens.astype(np.int32))
    diff = float(np.abs(np.asarray(ours) - ref).max())
    print(f"check: max |logits - transformers'| = {diff:.3g} over {tokens.shape} tokens")
    return diff


def main(argv: list[str] | None = None) -> float | None:
    return run(argv, "llama", __doc__)


if __name__ == "__main__":
    main()
