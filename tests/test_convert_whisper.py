"""Whisper encoder and log-mel front-end against transformers (PyTorch CPU, float32).

A tiny random `WhisperModel` built here (no network): the imported encoder equals its
`encoder(...).last_hidden_state` (<= 1e-4; measured ~1e-6), from a `WhisperModel` state dict, a
`WhisperForConditionalGeneration` one (`model.encoder.` prefix), a saved directory and the
tool's `--check`. The front-end equals `WhisperFeatureExtractor` (80 and 128 bins, 30 s
padding) to 2e-5 absolute on values of order 1 (measured 7e-7 and 4e-6).
"""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402  (torch and transformers are in the test extra)
import transformers  # noqa: E402

from avjax.convert.whisper import (  # noqa: E402
    from_hf_whisper_encoder,
    load_converted,
    load_hf_whisper_encoder,
)
from avjax.data.speech.whisper_features import mel_filters, whisper_features  # noqa: E402
from avjax.nn.whisper import sinusoids  # noqa: E402

MELS, POSITIONS = 16, 12  # HF insists on exactly 2 * max_source_positions = 24 frames


@pytest.fixture(scope="module")
def hf_whisper():
    cfg = transformers.WhisperConfig(
        num_mel_bins=MELS,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=48,
        max_source_positions=POSITIONS,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=16,
        vocab_size=50,
        max_target_positions=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.WhisperModel(cfg).float().eval()
    with torch.no_grad():  # non-trivial norms and biases too (HF initialises them to 1 / 0)
        for name, p in model.named_parameters():
            if "embed_positions" not in name:
                p.add_(0.1 * torch.randn_like(p))
    return cfg, model


def _features(seed=0, frames=2 * POSITIONS):
    return np.random.default_rng(seed).standard_normal((2, MELS, frames)).astype(np.float32)


def _hf_encoder(model, feats):
    with torch.no_grad():
        return model.encoder(torch.as_tensor(feats)).last_hidden_state.numpy()


# one compile per architecture, shared by every call (cheaper than op-by-op dispatch)
_APPLY = jax.jit(lambda m, v, *args: m.apply(v, *args), static_argnums=0)


def _tool(name):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(repo, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_encoder_equals_transformers(hf_whisper):
    cfg, hf = hf_whisper
    feats = _features()
    model, variables = from_hf_whisper_encoder(hf.state_dict(), cfg)
    ours = np.asarray(_APPLY(model, variables, feats))
    ref = _hf_encoder(hf, feats)
    assert ours.shape == ref.shape == (2, POSITIONS, 32)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # our own init builds the same tree; its positions are Whisper's sinusoids
    init = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), feats))
    shapes = jax.tree.map(lambda x: x.shape, variables)
    assert jax.tree.map(lambda x: x.shape, init) == shapes
    hf_positions = hf.encoder.embed_positions.weight.detach().numpy()
    np.testing.assert_allclose(sinusoids(POSITIONS, 32), hf_positions, atol=1e-6)
    # shorter inputs (which transformers refuses) use the first positions
    assert jax.eval_shape(model.apply, variables, feats[:, :, :10]).shape == (2, 5, 32)


def test_generation_checkpoint_prefix_and_errors(hf_whisper):
    cfg, hf = hf_whisper
    sd = {"model." + k: v for k, v in hf.state_dict().items()}
    sd["proj_out.weight"] = torch.zeros(50, 32)
    feats = _features(1)
    model, variables = from_hf_whisper_encoder(sd, cfg)
    np.testing.assert_allclose(_APPLY(model, variables, feats), _hf_encoder(hf, feats), atol=1e-4)

    missing = {k: v for k, v in sd.items() if "layers.1.fc2.bias" not in k}
    with pytest.raises(KeyError, match=r"missing \['layers.1.fc2.bias'\]"):
        from_hf_whisper_encoder(missing, cfg)
    bad = dict(sd, **{"model.encoder.conv2.weight": torch.zeros(32, 32, 5)})
    with pytest.raises(ValueError, match=r"conv2.weight has shape \[32, 32, 5\]"):
        from_hf_whisper_encoder(bad, cfg)
    with pytest.raises(ValueError, match="17 mel bins"):
        _APPLY(model, variables, np.zeros((1, 17, 24), np.float32))
    with pytest.raises(ValueError, match="max_source_positions=12"):
        _APPLY(model, variables, np.zeros((1, MELS, 26), np.float32))


def test_saved_directory_and_tool(hf_whisper, tmp_path):
    cfg, hf = hf_whisper
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "avjax")
    hf.save_pretrained(hf_dir)
    feats = _features(2)
    ref = _hf_encoder(hf, feats)
    model, variables = load_hf_whisper_encoder(hf_dir)
    np.testing.assert_allclose(_APPLY(model, variables, feats), ref, atol=1e-4)
    diff = _tool("convert_whisper").main(["--hf_dir", hf_dir, "--out", out, "--check"])
    assert diff is not None and diff <= 1e-4
    model2, variables2 = load_converted(out)
    assert model2.fields() == model.fields()
    np.testing.assert_allclose(_APPLY(model2, variables2, feats), ref, atol=1e-4)


@pytest.mark.parametrize("mels", [80, 128])
def test_log_mel_equals_feature_extractor(mels):
    from transformers.audio_utils import mel_filter_bank

    ref_filters = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    np.testing.assert_allclose(mel_filters(mels), ref_filters, atol=1e-8, rtol=1e-5)
    rng = np.random.default_rng(mels)
    tone = np.sin(np.arange(8000) / 10.0) * 0.05 * rng.standard_normal(8000)
    audio = [0.3 * rng.standard_normal(16000), tone, rng.uniform(-1, 1, 481_000)]  # last: cut
    audio = [a.astype(np.float32) for a in audio]
    fe = transformers.WhisperFeatureExtractor(feature_size=mels)
    ref = fe(audio, sampling_rate=16000, return_tensors="np").input_features
    ours = whisper_features(audio, mels)
    assert ours.shape == ref.shape == (3, mels, 3000)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
    assert ours[1].min() == pytest.approx(ours[1].max() - 2.0)  # the 80 dB floor
    if mels == 80:  # no padding: as long as the input
        assert whisper_features(audio[0], mels, pad_to=None).shape == (1, mels, 100)
