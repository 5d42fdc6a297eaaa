r"""TTAID (Gunawan, Nugroho, Park, 2022): test-time adaptive denoising by meta-transfer.

An MPRNet-style encoder-decoder with a primary head (residual), an auxiliary head that
reconstructs the noisy input and a mask network weighing the self-supervised auxiliary loss,
trained in stages chosen by `config.stage`, each run in its own workdir, a later stage
starting from an earlier one's newest checkpoint (`--config.init_from=<workdir>`). The
default run (stage 1, then stage 2 and the ablation's two baselines, then the report):

  M="python -m avjax.main --config=configs/ttaid.py"
  $M --workdir=W/meta_aux                                    # stage 1 (default), 200 steps
  $M --workdir=W/meta_transfer --config.stage=meta_transfer --config.init_from=W/meta_aux \
      --config.train.steps=60 --config.train.warmup_steps=5  # stage 2, camera noise
  $M --workdir=W/pretrain --config.stage=pretrain            # plain pretraining, 200 steps
  $M --workdir=W/pretrain_camera --config.stage=pretrain --config.data.noise=camera \
      --config.init_from=W/pretrain --config.train.steps=60 --config.train.warmup_steps=5
  $M --workdir=W/meta_transfer --config.stage=meta_transfer --mode=eval \
      --config.eval.compare=pretrain=W/pretrain,pretrain_camera=W/pretrain_camera,meta_aux=W/meta_aux

The report (PSNR / SSIM per noise family, each run with and without test-time adaptation) is
W/meta_transfer/eval/step_<N>/ttaid_report.{md,json}. Data: 32 x 32 crops of the scikit-image
photographs (embedded, offline) with synthetic noise (Gaussian + speckle sigma in [5, 50]/255
+ salt-and-pepper, random order) in pretrain / meta_aux and camera noise (an image-formation
model, avjax/data/image/noise.py) in meta_transfer; three whole photographs are held out
(eval: a 2 x 2 lattice of 96 x 96 crops each, 2 noise draws per crop). Real benchmarks:
--config.data.name=sidd_small|sidd_val|polyu|nam --config.data.manual_dir=DIR. Test-time
adaptation and denoising of a PNG or a folder (tiled, one compile per tile shape):
--mode=sample --config.sample.image=photo.png.

Measured 2026-11-30, second run (masked-mean auxiliary loss, `meta.aux_norm="mask"`, below;
2 CPU cores shared with other jobs, load average 5-18; CPU-seconds are user+sys, wall is
inflated ~3-6x by the load): meta_aux 200 steps 253 CPU-s (619 s wall); meta_transfer 60
steps 225 CPU-s (625 s); pretrain 200 steps 50 CPU-s (141 s); pretrain_camera 60 steps 38
CPU-s (103 s); eval (4 runs x 4 families x 24 items, 384 adaptations of 96 x 96) 180 CPU-s
(1064 s wall at load 17). In all ~750 CPU-s: roughly 7-10 minutes on 2 idle cores.
  Held-out PSNR (dB), re-measured 2026-12-01 on the same checkpoints: each of the 3 held-out
  photographs gives a 2 x 2 lattice of 96 x 96 crops x 2 noise draws (`eval.grid`,
  `eval.draws`): 24 items per family; TTA = 5 Adam steps lr 1e-5 on the heads; gain = mean
  TTA gain, +- its standard error over the 24 items (over the 3 photographs' means in []):
    PSNR without TTA   camera   gaussian   speckle   s&p
      noisy input      28.54    19.08      26.77     26.39
      pretrain         27.66    19.45      25.74     26.33
      pretrain_camera  28.19    19.57      26.33     26.77
      meta_aux         29.56    27.52      30.83     30.99
      meta_transfer    29.68    24.96      29.90     29.72
    TTA gain           camera             gaussian           speckle            s&p
      pretrain         +.009+-.003[.006]  +.001+-.002[.002]  +.023+-.009[.010]  +.009+-.002[.002]
      pretrain_camera  +.005+-.002[.005]  -.004+-.001[.001]  -.002+-.002[.004]  +.005+-.002[.004]
      meta_aux         -.255+-.063[.101]  +.039+-.094[.226]  -.146+-.113[.256]  -.404+-.149[.282]
      meta_transfer    +.077+-.012[.027]  +.037+-.008[.013]  +.095+-.017[.022]  +.091+-.023[.033]
  Mean mask on the held-out crops: pretrain 0.40 (its mask net is never trained), meta_aux
  0.60, meta_transfer 0.29; during meta_aux training 0.60 +- 0.01, meta_transfer 0.34 +- 0.05.
The paper's claim holds at this scale: test-time adaptation improves the meta-transfer model
on every noise family (+0.04 to +0.10 dB, 4-6 standard errors over items, >= 2.8 over the
photographs' means) and on every photograph of every family (per-photograph gains +0.02 to
+0.15 dB), and by more than it improves the plainly pretrained models (-0.004 to +0.023 dB;
camera: +0.077 vs +0.009 / +0.005). The gains are small. Adapting the stage-1 model hurts on
camera, speckle and salt-and-pepper noise (-0.15 to -0.40 dB, varying strongly by photograph:
clock -0.4 to -1.0 dB): stage 2 is what makes the adaptation safe. The earlier 3-item eval
(central crops, one draw: meta_transfer +0.03 to +0.08, pretrain <= +0.006) agreed in
direction. The masked mean rescales the auxiliary term, so the pretrain baselines moved too
(central-crop camera PSNR 27.63 -> 26.98 dB with aux_weight 10 unchanged) and meta_transfer
without TTA is below the first run's (central crops 28.65 vs 29.05 dB).

First run (the paper's `mean(|noisy - recon| * mask)`, `--config.meta.aux_norm=mean`; same
stages): camera-noise PSNR without TTA / TTA gain at lr 1e-5: pretrain 27.63 / +0.040,
pretrain_camera 27.98 / +0.007, meta_aux 27.05 / -0.094, meta_transfer 29.05 / -0.000. The
mask network collapsed in the meta stages (held-out mean mask 0.40 pretrain, 0.0007 after
meta_aux, 0.0000 after meta_transfer): shrinking the mask is the outer loss's easy way to make
the inner steps harmless, so the auxiliary loss and its gradient vanished and test-time Adam
steps were noise. Normalising the auxiliary loss by the mask sum alone did not stop it (the
smoothness term, which also shrinks with the mask, drove the mean to 0.007 within 30 steps);
the smoothness term is now divided by the mask mean as well (`mask_smoothness(norm="mask")`).
"""

from __future__ import annotations

import ml_collections

from avjax.train.defaults import mesh_config, train_config
from avjax.train.sharding import DEFAULT_RULES


def _data() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.name = "default"  # default | sidd_small | sidd_val | polyu | nam
    d.manual_dir = ""  # the benchmark in its published layout
    d.skip_bad = False  # skip (and count) unreadable / unpaired / mismatched pairs
    d.heldout_fraction = 0.1  # benchmarks: the last pairs held out
    d.crop = 32  # training crop (the paper: 128)
    d.noise = "auto"  # auto (synthetic; camera in meta_transfer) | a noise family
    return d


def _model() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.features = 16  # full-resolution channels (the paper: 32)
    m.scale_step = 8  # more channels per level down (the paper: 16)
    m.body_blocks = 1  # residual blocks per level, encoder and decoder
    m.head_blocks = 2
    m.mask_blocks = 3
    return m


def _meta_and_tta() -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    meta = ml_collections.ConfigDict()
    meta.inner_lr = 1e-3
    meta.inner_steps = 5  # meta_transfer (meta_aux: 1)
    meta.aux_weight = 10.0  # meta_transfer inner loss weight; pretrain: aux loss weight
    meta.outer_weight = 10.0  # meta_transfer outer L1 weight
    meta.mask_tv = 1e-2  # meta_aux: weight of the mask smoothness term in the outer loss
    meta.first_order = False  # stop gradients through the inner gradients
    # unroll the inner steps and the loop over tasks: compiles ~2x longer, no faster at 32^2
    # crops, 5.5x faster at 128^2 (XLA:CPU runs while-loop convolution gradients slowly)
    meta.unroll = False
    # auxiliary loss: mask = masked mean sum(|noisy - recon| * mask) / sum(mask), which a
    # collapsing mask cannot shrink; mean = the paper's mean(|noisy - recon| * mask)
    meta.aux_norm = "mask"

    tta = ml_collections.ConfigDict()
    tta.steps = 5
    tta.lr = 1e-5  # the paper's; larger rates move a CPU-scale model more
    tta.optimizer = "adam"  # adam | sgd
    tta.unroll = True  # unrolled steps: a while loop ran ~13x slower on XLA:CPU (256^2)
    tta.tile = 128  # images larger than this are adapted and denoised in tiles
    tta.overlap = 16
    return meta, tta


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "ttaid"
    c.seed = 0
    c.stage = "meta_aux"  # pretrain | meta_aux | meta_transfer
    c.init_from = ""  # a workdir whose newest checkpoint's params start this run
    c.data = _data()
    c.model = _model()
    c.meta, c.tta = _meta_and_tta()

    c.eval = ml_collections.ConfigDict()
    c.eval.families = "gaussian,speckle,salt_pepper,camera"
    c.eval.size = 96  # crop side of the held-out photographs
    c.eval.grid = 2  # grid x grid crops per photograph (1: the central crop)
    c.eval.draws = 2  # noise draws per crop
    c.eval.compare = ""  # label=workdir,...: more runs in the ablation report

    c.train = train_config(
        steps=200,
        batch_size=4,  # the meta-batch: one task per crop
        warmup_steps=10,
        log_every=10,
        eval_every=200,
        eval_batches=2,
        checkpoint_every=200,
    )
    c.evals = ml_collections.ConfigDict()
    c.evals.eval = {"type": "loss", "prefix": "eval_"}
    c.evals.eval.every = c.train.get_ref("eval_every")
    c.evals.denoise = {"type": "task", "every": 0, "prefix": ""}
    c.mesh = mesh_config()
    c.sharding_rules = DEFAULT_RULES

    c.sample = ml_collections.ConfigDict()
    c.sample.image = ""  # a PNG or a folder of PNGs; "" = held-out photographs, camera noise
    return c
