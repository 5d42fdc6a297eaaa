r"""Convert a RecurrentGemma (Griffin) checkpoint into avjax's Griffin layout.

  pip install -e '.[test]'        # recurrentgemma (Google's JAX package) reads the checkpoint
  python tools/convert_recurrentgemma.py --rg_ckpt=/models/recurrentgemma/2b \
      --out=/models/avjax_rg2b [--preset=recurrent_gemma_2b_v1] [--scan_layers] [--check]

`--rg_ckpt` is the orbax checkpoint as published (e.g. the Kaggle `2b` folder); nothing is
downloaded. The architecture is read off the parameters (`GriffinConfig.from_flax_params_or_
variables`; `--preset`, or `--window` and `--logits_soft_cap`, supply what the parameters
cannot tell). Writes `OUT/params` (orbax) and `OUT/model.json`, next to OUT first and moved into
place when complete (an existing OUT is replaced only by a whole new one); `--check` runs both
models on random tokens and prints the max absolute logit difference. Train from the result with
`--config.train.init_from=OUT`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> float | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rg_ckpt", required=True, help="RecurrentGemma orbax checkpoint directory")
    ap.add_argument("--out", required=True, help="where to write avjax params + model.json")
    ap.add_argument("--preset", default="", help="e.g. recurrent_gemma_2b_v1 (optional)")
    ap.add_argument(
        "--window", type=int, default=2048, help="local attention window (without --preset)"
    )
    ap.add_argument("--logits_soft_cap", type=float, default=30.0, help="(without --preset)")
    ap.add_argument("--scan_layers", action="store_true", help="write the stacked layout")
    ap.add_argument("--check", action="store_true", help="compare logits on random tokens")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from recurrentgemma import jax as rg

    from avjax.convert.recurrentgemma import from_recurrentgemma, save_converted

    path = os.path.abspath(args.rg_ckpt)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--rg_ckpt={path}: not a directory (an orbax checkpoint)")
    # Host (numpy) arrays; recurrentgemma's own load_parameters trips on newer orbax metadata.
    import orbax.checkpoint as ocp

    params = ocp.PyTreeCheckpointer().restore(path)
    preset = rg.Preset[args.preset.upper()] if args.preset else None
    if preset is None:  # what the parameters cannot tell; RecurrentGemma's values by default
        rg_config = rg.GriffinConfig.from_flax_params_or_variables(
            params,
            embeddings_scale_by_sqrt_dim=True,
            attention_window_size=args.window,
            logits_soft_cap=args.logits_soft_cap,
        )
    else:
        rg_config = rg.GriffinConfig.from_flax_params_or_variables(params, preset=preset)
    model, variables = from_recurrentgemma(params, rg_config)
    if args.scan_layers:
        model = model.clone(scan_layers=True)
    save_converted(model, variables, args.out)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
    print(f"wrote {args.out}: {n:,} parameters, {model.num_layers} layers {model.types}")
    if not args.check:
        return None
    tokens = jax.random.randint(jax.random.key(0), (1, 64), 0, rg_config.vocab_size)
    pos = jnp.arange(64)[None]
    ref = rg.Griffin(rg_config).apply(params, tokens, pos)[0]
    ours = model.clone(scan_layers=False).apply(variables, tokens, pos)[0]
    diff = float(jnp.max(jnp.abs(ref - ours)))
    print(f"check: max |logits - RecurrentGemma's| = {diff:.3g} over {tokens.shape} tokens")
    return diff


if __name__ == "__main__":
    main()
