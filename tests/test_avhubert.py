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

B, T, HW = 2, 6, 16
_TOOL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "convert_avhubert.py")


_JITTED = {}


def _apply(model):
    """`model.apply`, jitted once per module (op-by-op dispatch is slow for these graphs)."""
    if model not in _JITTED:
        _JITTED[model] = jax.jit(model.apply, static_argnames=("train", "mutable"))
    return _JITTED[model]


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
    out = _apply(model)(variables, audio, video)
    assert out["last_hidden_state"].shape == (B, T, cfg.encoder_embed_dim)
    assert len(out["hidden_states"]) == cfg.encoder_layers + 1
    np.testing.assert_array_equal(out["frame_lengths"], [T, T])
    a_only = _apply(model)(variables, audio, None)["last_hidden_state"]
    v_only = _apply(model)(variables, None, video)["last_hidden_state"]
    assert a_only.shape == v_only.shape == (B, T, cfg.encoder_embed_dim)
    assert not np.allclose(a_only, v_only, atol=1e-3)
    assert not np.allclose(a_only, out["last_hidden_state"], atol=1e-3)
    with pytest.raises(ValueError, match="same length"):
        _apply(model)(variables, audio[:, :4], video)
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
        out, _ = _apply(m)(
            variables,
            a,
            v,
            train=True,
            rngs={"dropout": jax.random.key(3)},
            mutable=("batch_stats",),
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
    padded = _apply(model)(variables, audio, video, jnp.array([T, n]))["last_hidden_state"]
    alone = _apply(model)(variables, audio[1:, :n], video[1:, :n])["last_hidden_state"]
    np.testing.assert_allclose(padded[1, :n], alone[0], atol=1e-5)
    unmasked = _apply(model)(variables, audio, video)["last_hidden_state"]
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
    want = _apply(model)(variables, audio, video)["last_hidden_state"]
    got = _apply(loaded_model)(loaded, audio, video)["last_hidden_state"]
    np.testing.assert_allclose(got, want, atol=1e-5)
    spec = importlib.util.spec_from_file_location("convert_avhubert", _TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--ckpt", str(path), "--out", str(tmp_path / "out"), "--check"]) == 0.0
    from avjax.convert.avhubert import load_converted

    reread, rvars = load_converted(str(tmp_path / "out"))
    np.testing.assert_allclose(
        _apply(reread)(rvars, audio, video)["last_hidden_state"], want, atol=1e-5
    )
    del sd["encoder.layers.1.fc2.bias"]
    with pytest.raises(ValueError, match="layers.1.fc2.bias"):
        from_fairseq_avhubert(sd, cfg)


def _torch_resnet(cfg):
    """The official visual front-end's module tree (names as in av_hubert's resnet.py), built
    from torch.nn so that a fairseq-named state dict loads with strict=True."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1, self.relu1 = torch.nn.BatchNorm2d(cout), torch.nn.PReLU(cout)
            self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2, self.relu2 = torch.nn.BatchNorm2d(cout), torch.nn.PReLU(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                conv = torch.nn.Conv2d(cin, cout, 1, stride, bias=False)
                self.downsample = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(cout))

        def forward(self, x):
            h = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
            return self.relu2(h + (x if self.downsample is None else self.downsample(x)))

    stem = cfg.resnet_stem
    net = torch.nn.Module()
    net.frontend3D = torch.nn.Sequential(
        torch.nn.Conv3d(1, stem, (5, 7, 7), (1, 2, 2), (2, 3, 3), bias=False),
        torch.nn.BatchNorm3d(stem),
        torch.nn.PReLU(stem),
        torch.nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
    )
    net.trunk, cin = torch.nn.Module(), stem
    for i, (w, n) in enumerate(zip(cfg.resnet_widths, cfg.resnet_blocks, strict=True)):
        blocks = [Block(cin if j == 0 else w, w, 2 if i and not j else 1) for j in range(n)]
        setattr(net.trunk, f"layer{i + 1}", torch.nn.Sequential(*blocks))
        cin = w
    return net


def test_visual_frontend_matches_torch_layout(tiny):
    """Perturbed variables exported to fairseq names load strictly into the official module
    tree; its eval-mode features equal our VisualFrontend's (conv/BN/PReLU layouts, paddings)."""
    import torch

    from avjax.convert.avhubert import to_fairseq_state_dict
    from avjax.nn.resnet import VisualFrontend

    cfg, _, variables, _, video = tiny
    rng = np.random.default_rng(5)

    def perturb(path, x):  # BatchNorm variances stay positive
        x = np.asarray(x) + 0.2 * rng.standard_normal(x.shape).astype(np.float32)
        return np.abs(x) + 0.5 if path[-1].key == "var" else x

    variables = jax.tree_util.tree_map_with_path(perturb, variables)
    prefix = "feature_extractor_video.resnet."
    sd = {
        k[len(prefix) :]: torch.from_numpy(np.array(v))
        for k, v in to_fairseq_state_dict(variables, cfg).items()
        if k.startswith(prefix)
    }
    net = _torch_resnet(cfg).eval()
    assert not net.load_state_dict(sd, strict=False).unexpected_keys
    missing = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")} - set(sd)
    assert not missing, missing
    with torch.no_grad():
        x = torch.from_numpy(np.array(video))[:, None]  # [B, 1, T, H, W]
        y = net.frontend3D(x)
        b, c, t = y.shape[:3]
        y = y.transpose(1, 2).reshape(b * t, c, *y.shape[3:])
        for i in range(len(cfg.resnet_widths)):
            y = getattr(net.trunk, f"layer{i + 1}")(y)
        ref = y.mean(dim=(2, 3)).reshape(b, t, -1).numpy()
    sub = {c: variables[c]["frontend"]["video_frontend"] for c in ("params", "batch_stats")}
    front = VisualFrontend(
        cfg.resnet_stem, cfg.resnet_widths, cfg.resnet_blocks, prelu_channels=True
    )
    ours = jax.jit(front.apply)(sub, video[..., None])
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
