"""Logical axis names: every name in every model's boxed parameter tree is covered by the
sharding rules of every preset (a name no rule covers is silently replicated), every
parameter carries names, and the check catches an unknown name."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from avjax.models import speechssm as speechssm_lib
from avjax.models import speechtransformer as speechtransformer_lib
from avjax.models.mamba import MambaLM
from avjax.nn import axes, layers
from avjax.nn.hubert import HubertConfig, HubertEncoder
from avjax.nn.memory import AssociativeBridge, KeyValueMemory
from avjax.train import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULE_SETS = {"default": sharding.DEFAULT_RULES} | {
    name: preset["rules"] for name, preset in sharding.PRESETS.items()
}


def _config(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", f"{REPO}/configs/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _tiny(model_cfg: Any, **kw: Any) -> Any:
    model_cfg.width, model_cfg.mlp_width, model_cfg.num_heads = 16, 24, 2
    model_cfg.num_layers = 3
    for k, v in kw.items():
        model_cfg[k] = v
    return model_cfg


def _lm(model: nn.Module) -> Callable[[], Any]:
    tok = jnp.zeros((1, 4), jnp.int32)
    return lambda: model.init(jax.random.key(0), tok, jnp.arange(4)[None])


def _speechssm(scan_layers: bool) -> Callable[[], Any]:
    cfg = _tiny(_config("speechssm").model, lru_width=16, window=4, scan_layers=scan_layers)
    return _lm(speechssm_lib.speechssm(cfg, vocab_size=8))


def _speechtransformer(scan_layers: bool) -> Callable[[], Any]:
    cfg = _tiny(_config("speechtransformer").model, num_kv_heads=1, scan_layers=scan_layers)
    return _lm(speechtransformer_lib.speechtransformer(cfg, vocab_size=8, max_len=8))


def _hubert(layout: dict[str, Any]) -> Callable[[], Any]:
    config = HubertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        conv_dim=(8, 8),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
        **layout,
    )
    wav = jnp.zeros((1, 400))
    return lambda: HubertEncoder(config).init(jax.random.key(0), wav)


def _bridge() -> Any:
    src, tgt = jnp.zeros((1, 3, 6)), jnp.zeros((1, 3, 5))
    model = AssociativeBridge(num_slots=4, key_dim=6, value_dim=5)
    return model.init(jax.random.key(0), src, tgt)


def _memory() -> Any:
    model = KeyValueMemory(num_slots=4, key_dim=6, value_dim=4, num_heads=2)
    return model.init(jax.random.key(0), jnp.zeros((1, 3, 6)))


MODELS: dict[str, Callable[[], Callable[[], Any]]] = {
    "speechssm": lambda: _speechssm(False),
    "speechssm_scan_layers": lambda: _speechssm(True),
    "speechtransformer": lambda: _speechtransformer(False),
    "speechtransformer_scan_layers": lambda: _speechtransformer(True),
    "mamba": lambda: _lm(MambaLM(vocab_size=8, d_model=16, num_layers=2, d_state=4)),
    "mamba_untied_bias": lambda: _lm(
        MambaLM(vocab_size=8, d_model=16, num_layers=1, tie_embeddings=False, use_bias=True)
    ),
    "hubert_group_postln": lambda: _hubert(dict(feat_extract_norm="group", conv_bias=False)),
    "hubert_layer_preln": lambda: _hubert(
        dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    ),
    "memory_bridge": lambda: _bridge,
    "memory_multihead": lambda: _memory,
}


def _leaves(boxed: Any) -> list[tuple[str, Any]]:
    flat = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def check_axes_covered(boxed: Any, rules: sharding.LogicalRules, where: str) -> None:
    """Raises AssertionError naming each parameter whose logical names `rules` does not cover
    (or that carries no names at all)."""
    covered = {name for name, _ in rules}
    problems = []
    for path, leaf in _leaves(boxed):
        if not isinstance(leaf, nn.Partitioned):
            problems.append(f"{path}: no logical axis names")
            continue
        missing = [n for n in leaf.names if n is not None and n not in covered]
        if missing:
            problems.append(f"{path}: {missing} in no rule")
        if len(leaf.names) != leaf.value.ndim:
            problems.append(f"{path}: names {leaf.names} for shape {leaf.value.shape}")
    assert not problems, f"{where}:\n  " + "\n  ".join(problems)


@functools.cache
def _boxed(name: str) -> Any:
    return jax.eval_shape(MODELS[name]())["params"]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_parameter_axis_is_covered_by_every_preset(model):
    boxed = _boxed(model)
    assert _leaves(boxed), model
    for rules_name, rules in RULE_SETS.items():
        check_axes_covered(boxed, rules, f"{model} under rules {rules_name!r}")


def test_every_axis_constant_is_covered_by_every_preset():
    for rules_name, rules in RULE_SETS.items():
        names = [name for name, _ in rules]
        assert sorted(names) == sorted(set(names)), rules_name  # no name twice
        assert set(axes.ALL) <= set(names), (rules_name, set(axes.ALL) - set(names))


def test_an_unknown_or_missing_name_fails_the_check():
    class Typo(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = layers.dense(4, (axes.EMBED, "mpl"), name="typo")(x)
            return x + self.param("bare", nn.initializers.zeros_init(), (4,))[None]

    boxed = jax.eval_shape(Typo().init, jax.random.key(0), jnp.zeros((1, 3)))["params"]
    with pytest.raises(AssertionError, match=r"typo'\]\['kernel'\]: \['mpl'\] in no rule"):
        check_axes_covered(boxed, sharding.DEFAULT_RULES, "Typo")
    with pytest.raises(AssertionError, match=r"bare'\]: no logical axis names"):
        check_axes_covered(boxed, sharding.DEFAULT_RULES, "Typo")
    # Flax itself replicates the unknown name without a word: the check is what catches it.
    spec = nn.logical_to_mesh_axes((axes.EMBED, "mpl"), list(sharding.DEFAULT_RULES))
    assert tuple(spec) == ("fsdp", None)
