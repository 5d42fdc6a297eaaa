"""Parity with HuggingFace transformers' PyTorch `LlamaForCausalLM` (CPU, float32) after import.

Tiny random models built here (no network): GQA with several KV-head counts, Llama-3 RoPE
scaling (with frequencies in all three bands: kept, interpolated, divided), tied and untied
embeddings; cached decoding; a saved HF directory through `load_hf_llama` and the tool.
"""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from avjax.convert.llama import from_hf_llama, load_converted, load_hf_llama  # noqa: E402
from avjax.nn.transformer import Llama3RopeScaling, rope_inv_freq  # noqa: E402

VOCAB, T = 97, 20
# theta 100 and head dim 16: wavelengths 6 .. 355 tokens, so with an original context of 64
# (bands < 16 kept, 16 .. 64 interpolated, > 64 divided by 4) all three bands occur.
LLAMA3 = dict(
    rope_type="llama3",
    rope_theta=100.0,
    factor=4.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


def _hf_model(kv_heads=2, tied=False, llama3=True, seed=0):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        rope_parameters=LLAMA3 if llama3 else dict(rope_type="default", rope_theta=100.0),
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # non-trivial norm scales too (HF initialises them to 1)
        for name, p in model.named_parameters():
            if not (name == "lm_head.weight" and tied):
                p.add_(0.1 * torch.randn_like(p))
    return cfg, model


def _tokens(seed=1, t=T):
    return np.random.default_rng(seed).integers(0, VOCAB, (2, t)).astype(np.int32)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _tool(name):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(repo, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_FULL = jax.jit(lambda m, v, tok: m.apply(v, tok)[0], static_argnums=0)


@pytest.mark.parametrize(
    "kv_heads,tied,llama3",
    [(1, True, False), (4, True, True)],  # GQA 2 untied: test_cached_decoding_...
    ids=["mqa_tied_default_rope", "mha_tied_llama3"],
)
def test_logits_match_transformers(kv_heads, tied, llama3):
    cfg, hf = _hf_model(kv_heads, tied, llama3)
    model, variables = from_hf_llama(hf.state_dict(), cfg)
    assert (model.num_kv_heads, model.tie_embeddings) == (kv_heads, tied)
    assert ("lm_head" in variables["params"]) == (not tied)
    tokens = _tokens()
    ref = _hf_logits(hf, tokens)
    ours = np.asarray(_FULL(model, variables, tokens))
    diff = float(np.abs(ours - ref).max())
    print(f"max |ours - HF| = {diff:.3g} (logits up to {np.abs(ref).max():.2f})")
    assert diff <= 1e-4
    if llama3:  # the scaling matters: without it the logits differ
        plain = np.asarray(_FULL(model.clone(rope_scaling=None), variables, tokens))
        assert np.abs(plain - ref).max() > 1e-3


def test_llama3_inv_freq_matches_transformers():
    cfg, hf = _hf_model()
    ref = hf.model.rotary_emb.inv_freq.numpy()
    ours = np.asarray(rope_inv_freq(16, 100.0, Llama3RopeScaling(4.0, 1.0, 4.0, 64)))
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    plain = np.asarray(rope_inv_freq(16, 100.0))
    assert (ours == plain).any() and (ours == plain / 4).any() and (ours > plain / 4).sum() > 1


def test_gqa_untied_llama3_logits_and_cached_decoding():
    cfg, hf = _hf_model(kv_heads=2, tied=False, llama3=True, seed=3)
    model, variables = from_hf_llama(hf.state_dict(), cfg, max_len=32, decode_block=8)
    assert "lm_head" in variables["params"] and model.num_kv_heads == 2
    tokens, prompt = _tokens(seed=4), 6
    ref = _hf_logits(hf, tokens)
    full = np.asarray(_FULL(model, variables, tokens))
    diff = float(np.abs(full - ref).max())
    print(f"max |ours - HF| = {diff:.3g} (logits up to {np.abs(ref).max():.2f})")
    assert diff <= 1e-4
    plain = np.asarray(_FULL(model.clone(rope_scaling=None), variables, tokens))
    assert np.abs(plain - ref).max() > 1e-3  # the Llama-3 scaling matters
    pos = np.broadcast_to(np.arange(T), tokens.shape)
    prefill = jax.jit(lambda x, p: model.apply(variables, x, p, return_cache=True)[1])
    cache = prefill(tokens[:, :prompt], pos[:, :prompt])
    step = jax.jit(lambda c, x, p: model.apply(variables, x, p, cache=c))
    outs = []
    for i in range(prompt, T):
        logits, cache = step(cache, tokens[:, i : i + 1], pos[:, i : i + 1])
        outs.append(np.asarray(logits[:, 0]))
    np.testing.assert_allclose(np.stack(outs, 1), full[:, prompt:], atol=2e-5, rtol=2e-5)
    assert np.abs(np.stack(outs, 1) - ref[:, prompt:]).max() <= 1e-4


def test_load_hf_dir_sharded_and_tool_check(tmp_path):
    main = _tool("convert_llama").main
    cfg, hf = _hf_model(kv_heads=2, tied=False, llama3=True, seed=5)
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir, max_shard_size="40KB")  # several shards + an index
    assert (hf_dir / "model.safetensors.index.json").exists()
    model, variables = load_hf_llama(str(hf_dir))
    assert model.rope_scaling == Llama3RopeScaling(4.0, 1.0, 4.0, 64)
    tokens = _tokens(seed=6)
    ref = _hf_logits(hf, tokens)
    assert np.abs(np.asarray(_FULL(model, variables, tokens)) - ref).max() <= 1e-4
    out = tmp_path / "avjax"
    diff = main(["--hf_dir", str(hf_dir), "--out", str(out), "--check", "--check_len", "12"])
    assert diff is not None and diff <= 1e-4
    model2, variables2 = load_converted(str(out))
    assert model2.config == model.config
    np.testing.assert_allclose(
        np.asarray(_FULL(model2, variables2, tokens)), ref, atol=1e-4, rtol=0
    )
    back = tmp_path / "hf_again"  # --export: avjax dir -> a new HF dir, checked the same way
    args = ["--export", "--out", str(out), "--hf_dir", str(back), "--check", "--check_len", "12"]
    diff = main(args)
    assert diff is not None and diff <= 1e-4 and (back / "model.safetensors").exists()


def test_lora_merge_export_reloads_in_transformers(tmp_path):
    """A LoRA-adapted (and a QLoRA NF4-based) model, merged and exported with `save_hf_llama`,
    reloads in `LlamaForCausalLM.from_pretrained` with our logits; the export inverts import."""
    from avjax.convert.llama import save_hf_llama, to_hf_llama
    from avjax.nn.lora import LoraConfig, LoraModel, add_adapters, merge_lora
    from avjax.nn.quant import quantize_params

    cfg, hf = _hf_model(kv_heads=2, tied=False, llama3=True, seed=7)
    model, variables = from_hf_llama(hf.state_dict(), cfg)
    exported = to_hf_llama(variables, model.config)  # the plain round trip is exact
    ref_sd = hf.state_dict()
    assert set(exported) == set(ref_sd)
    for k, x in exported.items():
        np.testing.assert_array_equal(x, ref_sd[k].numpy(), err_msg=k)
    stacked = dict(variables["params"])  # a scan_layers stack exports the same tensors
    blocks = [stacked.pop(f"blocks_{i}") for i in range(model.num_layers)]
    stacked["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    np.testing.assert_array_equal(
        to_hf_llama({"params": stacked}, model.config)["model.layers.1.mlp.up_proj.weight"],
        exported["model.layers.1.mlp.up_proj.weight"],
    )

    tokens = _tokens(seed=8)
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, target=r"(attention/(q|k|v|out)|ffw_down)$")
    params = add_adapters(model, variables["params"], lora, jax.random.key(0), tokens)
    params = jax.tree_util.tree_map_with_path(  # trained-looking, non-zero B
        lambda p, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(p) else x, params
    )
    for name, base in (("lora", params), ("qlora_nf4", quantize_params(params, "nf4", block=32))):
        ours = np.asarray(_FULL(LoraModel(model, lora), {"params": base}, tokens))
        assert np.abs(ours - _hf_logits(hf, tokens)).max() > 1e-2  # the adapters matter
        out = save_hf_llama({"params": merge_lora(base, lora)}, model.config, tmp_path / name)
        reloaded = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True)
        diff = float(np.abs(_hf_logits(reloaded.float().eval(), tokens) - ours).max())
        print(f"{name}: max |transformers(exported) - ours adapted| = {diff:.3g}")
        assert diff <= 1e-4
    with pytest.raises(ValueError, match="merge"):
        to_hf_llama({"params": params}, model.config)
