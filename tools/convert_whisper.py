r"""Convert the encoder of a HuggingFace Whisper directory into avjax's `WhisperEncoder` layout.

  python tools/convert_whisper.py --hf_dir=/models/whisper-medium --out=/models/avjax_whisper_m \
      [--check]

`--hf_dir` is a local directory as written by `save_pretrained` (`WhisperModel` or
`WhisperForConditionalGeneration`: config.json + safetensors or pytorch_model.bin); nothing is
downloaded; only the encoder tensors are read, one at a time. Writes `OUT/params` (orbax) and
`OUT/model.json` (read both back with `avjax.convert.whisper.load_converted`), moved into place
when complete. `--check` also runs transformers' encoder (PyTorch CPU, float32) and ours on
random log-mel features of the full `2 * max_source_positions` frames and prints the max
absolute difference of the last hidden states.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> float | None:
    """Converts; with `--check` returns the max |ours - transformers'| (else None)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hf_dir", required=True, help="local HF Whisper model directory")
    ap.add_argument("--out", required=True, help="where to write avjax params + model.json")
    ap.add_argument("--check", action="store_true", help="compare with transformers' encoder")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from avjax.convert.whisper import load_hf_whisper_encoder, save_converted

    hf_dir = os.path.abspath(args.hf_dir)
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"--hf_dir={hf_dir}: not a directory")
    model, variables = load_hf_whisper_encoder(hf_dir)
    save_converted(model, variables, args.out)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
    print(
        f"wrote {args.out}: {n:,} encoder parameters, {model.num_layers} layers, width "
        f"{model.width}, {model.num_heads} heads, {model.num_mel_bins} mel bins"
    )
    if not args.check:
        return None
    import torch
    import transformers

    hf = transformers.WhisperModel.from_pretrained(hf_dir, local_files_only=True).float().eval()
    frames = 2 * model.max_source_positions
    feats = np.random.default_rng(0).standard_normal((2, model.num_mel_bins, frames))
    feats = feats.astype(np.float32)
    with torch.no_grad():
        ref = hf.encoder(torch.as_tensor(feats)).last_hidden_state.numpy()
    ours = jax.jit(model.apply)(variables, feats)
    diff = float(np.abs(np.asarray(ours) - ref).max())
    print(f"check: max |encoder output - transformers'| = {diff:.3g} over {feats.shape} features")
    return diff


if __name__ == "__main__":
    main()
