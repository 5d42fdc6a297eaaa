r"""Convert a HuggingFace BLIP-2 Q-Former into avjax's `QFormer` layout.

  python tools/convert_qformer.py --hf_dir=/models/blip2-opt-2.7b --out=/models/avjax_qformer \
      [--check]

`--hf_dir` is a local directory as written by `save_pretrained`: a `Blip2QFormerModel`
(model_type `blip_2_qformer`) or a whole BLIP-2 model (`blip-2`, whose `qformer.*` tensors are
read); nothing is downloaded; tensors are read one at a time. Writes `OUT/params` (orbax) and
`OUT/model.json` (read both back with `avjax.convert.qformer.load_converted`), moved into place
when complete. `--check` also runs transformers' `Blip2QFormerModel` (PyTorch CPU, float32) and
ours on random queries and encoder states and prints the max absolute difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> float | None:
    """Converts; with `--check` returns the max |ours - transformers'| (else None)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hf_dir", required=True, help="local HF BLIP-2 or Q-Former directory")
    ap.add_argument("--out", required=True, help="where to write avjax params + model.json")
    ap.add_argument("--check", action="store_true", help="compare with transformers' Q-Former")
    ap.add_argument("--check_queries", type=int, default=32, help="queries per row for --check")
    ap.add_argument("--check_source", type=int, default=50, help="encoder states for --check")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from avjax.convert.qformer import load_hf_qformer, save_converted

    hf_dir = os.path.abspath(args.hf_dir)
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"--hf_dir={hf_dir}: not a directory")
    model, variables = load_hf_qformer(hf_dir)
    save_converted(model, variables, args.out)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
    print(
        f"wrote {args.out}: {n:,} parameters, {model.num_layers} layers, width {model.width}, "
        f"cross-attention every {model.cross_attention_frequency}, encoder width "
        f"{model.encoder_width}"
    )
    if not args.check:
        return None
    return _check(hf_dir, model, variables, args.check_queries, args.check_source)


def _check(hf_dir: str, model: Any, variables: Any, queries: int, source: int) -> float:
    """Max |ours - transformers'| on random queries `[2, queries, width]` and states."""
    import jax
    import numpy as np
    import torch
    import transformers

    with open(os.path.join(hf_dir, "config.json")) as f:
        kind = json.load(f).get("model_type")
    if kind == "blip-2":
        hf = transformers.Blip2Model.from_pretrained(hf_dir, local_files_only=True).qformer
    else:
        hf = transformers.Blip2QFormerModel.from_pretrained(hf_dir, local_files_only=True)
    hf = hf.float().eval()
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, queries, model.width)).astype(np.float32)
    e = rng.standard_normal((2, source, model.encoder_width)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.as_tensor(q), encoder_hidden_states=torch.as_tensor(e))
    ours = jax.jit(model.apply)(variables, q, e)
    diff = float(np.abs(np.asarray(ours) - ref.last_hidden_state.numpy()).max())
    print(f"check: max |Q-Former output - transformers'| = {diff:.3g} ({queries} queries)")
    return diff


if __name__ == "__main__":
    main()
