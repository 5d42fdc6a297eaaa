r"""SpeechSSM-2B: RecurrentGemma-2B-sized Griffin backbone at the paper's context length.

Paper setting (Park et al., 2025): LibriLight, 6,000-token (4-minute) windows of 25 Hz units,
128 windows per batch (768k tokens), lr 5e-4, weight decay 0.6, cosine decay, 100k steps,
16 TPU v5p chips, data parallel. Backbone as RecurrentGemma-2B: width 2560, MLP 7680,
10 heads, 26 layers (recurrent, recurrent, attention), local window 2048.

This config is for pods. Check that it compiles and fits before renting one:

  python tools/aot_compile.py --config=configs/speechssm_2b.py --topology=v5e:16x16

(measured on a 2-core CPU, preset fsdp_tp = fsdp 128 x tensor 2, 2.11B params: peak 14.48 GiB
of v5e's 16 GiB per chip, 4.5 min to compile; with --config.model.remat=dots
--config.model.scan_layers=True peak 8.20 GiB, compiler FLOPs 1.14e16 vs 1.10e16 per step,
memory-bound roofline 0.36 s/step = 56% MFU; remat=full: peak 4.61 GiB, 1.37e16 FLOPs)

and train on your own tokenised corpus, e.g.

  python -m avjax.main --config=configs/speechssm_2b.py --workdir=gs://BUCKET/speechssm_2b \
      --config.data.name=dir --config.data.manual_dir=/data/librilight
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def _base_config() -> ml_collections.ConfigDict:
    """configs/speechssm.py's config (loaded by path, whatever the working directory)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "speechssm.py")
    spec = importlib.util.spec_from_file_location("avjax_configs_speechssm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    c = _base_config()
    c.data.num_units = 32768  # the paper's unit vocabulary (USM-v2, 32k)
    c.data.seq_len = 6000
    c.model.width = 2560
    c.model.mlp_width = 7680
    c.model.num_heads = 10
    c.model.num_layers = 26
    c.model.lru_width = 2560
    c.model.window = 2048
    c.model.dtype = "bfloat16"
    c.train.steps = 100_000
    c.train.batch_size = 128
    c.train.lr = 5e-4
    c.train.weight_decay = 0.6
    c.train.warmup_steps = 1000
    c.train.b2 = 0.95
    c.train.log_every = 50
    c.train.eval_every = 2000
    c.train.checkpoint_every = 1000
    # FSDP over all chips but a tensor-parallel pair (batch 128 must divide by data x fsdp).
    c.mesh.preset = "fsdp_tp"
    c.mesh.tensor = 2
    return c
