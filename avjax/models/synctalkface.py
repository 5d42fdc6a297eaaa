"""SyncTalkFace: talking face generation with an Audio-Lip Memory (Park et al., AAAI 2022).

Facts in `shared/papers/memory.md`. A window of `T = 5` consecutive face frames is generated
from its audio, frame by frame:

1. Identity. Each target frame has its lower half masked; it is stacked on channels with a
   reference frame of the same person from elsewhere in the video (`[.., S, S, 6]`); the
   identity encoder turns it into U-Net skip features (`avjax.nn.wav2lip.IdentityEncoder`).
2. Audio. Each frame's 0.2 s mel window (`[80, 16]`, centred on the frame) is encoded to
   `f_aud [batch, T, dim]`.
3. Lip motion (training only). The ground-truth frames with their upper half zeroed go
   through the lip encoder (a Conv3d over +-2 frames, then 2D convs) to `f_lip [batch, T, dim]`.
4. Audio-Lip Memory (`avjax.nn.memory.AssociativeBridge`, 96 slots, radius r = 16): audio is
   the key, lip motion the value. Per frame, the audio addresses the key memory,
   `A_aud = softmax(r cos(q_embd(f_aud), M_aud))`, and recalls lip motion
   `A_aud M_lip`. In training the lip feature addresses the value memory too,
   `A_lip = softmax(r cos(v_embd(f_lip), M_lip))`, and
   `L_store = ||stopgrad(v_embd(f_lip)) - A_lip M_lip||^2`, `L_align = KL(A_lip || A_aud)`.
5. Generation. The face decoder maps `[recalled lip ; f_aud]` with the identity skips to the
   frame (the test-time path); in training it also maps `[f_lip ; f_aud]` (the real lip
   features) so the decoder learns to use lip features the memory has not yet learnt to give.

The model's param tree has two top-level parts, `generator` (everything above) and
`discriminator` (Wav2Lip's visual-quality discriminator on lower face halves), trained in
alternation with their own optimizers (`Task.parts`). Images are in [-1, 1].
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import memory, wav2lip

WINDOW = 5  # frames per generated window (T)


def mask_lower_half(frames: jax.Array) -> jax.Array:
    """`[..., S, S, C]` with rows `S/2 ..` zeroed (the generator must draw the mouth)."""
    s = frames.shape[-3]
    keep = (jnp.arange(s) < s // 2).astype(frames.dtype)
    return frames * keep.reshape((1,) * (frames.ndim - 3) + (s, 1, 1))


def mask_upper_half(frames: jax.Array) -> jax.Array:
    """`[..., S, S, C]` with rows `.. S/2` zeroed (what the lip encoder sees)."""
    s = frames.shape[-3]
    keep = (jnp.arange(s) >= s // 2).astype(frames.dtype)
    return frames * keep.reshape((1,) * (frames.ndim - 3) + (s, 1, 1))


def lower_half(frames: jax.Array) -> jax.Array:
    """`[..., S, S, C] -> [..., S/2, S, C]`."""
    return frames[..., frames.shape[-3] // 2 :, :, :]


class GeneratorOutput(NamedTuple):
    """What `Generator` returns (`[batch, T, ...]`; the training-only fields are None at test).

    recalled_frames: `[batch, T, S, S, 3]` from the recalled lip features (test-time path).
    real_frames: `[batch, T, S, S, 3]` from the real lip features (training only).
    memory: the bridge's output (addressings, reconstruction, target).
    lip: `[batch, T, dim]` the real lip features (training only).
    """

    recalled_frames: jax.Array
    real_frames: jax.Array | None
    memory: memory.BridgeOutput
    lip: jax.Array | None


class Generator(nn.Module):
    """Identity / audio / lip encoders, the Audio-Lip Memory and the face decoder.

    Attributes:
      id_base, id_max_width, bottleneck: identity encoder widths (Wav2Lip: 16, 512, 512).
      audio_base: audio encoder width (32 -> 16 x it at the output; the paper's 32).
      lip_base: lip encoder stem width (64).
      dim: audio / lip feature size (512).
      num_slots, radius: the memory (96, 16).
      residual: residual blocks per encoder / decoder stage (Wav2Lip: 1-3).
      norm_groups: GroupNorm groups.
    """

    id_base: int = 16
    id_max_width: int = 512
    bottleneck: int = 512
    audio_base: int = 32
    lip_base: int = 64
    dim: int = 512
    num_slots: int = 96
    radius: float = 16.0
    residual: int = 2
    norm_groups: int = 4

    def setup(self):
        g = self.norm_groups
        self.identity_encoder = wav2lip.IdentityEncoder(
            self.id_base, self.id_max_width, self.bottleneck, self.residual, g
        )
        self.audio_encoder = wav2lip.AudioEncoder(self.audio_base, self.dim, self.residual, g)
        self.lip_encoder = wav2lip.LipEncoder(self.lip_base, self.id_max_width, self.dim, g)
        self.memory = memory.AssociativeBridge(
            self.num_slots, self.dim, self.dim, self.radius, reconstruct_embedded=True
        )
        self.decoder = wav2lip.FaceDecoder(self.id_max_width, max(self.residual - 1, 0), g)

    def lip_features(self, frames: jax.Array) -> jax.Array:
        """`[batch, T, S, S, 3]` faces in [-1, 1] -> `[batch, T, dim]` (upper half zeroed here)."""
        return self.lip_encoder(mask_upper_half(frames))

    def __call__(
        self, faces: jax.Array, reference: jax.Array, mel: jax.Array, train: bool = False
    ) -> GeneratorOutput:
        """Generates a window.

        Args:
          faces: `[batch, T, S, S, 3]` target frames in [-1, 1] (only their upper halves are
            seen, and in training their lower halves through the lip encoder).
          reference: `[batch, T, S, S, 3]` reference frames of the same person.
          mel: `[batch, T, 80, 16]` the mel window of each frame.
          train: also run the lip branch (real lip features, memory losses).
        """
        b, t, s = faces.shape[:3]
        ident = jnp.concatenate([mask_lower_half(faces), reference], axis=-1)
        skips = self.identity_encoder(ident.reshape(b * t, s, s, 6))
        f_aud = self.audio_encoder(mel.reshape(b * t, 80, 16, 1)).reshape(b, t, self.dim)
        f_lip = self.lip_features(faces) if train else None
        mem = self.memory(f_aud, f_lip)

        def decode(lip: jax.Array) -> jax.Array:
            code = jnp.concatenate([lip, f_aud.astype(lip.dtype)], axis=-1)
            return self.decoder(code.reshape(b * t, -1), skips).reshape(b, t, s, s, 3)

        recalled = decode(mem.recalled)
        real = decode(f_lip) if train else None
        return GeneratorOutput(recalled, real, mem, f_lip)


class SyncTalkFace(nn.Module):
    """`generator` + `discriminator` (the param tree's two parts).

    Attributes:
      generator: the `Generator`.
      discriminator: a `wav2lip.QualityDiscriminator` on lower face halves.
    """

    generator: Generator
    discriminator: wav2lip.QualityDiscriminator

    def __call__(self, faces, reference, mel, train: bool = False) -> tuple[Any, jax.Array]:
        """Both parts (initialisation): `(GeneratorOutput, realness logits [batch * T])`."""
        out = self.generate(faces, reference, mel, train)
        return out, self.discriminate(out.recalled_frames)

    def generate(self, faces, reference, mel, train: bool = False) -> GeneratorOutput:
        return self.generator(faces, reference, mel, train)

    def lip_features(self, frames: jax.Array) -> jax.Array:
        return self.generator.lip_features(frames)

    def discriminate(self, frames: jax.Array) -> jax.Array:
        """`[batch, T, S, S, 3]` in [-1, 1] -> logits `[batch * T]` on the lower halves."""
        low = lower_half(frames)
        return self.discriminator(low.reshape((-1,) + low.shape[2:]))


def build(cfg: Any) -> SyncTalkFace:
    """The model `config.model` describes."""
    gen = Generator(
        id_base=int(cfg.id_base),
        id_max_width=int(cfg.max_width),
        bottleneck=int(cfg.dim),
        audio_base=int(cfg.audio_base),
        lip_base=int(cfg.lip_base),
        dim=int(cfg.dim),
        num_slots=int(cfg.num_slots),
        radius=float(cfg.radius),
        residual=int(cfg.residual),
        norm_groups=int(cfg.norm_groups),
    )
    disc = wav2lip.QualityDiscriminator(int(cfg.disc_base), int(cfg.max_width))
    return SyncTalkFace(gen, disc)


def memory_losses(mem: memory.BridgeOutput) -> dict[str, jax.Array]:
    """`{"store": L_store, "align": L_align}` (means over frames; float32)."""
    losses = memory.bridge_losses(mem)
    return {"store": losses["reconstruction"], "align": losses["alignment"]}


def l1(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean absolute difference (float32)."""
    return jnp.mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))


def gan_losses(real_logit: jax.Array, fake_logit: jax.Array) -> jax.Array:
    """The discriminator's BCE: real -> 1, fake -> 0 (mean over frames)."""
    return jnp.mean(jax.nn.softplus(-real_logit) + jax.nn.softplus(fake_logit))


def generator_gan_loss(fake_logit: jax.Array) -> jax.Array:
    """The generator's BCE of its frames against the label "real" (Wav2Lip's perceptual loss)."""
    return jnp.mean(jax.nn.softplus(-fake_logit))
