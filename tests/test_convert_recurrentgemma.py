"""Parity with Google's RecurrentGemma (JAX) after importing its weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

rg = pytest.importorskip("recurrentgemma.jax")

from avjax.convert.recurrentgemma import from_recurrentgemma  # noqa: E402

R, A = rg.TemporalBlockType.RECURRENT, rg.TemporalBlockType.ATTENTION


@pytest.fixture(autouse=True)
def _reference_broadcasts_implicitly():
    """RecurrentGemma's own code relies on implicit rank promotion, an error under conftest
    (ours is checked with it on by tests/test_nn_griffin.py)."""
    with jax.numpy_rank_promotion("allow"):
        yield


def _rg_model(blocks=(R, R, A), window=4):
    cfg = rg.GriffinConfig(
        vocab_size=61,
        width=32,
        mlp_expanded_width=48,
        num_heads=2,
        lru_width=32,
        attention_window_size=window,
        block_types=blocks,
        embeddings_scale_by_sqrt_dim=True,
        logits_soft_cap=30.0,
    )
    model = rg.Griffin(cfg)
    tok = jnp.zeros((2, 8), jnp.int32)
    params = model.init(jax.random.key(0), tok, jnp.broadcast_to(jnp.arange(8), (2, 8)))
    # Random, non-trivial values everywhere (init leaves norms and biases at zero).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return cfg, model, jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize("blocks", [(R, R, A), (A, R, R, A)])
def test_full_sequence_logits_match(blocks):
    cfg, rg_model, rg_params = _rg_model(blocks)
    model, variables = from_recurrentgemma(rg_params, cfg)
    tok = jax.random.randint(jax.random.key(2), (2, 19), 0, 61)
    # Second row has a document boundary (segment reset) in the middle.
    pos = jnp.stack([jnp.arange(19), jnp.concatenate([jnp.arange(7), jnp.arange(12)])])
    ref, _ = rg_model.apply(rg_params, tok, pos, return_cache=False)
    ours, _ = model.apply(variables, tok, pos)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_cached_decoding_matches():
    cfg, rg_model, rg_params = _rg_model()
    model, variables = from_recurrentgemma(rg_params, cfg)
    t, prompt = 16, 5
    tok = jax.random.randint(jax.random.key(3), (2, t), 0, 61)
    pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    _, rg_cache = rg_model.apply(rg_params, tok[:, :prompt], pos[:, :prompt])
    _, cache = model.apply(variables, tok[:, :prompt], pos[:, :prompt], return_cache=True)
    for i in range(prompt, t):
        ref, rg_cache = rg_model.apply(rg_params, tok[:, i : i + 1], pos[:, i : i + 1], rg_cache)
        ours, cache = model.apply(variables, tok[:, i : i + 1], pos[:, i : i + 1], cache=cache)
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_cli_converts_an_orbax_checkpoint_and_training_starts_from_it(tmp_path):
    """tools/convert_recurrentgemma.py on a checkpoint saved as RecurrentGemma's are
    (orbax PyTree), then `train.init_from` loads it (embedding kept fresh for a new vocab)."""
    import importlib.util
    import os

    import orbax.checkpoint as ocp
    from toy_task import GriffinToyTask, single_device_mesh, toy_config

    from avjax.convert.recurrentgemma import load_converted
    from avjax.train import loop

    _, _, params = _rg_model(blocks=(R, R, A) * 2, window=4)
    ocp.PyTreeCheckpointer().save(str(tmp_path / "rg"), params)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "convert_rg", os.path.join(repo, "tools", "convert_recurrentgemma.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    diff = tool.main(
        [
            "--rg_ckpt",
            str(tmp_path / "rg"),
            "--out",
            str(tmp_path / "ours"),
            "--check",
            "--window",
            "4",
        ]
    )
    assert diff <= 1e-4
    model, variables = load_converted(str(tmp_path / "ours"))
    assert model.types == ("recurrent", "recurrent", "attention") * 2

    tcfg = toy_config(steps=1, eval_every=0)
    tcfg.train.update({"init_from": str(tmp_path / "ours"), "init_skip": "^embedding$"})
    task = GriffinToyTask(tcfg, str(tmp_path / "w"))
    state = loop.train(task, tcfg, str(tmp_path / "w"), single_device_mesh(), stop_after=0)
    got = np.asarray(state.params["blocks_4"]["temporal"]["rg_lru"]["a_param"])
    want = np.asarray(variables["params"]["blocks_4"]["temporal"]["rg_lru"]["a_param"])
    np.testing.assert_array_equal(got, want)  # loaded; step 1 ran at lr 0 (warmup from 0)

    bad = toy_config(steps=1, eval_every=0)
    bad.train.update({"init_from": str(tmp_path / "ours"), "init_skip": ""})
    with pytest.raises(ValueError, match=r"embedding: shape \(61, 32\)"):
        loop.train(
            GriffinToyTask(bad, str(tmp_path / "x")), bad, str(tmp_path / "x"), single_device_mesh()
        )


def test_typed_presets_are_recurrentgemma_presets():
    """`GriffinConfig` presets equal RecurrentGemma's own presets once converted, SpeechSSM-2B
    is RecurrentGemma-2B over 32,768 units, and a module reports its architecture back."""
    import importlib.util
    import os

    from avjax.convert.recurrentgemma import architecture_from_config
    from avjax.models.speechssm import architecture
    from avjax.nn.griffin import GriffinConfig

    for ours, preset in (
        (GriffinConfig.recurrent_gemma_2b(), rg.Preset.RECURRENT_GEMMA_2B_V1),
        (GriffinConfig.recurrent_gemma_9b(), rg.Preset.RECURRENT_GEMMA_9B_V1),
    ):
        assert ours == architecture_from_config(rg.GriffinConfig.from_preset(preset))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("ssm_cfg", f"{repo}/configs/speechssm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("2b")
    assert architecture(cfg.model, cfg.data.num_units) == GriffinConfig.speechssm_2b()
    tiny = GriffinConfig(61, 32, 48, 2, 3, window=4)
    assert tiny.make(scan_layers=True).config == tiny
