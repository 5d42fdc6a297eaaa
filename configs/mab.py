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
`eval/step_<N>/report.json` and PNG heat maps of the memory addressing per word class.

Measured (2026-12-01, the shared 2-core machine at load average 22-28 falling to 10,
`uptime`): the default and `:nomemory` trained side by side for the default 400 steps (8
epochs of the 800 train clips), each checkpoint evaluated with `--mode=eval` on the 96
held-out clips of the 4 `val` speakers (test branch, video only; chance 0.10):
  step 400: word accuracy 0.500 with the memory, 0.490 without (48 vs 47 of 96 clips);
            held-out loss 1.413 vs 1.471 (ln 10 = 2.303); train accuracy (steps 351-400)
            0.46 / 0.51 (dropout on).
  step 200: 0.240 vs 0.260 (23 vs 25 clips); held-out loss 1.880 vs 2.036.
Before the normalisation the same 10-word data gave 0.1875 / 0.125 at 300 steps. So the
default reads lips far above chance on held-out speakers, and the memory model's held-out
loss is lower at both checkpoints, but its accuracy lead (one clip) is within one run's
noise: the paper's +1-2 points (LRW) are not shown at this scale. Cost: 350 / 321
CPU-seconds for 400 steps including compilation (user + system, `/usr/bin/time`), 50 / 48
min wall at that load (each run got ~0.1-0.2 of a core; from the CPU-seconds, about 3-4 min
on two idle cores, not measured), peak RSS 1.9 / 1.7 GB; `--mode=eval` 18 CPU-seconds.

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
