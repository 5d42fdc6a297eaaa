"""DF-3DFace (Park et al., 2023, arXiv 2310.05934): speech -> 3D face mesh sequences by
diffusion, one-to-many.

The denoiser is a bidirectional transformer over the noisy mesh sequence `x_t [batch, 1 +
frames, dim]`: one static token (the sequence's mean mesh, i.e. identity and mean head pose,
as a code) then one token per frame (its motion: expression, jaw, lips, pose changes), each a
vertex-offset vector or a PCA code (`avjax.data.mesh.mesh_data.MeshRepr`). Identity is
generated once per sequence, so it cannot drift into the lips. It is conditioned on

  - the diffusion timestep (sinusoidal embedding -> MLP -> adaptive RMSNorm shift/scale in
    every block, as in DiT);
  - speech features `audio [batch, frames, feat]` at the mesh frame rate, entering twice:
    added frame-aligned to the motion tokens, and through a cross-attention whose mask lets
    mesh frame i see audio frames j with |i - j| <= `sync_window` only (audio-mesh
    synchronisation: lips can only follow nearby speech, never drift in time);
  - masked conditioning: `audio_mask [batch, frames]` (1 = heard) replaces masked audio frames
    with a learned null token; in training random spans are masked and, for classifier-free
    guidance, whole sequences (`cond_drop_prob`); the fully masked model is the unconditional
    one.

There is no identity or template input: identity, head pose and non-speech motion are sampled
jointly with the lips, so several noise draws for one speech give different faces moving
their lips alike. The model predicts x0 (FaceDiffuser's choice) and samples with
`avjax.nn.diffusion.sample` (DDIM or DDPM) as one `lax.scan`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes, diffusion
from avjax.nn.attention import attend, project_out, project_qkv
from avjax.nn.layers import dense
from avjax.nn.norms import RMSNorm
from avjax.nn.transformer import GatedMLP


@dataclasses.dataclass(frozen=True)
class DF3DFaceConfig:
    """Denoiser sizes. dim: the mesh representation width; feat_dim: speech features."""

    dim: int
    feat_dim: int
    width: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_width: int = 384
    sync_window: int = 4
    use_audio: bool = True
    static_token: bool = False  # x_t row 0 is the sequence's static code (identity + mean pose)
    dtype: Any = jnp.float32


def _modulate(x: jax.Array, cond: jax.Array, name: str, dtype: Any) -> jax.Array:
    """RMSNorm(x) * (1 + scale) + shift, with (shift, scale) = dense(cond); x `[b, t, w]`,
    cond `[b, w]`."""
    w = x.shape[-1]
    ss = dense(2 * w, (axes.EMBED, axes.MLP), scale=1e-4, dtype=dtype, name=f"{name}_mod")(cond)
    shift, scale = jnp.split(ss.astype(jnp.float32), 2, axis=-1)
    h = RMSNorm(dtype=jnp.float32, name=f"{name}_norm")(x)
    return (h * (1.0 + scale[:, None]) + shift[:, None]).astype(dtype)


class DenoiserBlock(nn.Module):
    """Self-attention (bidirectional, RoPE) + windowed audio cross-attention + gated MLP, each
    pre-normed with timestep modulation. x `[b, t, w]`, audio `[b, t, w]`, temb `[b, w]`,
    self_mask / sync_mask `[b, t, t]` -> `[b, t, w]`."""

    cfg: DF3DFaceConfig

    @nn.compact
    def __call__(self, x, audio, temb, pos, self_mask, sync_mask):
        c = self.cfg
        hd = c.width // c.num_heads
        h = _modulate(x, temb, "attn", c.dtype)
        q, k, v = project_qkv(h, pos, c.num_heads, c.num_heads, hd, c.dtype)
        x = x + project_out(attend(q, k, v, self_mask), c.dtype, features=c.width)
        if c.use_audio:
            h = _modulate(x, temb, "sync", c.dtype)
            b, t, _ = h.shape
            q = dense(c.width, (axes.EMBED, axes.HEADS), use_bias=False, dtype=c.dtype, name="xq")
            kv = dense(
                2 * c.width, (axes.EMBED, axes.KV), use_bias=False, dtype=c.dtype, name="xkv"
            )(audio)
            ka, va = jnp.split(kv, 2, axis=-1)
            out = attend(
                q(h).reshape(b, t, c.num_heads, hd),
                ka.reshape(b, t, c.num_heads, hd),
                va.reshape(b, t, c.num_heads, hd),
                sync_mask,
            )
            x = x + dense(c.width, (axes.HEADS, axes.EMBED), dtype=c.dtype, name="xout")(
                out.reshape(b, t, c.width)
            )
        h = _modulate(x, temb, "mlp", c.dtype)
        x = x + GatedMLP(c.width, c.mlp_width, dtype=c.dtype, name="mlp")(h)
        return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))


class DF3DFace(nn.Module):
    """The denoiser: (x_t `[b, s + t, dim]`, timesteps `[b]`, audio `[b, t, feat]`,
    audio_mask `[b, t]`, frame_mask `[b, t]`) -> predicted x0 `[b, s + t, dim]` float32, where
    s = 1 with `static_token` (row 0: the sequence's static code, a token that attends to and
    is attended by every frame but hears no audio; it gets a learned type embedding) else 0."""

    cfg: DF3DFaceConfig

    @nn.compact
    def __call__(self, x_t, timesteps, audio, audio_mask, frame_mask):
        c = self.cfg
        s = int(c.static_token)
        b, t = audio.shape[:2]
        h = dense(c.width, (None, axes.EMBED), dtype=c.dtype, name="in_proj")(x_t)
        temb = diffusion.timestep_embedding(timesteps, c.width)
        temb = dense(c.width, (None, axes.MLP), dtype=c.dtype, name="t_in")(temb)
        temb = dense(c.width, (axes.MLP, axes.EMBED), dtype=c.dtype, name="t_out")(nn.silu(temb))

        def vector(name):
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (axes.EMBED,))
            return self.param(name, init, (c.width,))[None, None].astype(c.dtype)

        null = vector("audio_null")
        a = dense(c.width, (None, axes.EMBED), dtype=c.dtype, name="audio_proj")(audio)
        keep = (audio_mask > 0)[:, :, None]
        if not c.use_audio:
            keep = jnp.zeros_like(keep)
        a = jnp.where(keep, a, jnp.broadcast_to(null, a.shape))
        valid = frame_mask > 0
        if s:  # the static token: its own type embedding, no audio (a null frame), always valid
            a = jnp.concatenate([jnp.broadcast_to(null, (b, 1, c.width)), a], axis=1)
            h = h + jnp.concatenate(
                [vector("static_embed"), jnp.zeros((1, t, c.width), c.dtype)], axis=1
            )
            valid = jnp.concatenate([jnp.ones((b, 1), bool), valid], axis=1)
        if c.use_audio:
            h = h + jnp.concatenate([jnp.zeros_like(a[:, :s]), a[:, s:]], axis=1)
        n = s + t
        pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None], (b, n))
        self_mask = valid[:, None, :] & jnp.ones((b, n, n), bool)
        near = jnp.abs(pos[:, :, None] - pos[:, None, :]) <= c.sync_window
        if s:  # frames hear frames' audio only; the static token its null frame only
            is_frame = pos >= s
            near = (near & is_frame[:, :, None] & is_frame[:, None, :]) | (
                ~is_frame[:, :, None] & ~is_frame[:, None, :]
            )
        sync_mask = near & valid[:, None, :]
        for i in range(c.num_layers):
            h = DenoiserBlock(c, name=f"block_{i}")(h, a, temb, pos, self_mask, sync_mask)
        h = RMSNorm(name="final_norm")(h)
        out = nn.Dense(
            c.dim,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.zeros_init(), (axes.EMBED, None)
            ),
            name="out_proj",
        )(h)
        return out.astype(jnp.float32)


def random_span_mask(rng: jax.Array, shape: tuple[int, int], prob: float, span: int) -> jax.Array:
    """`[batch, frames]` float32: 0 on random spans of `span` frames covering about `prob` of
    the frames (span starts drawn with probability prob / span), 1 elsewhere."""
    starts = jax.random.uniform(rng, shape) < prob / max(span, 1)
    kernel = jnp.ones((span,), jnp.float32)
    covered = jax.vmap(lambda s: jnp.convolve(s.astype(jnp.float32), kernel)[: shape[1]])(starts)
    return (covered == 0).astype(jnp.float32)


def masked_frames(x: jax.Array, frame_mask: jax.Array) -> jax.Array:
    """x `[b, t, d]` with padded frames zeroed (mask `[b, t]`)."""
    return x * frame_mask[:, :, None].astype(x.dtype)
