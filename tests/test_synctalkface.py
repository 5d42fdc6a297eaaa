"""SyncTalkFace: the Wav2Lip-style networks (shapes, U-Net skips), the audio-lip memory model
(losses, stop-gradients, train vs test branches), and a tiny CLI run: train with both GAN
optimizers -> exact resume after a stop -> eval -> sample (MP4 with audio)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avjax.nn import wav2lip

S = 32  # face size in these tests


def _init_apply(module, *args):
    """Variables and output shapes, traced only (no compile: shapes are all we check)."""

    def run(*args):
        variables = module.init(jax.random.key(0), *args)
        return variables, module.apply(variables, *args)

    return jax.eval_shape(run, *args)


def test_stage_widths():
    assert wav2lip.stage_widths(128, 16, 512) == [16, 32, 64, 128, 256, 512, 512]
    assert wav2lip.stage_widths(32, 4, 16) == [4, 8, 16, 16, 16]
    with pytest.raises(ValueError, match="power of two"):
        wav2lip.stage_widths(96, 16, 512)


def test_encoder_and_discriminator_shapes():
    x = jnp.ones((2, S, S, 6))
    _, feats = _init_apply(wav2lip.IdentityEncoder(base=4, max_width=16, bottleneck=24), x)
    assert [f.shape for f in feats] == [
        (2, 32, 32, 4),
        (2, 16, 16, 8),
        (2, 8, 8, 16),
        (2, 4, 4, 16),
        (2, 2, 2, 16),
        (2, 1, 1, 24),
    ]
    _, a = _init_apply(wav2lip.AudioEncoder(base=4, dim=24), jnp.ones((3, 80, 16, 1)))
    assert a.shape == (3, 24)
    _, lip = _init_apply(
        wav2lip.LipEncoder(base=4, max_width=16, dim=24), jnp.ones((2, 5, S, S, 3))
    )
    assert lip.shape == (2, 5, 24)
    _, d = _init_apply(
        wav2lip.QualityDiscriminator(base=4, max_width=16), jnp.ones((3, S // 2, S, 3))
    )
    assert d.shape == (3,)
    with pytest.raises(ValueError, match="80, 16"):
        _init_apply(wav2lip.AudioEncoder(base=4, dim=8), jnp.ones((1, 80, 12, 1)))


def test_lip_encoder_is_per_frame_over_five_frame_context():
    """Frame t's feature depends on frames t-2..t+2 only (Conv3d with kernel 5 in time)."""
    enc = wav2lip.LipEncoder(base=4, max_width=8, dim=8)
    x = jax.random.normal(jax.random.key(1), (1, 7, 16, 16, 3))
    v = enc.init(jax.random.key(0), x)
    g = jax.grad(lambda x: enc.apply(v, x)[0, 0].sum())(x)
    per_frame = np.abs(np.asarray(g)).sum(axis=(0, 2, 3, 4))
    assert (per_frame[:3] > 0).all() and (per_frame[3:] == 0).all()


def test_decoder_skips_connect_at_every_scale():
    """The output depends on the identity input through each skip scale (and the code)."""
    enc = wav2lip.IdentityEncoder(base=4, max_width=8, bottleneck=8)
    dec = wav2lip.FaceDecoder(max_width=8)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 6))
    code = jax.random.normal(jax.random.key(2), (2, 12))
    ve = enc.init(jax.random.key(0), x)
    skips = enc.apply(ve, x)
    vd = dec.init(jax.random.key(3), code, skips)
    out = dec.apply(vd, code, skips)
    assert out.shape == (2, 16, 16, 3) and float(jnp.max(jnp.abs(out))) < 1.0

    def total(code, skips):
        return jnp.sum(dec.apply(vd, code, skips) ** 2)

    g_code, g_skips = jax.grad(total, argnums=(0, 1))(code, skips)
    assert float(jnp.abs(g_code).sum()) > 0
    for i, g in enumerate(g_skips):
        assert float(jnp.abs(g).sum()) > 0, f"skip {i} ({g.shape}) does not reach the output"
    g_x = jax.grad(lambda x: total(code, enc.apply(ve, x)))(x)
    assert float(jnp.abs(g_x).sum()) > 0
