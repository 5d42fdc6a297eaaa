"""MAB (`avjax.models.mab`, `avjax.tasks.mab`, `configs/mab.py`): the loss learns, the
ablation has no memory, one tiny CLI run train -> preempted -> resumed -> eval (report,
heat maps), and the LRW layout from a fixture trains a step."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from avjax import main as avjax_main
from avjax.data.video import av_corpus
from avjax.data.video.io import write_video
from avjax.models import mab as mab_lib
from avjax.tasks import mab as mab_tasks
from avjax.tasks.base import LossContext
from avjax.tasks.mab import MABTask

REPO = os.path.join(os.path.dirname(__file__), "..")


def _config(cache: str, variant: str = ""):
    spec = importlib.util.spec_from_file_location("_cfg_mab", f"{REPO}/configs/mab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(variant)
    c.data.update(cache_dir=cache, build_workers=1, read_threads=1, prefetch_batches=1)
    c.data.synthetic = dataclasses.asdict(av_corpus.TINY)
    c.data.update(num_frames=8, image_size=20, crop_size=16)
    c.model.update(stem_features=4, widths=(4, 8), blocks=(1, 1), audio_channels=(4, 4))
    c.model.update(gru_hidden=8, gru_layers=1, num_slots=8)
    c.train.update(steps=4, batch_size=8, warmup_steps=1, log_every=2, eval_every=4)
    c.train.update(checkpoint_every=4, eval_batches=1, async_checkpoints=False)
    c.eval.update(heatmap_words=2, speech_clips=1, griffin_lim_iters=2)
    return c


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mab_cache"))


@pytest.fixture(scope="module")
def cli_run(cache, tmp_path_factory):
    """train 2 steps (stopped as a preempted job), resume to 4, then --mode=eval."""
    workdir = str(tmp_path_factory.mktemp("mab") / "w")
    first = avjax_main.run(_config(cache), workdir, "train", stop_after=2)
    resumed = avjax_main.run(_config(cache), workdir, "train")
    evaluated = avjax_main.run(_config(cache), workdir, "eval")
    return workdir, first, resumed, evaluated


def test_cli_train_resume_eval(cli_run):
    workdir, first, resumed, out = cli_run
    assert (first["step"], resumed["step"], out["step"]) == (2, 4, 4)
    assert 0.0 <= out["mab/word_accuracy"] <= 1.0
    assert out["mab/chance"] == pytest.approx(1 / av_corpus.TINY.vocab_size)
    assert np.isfinite(out["eval_loss"])
    report = os.path.join(workdir, "eval", "step_4")
    assert json.load(open(os.path.join(report, "report.json")))["use_memory"] is True
    pngs = sorted(f for f in os.listdir(report) if f.endswith(".png"))
    assert "addressing_words.png" in pngs and len(pngs) == 3  # + 2 per-word maps
    # The memory diagnostics: both addressings' statistics, the audio branch and the
    # test branch fed another word's recall.
    for side in ("source", "target"):
        assert 0.0 <= out[f"mab/memory_{side}_entropy"] <= np.log(8) + 1e-5  # 8 slots
        assert 1.0 <= out[f"mab/memory_{side}_slot_perplexity"] <= 8.0 + 1e-4
    assert out["mab/memory_kl"] >= 0.0
    for k in ("audio_branch_accuracy", "swapped_recall_accuracy", "memory_top1_agreement"):
        assert 0.0 <= out[f"mab/{k}"] <= 1.0


def test_addressing_stats_and_other_word():
    labels, lengths = np.array([0, 0, 1, 1]), np.array([3, 3, 2, 3])
    one_slot_per_word = np.zeros((4, 3, 4))
    one_slot_per_word[:2, :, 0] = one_slot_per_word[2:, :, 1] = 1.0
    one_slot_per_word[2, 2] = 0.25  # past the clip's length: ignored
    stats = mab_tasks.addressing_stats(one_slot_per_word, labels, lengths)
    assert stats["entropy"] == pytest.approx(0.0, abs=1e-6)
    assert stats["slot_perplexity"] == pytest.approx(2.0)
    assert stats["word_information"] == pytest.approx(np.log(2))  # the word is in the slot
    uniform = mab_tasks.addressing_stats(np.full((4, 3, 4), 0.25), labels, lengths)
    assert uniform["entropy"] == pytest.approx(np.log(4)) and uniform["slot_perplexity"] == 4
    assert uniform["word_information"] == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_array_equal(mab_tasks._other_word(np.array([3, 3, 5, 3])), [2, 2, 3, 2])


def _clip(path: str, value: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    video = np.full((8, 32, 32, 3), value, np.uint8)
    open_frames = (np.arange(8) // (1 + value // 100)) % 2 == 0  # a per-word mouth rhythm
    video[open_frames, 20:, 8:24] = 255 - value
    t = np.arange(8 * 640) / 16000
    write_video(path, video, (0.3 * np.sin(2 * np.pi * (200 + value) * t)).astype(np.float32))


@pytest.fixture(scope="module")
def lrw_root(tmp_path_factory):
    """Two words in LRW's published layout (<WORD>/{train,val}/<WORD>_<n>.mp4 + .txt)."""
    root = str(tmp_path_factory.mktemp("lrw"))
    for word, value in (("ABOUT", 40), ("WATER", 200)):
        for split, ns in (("train", (1, 2)), ("val", (3,))):
            for n in ns:
                base = os.path.join(root, word, split, f"{word}_{n:05d}")
                _clip(base + ".mp4", value)
                with open(base + ".txt", "w") as f:
                    f.write(f"Text: {word}\nConf: 8\n\nDuration: 0.300000 seconds\n")
    return root


def _task_and_batch(cache: str, tmp: str, variant: str = "", lrw: str = ""):
    config = _config(cache, variant)
    if lrw:
        config.data.update(name="lrw", manual_dir=lrw)
    task = MABTask(config, tmp)
    batch = next(iter(task.train_dataset(0, 1)))
    return task, task.build_model(), batch


def test_lrw_layout_trains_loss_decreases_every_term_is_trained(cache, lrw_root, tmp_path):
    task, model, batch = _task_and_batch(cache, str(tmp_path), lrw=lrw_root)
    assert task.data.facts["layout"] == "lrw" and task.data.vocabulary == ["ABOUT", "WATER"]
    variables = nn.unbox(
        jax.jit(lambda b: task.init_variables(model, jax.random.key(0, impl="rbg"), b))(batch)
    )
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, state, opt_state, i):
        def f(p):
            rngs = {"dropout": jax.random.fold_in(jax.random.key(1, impl="rbg"), i)}
            ctx = LossContext(True, jax.random.key(2), rngs, state)
            loss, metrics, new_state = task.apply_loss(model, p, batch, ctx)
            return loss, (metrics, new_state)

        (loss, (metrics, new_state)), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), new_state, opt_state, metrics, grads

    first = None
    for i in range(12):
        params, state, opt_state, metrics, grads = step(params, state, opt_state, i)
        first = first or metrics
    for k in ("ce_test", "ce_train", "alignment", "reconstruction"):
        assert np.isfinite(first[k]), k
    assert float(metrics["loss"]) < 0.8 * float(first["loss"])
    # The value memory is written by the reconstruction loss; keys by the task loss + KL.
    g = grads["bridge"]
    assert float(jnp.abs(g["target_values"]).max()) > 0
    assert float(jnp.abs(g["source_keys"]).max()) > 0
    assert float(jnp.abs(grads["audio_front"]["proj"]["kernel"]).max()) > 0


def test_ablation_has_no_memory_and_eval_needs_no_audio(cache, tmp_path):
    task, model, batch = _task_and_batch(cache, str(tmp_path), "nomemory")
    shapes = jax.eval_shape(lambda: task.init_variables(model, jax.random.key(0), batch))
    assert set(shapes["params"]) == {"visual_front", "temporal", "classifier"}
    full_task = MABTask(_config(cache), str(tmp_path))
    full = full_task.build_model()
    inputs = full_task.model_inputs(batch)
    full_shapes = jax.eval_shape(lambda: full.init(jax.random.key(0), **inputs))
    assert {"bridge", "audio_front", "fusion"} <= set(full_shapes["params"])
    # The test-time branch reads video only: the outputs do not depend on the audio.
    out = jax.eval_shape(
        lambda v: full.apply(v, batch["video"], batch["length"], None), full_shapes
    )
    assert out.train is None and out.bridge.target_logits is None
    assert out.test.logits.shape == (8, av_corpus.TINY.vocab_size)


def test_speech_head_loss(cache, tmp_path):
    task, model, batch = _task_and_batch(cache, str(tmp_path), "speech")
    out = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), **task.model_inputs(batch))[0]
    )
    assert out.test.logits is None and out.test.mel.shape == (8, 4 * 8, 80)
    # Per-clip normalisation: zero temporal mean per pixel, unit variance per clip, blind to
    # a still image added to every frame (identity, lighting), zero past the clip's length.
    video = np.asarray(batch["video"][:2]).copy()
    video[1, 5:] = 0
    lengths = jnp.array([8, 5])
    x = np.asarray(mab_lib.normalize_video(jnp.asarray(video), lengths, per_clip=True))
    assert np.abs(x[0].mean(0)).max() < 1e-4 and x[0].std() == pytest.approx(1.0, 2e-2)  # eps
    assert np.abs(x[1, :5].mean(0)).max() < 1e-4 and not x[1, 5:].any()
    still = np.clip(video.astype(np.int32) // 2 + np.arange(16)[None, None, :, None, None], 0, 255)
    half = np.asarray(mab_lib.normalize_video(jnp.asarray(video // 2), lengths, per_clip=True))
    shifted = mab_lib.normalize_video(jnp.asarray(still.astype(np.uint8)), lengths, per_clip=True)
    np.testing.assert_allclose(np.asarray(shifted), half, atol=2e-2)
