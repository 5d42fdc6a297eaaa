"""Multi-modality Associative Bridging through Memory (MAB; Kim, Hong, Park, Ro, ICCV 2021).

Lip reading (word classification) and speech from silent video with an audio memory that the
video recalls through an associative bridge; facts in `shared/papers/memory.md`. The model
reads top to bottom like the method:

1. Visual front-end (`nn.resnet.VisualFrontend`): grey mouth crops `[B, T, H, W, 1]`,
   normalised with LRW's mean 0.4136 / std 0.1700 (the paper) or standardised per clip
   around each pixel's temporal mean (`per_clip_norm`) -> `f_v [B, T, D]`, dropout.
2. Audio front-end (`nn.audio_front.AudioFrontend`, training only): log-mel at 4x the video
   rate `[B, 4T, 80]`, per-utterance mean/variance normalised (CMVN) -> `f_a [B, T, D]`.
3. Associative bridge (`nn.memory.AssociativeBridge`): the video addresses the source key
   memory and recalls audio features from the value memory (`A_src @ sg(V)`); in training
   the real audio addresses the value memory (`A_tgt`) for the reconstruction and bridge
   losses.
4. Two branches through one fusion layer `Linear(2D -> D)`: the test-time branch
   `fusion([f_v, recalled])` (video only) and the train-only branch `fusion([f_v, f_a])`.
5. Back-end (`nn.temporal.BiGRU`, 2 layers, or `MSTCN`) shared by both branches.
6. Heads: the word classifier (mean over valid frames -> `Linear(-> num_classes)`) and, for
   speech from silent video, a mel decoder (per frame `Linear(-> 4 x 80)`: the 4 log-mel
   frames of each video frame, normalised) whose output a vocoder turns into a waveform.

`use_memory=False` is the ablation the paper argues from: the same visual front, back-end
and heads on `f_v` alone (no audio front, no bridge, no fusion).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes, layers, memory
from avjax.nn.audio_front import AudioFrontend
from avjax.nn.resnet import VisualFrontend
from avjax.nn.temporal import MSTCN, BiGRU

LRW_MEAN, LRW_STD = 0.4136, 0.1700  # grey-level statistics of LRW mouth crops (in [0, 1])


class Branch(NamedTuple):
    """One branch's heads: `logits [B, classes]` (None without the classifier) and
    `mel [B, 4T, mels]` normalised log-mel (None without the speech head)."""

    logits: jax.Array | None
    mel: jax.Array | None


class MABOutput(NamedTuple):
    """`test`: the video-only branch; `train`: the branch fused with real audio (None at test
    time or without the memory); `bridge`: the memory's output (None without the memory)."""

    test: Branch
    train: Branch | None
    bridge: memory.BridgeOutput | None


def normalize_video(
    video: jax.Array, lengths: jax.Array | None = None, per_clip: bool = False
) -> jax.Array:
    """uint8 grey crops `[B, T, H, W, 1]` -> float32 `[B, T, H, W, 1]`.

    `per_clip=False`: the paper's `(x / 255 - 0.4136) / 0.1700`. `per_clip=True`: each
    pixel minus its mean over the clip's valid frames (the still content: identity, skin,
    lighting, the mean mouth shape), divided by the clip's standard deviation of what is
    left (the motion), so the motion is not swamped (on the embedded corpus the temporal
    variation is ~6 grey levels against ~41 between clips). Frames past `lengths` are 0.
    """
    x = video.astype(jnp.float32) / 255.0
    if not per_clip:
        return (x - LRW_MEAN) / LRW_STD
    b, t = x.shape[:2]
    w = jnp.ones((b, t), jnp.float32) if lengths is None else _valid(lengths, t)
    w = w[:, :, None, None, None]
    n = jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
    x = (x - jnp.sum(x * w, axis=1, keepdims=True) / n) * w
    var = jnp.sum(jnp.square(x), axis=(1, 2, 3, 4), keepdims=True) / (n * x[0, 0].size)
    return x * jax.lax.rsqrt(var + 1e-6)


def cmvn(mel: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """Per-utterance, per-bin mean and variance normalisation of `[B, 4T, mels]` over the
    valid steps (`4 * lengths`)."""
    mel = mel.astype(jnp.float32)
    if lengths is None:
        w = jnp.ones(mel.shape[:2], jnp.float32)
    else:
        w = (jnp.arange(mel.shape[1])[None, :] < 4 * lengths[:, None]).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w, axis=1), 1.0)[:, None, None]
    mean = jnp.sum(mel * w[..., None], axis=1, keepdims=True) / n
    var = jnp.sum(jnp.square(mel - mean) * w[..., None], axis=1, keepdims=True) / n
    return (mel - mean) * jax.lax.rsqrt(var + 1e-5) * w[..., None]


def masked_mean(x: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """Mean of `[B, T, D]` over the valid frames -> `[B, D]`."""
    if lengths is None:
        return jnp.mean(x, axis=1)
    w = (jnp.arange(x.shape[1])[None, :] < lengths[:, None]).astype(x.dtype)
    return jnp.sum(x * w[..., None], axis=1) / jnp.maximum(jnp.sum(w, 1), 1.0)[:, None]


class MAB(nn.Module):
    """Lip reader / speech-from-video model with the visual-audio memory (module docstring).

    `__call__(video [B, T, H, W, 1] uint8, lengths [B], mel=None [B, 4T, mels], train)`
    -> `MABOutput`. Pass `mel` (the real audio) in training to get the train branch and the
    bridge's target side; evaluation passes the video alone.

    Attributes:
      num_classes: words (LRW: 500); 0 = no classifier.
      mel_bins: mels of the speech head (80); 0 = no speech head.
      stem_features, widths, blocks: the visual front (64, (64, 128, 256, 512), (2, 2, 2, 2)).
      audio_channels: the audio front's two conv widths ((128, 256)).
      backend: "gru" (2-layer BiGRU) or "tcn" (MS-TCN).
      gru_hidden, gru_layers, tcn_widths: back-end sizes.
      use_memory: False = the ablation without audio memory.
      num_slots, radius, memory_heads: the bridge (88 slots for the BiGRU, 168 for MS-TCN; r=16).
      front_dropout, fusion_dropout: 0.3 after the visual front, 0.5 after the fusion.
      per_clip_norm: standardise the crops per clip (`normalize_video`) instead of LRW's
        global statistics.
      dtype: activation dtype (memory addressing and losses stay float32).
    """

    num_classes: int = 500
    mel_bins: int = 0
    stem_features: int = 64
    widths: Sequence[int] = (64, 128, 256, 512)
    blocks: Sequence[int] = (2, 2, 2, 2)
    audio_channels: Sequence[int] = (128, 256)
    backend: str = "gru"
    gru_hidden: int = 512
    gru_layers: int = 2
    tcn_widths: Sequence[int] = (768, 768, 768, 768)
    use_memory: bool = True
    num_slots: int = 88
    radius: float = 16.0
    memory_heads: int = 1
    front_dropout: float = 0.3
    fusion_dropout: float = 0.5
    per_clip_norm: bool = False
    dtype: jnp.dtype | None = None

    def setup(self):
        dim = self.widths[-1]
        self.front_drop = nn.Dropout(self.front_dropout)
        self.fusion_drop = nn.Dropout(self.fusion_dropout)
        self.visual_front = VisualFrontend(
            self.stem_features, tuple(self.widths), tuple(self.blocks), self.dtype
        )
        if self.use_memory:
            self.audio_front = AudioFrontend(tuple(self.audio_channels), dim, self.dtype)
            self.bridge = memory.AssociativeBridge(
                self.num_slots, dim, dim, self.radius, self.memory_heads, dtype=self.dtype
            )
            self.fusion = layers.dense(dim, (None, axes.EMBED), dtype=self.dtype, name="fusion")
        if self.backend == "gru":
            self.temporal = BiGRU(self.gru_hidden, self.gru_layers, dtype=self.dtype)
        elif self.backend == "tcn":
            self.temporal = MSTCN(tuple(self.tcn_widths), dtype=self.dtype)
        else:
            raise ValueError(f"model.backend={self.backend!r}; expected 'gru' or 'tcn'")
        if self.num_classes:
            self.classifier = layers.dense(self.num_classes, (None, axes.VOCAB), name="classifier")
        if self.mel_bins:
            self.mel_decoder = layers.dense(4 * self.mel_bins, (None, None), name="mel_decoder")

    def heads(self, feats: jax.Array, lengths: jax.Array | None, train: bool) -> Branch:
        """Back-end + heads on fused features `[B, T, D]` -> `Branch`."""
        h = self.temporal(feats, lengths, train=train)
        logits = mel = None
        if self.num_classes:
            logits = self.classifier(masked_mean(h, lengths)).astype(jnp.float32)
        if self.mel_bins:
            b, t = h.shape[:2]
            mel = self.mel_decoder(h).astype(jnp.float32).reshape(b, 4 * t, self.mel_bins)
        return Branch(logits, mel)

    def __call__(
        self,
        video: jax.Array,
        lengths: jax.Array | None = None,
        mel: jax.Array | None = None,
        train: bool = False,
        recall_from: jax.Array | None = None,
    ) -> MABOutput:
        """`recall_from [B]` (int, diagnostics): clip `i`'s test branch fuses its own video with
        the audio recalled for clip `recall_from[i]` (does the recall reach the classifier?)."""
        frames = normalize_video(video, lengths, self.per_clip_norm)
        f_v = self.visual_front(frames, train=train)
        f_v = self.front_drop(f_v, deterministic=not train)
        if not self.use_memory:
            return MABOutput(self.heads(f_v, lengths, train), None, None)

        f_a = None if mel is None else self.audio_front(cmvn(mel, lengths), train=train)
        bridge = self.bridge(f_v, f_a)

        def fuse(other: jax.Array) -> jax.Array:
            fused = self.fusion(jnp.concatenate([f_v, other], axis=-1))
            return self.fusion_drop(fused, deterministic=not train)

        recalled = bridge.recalled.astype(f_v.dtype)
        if recall_from is not None:
            recalled = jnp.take(recalled, recall_from, axis=0)
        test = self.heads(fuse(recalled), lengths, train)
        train_branch = None if f_a is None else self.heads(fuse(f_a), lengths, train)
        return MABOutput(test, train_branch, bridge)


def _valid(lengths: jax.Array, steps: int, per_frame: int = 1) -> jax.Array:
    """`[B, steps]` float32, 1 on the first `per_frame * lengths` steps."""
    return (jnp.arange(steps)[None, :] < per_frame * lengths[:, None]).astype(jnp.float32)


def _word_ce(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(sum of CE over labelled examples, number of correct)`; label -1 = no word."""
    has = labels >= 0
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == labels) & has
    return jnp.sum(jnp.where(has, nll, 0.0)), jnp.sum(correct.astype(jnp.float32))


def _mel_l1(pred: jax.Array, target: jax.Array, lengths: jax.Array) -> jax.Array:
    """Sum over examples of the mean |pred - target| over valid steps and bins."""
    w = _valid(lengths, pred.shape[1], 4)
    err = jnp.mean(jnp.abs(pred - target.astype(jnp.float32)), axis=-1)  # [B, 4T]
    return jnp.sum(jnp.sum(err * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0))


def mab_losses(
    out: MABOutput,
    labels: jax.Array,
    lengths: jax.Array,
    mel_target: jax.Array | None = None,
    mel_weight: float = 1.0,
) -> dict[str, jax.Array]:
    """The paper's objective as sums over the batch (`loss` is what is minimised).

    `CE(test branch) + CE(train branch) + KL(sg(A_tgt) || A_src) + MSE reconstruction`
    (all weight 1), plus `mel_weight * L1` of each branch's normalised log-mel against
    `mel_target [B, 4T, mels]` for the speech head. The memory terms are frame means per
    batch, multiplied by the batch size so every term is a sum over examples. Also returns
    `correct` (test branch) and each term.
    """
    b = labels.shape[0]
    terms: dict[str, jax.Array] = {}
    branches = {"test": out.test, "train": out.train}
    for name, branch in branches.items():
        if branch is None:
            continue
        if branch.logits is not None:
            terms[f"ce_{name}"], correct = _word_ce(branch.logits, labels)
            if name == "test":
                terms["correct"] = correct
        if branch.mel is not None and mel_target is not None:
            terms[f"mel_l1_{name}"] = _mel_l1(branch.mel, mel_target, lengths)
    if out.bridge is not None and out.bridge.target_logits is not None:
        mask = _valid(lengths, out.bridge.source_logits.shape[1]) > 0
        for k, v in memory.bridge_losses(out.bridge, mask).items():
            terms[k] = v * b
    total = sum(
        (mel_weight if k.startswith("mel_l1") else 1.0) * v
        for k, v in terms.items()
        if k != "correct"
    )
    return {"loss": jnp.asarray(total, jnp.float32), **terms}
