"""Resumable sampling: stop + resume == uninterrupted (same seed), refusals, mesh sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avjax.nn.griffin import GriffinLM
from avjax.nn.transformer import TransformerLM
from avjax.sample import autoregressive
from avjax.sample.resumable import ResumeMismatchError, generate_resumable, sample_resumable
from avjax.train.sharding import make_mesh

MODELS = {
    "griffin": GriffinLM(
        vocab_size=32, width=32, mlp_width=64, num_heads=2, num_layers=3, window=8
    ),
    "transformer": TransformerLM(
        vocab_size=32,
        width=32,
        mlp_width=64,
        num_heads=2,
        num_layers=2,
        max_len=64,
        decode_block=16,
    ),
}


def _setup(name, batch=2, prompt_len=5):
    model = MODELS[name]
    prompt = np.random.default_rng(0).integers(0, 32, (batch, prompt_len)).astype(np.int32)
    pos = jnp.broadcast_to(jnp.arange(prompt_len), prompt.shape)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.asarray(prompt), pos)["params"])
    return model, params, prompt


KW = dict(seed=3, temperature=1.0, top_k=20, chunk_tokens=10, save_every_chunks=2, progress=False)


@pytest.mark.parametrize("name", ["griffin", "transformer"])
def test_stop_and_resume_equals_uninterrupted(name, tmp_path):
    model, params, prompt = _setup(name)
    straight = np.concatenate(
        list(autoregressive.generate(model, params, prompt, 45, seed=3, top_k=20, chunk_tokens=10)),
        axis=1,
    )
    d = str(tmp_path / "job")
    # Killed after 3 chunks: the last save was after chunk 2 (tokens 0..19).
    first = sample_resumable(model, params, prompt, 45, d, stop_after_chunks=3, **KW)
    assert first.shape == (2, 30)
    np.testing.assert_array_equal(first, straight[:, :30])
    chunks = list(generate_resumable(model, params, prompt, 45, d, **KW))
    assert chunks[0].shape == (2, 20)  # the restored tokens come first
    resumed = np.concatenate(chunks, axis=1)
    np.testing.assert_array_equal(resumed, straight)
    assert len(np.unique(straight)) > 5  # really sampled, not a constant
    # A finished job restarted returns its tokens without decoding again.
    again = list(generate_resumable(model, params, prompt, 45, d, **KW))
    assert len(again) == 1
    np.testing.assert_array_equal(again[0], straight)


def test_other_arguments_in_the_same_directory_are_refused(tmp_path):
    model, params, prompt = _setup("griffin")
    d = str(tmp_path / "job")
    sample_resumable(model, params, prompt, 20, d, stop_after_chunks=2, **KW)
    with pytest.raises(ResumeMismatchError, match="seed"):
        sample_resumable(model, params, prompt, 20, d, **{**KW, "seed": 4})
    with pytest.raises(ResumeMismatchError, match="prompt_sha256"):
        sample_resumable(model, params, prompt + 1, 20, d, **KW)
    other, other_params, _ = _setup("transformer")
    with pytest.raises(ResumeMismatchError, match="params_sha256"):
        sample_resumable(other, other_params, prompt, 20, d, **KW)
    # The same shapes with other values (another checkpoint) are another job too.
    moved = jax.tree.map(lambda x: x * 1.01, params)
    with pytest.raises(ResumeMismatchError, match="params_sha256"):
        sample_resumable(model, moved, prompt, 20, d, **KW)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices")
def test_sharded_batch_sampling_resumes_exactly(tmp_path):
    model, params, prompt = _setup("griffin", batch=8)
    mesh = make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    rules = [("batch", "data")]
    kw = dict(KW, mesh=mesh, rules=rules)
    straight = sample_resumable(model, params, prompt, 30, str(tmp_path / "a"), **kw)
    d = str(tmp_path / "b")
    sample_resumable(model, params, prompt, 30, d, stop_after_chunks=2, **kw)
    resumed = sample_resumable(model, params, prompt, 30, d, **kw)
    np.testing.assert_array_equal(resumed, straight)
    # The state really is split over the 8 devices along the batch.
    from avjax.sample.autoregressive import prefill

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        p = jax.device_put(prompt, jax.sharding.NamedSharding(mesh, jax.P("data")))
        state = jax.jit(lambda pr, x: prefill(model, pr, x))(params, p)
    assert state.logits.sharding.spec[0] == "data"
    assert len({s.device for s in state.logits.addressable_shards}) == 8
    assert state.logits.addressable_shards[0].data.shape == (1, 32)
    # Sharded sampling draws the same tokens as one device (same seed).
    single = sample_resumable(model, params, prompt, 30, str(tmp_path / "c"), **KW)
    np.testing.assert_array_equal(single, straight)
    # A batch the mesh cannot split (2 over 8) is sampled unsharded, same tokens.
    two = sample_resumable(model, params, prompt[:2], 30, str(tmp_path / "d"), **kw)
    np.testing.assert_array_equal(
        two, sample_resumable(model, params, prompt[:2], 30, str(tmp_path / "e"), **KW)
    )


@pytest.mark.parametrize("name", ["griffin", "transformer"])
def test_score_equals_the_parallel_pass(name):
    """Teacher forcing through the decode step == log-softmax of one full forward pass."""
    model, params, prompt = _setup(name)
    targets = np.random.default_rng(1).integers(0, 32, (2, 23)).astype(np.int32)
    lp = autoregressive.score(model, params, prompt, targets, chunk_tokens=10)
    assert lp.shape == (2, 23)
    full = np.concatenate([prompt, targets], axis=1)
    pos = jnp.broadcast_to(jnp.arange(full.shape[1]), full.shape)
    logits, _ = model.apply({"params": params}, jnp.asarray(full), pos)
    logp = jax.nn.log_softmax(logits[:, prompt.shape[1] - 1 : -1], axis=-1)
    ref = np.take_along_axis(np.asarray(logp), targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(lp, ref, rtol=1e-4, atol=1e-4)
    # Chunks end at multiples of chunk_tokens, wherever the run starts.
    assert list(autoregressive.chunk_sizes(0, 23, 10)) == [10, 10, 3]
    assert list(autoregressive.chunk_sizes(7, 23, 10)) == [3, 10, 3]
