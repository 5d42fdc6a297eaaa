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

Units: 32,768 k-means units (the paper's vocabulary size) need enough vectors to be fitted:
fitting refuses fewer than `data.min_vectors_per_unit` = 30 per unit (30 x 32,768 = 983k
25 Hz vectors = 10.9 h of audio; see avjax.data.kmeans for why 30). This config fits on
`data.fit_minutes` = 1,200 (20 h: 1.8M vectors, 55 per unit); above 4,096 units the feature
pass writes .npy shards to local disk and mini-batch k-means (batches of 65,536, at most
`data.kmeans_iters` = 10 epochs, early stopping) streams them, so memory stays at a few
buffers whatever fit_minutes is; the vocoder is fitted on the first 60 min. Measured on the
shared 2-core CPU (jax CPU): log-mel features at 160 s of audio per s (20 h: 7.5 min);
HuBERT-base features (torch CPU) at 0.7 s of audio per s (20 h: ~29 h); k-means assignment
against 32,768 centroids at 192 vectors/s = 4 GFLOP/s (one epoch of 1.8M vectors: 2.6 h; 10
epochs: ~26 h) plus k-means++ seeding on 98k vectors at 0.59 s per centroid (~5.4 h). So fit
the units on an accelerator: one epoch is 2 x 1.8M x 32,768 x 320 = 3.8e13 FLOPs (10 epochs:
3.8e14, seconds to minutes on a v5e/H100-class chip) and HuBERT-base is ~10 GFLOPs per second
of audio (20 h: ~7e14 FLOPs); these accelerator times are estimates from FLOPs, not measured.

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
    # >= 30 vectors per unit (data.min_vectors_per_unit) needs >= 656 min; 20 h gives 55.
    c.data.fit_minutes = 1200.0
    c.data.kmeans_iters = 10  # mini-batch epochs at this size (streamed from disk)
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
