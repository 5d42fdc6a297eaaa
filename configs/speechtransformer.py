r"""SpeechTransformer: SpeechSSM's Transformer baseline at CPU scale, matched in size.

Everything but the model is configs/speechssm.py's (the same embedded corpus, 256 k-means
units, 512-unit windows, optimiser, 400 steps, sampling). The model is a decoder-only
Transformer in Gemma's layout (global causal multi-query attention with RoPE, gated-GeLU MLP,
RMSNorm, tied embeddings, soft-capped logits) with SpeechSSM's width, heads and depth and the
MLP widened from 384 to 416 so the parameter count matches: 1,245,184 vs SpeechSSM's
1,241,728 (+0.3%).

Train (the units/corpus are built as for SpeechSSM; 400 steps of 8 x 512 units, ~8 minutes
on 2 idle CPU cores; 27 minutes measured on 2 cores shared with other jobs):

  python -m avjax.main --config=configs/speechtransformer.py --workdir=workdir/speechtransformer

Expected (measured on 2 CPU cores, 1,245,184 parameters): held-out loss 2.61 / 2.51 / 2.51 /
2.59 nats per unit at steps 100 / 200 / 300 / 400 (train loss 1.63 at 400), against a unigram
entropy of 5.29 and SpeechSSM's 2.44 / 2.19 / 2.17 / 2.28 with the same data, steps, size
and (unit-variance) initialisation (2.45 / 2.18 / 2.13 / 2.22 with RecurrentGemma's init).

Sample (the KV cache is sized from config.sample: prompt + continuation, unless
config.model.max_len is set; 16 minutes = --config.sample.seconds=960 holds 24.3k keys and
values per layer):

  python -m avjax.main --config=configs/speechtransformer.py \
      --workdir=workdir/speechtransformer --mode=sample

writes workdir/speechtransformer/samples/step_<N>/60s_t1.0_k0_seed0-<key8>/sample_0.wav,
.png, .npy (measured: 60 s, 1,500 units in 4 s of decoding, 2.6 ms per unit, 142 distinct
units).

Decode speed and memory against SpeechSSM: `python tools/bench/longform.py`.

SpeechTransformer-2B, the paper's baseline (Gemma-2B-initialised), is the `2b` variant:

  python tools/aot_compile.py --config=configs/speechtransformer.py:2b --topology=v5e:16x16

Gemma-2B's shapes and layout (18 layers, width 2048, 8 query heads with 1 KV head of dim 256,
GeGLU MLP 16,384, RoPE on the full head dim, no logit soft-cap, sqrt(width) embedding scale, no
biases) over SpeechSSM-2B's 32,768 units and data/training settings (configs/speechssm.py:2b):
2,048,993,280 parameters (Gemma-2B's 2,506,172,416 with its 256,000-token vocabulary). Import
Gemma-2B's blocks as the paper does: convert a local HF Gemma-2B directory with
`tools/convert_gemma.py --hf_dir=... --out=G` and train with `--config.train.init_from=G
--config.train.init_skip='^embedding$'` (the unit embedding stays fresh).

Measured with the AOT tool on a 2-core CPU (README "Fit check"): with
--config.model.remat=dots --config.model.scan_layers=True on v5e:16x16 (fsdp 128 x tensor 2),
temporaries 6.30 GiB, peak 6.43 GiB per chip, analytic 1.046e16 FLOPs per step, compute-bound
at 0.207 s per step (36 GiB per chip of HBM traffic), 13.9 min to compile under load. Decoding
(`--mode=decode --config.mesh.preset=dp --topology=v5e:2x4 --batch=64`, KV cache of 24,000
tokens = 16 minutes): 421.9 MiB of cache per sequence (SpeechSSM-2B: 16.5 MiB, constant),
peak 7.15 GiB per chip, 9.3 ms per step at the memory roofline (SpeechSSM-2B: 5.3 ms); at
most 224 sequences fit on the 8 chips (15.40 GiB peak; 232 do not): 11.1k tokens/s against
SpeechSSM-2B's 262k at 4,376 sequences (23.5x).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def _speechssm_config(arg: str | None) -> ml_collections.ConfigDict:
    """configs/speechssm.py:`arg`'s config, whose data and training this baseline shares
    (loaded by path, whatever the working directory)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "speechssm.py")
    spec = importlib.util.spec_from_file_location("_speechssm_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _gemma_2b_model(m: ml_collections.ConfigDict) -> None:
    """Gemma-2B's shapes and layout on `config.model` (keys of avjax.models.speechtransformer)."""
    m.width = 2048
    m.mlp_width = 16_384
    m.num_heads = 8
    m.num_kv_heads = 1
    m.head_dim = 256
    m.num_layers = 18
    m.logit_softcap = 0.0  # none
    m.rope_fraction = 1.0
    m.rope_theta = 10_000.0
    m.use_bias = False
    m.embed_scale = True  # x sqrt(width)
    m.norm_eps = 1e-6
    m.dtype = "bfloat16"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg` (from `--config=configs/speechtransformer.py:ARG`): None = the CPU baseline,
    "2b" = SpeechTransformer-2B (Gemma-2B shapes, SpeechSSM-2B's data and training)."""
    if arg not in (None, "", "2b"):
        raise ValueError(f"configs/speechtransformer.py:{arg}: expected no argument or '2b'")
    c = _speechssm_config(arg)
    c.task = "speechtransformer"
    m = ml_collections.ConfigDict()
    m.width = 128
    m.mlp_width = 416  # SpeechSSM's 384, widened to match its parameter count
    m.num_heads = 4
    m.num_kv_heads = 1  # multi-query, as Gemma-2B (the paper's baseline is Gemma-initialised)
    m.num_layers = 6
    m.logit_softcap = 30.0
    m.dtype = "float32"  # activations; "bfloat16" on TPU/GPU
    m.remat = "none"  # none | full | dots
    m.scan_layers = False  # nn.scan over the identical blocks (fast compile)
    # Decoding only (never change the parameters): KV-cache length (0 = prompt + continuation
    # from config.sample) and keys per block of the decode attention loop (0 = whole buffer).
    m.max_len = 0
    m.decode_block = 256
    if arg == "2b":
        _gemma_2b_model(m)
    c.model = m
    return c
