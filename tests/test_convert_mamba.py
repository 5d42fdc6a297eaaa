"""Parity with HuggingFace transformers' PyTorch Mamba (CPU, float32) after importing its weights.

Without the CUDA kernels (`mamba_ssm`, `causal_conv1d`) transformers runs its pure-PyTorch
reference path, which is what these tests compare against. Tiny random models; no network.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from avjax.convert.mamba import from_hf_mamba, load_converted, load_hf_mamba  # noqa: E402

VOCAB, T = 97, 17


def _hf_model(seed=0, **kw):
    cfg = transformers.MambaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        **kw,
    )
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # random, non-trivial values everywhere (A_log, D, dt bias included)
        for name, p in model.named_parameters():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            p.add_(0.1 * torch.randn_like(p))
    return cfg, model


def _tokens(seed=1, t=T):
    return np.random.default_rng(seed).integers(0, VOCAB, (2, t)).astype(np.int32)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


_FULL = jax.jit(lambda m, v, tok: m.apply(v, tok)[0], static_argnums=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(tie_word_embeddings=True),
        dict(tie_word_embeddings=False, use_bias=True, use_conv_bias=False, time_step_rank=3),
    ],
    ids=["tied", "untied_bias_noconvbias"],
)
def test_full_sequence_logits_match(kw):
    cfg, hf = _hf_model(**kw)
    model, variables = from_hf_mamba(hf.state_dict(), cfg)
    assert model.tie_embeddings == cfg.tie_word_embeddings and model.rank == cfg.time_step_rank
    tokens = _tokens()
    ref = _hf_logits(hf, tokens)
    ours = np.asarray(_FULL(model, variables, tokens))
    diff = float(np.abs(ours - ref).max())
    print(f"full-sequence max |ours - HF| = {diff:.3g} (logits up to {np.abs(ref).max():.2f})")
    assert diff <= 1e-4


def test_cached_decoding_matches_full_call_and_hf_cache():
    cfg, hf = _hf_model(seed=3)
    model, variables = from_hf_mamba(hf.state_dict(), cfg)
    tokens, prompt = _tokens(seed=4), 5
    full = np.asarray(_FULL(model, variables, tokens))
    prefill = jax.jit(lambda v, tok: model.apply(v, tok, return_cache=True))
    step = jax.jit(lambda v, tok, c: model.apply(v, tok, c, method="step"))
    logits, cache = prefill(variables, tokens[:, :prompt])
    np.testing.assert_allclose(logits, full[:, :prompt], atol=1e-5, rtol=0)
    with torch.no_grad():
        out = hf(torch.as_tensor(tokens[:, :prompt], dtype=torch.long), use_cache=True)
        hf_cache = out.cache
        worst_full = worst_hf = 0.0
        for t in range(prompt, T):
            ours, cache = step(variables, tokens[:, t], cache)
            out = hf(
                torch.as_tensor(tokens[:, t : t + 1], dtype=torch.long),
                cache=hf_cache,
                use_cache=True,
            )
            hf_cache = out.cache
            worst_full = max(worst_full, float(np.abs(np.asarray(ours) - full[:, t]).max()))
            worst_hf = max(
                worst_hf, float(np.abs(np.asarray(ours) - out.logits[:, -1].numpy()).max())
            )
    print(
        f"decoding max |step - full call| = {worst_full:.3g}, |step - HF cached| = {worst_hf:.3g}"
    )
    assert worst_full <= 1e-5
    assert worst_hf <= 1e-4


def test_load_from_save_pretrained_directory_and_cli(tmp_path):
    import importlib.util

    cfg, hf = _hf_model(seed=5, tie_word_embeddings=False)
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    assert (hf_dir / "config.json").exists()
    tokens = _tokens(seed=6)
    ref = _hf_logits(hf, tokens)
    model, variables = load_hf_mamba(str(hf_dir))
    ours = np.asarray(_FULL(model, variables, tokens))
    assert float(np.abs(ours - ref).max()) <= 1e-4

    # The command line: orbax params + model.json, read back with load_converted.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "convert_mamba", os.path.join(repo, "tools", "convert_mamba.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out_dir = tmp_path / "ours"
    diff = cli.main([f"--hf_dir={hf_dir}", f"--out={out_dir}", "--check", "--check_len=8"])
    assert diff <= 1e-4
    assert (out_dir / "model.json").exists() and (out_dir / "params").is_dir()
    model2, variables2 = load_converted(str(out_dir))
    assert model2 == model
    ours2 = np.asarray(_FULL(model2, variables2, tokens))
    np.testing.assert_array_equal(ours2, ours)


def test_bad_state_dicts_are_named():
    cfg, hf = _hf_model(seed=7)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    missing = dict(sd)
    del missing["backbone.layers.1.mixer.A_log"]
    with pytest.raises(KeyError, match=r"missing.*backbone\.layers\.1\.mixer\.A_log"):
        from_hf_mamba(missing, cfg)
    extra = dict(sd, **{"backbone.layers.2.norm.weight": sd["backbone.norm_f.weight"]})
    with pytest.raises(KeyError, match=r"unexpected.*backbone\.layers\.2\.norm\.weight"):
        from_hf_mamba(extra, cfg)
    bad = dict(sd, **{"backbone.layers.0.mixer.D": np.zeros((3,), np.float32)})
    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer\.D has shape \[3\]"):
        from_hf_mamba(bad, cfg)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_mamba("/nonexistent/mamba")
    # A tied checkpoint may leave out lm_head.weight (save_pretrained does).
    no_head = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    model, variables = from_hf_mamba(no_head, cfg)
    assert "lm_head" not in variables["params"]
    # The ssm state of our cache is float32 even with bfloat16 activations.
    model, variables = from_hf_mamba(sd, cfg, dtype=jnp.bfloat16)
    assert all(c.ssm_state.dtype == jnp.float32 for c in model.init_cache(1))
