"""HuBERT encoder: parity with transformers' PyTorch `HubertModel` (random tiny weights)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from avjax.convert.hubert import from_hf_hubert, load_hf_hubert  # noqa: E402
from avjax.nn.hubert import HubertConfig  # noqa: E402

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    conv_dim=(16, 16, 16),
    conv_stride=(5, 2, 2),
    conv_kernel=(10, 3, 3),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)
LAYOUTS = {
    "group_postln": dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False),
    "layer_preln": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
}


def _hf_model(layout: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.HubertConfig(**TINY, **LAYOUTS[layout])
    model = transformers.HubertModel(cfg).eval()
    # Non-trivial values everywhere (init leaves norms at 1/0 and biases at 0).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "original0" in name or name.endswith("weight_g"):
                p.copy_(p.abs() * (1.0 + 0.5 * torch.rand_like(p)))
            else:
                p.add_(0.1 * torch.randn_like(p))
    return cfg, model


def _wav(batch: int = 2, samples: int = 1603, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, samples)).astype(np.float32)


def _hf_forward(model, wav: np.ndarray):
    with torch.no_grad():
        out = model(torch.from_numpy(wav), output_hidden_states=True)
    return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parity_with_transformers(layout):
    cfg, hf = _hf_model(layout)
    wav = _wav()
    ref_last, ref_hidden = _hf_forward(hf, wav)
    model, variables = from_hf_hubert(hf.state_dict(), cfg)
    out = jax.jit(model.apply)(variables, jnp.asarray(wav))
    ours_hidden = out["hidden_states"]
    assert out["last_hidden_state"].shape == ref_last.shape == (2, 79, 32)
    assert len(ours_hidden) == len(ref_hidden) == cfg.num_hidden_layers + 1
    np.testing.assert_allclose(out["last_hidden_state"], ref_last, atol=1e-4, rtol=0)
    for i, (a, b) in enumerate(zip(ours_hidden, ref_hidden, strict=True)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=f"hidden_states[{i}]")
    assert model.config.num_frames(wav.shape[1]) == ref_last.shape[1]
    # Stopping early at layer L gives hidden_states[L].
    part = jax.jit(lambda v, w: model.apply(v, w, num_layers=1))(variables, jnp.asarray(wav))
    np.testing.assert_allclose(part["last_hidden_state"], ref_hidden[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_padded_batch_with_lengths_equals_unpadded_rows(layout):
    cfg, hf = _hf_model(layout, seed=1)
    model, variables = from_hf_hubert(hf.state_dict(), cfg)
    lengths = [1603, 1100]
    wav = _wav(samples=max(lengths), seed=3)
    wav[1, lengths[1] :] = 0.7  # junk in the padding must not matter
    out = model.apply(variables, jnp.asarray(wav), jnp.asarray(lengths))
    for row, n in enumerate(lengths):
        ref_last, _ = _hf_forward(hf, wav[row : row + 1, :n])
        frames = model.config.num_frames(n)
        assert int(out["frame_lengths"][row]) == frames == ref_last.shape[1]
        np.testing.assert_allclose(
            out["last_hidden_state"][row, :frames], ref_last[0], atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("weight_norm", ["parametrizations", "legacy"])
def test_load_hf_hubert_from_save_pretrained(tmp_path, weight_norm):
    cfg, hf = _hf_model("group_postln", seed=2)
    hf.save_pretrained(tmp_path / "hub")
    wav = _wav(batch=1, samples=2000, seed=4)
    ref_last, _ = _hf_forward(hf, wav)
    if weight_norm == "legacy":
        # Older checkpoints (and the published facebook/hubert-* files) name the weight-norm
        # pair weight_g / weight_v and come as pytorch_model.bin.
        from safetensors.torch import load_file

        sd = load_file(tmp_path / "hub" / "model.safetensors")
        p = "encoder.pos_conv_embed.conv."
        sd[p + "weight_g"] = sd.pop(p + "parametrizations.weight.original0")
        sd[p + "weight_v"] = sd.pop(p + "parametrizations.weight.original1")
        (tmp_path / "hub" / "model.safetensors").unlink()
        torch.save(sd, tmp_path / "hub" / "pytorch_model.bin")
    model, variables = load_hf_hubert(tmp_path / "hub")
    assert model.config == HubertConfig(**TINY, **LAYOUTS["group_postln"])
    out = model.apply(variables, jnp.asarray(wav))
    np.testing.assert_allclose(out["last_hidden_state"], ref_last, atol=1e-4, rtol=0)


def test_load_errors_name_the_problem(tmp_path):
    cfg, hf = _hf_model("group_postln")
    sd = dict(hf.state_dict())
    del sd["encoder.layers.1.attention.q_proj.bias"]
    sd["encoder.layers.2.attention.q_proj.bias"] = torch.zeros(32)
    with pytest.raises(ValueError, match=r"missing keys.*layers\.1\.attention\.q_proj\.bias"):
        from_hf_hubert(sd, cfg)
    with pytest.raises(ValueError, match=r"unexpected keys.*layers\.2\.attention"):
        from_hf_hubert({**hf.state_dict(), "encoder.layers.2.attention.q_proj.bias": 0}, cfg)
    bad = dict(hf.state_dict())
    bad["feature_projection.projection.weight"] = torch.zeros(32, 15)
    with pytest.raises(ValueError, match=r"feature_projection\.projection\.weight.*\(15, 32\)"):
        from_hf_hubert(bad, cfg)
    # HubertForCTC-style prefixed keys with a head load fine.
    prefixed = {"hubert." + k: v for k, v in hf.state_dict().items()}
    prefixed["lm_head.weight"] = torch.zeros(5, 32)
    from_hf_hubert(prefixed, cfg)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_hubert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_hubert(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_hf_hubert(tmp_path / "nope")


def _stack(frames: np.ndarray, units: int, per_unit: int = 32) -> np.ndarray:
    """Reference 25 Hz stacking: the first `per_unit * units` frames, the last one repeated."""
    need = per_unit * units
    frames = np.concatenate([frames, np.repeat(frames[-1:], max(need - len(frames), 0), 0)])
    return frames[:need].reshape(units, -1)


def test_hubert_feature_extractor_matches_transformers_layer(tmp_path):
    from avjax.data.speech.features import HubertFeatures, get_extractor

    _, hf = _hf_model("layer_preln", seed=5)
    hf.save_pretrained(tmp_path / "hub")
    wav = _wav(batch=1, samples=5000, seed=6)[0]
    ex = get_extractor("hubert", hubert_dir=tmp_path / "hub", layer=1)
    # The tiny model's 20-sample frames are stacked 32 per 640-sample unit (the published
    # models' 320-sample frames: 2 per unit): 25 Hz units like every extractor.
    assert ex.frame_rate == 25 and ex.dim == 32 * 32
    assert ex.spec["layer"] == 1 and ex.spec["frames_per_unit"] == 32
    _, ref_hidden = _hf_forward(hf, wav[None])
    raw = HubertFeatures(tmp_path / "hub", layer=1)(wav)  # zero-padded to 1 s inside, exact
    np.testing.assert_allclose(raw, ref_hidden[1][0], atol=1e-4, rtol=0)
    feats = ex(wav)
    assert feats.shape == (5000 // 640, 1024)
    np.testing.assert_allclose(feats, _stack(ref_hidden[1][0], 7), atol=1e-4, rtol=0)
    # 1280 samples give 63 frames for 2 units: the last frame is repeated.
    short = wav[:1280]
    assert len(_hf_forward(hf, short[None])[0][0]) == 63
    np.testing.assert_allclose(
        ex(short), _stack(_hf_forward(hf, short[None])[1][1][0], 2), atol=1e-4, rtol=0
    )
    # Long audio is encoded in independent chunks of whole units, each stacked on its own.
    chunked = get_extractor("hubert", hubert_dir=tmp_path / "hub", layer=1, max_chunk_seconds=0.2)
    got = chunked(wav)
    ref = np.concatenate(
        [
            _stack(_hf_forward(hf, wav[None, a : a + 3200])[1][1][0], len(wav[a : a + 3200]) // 640)
            for a in range(0, 5000, 3200)
        ]
    )
    assert got.shape == (7, 1024)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        get_extractor("hubert", hubert_dir=tmp_path / "hub", layer=3)


def test_hubert_tokenizer_saves_loads_and_encodes_with_its_layer(tmp_path):
    import shutil

    from avjax.data.speech import features, units

    _, hf = _hf_model("group_postln", seed=7)
    hf.save_pretrained(tmp_path / "hub")
    ex = features.get_extractor("hubert", hubert_dir=tmp_path / "hub", layer=2)
    wavs = [_wav(batch=1, samples=n, seed=k)[0] for k, n in ((1, 6400), (2, 4000))]
    feats = [ex(w) for w in wavs]
    tok = units.UnitTokenizer.fit(feats, num_units=4, iters=3, extractor=ex.spec, normalize=False)
    assert np.all(tok.mean == 0) and np.all(tok.std == 1)
    tok.save(tmp_path / "tok")
    back = units.UnitTokenizer.load(tmp_path / "tok")
    assert back.features == "hubert" and back.extractor == ex.spec
    assert back.extractor["hubert_dir"] == str(tmp_path / "hub") and back.extractor["layer"] == 2
    for w, f in zip(wavs, feats, strict=True):
        u = back.encode(w)
        assert u.shape == (len(w) // 640,)
        np.testing.assert_array_equal(u, tok.encode_features(f))
    # The checkpoint is needed where it was fitted: a moved one is named.
    shutil.move(tmp_path / "hub", tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="hub: HuBERT model directory not found"):
        units.UnitTokenizer.load(tmp_path / "tok").encode(wavs[0])
