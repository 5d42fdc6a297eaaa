r"""Wav2Lip's lip-sync expert at CPU scale, with LSE-C / LSE-D and AV-offset evaluation.

The expert (`avjax.models.syncnet`): 5 lower-half face frames stacked on channels and an
80 x 16 mel window (0.2 s) -> unit embeddings -> a learned affine map of their cosine = the
sync logit, BCE on in-sync vs shifted pairs drawn on the device from clip batches
(`video [B, T, H, W, 3]` uint8 at 25 fps, `audio [B, T * 640]` at 16 kHz). The default is the
recipe that learns at CPU scale: `model.arch="shallow"` (3 stride-2 convs per encoder, width
16, no norm; 175 k parameters), `model.centre=True` (each window minus its temporal mean:
identity, background and loudness cancel, the motion stays), `model.head="linear"` (signed
embeddings, no final ReLU) and, added to the BCE, the offset softmax (`model.offset_radius=7`:
which of the clip's 15 mel windows at -7..+7 frames is in sync). `:paper` is Wav2Lip's expert
as published (96 x 96 faces, the full 32..512 stack, ReLU embeddings, P(sync) = cosine, BCE
only; 16.3 M parameters; not trained here: its small CPU form did not learn, below).
Evaluation (`avjax.tasks.syncnet.sync_eval` through the `task` evaluator, options in
`config.sync_eval`): held-out accuracy on in-sync / shifted pairs, LSE-D / LSE-C
(joonson/syncnet_python's protocol, `avjax.eval.lse`) of held-out clips in sync and with the
audio delayed 8 frames, and the offsets recovered for clips shifted by -10..+10 frames.

Data (`config.data.name`): "procedural" (default): in-memory talking faces
(`avjax.data.video.procedural.ProceduralClips`: 40 identities, 8 held out; syllables of
formant-shaped harmonics with pauses and unvoiced bursts; the mouth opens and widens with
them), 160 train + 32 held-out clips of 2 s at 48 x 48, made in ~0.25 s per clip on an idle
core (about 1 minute; nothing is written). "synthetic": the embedded AV corpus of
`avjax.data.video.av_data` (built in the cache on first use; `view=lrs3` sentences), or a
real corpus: `--config.data.name=lrs3|lrs2|lrw|grid|dir --config.data.manual_dir=DIR`.

  python -m avjax.main --config=configs/syncnet.py --workdir=workdir/syncnet
  python -m avjax.main --config=configs/syncnet.py --workdir=workdir/syncnet --mode=eval

`--mode=eval` writes `sync/accuracy` (held-out in-sync vs shifted pairs, 4 draws per clip),
`sync/insync_lse_d|lse_c`, `sync/shifted_lse_d|lse_c` (audio delayed 8 frames),
`sync/insync_offset_exact` and `sync/offset_exact|offset_within_1` over `offset_trials`
(8 clips x shifts -10..+10; exact = the offset found is -shift, syncnet_python's sign).

Measured (2026-12-01, the default on the shared 2-core machine at load average 12-18):
train 300 steps in 5.2 min wall, 62 CPU-s (process user + system; 1.8-2.3 steps/s; peak RSS
5.3 GB), train accuracy 0.89 and offset (15-way) accuracy 0.78 at step 300, eval_loss 1.29 /
0.82 / 0.86 at steps 100 / 200 / 300. `--mode=eval`: 2.6 min wall, 24 CPU-s. Held-out
speakers (8 identities, 32 clips): pair accuracy 0.875; LSE-D 0.768 in sync vs 0.807 with the
audio delayed 8 frames, LSE-C 0.560 vs 0.525 (distances of unit embeddings: D is in [0, 2]);
the in-sync offset is 0 for 16 / 16 clips and the offset found for clips shifted by -10..+10
frames is exact in 168 / 168 trials (8 clips x 21 shifts).
`:stf`: the expert configs/synctalkface.py loads frozen, on its data: the embedded corpus's
`lrw` view (29-frame word clips, RGB 32 x 32, shifts <= 10 frames), 1,500 steps. Measured
(2026-12-01, load average 15-27 on the 2 shared cores): train 29 min wall, 141 CPU-s (peak
RSS 1.7 GB); train pair accuracy 0.68 / 0.73 / 0.76 and offset (15-way) accuracy 0.22 / 0.35
/ 0.42 at steps 300 / 1000 / 1500 (a 300-step run: 0.68 / 0.22). `--mode=eval`
(`--config.sync_eval.offset_clips=4`; 5 min wall, 18 CPU-s) on held-out speakers: pair
accuracy 0.672; LSE-D 0.921 in sync vs 0.936 with the audio delayed 8 frames, LSE-C 0.159 vs
0.144; the in-sync offset is 0 for 8 / 16 clips, offsets exact in 59 / 84 trials (within 1:
62 / 84). It discriminates, weakly: a word fills only part of a 29-frame clip (the rest is
silence and a still mouth), and 32 x 32 faces leave the mouth a few pixels wide.
Before this recipe (the Wav2Lip-style stack, width 8, GroupNorm, ReLU'd pooled embeddings,
BCE only) the expert did not learn: train accuracy ~0.49 and the loss at ln 2 for 600-2,000
steps. Why (probes on 96 train / 32 held-out procedural clips): its embeddings are nearly
constant at init (face-face cosine 0.991, audio-audio 0.973) and collapse further in
training, because what the 5 frames / 16 mel steps share (identity, background, loudness)
swamps the motion inside the window. A signed head alone, the offset softmax alone and a
linear bilinear model all stay at chance; centring the inputs is what makes it learn (the
linear model then reaches 0.89 15-way offset accuracy in 300 steps; the shallow expert
0.80 / 0.86 / 0.92 held-out pair accuracy after 50 / 100 / 250 steps of batch 16).
SyncNet v2 weights (`syncnet_v2.model`) import with `avjax.convert.syncnet.load_syncnet_v2`
for LSE as papers report it (`avjax.eval.lse.lse` + `syncnet_mfcc`, 224 x 224 face crops).
"""

from __future__ import annotations

import ml_collections

from avjax.data.video import av_data
from avjax.train.defaults import mesh_config, train_config
from avjax.train.sharding import DEFAULT_RULES


def _model(paper: bool) -> ml_collections.ConfigDict:
    """The expert: default = the CPU recipe that learns (shallow, centred, signed, BCE + the
    offset softmax); `paper` = Wav2Lip's stack and loss (BCE on the cosine only)."""
    m = ml_collections.ConfigDict()
    m.face_size = 96 if paper else 48  # faces are resized to this; the expert sees the lower half
    m.arch = "wav2lip" if paper else "shallow"  # shallow: 3 strided convs per encoder
    m.width = 32 if paper else 16  # Wav2Lip: 32 (channels 32..512)
    m.deep = paper  # arch=wav2lip: True = the paper's full stack (96 x 96 faces)
    m.norm_groups = 8 if paper else 0  # GroupNorm groups (Wav2Lip: BatchNorm), 0: none
    m.similarity = "cosine" if paper else "scaled"  # cosine: P(sync) = cosine (Wav2Lip)
    m.head = "relu" if paper else "linear"  # linear: signed embeddings (no final ReLU)
    m.centre = not paper  # each window minus its temporal mean (frames and mel steps)
    m.offset_radius = 0 if paper else 7  # + softmax over the +-7-frame mel windows of a clip
    m.offset_weight = 1.0
    m.min_shift = 1  # off-sync pairs: audio shifted by 1..max_shift frames
    m.max_shift = 15
    m.dtype = "float32"
    return m


def _synctalkface_view(c: ml_collections.ConfigDict) -> None:
    """`:stf`: the expert configs/synctalkface.py loads, on its data (the embedded corpus's
    `lrw` view: 29-frame word clips, RGB 32 x 32 faces); shifts <= 10 frames fit 29 frames."""
    c.data.update(name="synthetic", view="lrw", num_frames=29, image_size=32, crop_size=32)
    c.model.update(face_size=32, max_shift=10)
    c.train.update(steps=1500, eval_every=500, checkpoint_every=500)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "paper", "stf"):
        raise ValueError(f"configs/syncnet.py:{arg}: expected '', 'paper' or 'stf'")
    paper = arg == "paper"
    c = ml_collections.ConfigDict()
    c.task = "syncnet"
    c.seed = 0

    # Data: clip batches `video [B, T, S, S, C]` uint8 + `audio [B, T * 640]`. "procedural":
    # in-memory talking faces (`data.procedural`); any av_data name (synthetic = the embedded
    # AV corpus, lrs3 | lrs2 | lrw | grid | dir from data.manual_dir) uses those fields.
    c.data = av_data.default_config()
    c.data.name = "procedural"
    c.data.view = "lrs3"  # name=synthetic: sentences (long enough for offsets of +-15 frames)
    c.data.num_frames = 50  # 2 s at 25 fps (>= 36)
    c.data.image_size = 96 if paper else 48
    c.data.crop_size = 96 if paper else 48  # the face size the data module hands over
    c.data.grayscale = False  # Wav2Lip's expert sees RGB
    c.data.hflip = 0.0
    c.data.procedural = {
        "identities": 40,
        "heldout_identities": 8,
        "train_clips": 160,
        "eval_clips": 32,
    }

    c.model = _model(paper)

    c.train = train_config(
        steps=300,
        eval_every=100,
        checkpoint_every=100,
    )
    if arg == "stf":  # SyncTalkFace's frozen expert: its data view and face size
        _synctalkface_view(c)

    c.evals = ml_collections.ConfigDict()
    c.evals.eval = {"type": "loss", "prefix": "eval_"}
    c.evals.eval.every = c.train.get_ref("eval_every")
    # --mode=eval: Task.evaluate = avjax.tasks.syncnet.sync_eval with the options below.
    c.evals.sync = {"type": "task", "every": 0, "prefix": "sync/"}
    c.sync_eval = {
        "repeats": 4,
        "clips": 16,
        "lse_shift": 8,
        "max_offset": 10,
        "offset_clips": 8,
    }

    c.mesh = mesh_config()
    c.sharding_rules = DEFAULT_RULES
    return c
