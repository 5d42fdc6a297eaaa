"""Parity with HuggingFace transformers' PyTorch `GemmaForCausalLM` (CPU, float32) after import.

Tiny random Gemma-1 models built here (no network): multi-query (1 KV head, as Gemma-2B) and
several KV heads, a head dim independent of the width (as Gemma-7B); a saved HF directory
through `load_hf_gemma` and `tools/convert_gemma.py --check`; the Gemma-2B preset's shapes.
"""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from avjax.convert.gemma import from_hf_gemma, load_converted, load_hf_gemma  # noqa: E402
from avjax.nn.transformer import DecoderConfig  # noqa: E402

VOCAB, T = 97, 20


def _hf_model(kv_heads=1, seed=0):
    cfg = transformers.GemmaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,  # 4 x 16 = 64 query dims on a 48 width
        rope_parameters=dict(rope_type="default", rope_theta=100.0),
    )
    torch.manual_seed(seed)
    model = transformers.GemmaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # non-trivial norm offsets too (HF initialises them to 0)
        for name, p in model.named_parameters():
            if name != "lm_head.weight":
                p.add_(0.1 * torch.randn_like(p))
    return cfg, model


def _tokens(seed=1, t=T):
    return np.random.default_rng(seed).integers(0, VOCAB, (2, t)).astype(np.int32)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


_FULL = jax.jit(lambda m, v, tok: m.apply(v, tok)[0], static_argnums=0)


@pytest.mark.parametrize("kv_heads", [1, 2], ids=["mqa", "gqa2"])
def test_logits_match_transformers(kv_heads):
    cfg, hf = _hf_model(kv_heads)
    model, variables = from_hf_gemma(hf.state_dict(), cfg)
    assert (model.num_kv_heads, model.head_dim, model.embed_scale) == (kv_heads, 16, True)
    assert "lm_head" not in variables["params"] and model.logit_softcap is None
    tokens = _tokens()
    ref = _hf_logits(hf, tokens)
    ours = np.asarray(_FULL(model, variables, tokens))
    diff = float(np.abs(ours - ref).max())
    print(f"max |ours - HF| = {diff:.3g} (logits up to {np.abs(ref).max():.2f})")
    assert diff <= 1e-4


def test_load_hf_dir_and_tool_check(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "convert_gemma", os.path.join(repo, "tools", "convert_gemma.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg, hf = _hf_model(kv_heads=2, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    model, variables = load_hf_gemma(str(tmp_path / "hf"))
    tokens = _tokens(seed=4)
    ref = _hf_logits(hf, tokens)
    assert np.abs(np.asarray(_FULL(model, variables, tokens)) - ref).max() <= 1e-4
    out = str(tmp_path / "avjax")
    argv = ["--hf_dir", str(tmp_path / "hf"), "--out", out, "--check", "--check_len", "12"]
    diff = tool.main(argv)
    assert diff is not None and diff <= 1e-4
    model2, variables2 = load_converted(out)
    assert model2.config == model.config
    np.testing.assert_allclose(np.asarray(_FULL(model2, variables2, tokens)), ref, atol=1e-4)


def test_speechtransformer_2b_config_is_gemma_2b():
    from avjax.models.speechtransformer import parameter_count, speechtransformer

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "st_config", os.path.join(repo, "configs", "speechtransformer.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("2b")
    assert config.data.num_units == 32_768 and config.task == "speechtransformer"
    # Over Gemma's vocabulary the config is exactly the Gemma-2B preset (so its weights fit).
    model = speechtransformer(config.model, 256_000, max_len=16)
    assert model.config == DecoderConfig.gemma_2b()
    assert parameter_count(config.model, 32_768) == 2_048_993_280
    tokens = np.zeros((1, 4), np.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]
    shapes = nn.meta.unbox(boxed)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n == parameter_count(config.model, 256_000) == 2_506_172_416  # Gemma-2B's 2.51B
    attn = shapes["blocks_0"]["attention"]
    assert attn["q"]["kernel"].shape == (2048, 2048) and attn["k"]["kernel"].shape == (2048, 256)
    assert shapes["blocks_17"]["mlp"]["ffw_up_w"].shape == (2, 2048, 16_384)
