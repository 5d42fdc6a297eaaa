"""BLIP-2 Q-Former import against transformers' `Blip2QFormerModel` (PyTorch CPU, float32).

Tiny random models built here (no network), cross-attention every layer and every 2nd layer
(with the unused text branch present), with and without an encoder mask: the imported model
equals `last_hidden_state` to <= 1e-4 (measured ~1e-6); a whole BLIP-2 state dict (`qformer.`
prefix); a saved directory through `load_hf_qformer` and the tool's `--check`.
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

from avjax.convert.qformer import from_hf_qformer, load_converted, load_hf_qformer  # noqa: E402

WIDTH, ENC, QUERIES, SOURCE = 32, 24, 5, 7


def _hf_qformer(freq, text=False, seed=0, layers=3):
    cfg = transformers.Blip2QFormerConfig(
        vocab_size=30,
        hidden_size=WIDTH,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=48,
        encoder_hidden_size=ENC,
        cross_attention_frequency=freq,
        use_qformer_text_input=text,
    )
    torch.manual_seed(seed)
    model = transformers.Blip2QFormerModel(cfg).float().eval()
    with torch.no_grad():  # non-trivial norms and biases too
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return cfg, model


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, QUERIES, WIDTH)).astype(np.float32)
    e = rng.standard_normal((2, SOURCE, ENC)).astype(np.float32)
    mask = np.ones((2, SOURCE), bool)
    mask[1, 4:] = False
    return q, e, mask


def _hf_out(model, q, e, mask=None):
    kw = {} if mask is None else {"encoder_attention_mask": torch.as_tensor(mask.astype(np.int64))}
    with torch.no_grad():
        out = model(torch.as_tensor(q), encoder_hidden_states=torch.as_tensor(e), **kw)
    return out.last_hidden_state.numpy()


# one compile per architecture, shared by every call (cheaper than op-by-op dispatch)
_APPLY = jax.jit(lambda m, v, *args: m.apply(v, *args), static_argnums=0)


def _tool(name):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(repo, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "freq,text,layers", [(1, False, 2), (2, True, 3)], ids=["cross_every", "cross_every2"]
)
def test_qformer_equals_transformers(freq, text, layers):
    cfg, hf = _hf_qformer(freq, text, layers=layers)
    q, e, mask = _inputs()
    model, variables = from_hf_qformer(hf.state_dict(), cfg)
    crossing = [i for i in range(layers) if "cross_attn" in variables["params"][f"layers_{i}"]]
    assert crossing == ([0, 1] if freq == 1 else [0, 2])
    ref, ref_masked = _hf_out(hf, q, e), _hf_out(hf, q, e, mask)
    assert np.abs(ref - ref_masked).max() > 1e-2  # the mask matters
    everything = np.ones_like(mask)  # one compile per architecture: always pass a mask
    np.testing.assert_allclose(_APPLY(model, variables, q, e, everything), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(_APPLY(model, variables, q, e, mask), ref_masked, atol=1e-4, rtol=0)
    init = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), q, e))
    assert jax.tree.map(lambda x: x.shape, init) == jax.tree.map(lambda x: x.shape, variables)


def test_blip2_prefix_errors_and_tool(tmp_path):
    cfg, hf = _hf_qformer(2, seed=1)
    q, e, mask = _inputs(1)
    all_keys = np.ones_like(mask)
    ref = _hf_out(hf, q, e)
    whole = {"qformer." + k: v for k, v in hf.state_dict().items()}
    whole["query_tokens"] = torch.zeros(1, QUERIES, WIDTH)
    model, variables = from_hf_qformer(whole, {"qformer_config": cfg.to_dict()})
    np.testing.assert_allclose(_APPLY(model, variables, q, e, all_keys), ref, atol=1e-4)

    sd = hf.state_dict()
    missing = {k: v for k, v in sd.items() if "layer.2.crossattention.attention.key.bias" not in k}
    with pytest.raises(KeyError, match=r"missing \['encoder.layer.2.crossattention"):
        from_hf_qformer(missing, cfg)
    extra = dict(sd, **{"encoder.layer.1.crossattention.attention.key.bias": torch.zeros(WIDTH)})
    with pytest.raises(KeyError, match="unexpected"):
        from_hf_qformer(extra, cfg)
    bad = dict(sd, **{"encoder.layer.0.crossattention.attention.key.weight": torch.zeros(32, 8)})
    with pytest.raises(ValueError, match=r"key.weight has shape \[32, 8\], expected \[32, 24\]"):
        from_hf_qformer(bad, cfg)
    with pytest.raises(ValueError, match="encoder_width=24"):
        _APPLY(model, variables, q, e[..., :8])

    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "avjax")
    hf.save_pretrained(hf_dir)
    loaded, loaded_vars = load_hf_qformer(hf_dir)
    np.testing.assert_allclose(_APPLY(loaded, loaded_vars, q, e, all_keys), ref, atol=1e-4)
    argv = ["--hf_dir", hf_dir, "--out", out, "--check", "--check_queries", "4"]
    diff = _tool("convert_qformer").main(argv + ["--check_source", "6"])
    assert diff is not None and diff <= 1e-4
    model2, variables2 = load_converted(out)
    assert model2.fields() == model.fields()
    np.testing.assert_allclose(_APPLY(model2, variables2, q, e, all_keys), ref, atol=1e-4)
