r"""Convert a HuggingFace `MambaForCausalLM` directory into avjax's `MambaLM` layout.

  python tools/convert_mamba.py --hf_dir=/models/mamba-130m-hf --out=/models/avjax_mamba130m \
      [--check]

`--hf_dir` is a local directory as written by `save_pretrained` (config.json +
model.safetensors, sharded safetensors, or pytorch_model.bin); nothing is downloaded. Writes
`OUT/params` (orbax `StandardCheckpointer`) and `OUT/model.json` (the MambaLM fields; read both
back with `avjax.convert.mamba.load_converted`); they are written to a temporary folder next to
OUT and moved into place when complete, so an existing OUT is replaced only by a whole new one.
`--check` also runs transformers' PyTorch model (CPU) and ours on random tokens and prints the
max absolute logit difference.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> float | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hf_dir", required=True, help="local HF Mamba model directory")
    ap.add_argument("--out", required=True, help="where to write avjax params + model.json")
    ap.add_argument("--check", action="store_true", help="compare logits with transformers")
    ap.add_argument("--check_len", type=int, default=32, help="tokens per row for --check")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from avjax.convert.mamba import load_hf_mamba, save_converted

    hf_dir = os.path.abspath(args.hf_dir)
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"--hf_dir={hf_dir}: not a directory")
    model, variables = load_hf_mamba(hf_dir)
    save_converted(model, variables, args.out)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
    print(
        f"wrote {args.out}: {n:,} parameters, {model.num_layers} layers, d_model {model.d_model},"
        f" d_inner {model.inner}, d_state {model.d_state}, tied head {model.tie_embeddings}"
    )
    if not args.check:
        return None
    import torch
    import transformers

    hf = transformers.MambaForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    hf = hf.float().eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.vocab_size, (2, args.check_len))
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.numpy()
    ours, _ = jax.jit(model.apply)(variables, tokens.astype(np.int32))
    diff = float(np.abs(np.asarray(ours) - ref).max())
    print(f"check: max |logits - transformers'| = {diff:.3g} over {tokens.shape} tokens")
    return diff


if __name__ == "__main__":
    main()
