"""SpeechTransformer end to end at tiny scale: train through avjax.main, then sample."""

import importlib.util
import os

import numpy as np
import pytest
from test_speechssm import TINY as SSM_TINY

from avjax.main import run
from avjax.models import speechssm as speechssm_lib
from avjax.models import speechtransformer as speechtransformer_lib
from avjax.tasks import get_task
from avjax.tasks.speechtransformer import SpeechTransformerTask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# test_speechssm's tiny settings with a 2-layer Transformer in place of the Griffin model.
TINY = {
    **{k: v for k, v in SSM_TINY.items() if k not in ("model.lru_width", "model.window")},
    "model.num_layers": 2,
    "model.decode_block": 16,
    "train.steps": 3,
    "train.warmup_steps": 1,
    "train.eval_every": 0,
}


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, f"configs/{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _config(cache_dir, **overrides):
    c = _load("speechtransformer")
    c.data.cache_dir = str(cache_dir)
    c.update_from_flattened_dict({**TINY, **overrides})
    return c


def test_config_matches_speechssm_in_size_and_everything_else():
    ssm, tf = _load("speechssm"), _load("speechtransformer")
    assert tf.task == "speechtransformer"
    for section in ("data", "train", "sample", "mesh"):
        assert tf[section].to_dict() == ssm[section].to_dict(), section
    vocab = ssm.data.num_units
    n_tf = speechtransformer_lib.parameter_count(tf.model, vocab)
    # SpeechSSM's parameters, counted from its module.
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    model = speechssm_lib.speechssm(ssm.model, vocab)
    x = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, x))
    n_ssm = sum(v.size for v in jax.tree.leaves(nn.meta.unbox(shapes)))
    assert abs(n_tf / n_ssm - 1) < 0.01, (n_tf, n_ssm)
    # Training FLOPs: the causal-half attention term is what the analytic count adds.
    f512 = speechtransformer_lib.flops_per_token(tf.model, vocab, 512)
    f0 = speechtransformer_lib.flops_per_token(tf.model, vocab, 0)
    assert f512 - f0 == pytest.approx(3 * 6 * 2 * 2 * 256 * 128)
    # Without attention: 6 FLOPs per matmul weight (tied embedding as the logits matmul);
    # norms and biases (per layer 2 norms, 2 output biases, 2 up biases; the final norm) aside.
    assert f0 == pytest.approx(6 * (n_tf - 6 * (4 * 128 + 2 * 416) - 128))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus_cache")


def test_train_then_sample_through_main(cache_dir, tmp_path):
    cfg = _config(cache_dir, **{"mesh.data": 8})
    w = str(tmp_path / "w")
    assert run(cfg, w, "train") == {"step": 3}
    task = get_task(cfg, w)
    assert isinstance(task, SpeechTransformerTask)
    # The KV cache holds the prompt and the continuation, in whole decode blocks.
    assert task.cache_len() == 128 and task.build_model().max_len == 128
    assert task.flops_per_token() > 0
    # Sampling longer than training configured still restores: cache size is decode-only.
    cfg_long = _config(cache_dir, **{"mesh.data": 8, "sample.seconds": 6.0})
    summary = run(cfg_long, w, "sample")
    assert summary["tokens"] == 150
    out = summary["out_dir"]  # samples/step_3/<seconds>s_t<T>_k<K>_seed<S>-<key8>
    assert os.path.dirname(out) == os.path.join(w, "samples", "step_3")
    units = np.load(os.path.join(out, "sample_0.npy"))
    assert units.shape == (25 + 150,) and units.min() >= 0 and units.max() < 32
    assert len(np.unique(units[25:])) > 3
    import soundfile as sf

    info = sf.info(os.path.join(out, "sample_0.wav"))
    assert info.samplerate == 16000 and abs(info.duration - 7.0) < 0.05
    evals = run(cfg, w, "eval")
    assert np.isfinite(evals["eval_loss"])
