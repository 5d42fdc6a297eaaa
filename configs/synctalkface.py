r"""SyncTalkFace (Park et al., AAAI 2022): talking faces from audio with an Audio-Lip Memory.

The model (`avjax.models.synctalkface`): identity encoder on masked target + reference
frames, audio encoder on each frame's 0.2 s mel window, lip encoder (training only), the
audio-lip memory (96 slots, r = 16; audio keys, lip values; L_store, L_align), and a U-Net
decoder from the recalled lip features (and, in training, the real ones). A GAN: the
`generator` and Wav2Lip's visual-quality `discriminator` are two parts with their own Adam
states (lr 1e-4 / 5e-4, betas (0.5, 0.999)), checkpointed and resumed together. Losses (the
paper's weights, `config.loss`): L1 x 10 on both outputs, audio-visual sync x 0.2 (Wav2Lip's
expert, FROZEN, from `model.sync_expert_workdir`), visual-visual sync x 0.2, GAN x 0.2,
memory x 0.2.

Data: the embedded AV corpus (`av_data`, `view=lrw`: 29-frame word clips of 40 speakers, 8
held out), RGB face crops at 32 x 32 (default) / 128 x 128 (`:paper`).

  # 1. the sync expert on the same corpus (its checkpoint is loaded frozen)
  python -m avjax.main --config=configs/syncnet.py --workdir=workdir/syncnet \
      --config.data.name=synthetic --config.data.view=lrw --config.data.num_frames=29 \
      --config.data.image_size=32 --config.data.crop_size=32 --config.model.face_size=32 \
      --config.model.max_shift=10
  # 2. SyncTalkFace, and the ablation without the sync losses (same run length)
  python -m avjax.main --config=configs/synctalkface.py --workdir=workdir/stf \
      --config.model.sync_expert_workdir=workdir/syncnet
  python -m avjax.main --config=configs/synctalkface.py:nosync --workdir=workdir/stf_nosync
  python -m avjax.main --config=configs/synctalkface.py --workdir=workdir/stf --mode=eval \
      --config.model.sync_expert_workdir=workdir/syncnet
  python -m avjax.main --config=configs/synctalkface.py --workdir=workdir/stf --mode=sample \
      --config.sample.audio=speech.wav --config.sample.video=face.mp4   # or face.png

`--mode=eval` writes `stf/psnr`, `stf/ssim`, `stf/psnr_lower_half` of held-out clips
regenerated from their audio, `stf/gen_lse_c|lse_d` and `stf/real_lse_c|lse_d` (the expert's
LSE of generated and real held-out clips), `stf/lmd` with `stf_eval.lmd=True` (dlib), and
`eval/contact_<step>.png` (real frames above generated). `--mode=sample` writes
`samples/synctalkface_<step>.mp4` (with the audio) and `..._side_by_side.mp4`.

`:paper`: 128 x 128, batch 40 x 5 frames, full widths (paper scale; for accelerators):
49.4 M generator and 15.2 M discriminator parameters (traced with `jax.eval_shape`; not
compiled or fit-checked on a TPU topology yet).

Measured so far (tiny test shapes only, 16 x 16 faces, widths 4-16, batch 8, on the shared
2-core machine at load average 12-20, 2026-12-01): the 1-step expert of step 1 above (now
configs/syncnet.py's learning default: shallow, centred, signed head, offset softmax) costs
22 CPU-s, a 2-step SyncTalkFace train from scratch 66 CPU-s, almost all XLA compilation (the
generator step differentiates through the identity / audio / lip encoders, the memory, the
decoder, the frozen expert and the discriminator); a stop or resume from the compilation
cache ~6 CPU-s each; eval of 2 clips ~38 CPU-s; sampling 1 s ~21 CPU-s.
NOT yet measured: the default run's wall time and its numbers (LSE-C of generated vs real
held-out clips, and vs `:nosync` at the same run length). The expert of step 1 learns on the
procedural clips (configs/syncnet.py: held-out pair accuracy 0.875, offsets exact for
168 / 168 shifted clips) but has not been trained or checked on the `lrw` view of the
embedded corpus at 32 x 32, and the 1,500-step default was not run; fill them in.
"""

from __future__ import annotations

import ml_collections

from avjax.data.video import av_data
from avjax.train.defaults import mesh_config, train_config
from avjax.train.sharding import DEFAULT_RULES


def _model(paper: bool) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.id_base = 16 if paper else 8  # identity encoder width at full resolution
    m.max_width = 512 if paper else 64
    m.dim = 512 if paper else 64  # audio / lip feature and memory slot size
    m.audio_base = 32 if paper else 8
    m.lip_base = 64 if paper else 16
    m.disc_base = 32 if paper else 8
    m.residual = 2 if paper else 1
    m.norm_groups = 8 if paper else 4
    m.num_slots = 96
    m.radius = 16.0
    m.sync_expert_workdir = ""  # a configs/syncnet.py workdir: its expert, frozen
    m.dtype = "float32"
    return m


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "nosync", "paper"):
        raise ValueError(f"configs/synctalkface.py:{arg}: expected '', 'nosync' or 'paper'")
    paper = arg == "paper"
    c = ml_collections.ConfigDict()
    c.task = "synctalkface"
    c.seed = 0

    c.data = av_data.default_config()
    c.data.name = "synthetic"  # or lrs2 | lrs3 | lrw | grid | dir with data.manual_dir
    c.data.view = "lrw"
    c.data.num_frames = 29
    c.data.image_size = 128 if paper else 32
    c.data.crop_size = 128 if paper else 32  # no random crop: the face box is the frame
    c.data.grayscale = False
    c.data.hflip = 0.0

    c.model = _model(paper)

    c.loss = ml_collections.ConfigDict()
    c.loss.l1 = 10.0
    c.loss.av_sync = 0.2
    c.loss.vv_sync = 0.2
    c.loss.gan = 0.2
    c.loss.memory = 0.2
    c.loss.sync = arg != "nosync"  # False: neither sync loss (the ablation)

    c.train = train_config(
        steps=100_000 if paper else 1500,
        batch_size=40 if paper else 16,
        lr=1e-4 if paper else 5e-4,
        final_lr_frac=1.0,
        warmup_steps=0 if paper else 20,
        b1=0.5,
        clip_norm=0.0,
    )
    c.train.parts = {"discriminator": {"lr": 5e-4 if paper else 1e-3}}

    c.evals = ml_collections.ConfigDict()
    c.evals.eval = {"type": "loss", "prefix": "eval_"}
    c.evals.eval.every = c.train.get_ref("eval_every")
    c.evals.stf = {"type": "task", "every": 0, "prefix": "stf/"}
    c.stf_eval = {"clips": 16, "lmd": False}

    c.sample = ml_collections.ConfigDict()
    c.sample.audio = ""  # a WAV (any rate; resampled to 16 kHz)
    c.sample.video = ""  # an MP4 of a face, or a PNG / JPEG face image
    c.sample.max_seconds = 10.0

    c.mesh = mesh_config()
    c.sharding_rules = DEFAULT_RULES
    return c
