r"""TTAID (Gunawan, Nugroho, Park, 2022): test-time adaptive denoising by meta-transfer.

An MPRNet-style encoder-decoder with a primary head (residual), an auxiliary head that
reconstructs the noisy input and a mask network weighing the self-supervised auxiliary loss,
trained in stages chosen by `config.stage`, each run in its own workdir, a later stage
starting from an earlier one's newest checkpoint (`--config.init_from=<workdir>`):

  python -m avjax.main --config=configs/ttaid.py --workdir=W/pretrain --config.stage=pretrain
  python -m avjax.main --config=configs/ttaid.py --workdir=W/meta_aux --config.stage=meta_aux
  python -m avjax.main --config=configs/ttaid.py --workdir=W/meta_transfer \
      --config.stage=meta_transfer --config.init_from=W/meta_aux

(the default, `python -m avjax.main --config=configs/ttaid.py --workdir=W`, is stage 1,
meta_aux). Data: crops of the scikit-image photographs (embedded, offline) with synthetic
noise (Gaussian + speckle sigma in [5, 50]/255 + salt-and-pepper, random order) in
pretrain / meta_aux and camera noise (an image-formation model) in meta_transfer; three whole
photographs are held out. Real benchmarks: --config.data.name=sidd_small|sidd_val|polyu|nam
--config.data.manual_dir=DIR (layouts in avjax/data/image/benchmarks.py).

Test-time adaptation and denoising of a PNG or a folder (tiled, one compile per tile shape):

  python -m avjax.main --config=configs/ttaid.py --workdir=W/meta_transfer \
      --config.stage=meta_transfer --mode=sample --config.sample.image=photo.png

The ablation (plain pretraining vs meta-auxiliary vs meta-transfer, each with and without
test-time adaptation, PSNR / SSIM per noise family) in W/meta_transfer/eval/step_<N>/
ttaid_report.{md,json}:

  python -m avjax.main --config=configs/ttaid.py --workdir=W/meta_transfer --mode=eval \
      --config.stage=meta_transfer --config.eval.compare=pretrain=W/pretrain,meta_aux=W/meta_aux

Measured (tiny shapes only, 2 CPU cores shared with ~8 other jobs; the default config's
runtime and PSNR are NOT measured yet): the three stages at crop 16, 4 features, 4 steps
each, then --mode=eval with a comparison run and --mode=sample on 3 images, end to end in
~2 minutes (mostly compilation); the untrained-scale numbers are meaningless (PSNR ~7.6 dB at
init, before the primary head's output conv was zero-initialised; it now starts as the
identity). Whether test-time adaptation helps the meta-transfer model more than the plainly
pretrained one (the paper's claim) is not established at this scale: run the three stages
and the eval command above and read the TTA-gain column of ttaid_report.md. The paper's
test-time lr (1e-5) barely moves a CPU-scale model; try --config.tta.lr=1e-3.
"""

from __future__ import annotations

import ml_collections

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

    tta = ml_collections.ConfigDict()
    tta.steps = 5
    tta.lr = 1e-5  # the paper's; larger rates move a CPU-scale model more
    tta.optimizer = "adam"  # adam | sgd
    tta.tile = 128  # images larger than this are adapted and denoised in tiles
    tta.overlap = 16
    return meta, tta


def _train() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.steps = 100
    t.batch_size = 4  # the meta-batch: one task per crop
    t.grad_accum = 1
    t.lr = 1e-3
    t.final_lr_frac = 0.1
    t.warmup_steps = 10
    t.weight_decay = 0.0
    t.b1 = 0.9
    t.b2 = 0.999
    t.clip_norm = 1.0
    t.log_every = 10
    t.eval_every = 100
    t.eval_batches = 2
    t.checkpoint_every = 100
    t.keep_checkpoints = 2
    t.async_checkpoints = True
    t.reset_data_iterator = False
    t.init_from = ""  # a params-only checkpoint (the loop's); see config.init_from
    t.init_skip = ""
    t.ema_decay = 0.0
    t.eval_with_ema = False
    return t


def _mesh() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.preset = ""
    m.data = -1
    m.fsdp = 1
    m.sequence = 1
    m.tensor = 1
    m.dcn_data = 1
    return m


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
    c.eval.size = 96  # central crop of each held-out photograph
    c.eval.compare = ""  # label=workdir,...: more runs in the ablation report

    c.train = _train()
    c.evals = ml_collections.ConfigDict()
    c.evals.eval = {"type": "loss", "prefix": "eval_"}
    c.evals.eval.every = c.train.get_ref("eval_every")
    c.evals.denoise = {"type": "task", "every": 0, "prefix": ""}
    c.mesh = _mesh()
    c.sharding_rules = DEFAULT_RULES

    c.sample = ml_collections.ConfigDict()
    c.sample.image = ""  # a PNG or a folder of PNGs; "" = held-out photographs, camera noise
    return c
