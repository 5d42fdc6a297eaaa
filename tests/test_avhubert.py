"""AV-HuBERT encoder (avjax.nn.avhubert) and its fairseq importer (avjax.convert.avhubert)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avjax.nn.avhubert import AVHubertConfig, AVHubertEncoder, stack_audio_features

B, T, HW = 2, 6, 24


@pytest.fixture(scope="module")
def tiny():
    """Tiny encoder, variables, `audio [B, T, 104]`, `video [B, T, HW, HW]`."""
    cfg = AVHubertConfig.tiny()
    model = AVHubertEncoder(cfg)
    audio = jax.random.normal(jax.random.key(0), (B, T, cfg.audio_feat_dim))
    video = jax.random.normal(jax.random.key(1), (B, T, HW, HW))
    variables = model.init(jax.random.key(2), audio, video)
    return cfg, model, variables, audio, video


def test_shapes_and_single_modalities(tiny):
    cfg, model, variables, audio, video = tiny
    out = model.apply(variables, audio, video)
    assert out["last_hidden_state"].shape == (B, T, cfg.encoder_embed_dim)
    assert len(out["hidden_states"]) == cfg.encoder_layers + 1
    np.testing.assert_array_equal(out["frame_lengths"], [T, T])
    a_only = model.apply(variables, audio, None)["last_hidden_state"]
    v_only = model.apply(variables, None, video)["last_hidden_state"]
    assert a_only.shape == v_only.shape == (B, T, cfg.encoder_embed_dim)
    assert not np.allclose(a_only, v_only, atol=1e-3)
    assert not np.allclose(a_only, out["last_hidden_state"], atol=1e-3)
    with pytest.raises(ValueError, match="same length"):
        model.apply(variables, audio[:, :4], video)
    feats = jnp.arange(2 * 10 * 26, dtype=jnp.float32).reshape(2, 10, 26)
    stacked = stack_audio_features(feats)
    assert stacked.shape == (2, 3, 104)
    np.testing.assert_array_equal(stacked[:, 0, 26:52], feats[:, 1])
    np.testing.assert_array_equal(stacked[:, 2, 52:], 0.0)


@pytest.mark.parametrize("audio_dropout", [1.0, 0.0])
def test_modality_dropout_zeros_one_modality(tiny, audio_dropout):
    """modality_dropout = 1 drops a modality for every example: audio when audio_dropout = 1,
    video when 0, so the output equals the run given only the other modality."""
    cfg, _, variables, audio, video = tiny
    model = AVHubertEncoder(AVHubertConfig.tiny(modality_dropout=1.0, audio_dropout=audio_dropout))

    def run(a, v, rate=1.0):
        m = model if rate else AVHubertEncoder(AVHubertConfig.tiny(modality_dropout=0.0))
        out, _ = m.apply(
            variables,
            a,
            v,
            train=True,
            rngs={"dropout": jax.random.key(3)},
            mutable=["batch_stats"],
        )
        return out["last_hidden_state"]

    dropped = run(audio, video)
    kept = run(None, video) if audio_dropout == 1.0 else run(audio, None)
    np.testing.assert_allclose(dropped, kept, atol=1e-5)
    assert not np.allclose(run(audio, video, rate=0.0), dropped, atol=1e-3)


def test_padding_mask_respected(tiny):
    """A row's valid frames equal the unpadded run of that row alone (eval mode)."""
    _, model, variables, audio, video = tiny
    n = 4
    padded = model.apply(variables, audio, video, jnp.array([T, n]))["last_hidden_state"]
    alone = model.apply(variables, audio[1:, :n], video[1:, :n])["last_hidden_state"]
    np.testing.assert_allclose(padded[1, :n], alone[0], atol=1e-5)
    unmasked = model.apply(variables, audio, video)["last_hidden_state"]
    assert not np.allclose(unmasked[1, :n], alone[0], atol=1e-3)
