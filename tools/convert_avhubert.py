r"""Convert an official fairseq AV-HuBERT checkpoint into avjax's `AVHubertEncoder` layout.

  python tools/convert_avhubert.py --ckpt=/models/large_vox_iter5.pt --out=/models/avhubert_l \
      [--check]

`--ckpt` is a checkpoint file from `facebookresearch/av_hubert` (pretrained or fine-tuned;
nothing is downloaded). It is read tensor by tensor (memory-mapped where torch allows) without
running any code the pickle names (see `avjax.convert.avhubert`). Prints the inferred encoder
shape and the keys it did not map; writes `OUT/params` + `OUT/model.json` (read back with
`avjax.convert.avhubert.load_converted`). `--check` re-reads the checkpoint, exports our
variables back to fairseq names and prints the max difference per mapped tensor (must be 0;
the positional conv is compared after folding its weight norm), then runs the encoder on
random 88 x 88 video + audio features and prints the output's shape and statistics. Without
fairseq installed the outputs are not compared with the official model.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _check(ckpt: str, model, variables) -> float:
    """Max |exported - checkpoint| over mapped tensors; prints a forward pass's statistics."""
    import jax
    import numpy as np

    from avjax.convert import avhubert as conv

    sd, _ = conv._encoder_keys(conv.read_checkpoint(ckpt)["model"])
    conv._fold_pos_conv(sd)
    exported = conv.to_fairseq_state_dict(variables, model.config)
    diff = max(float(np.abs(v - conv._to_numpy(sd[k])).max()) for k, v in exported.items())
    print(f"check: max |exported - checkpoint| over {len(exported)} tensors = {diff:.3g}")
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((1, 25, model.config.audio_feat_dim)).astype(np.float32)
    video = rng.standard_normal((1, 25, 88, 88)).astype(np.float32)
    out = jax.jit(model.apply)(variables, audio, video)["last_hidden_state"]
    out = np.asarray(out)
    print(
        f"forward: {out.shape}, mean {out.mean():.4f}, std {out.std():.4f}, finite "
        f"{bool(np.isfinite(out).all())}"
    )
    return diff


def main(argv: list[str] | None = None) -> float | None:
    """Converts; with `--check` returns the max export/checkpoint difference (else None)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="fairseq AV-HuBERT checkpoint file (.pt)")
    ap.add_argument("--out", required=True, help="where to write avjax params + model.json")
    ap.add_argument("--check", action="store_true", help="round-trip and forward-pass checks")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from avjax.convert.avhubert import load_avhubert, save_converted

    model, variables, unmapped = load_avhubert(args.ckpt)
    save_converted(model, variables, args.out)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    print(f"wrote {args.out}: {n:,} parameters; {model.config}")
    print(f"{len(unmapped)} checkpoint keys not mapped: {unmapped}")
    return _check(args.ckpt, model, variables) if args.check else None


if __name__ == "__main__":
    main()
