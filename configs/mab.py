r"""Multi-modality Associative Bridging through Memory (MAB, ICCV 2021) at CPU scale.

Lip reading of word clips from grey mouth crops with an audio memory recalled from video
(`avjax.models.mab`, `avjax.tasks.mab`): visual front (3D stem + ResNet per frame), audio
front (2D convs over log-mel at 4x the video rate, training only), the associative bridge
(`avjax.nn.memory`), test-time branch fusion([f_v, recalled]) and train-only branch
fusion([f_v, f_a]), a 2-layer BiGRU back-end, a word classifier. Loss: CE(test branch) +
CE(train branch) + KL(bridge) + reconstruction, all weight 1.

Data: the embedded AV corpus (`avjax.data.video.av_corpus`, built in the cache on first use)
in its LRW view, by default over 10 words (`synthetic.vocab_size=10`: the 1,000 word clips
of 29 frames give 100 clips per word; chance 0.10; the corpus builds in ~80 CPU-seconds);
`words125` is the full 125-word corpus (8 clips per word; chance 0.008). 32 train speakers;
the 4 `val` speakers are held out. The mouth region `roi=(0.3, 0.5, 0.7, 0.9)` (the mouth
box plus head drift; the mouth sits in its upper half) resized to 28 and cropped to 24. A
real corpus: `--config.data.name=lrw --config.data.manual_dir=DIR` (or lrs2 | lrs3 | grid).

Why it learned slowly before (0.0 at 250 steps on 125 words): the still content of a clip
(identity, skin, lighting, the mean mouth shape) varies ~41 grey levels between clips, the
mouth motion ~6 within one; with LRW's global mean / std the front-end saw mostly who and
where, not what was said. `model.per_clip_norm` (default; the `paper` variant keeps LRW's
global statistics) subtracts each pixel's mean over the clip and divides by the clip's
standard deviation of the rest (`avjax.models.mab.normalize_video`). A ridge probe on 3 x 3
pooled crops (800 train clips, 100 held-out, 10 words) reads 0.39-0.47 either way, so the
words are in the crops; the CNN needed the normalisation. The 24-pixel crop halves the
step (the visual front is ~all of it: 0.56 vs 1.03 CPU-seconds per step of 16 clips).

Variants (`--config=configs/mab.py:VARIANT`):
  (default)  lip reading, tiny widths, BiGRU back-end.
  nomemory   the same model and data without the memory (the paper's ablation).
  speech     speech from silent video: a mel decoder head (L1 on normalised log-mel, both
             branches) instead of the classifier; eval decodes with Griffin-Lim and reports
             STOI / ESTOI against the held-out audio.
  tcn        MS-TCN back-end (168 slots at paper size).
  paper      the paper's sizes: 112 x 112 crops of 29 frames, ResNet-18 (64..512), audio
             front 128/256, BiGRU 2 x 512, 88 slots (168 with `tcn,paper`), r = 16,
             batch 320, 200 epochs, bfloat16 activations; with the loop's AdamW at lr 3e-4
             (the paper: SGD nesterov lr 0.1 -> 0.01, halved on plateau), on LRW.

  python -m avjax.main --config=configs/mab.py --workdir=workdir/mab
  python -m avjax.main --config=configs/mab.py --workdir=workdir/mab --mode=eval
  python -m avjax.main --config=configs/mab.py:nomemory --workdir=workdir/mab_nomem

`--mode=eval` writes `word_accuracy` (test branch, video only, held-out speakers),
`eval/step_<N>/report.json` and PNG heat maps of the memory addressing per word class, and
with the memory its diagnostics (`avjax.tasks.mab.addressing_stats`): per-frame addressing
entropy (nats; uniform over 32 slots: ln 32 = 3.47), slots in use (perplexity of the mean
addressing), word information I(word; slot) (nats; at most ln 10 = 2.30) of the source
(video) and target (audio) addressings, their held-out KL and top-1 agreement,
`audio_branch_accuracy` (the train-only branch fed the real audio: what the memory could
at best recall) and `swapped_recall_accuracy` (the test branch fed the recall of a clip of
another word: does the classifier read the recall?).

Measured (2026-12-01, the shared 2-core machine, load 7-24), memory vs `:nomemory`: 3 seeds
each (`--config.seed=0|1|2`) of a full 200-step schedule (`--config.train.steps=200
--config.train.eval_every=200 --config.train.checkpoint_every=200`: 4 epochs of the 800
train clips), same data, same steps; each checkpoint evaluated with `--mode=eval` on the 96
held-out clips of the 4 `val` speakers (video only; chance 0.10):
                        with memory (seeds 0, 1, 2)        without memory
  word accuracy         0.260 0.208 0.292: 0.254 +- 0.042  0.219 0.240 0.219: 0.226 +- 0.012
  held-out loss         2.054 2.120 2.068: 2.081 +- 0.035  2.083 2.002 2.035: 2.040 +- 0.041
  CPU-s (train, incl.   168 +- 1, 15-25 min wall,          153 +- 1, 14-22 min wall,
    compilation)        peak RSS 1.5-1.9 GB                peak RSS 1.3-1.7 GB
(mean +- sample std). The memory does NOT help beyond the seed spread: +0.028 accuracy
(under 3 of 96 clips; the memory runs' own std is 0.042) and a higher held-out loss.
Diagnosis (means of the 3 memory runs): the audio (target) addressing is sharp (entropy 1.23
nats, ~17 slots in use) but nearly word-blind (word information 0.034 nats): its slots are
frame-level sound classes every word uses, so a word is in their order, not their choice;
the video (source) addressing is near uniform (entropy 2.84 of 3.47 nats, word information
0.001; the per-word heat maps look alike) and far from the audio's (held-out KL 1.55
nats, top-1 agreement 0.23): the bridge has not learned to recall the audio from video at
this length. The recall does reach the classifier (another word's recall: 0.219 vs 0.254),
but it carries what the video already holds. The ceiling is low as well: the audio branch
(real audio, same classifier) reads 0.552 held out at 200 steps, while a ridge probe on
4 x 20 pooled log-mel reads 0.90-0.92. The implementation matches the authors' code (losses
all weight 1; recall `A_src sg(V)`; `sg(f_a)` into `v_embd` and as the reconstruction
target; `sg(A_tgt)` in the KL; fusion([f_v, recall]) at test time): no bug found; a gain
would need a longer run (training KL ~2.0 at step 50, 1.5-1.7 at step 200).

One seed at the default 400 steps (before the diagnostics; load 22-28): word accuracy
0.500 with the memory vs 0.490 without (48 vs 47 of 96 clips), held-out loss 1.413 vs
1.471; step 200 of that schedule 0.240 vs 0.260. Before the per-clip normalisation the
same data gave 0.1875 / 0.125 at 300 steps. Cost of 400 steps: 350 / 321 CPU-seconds (about
3-4 min on two idle cores, not measured), peak RSS 1.9 / 1.7 GB; `--mode=eval` 18-25
CPU-seconds.

`:speech` (the same data, 400 steps, memory on; 337 CPU-seconds, 47 min wall at the same
load): on 16 held-out clips decoded by Griffin-Lim (16 iterations) from the test branch's
log-mel (video only), STOI 0.516 / ESTOI 0.154 (step 200: 0.505 / 0.123) against the real
held-out audio; the trivial baseline (the held-out mean log-mel spectrum, constant in time,
same vocoder) 0.417 / 0.002; the real log-mel through the same vocoder (the ceiling)
0.944 / 0.874. Log-mel L1 2.21 vs 2.43 for the baseline. So the video carries timing and
some spectral shape into the speech, but it is far from intelligible (the paper, GRID
speaker-dependent: STOI 0.738). `--mode=eval` 24 CPU-seconds, writes speech_0.wav beside
speech_0_mean_mel.wav.

`:words125` (125 words, 8 clips per word) is not re-measured with the normalisation; before
it, 250 steps gave 0.0 with and without the memory.
"""

from __future__ import annotations

import ml_collections

from avjax.data.video import av_corpus, av_data
from avjax.train.defaults import mesh_config, train_config
from avjax.train.sharding import DEFAULT_RULES


def _model() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.classify = True  # word classifier head (lip reading)
    m.num_classes = 0  # 0: the data's vocabulary size
    m.speech = False  # mel decoder head (speech from silent video)
    m.mel_bins = 80
    m.mel_mean = -6.0  # normalises the speech head target (corpus log-mel: mean -5.6, std 3.8)
    m.mel_std = 4.0
    m.mel_weight = 1.0
    m.stem_features = 8  # paper: 64
    m.widths = (8, 16, 32, 64)  # paper: (64, 128, 256, 512)
    m.blocks = (1, 1, 1, 1)  # paper: (2, 2, 2, 2) (ResNet-18)
    m.audio_channels = (8, 16)  # paper: (128, 256)
    m.backend = "gru"  # gru | tcn
    m.gru_hidden = 64  # paper: 512
    m.gru_layers = 2
    m.tcn_widths = (96, 96)  # paper: (768,) * 4
    m.use_memory = True
    m.num_slots = 32  # paper: 88 (BiGRU), 168 (MS-TCN)
    m.radius = 16.0
    m.memory_heads = 1
    m.front_dropout = 0.3
    m.fusion_dropout = 0.5
    m.per_clip_norm = True  # standardise crops per clip (paper: LRW's global mean / std)
    m.dtype = "float32"
    return m


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "mab"
    c.seed = 0

    c.data = av_data.default_config()
    c.data.view = "lrw"
    c.data.synthetic.vocab_size = 10  # 100 clips per word (`words125`: the full corpus)
    c.data.synthetic.num_sentences = 8  # the LRS3 view is not read
    c.data.num_frames = 29
    c.data.roi = (0.3, 0.5, 0.7, 0.9)  # the mouth box plus head drift
    c.data.image_size = 28
    c.data.crop_size = 24
    c.data.grayscale = True
    c.data.mel = True
    c.data.hflip = 0.5
    c.data.spec_freq_masks = 1
    c.data.spec_time_masks = 1
    c.data.spec_mask_width = 10

    c.model = _model()

    c.train = train_config(
        lr=2e-3,
        final_lr_frac=0.05,
        weight_decay=1e-4,
        clip_norm=5.0,
        steps=400,
        eval_every=200,
        eval_batches=6,  # 96 of the 100 held-out clips
        checkpoint_every=200,
    )

    c.eval = ml_collections.ConfigDict()
    c.eval.heatmap_words = 8
    c.eval.speech_clips = 16
    c.eval.griffin_lim_iters = 16

    c.evals = ml_collections.ConfigDict()
    c.evals.eval = {"type": "loss", "prefix": "eval_"}
    c.evals.eval.every = c.train.get_ref("eval_every")
    c.evals.mab = {"type": "task", "every": 0, "prefix": "mab/"}

    c.mesh = mesh_config()
    c.sharding_rules = DEFAULT_RULES

    for v in (x for x in variant.split(",") if x):
        _VARIANTS[v](c)
    return c


def _nomemory(c: ml_collections.ConfigDict) -> None:
    c.model.use_memory = False


def _words125(c: ml_collections.ConfigDict) -> None:
    c.data.synthetic.vocab_size = av_corpus.CorpusSpec.vocab_size
    c.data.synthetic.num_sentences = av_corpus.CorpusSpec.num_sentences


def _speech(c: ml_collections.ConfigDict) -> None:
    c.model.classify = False
    c.model.speech = True
    c.data.hflip = 0.0
    c.data.spec_freq_masks = c.data.spec_time_masks = 0


def _tcn(c: ml_collections.ConfigDict) -> None:
    c.model.backend = "tcn"


def _paper(c: ml_collections.ConfigDict) -> None:
    _words125(c)  # on the embedded corpus; the paper: LRW (--config.data.name=lrw)
    c.data.image_size, c.data.crop_size = 122, 112
    c.data.erase_prob = 0.5
    m = c.model
    m.stem_features, m.widths, m.blocks = 64, (64, 128, 256, 512), (2, 2, 2, 2)
    m.audio_channels, m.gru_hidden = (128, 256), 512
    m.tcn_widths = (768,) * 4
    m.num_slots = 168 if m.backend == "tcn" else 88
    m.per_clip_norm = False  # LRW's global mean / std, as the paper
    m.dtype = "bfloat16"
    c.train.batch_size = 320
    c.train.steps = 200 * 488_766 // 320  # 200 epochs of LRW's 488,766 train clips
    c.train.lr = 3e-4


_VARIANTS = {
    "nomemory": _nomemory,
    "words125": _words125,
    "speech": _speech,
    "tcn": _tcn,
    "paper": _paper,
}
