r"""SpeechSSM (Park et al., 2025) at CPU scale, on the embedded default corpus.

A Griffin LM (RG-LRU recurrent blocks with temporal conv1d, local sliding-window attention,
pattern 2 recurrent : 1 attention, RMSNorm, gated MLP) over 25 Hz k-means speech units.

Train (the first run builds a 2-hour espeak-ng story corpus in ~12 s, cached in
~/.cache/avjax; fits 256 units + the units->mel decoder into the workdir in ~70 s; then
400 steps of 8 x 512 units at ~1.1 step/s on 2 CPU cores: ~8 minutes in all):

  python -m avjax.main --config=configs/speechssm.py --workdir=workdir/speechssm

Expected (measured on 2 CPU cores, 1.24M parameters, RecurrentGemma's output-projection
init `model.out_init_scale="rg"`): held-out loss 2.45 / 2.18 / 2.13 / 2.22 nats per unit at
steps 100 / 200 / 300 / 400 (train loss 0.84 at 400: 12 epochs of 162k units overfit; stop at
300 for the best held-out loss; with the earlier unit-variance init, "unit": 2.44 / 2.19 /
2.17 / 2.28), against a unigram entropy of
the units of 5.29 nats (both in the log, workdir/speechssm/metrics.jsonl and data_facts.json).

Sample a minute (or 16: --config.sample.seconds=960) continuing a held-out prompt:

  python -m avjax.main --config=configs/speechssm.py --workdir=workdir/speechssm --mode=sample

writes workdir/speechssm/samples/step_<N>/60s_t1.0_k0_seed0-<key8>/sample_0.wav, .png
spectrogram, .npy units: one folder per request (length, temperature, top-k, seed; <key8>
hashes everything that defines the tokens), so other settings sample beside it and the same
command again resumes or returns the finished one (--config.sample.out_dir=DIR names it).

Any field can be overridden, e.g. `--config.train.steps=100 --config.mesh.data=-1`.

Real corpora (`--config.data.name=...`, audio already on disk in the corpus' own layout in
`--config.data.manual_dir`; nothing is downloaded). The first run builds a TFDS dataset
(ArrayRecord, cached in <cache_dir>/tfds/<name>-<fingerprint of the folder>), fits the units
and vocoder on `data.fit_minutes` of train audio into the workdir, and tokenises every split
used into workdir/units/tokens-*/ (resumable shards); later runs reuse all of it.

  librispeech       manual_dir/LibriSpeech/<split>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac
                    + <spk>-<chapter>.trans.txt  (unpack openslr.org/12 train-clean-100.tar.gz,
                    dev-clean.tar.gz, ... into manual_dir). Trains on the train-* splits,
                    evaluates on dev-clean. A chapter is a document.
  librilight        manual_dir/<subset>/<spk>/<book>/<file>.flac + <file>.json (unpack
                    small.tar / medium.tar / large.tar from the Libri-Light release). Files are
                    cut at silences into <= 4 min segments (data.builder_config=cut4min; cut30s,
                    full); whole files are held out by data.heldout_fraction.
  librispeech_long  manual_dir/librispeech-long/<split>/<spk>/<chapter>/<chapter>_<seg>.flac
                    + .txt (the LibriSpeech-Long release); evaluation splits dev/test-clean/other.

  python -m avjax.main --config=configs/speechssm.py --workdir=workdir/ls \
      --config.data.name=librispeech --config.data.manual_dir=/data/librispeech \
      --config.data.seq_len=6000 --config.data.pack=True --config.train.steps=1000

A missing folder or another layout stops with the expected layout; a corrupt, empty or
non-16 kHz file stops with its name unless --config.data.skip_bad=True (then skipped and
counted in the log and in workdir/data_facts.json). To tokenise a corpus on many machines
ahead of training: tools/tokenize_corpus.py (--process_index/--process_count, resumable).
Units are k-means over log-mel by default; --config.data.features=mfcc, or =hubert with
--config.data.hubert_dir=DIR (--config.data.hubert_layer=6), fits them on other features.

## Paper scale: `--config=configs/speechssm.py:2b`

SpeechSSM-2B: a RecurrentGemma-2B-sized Griffin backbone at the paper's context length.

Paper setting (Park et al., 2025): LibriLight, 6,000-token (4-minute) windows of 25 Hz units,
128 windows per batch (768k tokens), lr 5e-4, weight decay 0.6, cosine decay, 100k steps,
16 TPU v5p chips, data parallel. Backbone as RecurrentGemma-2B: width 2560, MLP 7680,
10 heads, 26 layers (recurrent, recurrent, attention), local window 2048.

This variant is for pods. Check that it compiles and fits before renting one:

  python tools/aot_compile.py --config=configs/speechssm.py:2b --topology=v5e:16x16

(measured on a 2-core CPU, preset fsdp_tp = fsdp 128 x tensor 2, 2.11B params: peak 14.48 GiB
of v5e's 16 GiB per chip, 4.5 min to compile; with --config.model.remat=dots
--config.model.scan_layers=True, really scanned as 8 x (r, r, a) + (r, r): peak 7.04 GiB,
1.047e16 FLOPs executed (1.04x the analytic 1.005e16), 343 GiB of HBM traffic per chip from
the compiled HLO: memory-bound at 0.449 s/step, estimated MFU 44 %; with
--config.model.remat=full and the same scan: peak 3.31 GiB, 1.28e16 FLOPs executed (1.27x:
the recomputation), 286 GiB per chip: memory-bound at 0.375 s/step, MFU 53 % (README "Fit
check" breaks the traffic down). Before the scan fix: dots peak 8.20 GiB, full 4.61 GiB)

Units: 32,768 k-means units (the paper's vocabulary size) need enough vectors to be fitted:
fitting refuses fewer than `data.min_vectors_per_unit` = 30 per unit (30 x 32,768 = 983k
25 Hz vectors = 10.9 h of audio; see avjax.data.speech.kmeans for why 30). This config fits on
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

  python -m avjax.main --config=configs/speechssm.py:2b --workdir=gs://BUCKET/speechssm_2b \
      --config.data.name=dir --config.data.manual_dir=/data/librilight
"""

from __future__ import annotations

import ml_collections

from avjax.train.defaults import mesh_config, train_config
from avjax.train.sharding import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`arg` (from `--config=configs/speechssm.py:ARG`): None = the CPU run on the embedded
    corpus, "2b" = SpeechSSM-2B at the paper's scale (see the module docstring)."""
    if arg not in (None, "", "2b"):
        raise ValueError(f"configs/speechssm.py:{arg}: expected no argument or '2b'")
    c = ml_collections.ConfigDict()
    c.task = "speechssm"
    c.seed = 0

    # Data: the embedded default corpus (espeak-ng read stories), tokenised to k-means units,
    # or a real corpus read from data.manual_dir (see the docstring).
    c.data = ml_collections.ConfigDict()
    c.data.name = "default"  # default | dir | librispeech | librilight | librispeech_long
    c.data.minutes = 120.0  # of synthesised speech (>= 30; name="default" only)
    c.data.heldout_fraction = 0.1  # whole documents held out when there is no eval split
    c.data.cache_dir = ""  # corpus audio / TFDS cache; "" = $AVJAX_CACHE or ~/.cache/avjax
    c.data.manual_dir = ""  # your audio folder (name="dir") or the corpus in its layout
    c.data.skip_bad = False  # skip (and count in the log) corrupt/empty/wrong-rate files
    c.data.builder_config = ""  # TFDS builder config; LibriLight: cut4min (default) | cut30s | full
    c.data.train_splits = ""  # comma-separated TFDS splits; "" = the train* splits
    c.data.eval_split = ""  # "" = dev_clean, else the first dev*/test* split, else heldout_fraction
    c.data.fit_minutes = 60.0  # audio the units + vocoder are fitted on (real corpora)
    c.data.num_shards = 0  # tokenised ArrayRecord shards per split; 0 = ~2,000 examples each
    c.data.join_documents = True  # join a chapter's / file's utterances into one document
    c.data.pack = False  # pack short documents into shared windows (segment_pos restarts)
    c.data.num_units = 256
    c.data.features = "logmel"  # unit features (real corpora): logmel | mfcc | hubert; 25 Hz
    c.data.hubert_dir = ""  # features="hubert": a local HF HuBERT dir (config.json + weights)
    c.data.hubert_layer = 6  # features="hubert": transformer layer (6 = GSLM's for base)
    c.data.kmeans_iters = 30
    c.data.min_vectors_per_unit = 30  # fitting refuses fewer 25 Hz vectors per unit (fit_minutes)
    c.data.vocoder_steps = 300  # units->mel decoder training steps (fitted with the units)
    # Units are frozen once the workdir has a checkpoint (a change that would refit them is an
    # error naming the fields); True refits them in a workdir without checkpoints only.
    c.data.refit_units = False
    c.data.seq_len = 512  # tokens per training window (20.5 s at 25 Hz; the paper: 6000)

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
    # Output projections of every block: "rg" = variance scale 2 / num_layers (RecurrentGemma),
    # "unit" = 1.0 (before issue 12).
    c.model.out_init_scale = "rg"

    c.train = train_config(
        steps=400,
        batch_size=8,
        lr=3e-3,
        weight_decay=0.1,
        b2=0.98,
        log_every=20,
        eval_every=100,
        eval_batches=4,
        checkpoint_every=100,
        keep_checkpoints=3,
    )
    # Resume params + optimizer state but start the data pipeline afresh (e.g. after a change
    # in the number of processes, whose iterator positions cannot be carried over).
    c.train.reset_data_iterator = False
    # Start from converted weights (tools/convert_recurrentgemma.py --out=DIR), as the paper
    # starts from RecurrentGemma-2B; init_skip (regex over param paths) keeps some fresh,
    # e.g. "^embedding$" for the unit vocabulary.
    c.train.init_from = ""
    c.train.init_skip = ""
    # EMA copy of the parameters (0 = off); eval and sampling use it with eval_with_ema.
    c.train.ema_decay = 0.0
    c.train.eval_with_ema = False

    # Evaluators (avjax/eval/evaluators.py): name -> registered type, cadence `every` in steps
    # (0: --mode=eval only) and its own options. The held-out loss (`eval_loss` in
    # metrics.jsonl) follows train.eval_every; long-form (workdir/eval/step_<N>/report.md,
    # settings from config.sample, any LongformConfig field here overrides) in --mode=eval.
    c.evals = ml_collections.ConfigDict()
    c.evals.eval = {"type": "loss", "prefix": "eval_", "perplexity": True}
    c.evals.eval.every = c.train.get_ref("eval_every")
    c.evals.facts = {"type": "facts", "every": 0, "prefix": "", "keys": "unigram_entropy_nats"}
    c.evals.longform = {"type": "longform", "every": 0}

    c.mesh = mesh_config()
    c.sharding_rules = DEFAULT_RULES

    c.sample = ml_collections.ConfigDict()
    c.sample.seconds = 60.0  # generated continuation length
    c.sample.prompt_seconds = 10.0  # from the held-out split
    c.sample.temperature = 1.0
    c.sample.top_k = 0  # 0 = off
    c.sample.top_p = 1.0  # nucleus sampling; 1.0 = off
    c.sample.batch_size = 1
    c.sample.seed = 0
    c.sample.chunk_tokens = 250  # decode steps per jitted chunk (10 s): progress granularity
    c.sample.save_every_chunks = 6  # sampler state saved every N chunks: a killed job resumes
    # "" = samples/step_<N>/<seconds>s_t<T>_k<K>_seed<S>-<key8>/ in the workdir, one per
    # request; else this folder (path or URL), refused if it holds another request.
    c.sample.out_dir = ""
    if arg == "2b":
        _paper_2b(c)
    return c


def _paper_2b(c: ml_collections.ConfigDict) -> None:
    """SpeechSSM-2B's data, model and training settings on `c` (the `:2b` variant)."""
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
