r"""SpeechSSM (Park et al., 2025) at CPU scale, on the embedded default corpus.

A Griffin LM (RG-LRU recurrent blocks with temporal conv1d, local sliding-window attention,
pattern 2 recurrent : 1 attention, RMSNorm, gated MLP) over 25 Hz k-means speech units.

Train (the first run builds a 2-hour espeak-ng story corpus in ~12 s, cached in
~/.cache/avjax; fits 256 units + the units->mel decoder into the workdir in ~70 s; then
400 steps of 8 x 512 units at ~1.1 step/s on 2 CPU cores: ~8 minutes in all):

  python -m avjax.main --config=configs/speechssm.py --workdir=workdir/speechssm

Expected (measured on 2 CPU cores, 1.24M parameters): held-out loss 2.44 / 2.19 / 2.17 /
2.28 nats per unit at steps 100 / 200 / 300 / 400 (train loss 0.75 at 400: 12 epochs of
162k units overfit; stop at 300 for the best held-out loss), against a unigram entropy of
the units of 5.29 nats (both in the log, workdir/speechssm/metrics.jsonl and data_facts.json).

Sample a minute (or 16: --config.sample.seconds=960) continuing a held-out prompt:

  python -m avjax.main --config=configs/speechssm.py --workdir=workdir/speechssm --mode=sample

writes workdir/speechssm/samples/step_<N>/sample_0.wav, .png spectrogram, .npy units.

Any field can be overridden, e.g. `--config.train.steps=100 --config.mesh.data=-1`.
"""

from __future__ import annotations

import ml_collections

from avjax.train.sharding import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "speechssm"
    c.seed = 0

    # Data: the embedded default corpus (espeak-ng read stories), tokenised to k-means units.
    c.data = ml_collections.ConfigDict()
    c.data.name = "default"
    c.data.minutes = 120.0  # of synthesised speech (>= 30)
    c.data.heldout_fraction = 0.1
    c.data.cache_dir = ""  # where the corpus audio is cached; "" = $AVJAX_CACHE or ~/.cache/avjax
    c.data.manual_dir = ""  # a directory of your own .wav/.flac files (used when name="dir")
    c.data.num_units = 256
    c.data.kmeans_iters = 30
    c.data.vocoder_steps = 300  # units->mel decoder training steps (fitted with the units)
    c.data.seq_len = 512  # tokens per training window (20.5 s at 25 Hz)

    # Model: Griffin backbone (RecurrentGemma layout), tiny.
    c.model = ml_collections.ConfigDict()
    c.model.width = 128
    c.model.mlp_width = 384
    c.model.num_heads = 4
    c.model.num_layers = 6  # pattern (recurrent, recurrent, attention) repeated
    c.model.lru_width = 128
    c.model.window = 256  # local attention window (tokens)
    c.model.conv1d_width = 4
    c.model.logit_softcap = 30.0
    c.model.dtype = "float32"  # activations; "bfloat16" on TPU/GPU
    c.model.scan_impl = "auto"  # linear recurrence: auto | sequential | associative | chunked
    c.model.remat = "none"  # activation checkpointing per block: none | full | dots
    c.model.scan_layers = False  # nn.scan over repeats of the block pattern (fast compile)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 400
    c.train.batch_size = 8
    c.train.grad_accum = 1
    c.train.lr = 3e-3
    c.train.final_lr_frac = 0.1
    c.train.warmup_steps = 50
    c.train.weight_decay = 0.1
    c.train.b1 = 0.9
    c.train.b2 = 0.98
    c.train.clip_norm = 1.0
    c.train.log_every = 20
    c.train.eval_every = 100
    c.train.eval_batches = 4
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 3
    c.train.async_checkpoints = True
    # Start from converted weights (tools/convert_recurrentgemma.py --out=DIR), as the paper
    # starts from RecurrentGemma-2B; init_skip (regex over param paths) keeps some fresh,
    # e.g. "^embedding$" for the unit vocabulary.
    c.train.init_from = ""
    c.train.init_skip = ""

    c.mesh = ml_collections.ConfigDict()
    c.mesh.preset = ""  # "" = as below; dp | fsdp | fsdp_tp | fsdp_sp (avjax/train/sharding.py)
    c.mesh.data = -1  # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.sequence = 1  # activations' length dim (the fsdp_sp preset)
    c.mesh.tensor = 1
    c.mesh.dcn_data = 1  # slices (multi-slice TPU): data parallel across them
    c.sharding_rules = DEFAULT_RULES

    c.sample = ml_collections.ConfigDict()
    c.sample.seconds = 60.0  # generated continuation length
    c.sample.prompt_seconds = 10.0  # from the held-out split
    c.sample.temperature = 1.0
    c.sample.top_k = 0  # 0 = off
    c.sample.batch_size = 1
    c.sample.seed = 0
    c.sample.chunk_tokens = 250  # decode steps per jitted chunk (10 s): progress granularity
    return c
