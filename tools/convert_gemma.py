r"""Convert a HuggingFace `GemmaForCausalLM` (Gemma 1) directory into avjax's `TransformerLM`.

  python tools/convert_gemma.py --hf_dir=/models/gemma-2b --out=/models/avjax_gemma2b [--check]

`--hf_dir` is a local directory as written by `save_pretrained` (config.json +
model.safetensors, sharded safetensors, or pytorch_model.bin); nothing is downloaded; the
safetensors are read tensor by tensor. Writes `OUT/params` (orbax) and `OUT/model.json` (read
both back with `avjax.convert.gemma.load_converted`). `--check` also runs transformers' PyTorch
model (CPU, float32) and ours on random tokens and prints the max absolute logit difference.
The result initialises SpeechTransformer-2B as in the paper (its blocks and final norm; the
32,768-unit embedding stays fresh):

  python -m avjax.main --config=configs/speechtransformer.py:2b --workdir=W \
      --config.train.init_from=/models/avjax_gemma2b --config.train.init_skip='^embedding$'
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.convert_llama import run  # noqa: E402


def main(argv: list[str] | None = None) -> float | None:
    return run(argv, "gemma", __doc__)


if __name__ == "__main__":
    main()
