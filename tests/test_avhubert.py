"""AV-HuBERT encoder (avjax.nn.avhubert) and its fairseq importer (avjax.convert.avhubert)."""

from __future__ import annotations

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avjax.nn.avhubert import AVHubertConfig, AVHubertEncoder, stack_audio_features

B, T, HW = 2, 6, 24
_TOOL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "convert_avhubert.py")


@pytest.fixture(scope="module")
def tiny():
    """Tiny encoder, variables, `audio [B, T, 104]`, `video [B, T, HW, HW]`."""
    cfg = AVHubertConfig.tiny()
    model = AVHubertEncoder(cfg)
    audio = jax.random.normal(jax.random.key(0), (B, T, cfg.audio_feat_dim))
    video = jax.random.normal(jax.random.key(1), (B, T, HW, HW))
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(2), audio, video))
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


def _fairseq_checkpoint_dict(variables, cfg):
    """Our variables as an official-looking fairseq state dict: weight-norm pair for the
    positional conv, BatchNorm counters and the pretraining head's extra entries."""
    import torch

    from avjax.convert.avhubert import to_fairseq_state_dict

    sd = {
        k: torch.from_numpy(np.array(v)) for k, v in to_fairseq_state_dict(variables, cfg).items()
    }
    w = sd.pop("encoder.pos_conv.0.weight")
    g = torch.linalg.vector_norm(w, dim=(0, 1), keepdim=True)
    sd["encoder.pos_conv.0.weight_g"], sd["encoder.pos_conv.0.weight_v"] = g, 3.0 * w
    extras = {
        "mask_emb": torch.zeros(cfg.audio_feat_dim),
        "final_proj.weight": torch.zeros(8, cfg.encoder_embed_dim),
        "label_embs_concat": torch.zeros(5, 8),
        "feature_extractor_video.resnet.frontend3D.1.num_batches_tracked": torch.tensor(3),
    }
    return {**sd, **extras}, sorted(extras)


def test_import_round_trip_and_checkpoint_file(tiny, tmp_path):
    """our variables -> fairseq-named dict -> import: every tensor lands, extras are reported;
    the same through a torch.save'd checkpoint holding an argparse Namespace config."""
    import argparse

    import torch

    from avjax.convert.avhubert import from_fairseq_avhubert, infer_config, load_avhubert

    cfg, model, variables, audio, video = tiny
    sd, extras = _fairseq_checkpoint_dict(variables, cfg)
    assert infer_config(sd, encoder_attention_heads=4) == cfg
    _, imported = from_fairseq_avhubert(sd, cfg)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), imported, dict(variables)
    )
    args = argparse.Namespace(encoder_attention_heads=4, layer_norm_first=True)
    ft = {"encoder.w2v_model." + k: v for k, v in sd.items()}
    ft["decoder.embed_tokens.weight"] = torch.zeros(3, 4)
    path = tmp_path / "checkpoint_best.pt"
    torch.save({"args": args, "cfg": None, "model": ft}, path)
    with pytest.raises(Exception, match="[Ww]eights"):
        torch.load(path, weights_only=True)  # why the restricted unpickler is needed
    loaded_model, loaded, unmapped = load_avhubert(path)
    assert loaded_model.config == cfg
    assert unmapped == sorted(
        ["decoder.embed_tokens.weight"] + ["encoder.w2v_model." + k for k in extras]
    )
    want = model.apply(variables, audio, video)["last_hidden_state"]
    got = loaded_model.apply(loaded, audio, video)["last_hidden_state"]
    np.testing.assert_allclose(got, want, atol=1e-5)
    spec = importlib.util.spec_from_file_location("convert_avhubert", _TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--ckpt", str(path), "--out", str(tmp_path / "out"), "--check"]) == 0.0
    from avjax.convert.avhubert import load_converted

    reread, rvars = load_converted(str(tmp_path / "out"))
    np.testing.assert_allclose(
        reread.apply(rvars, audio, video)["last_hidden_state"], want, atol=1e-5
    )
    del sd["encoder.layers.1.fc2.bias"]
    with pytest.raises(ValueError, match="layers.1.fc2.bias"):
        from_fairseq_avhubert(sd, cfg)
