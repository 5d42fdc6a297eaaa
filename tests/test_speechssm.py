"""SpeechSSM end to end at tiny scale: train, exact resume, SIGTERM, sharding, sampling."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from avjax.data.audio import AudioError
from avjax.main import run
from avjax.tasks import get_task
from avjax.train import checkpoint as ckpt_lib
from avjax.train import loop
from avjax.train.metrics import read_jsonl
from avjax.train.sharding import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "data.minutes": 1.0,
    "data.num_units": 32,
    "data.seq_len": 64,
    "data.kmeans_iters": 5,
    "data.vocoder_steps": 10,
    "model.width": 32,
    "model.mlp_width": 64,
    "model.lru_width": 32,
    "model.num_heads": 2,
    "model.num_layers": 3,
    "model.window": 16,
    "train.batch_size": 8,
    "train.steps": 6,
    "train.warmup_steps": 2,
    "train.log_every": 1,
    "train.eval_every": 3,
    "train.eval_batches": 1,
    "train.checkpoint_every": 3,
    "sample.seconds": 4.0,
    "sample.prompt_seconds": 1.0,
    "sample.chunk_tokens": 20,
}


def _config(cache_dir, **overrides):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs/speechssm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.data.cache_dir = str(cache_dir)
    for key, value in {**TINY, **overrides}.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return c


def _cli_args(cache_dir, **overrides):
    return [
        f"--config.{k}={v}" for k, v in {**TINY, "data.cache_dir": cache_dir, **overrides}.items()
    ]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus_cache")


def _one_device():
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def test_resume_equals_straight_run(cache_dir, tmp_path):
    """2N straight steps == N steps + stop (as on SIGTERM) + resume + N steps."""
    cfg = _config(cache_dir)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    straight = loop.train(get_task(cfg, a), cfg, a, _one_device())
    loop.train(get_task(cfg, b), cfg, b, _one_device(), stop_after=3)
    assert ckpt_lib.make_manager(b, 3).latest_step() == 3
    resumed = loop.train(get_task(cfg, b), cfg, b, _one_device())
    for x, y in zip(_leaves(straight), _leaves(resumed), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    la = [
        (r["step"], r["loss"]) for r in read_jsonl(os.path.join(a, "metrics.jsonl")) if "loss" in r
    ]
    lb = [
        (r["step"], r["loss"]) for r in read_jsonl(os.path.join(b, "metrics.jsonl")) if "loss" in r
    ]
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in la], [v for _, v in lb], rtol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices")
def test_sharded_step_matches_single_device(cache_dir, tmp_path):
    cfg = _config(cache_dir, **{"train.steps": 2, "train.eval_every": 0})
    single = loop.train(get_task(cfg, str(tmp_path / "a")), cfg, str(tmp_path / "a"), _one_device())
    cfg8 = _config(cache_dir, **{"train.steps": 2, "train.eval_every": 0})
    cfg8.mesh.update({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = loop.train(
        get_task(cfg8, str(tmp_path / "b")), cfg8, str(tmp_path / "b"), make_mesh(cfg8.mesh)
    )
    mlp = sharded.params["blocks_0"]["mlp"]["ffw_up_w"]
    assert mlp.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len(mlp.addressable_shards) == 8 and mlp.addressable_shards[0].data.shape == (2, 16, 32)
    for x, y in zip(_leaves(single), _leaves(sharded), strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)
    la = [r["loss"] for r in read_jsonl(str(tmp_path / "a" / "metrics.jsonl")) if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(str(tmp_path / "b" / "metrics.jsonl")) if "loss" in r]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def test_sample_writes_audio_png_and_units(cache_dir, tmp_path):
    cfg = _config(cache_dir, **{"mesh.data": 8, "train.steps": 3})
    w = str(tmp_path / "w")
    run(cfg, w, "train")
    summary = run(cfg, w, "sample")
    out = summary["out_dir"]  # samples/step_3/<seconds>s_t<T>_k<K>_seed<S>-<key8>
    assert os.path.dirname(out) == os.path.join(w, "samples", "step_3")
    units = np.load(os.path.join(out, "sample_0.npy"))
    assert units.shape == (25 + 100,)  # 1 s prompt + 4 s at 25 Hz
    assert summary["tokens"] == 100
    import soundfile as sf

    info = sf.info(os.path.join(out, "sample_0.wav"))
    assert info.samplerate == 16000 and abs(info.duration - 5.0) < 0.05
    assert os.path.getsize(os.path.join(out, "sample_0.png")) > 1000
    evals = run(cfg, w, "eval")
    assert np.isfinite(evals["eval_loss"]) and evals["unigram_entropy_nats"] > 0


def test_workdir_of_another_model_is_refused(cache_dir, tmp_path):
    cfg = _config(cache_dir, **{"train.steps": 1, "train.eval_every": 0})
    w = str(tmp_path / "w")
    loop.train(get_task(cfg, w), cfg, w, _one_device())
    before = sorted(os.listdir(os.path.join(w, "checkpoints")))
    other = _config(cache_dir, **{"train.steps": 2, "model.width": 64, "model.lru_width": 64})
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="model.width"):
        loop.train(get_task(other, w), other, w, _one_device())
    assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == before


def test_non_logmel_units_on_the_default_corpus_fail_before_building(tmp_path):
    cfg = _config(tmp_path / "cache", **{"data.features": "mfcc"})
    with pytest.raises(ValueError, match="config.data.features='mfcc'"):
        get_task(cfg, str(tmp_path / "w")).prepare()
    assert not os.path.exists(tmp_path / "cache")
    # Log-mel workdirs keep the compatibility stamp they had; other features are part of it.
    assert "features" not in get_task(_config(tmp_path), "w").compatibility()["units"]
    assert get_task(cfg, "w").compatibility()["units"]["features"] == "mfcc"
    # Workdirs from before `model.out_init_scale` existed keep theirs: it only shapes the init.
    assert "out_init_scale" not in get_task(cfg, "w").compatibility()["model"]


@pytest.mark.parametrize("bad", ["corrupt", "empty"])
def test_bad_audio_file_in_data_dir_is_named(tmp_path, bad):
    import soundfile as sf

    d = tmp_path / "audio" / "spk1"
    d.mkdir(parents=True)
    sf.write(str(d / "good.wav"), np.random.default_rng(0).normal(0, 0.1, 16000), 16000)
    path = d / "bad.wav"
    if bad == "corrupt":
        path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    else:
        sf.write(str(path), np.zeros(0), 16000)
    cfg = _config(
        tmp_path / "cache", **{"data.name": "dir", "data.manual_dir": str(tmp_path / "audio")}
    )
    w = str(tmp_path / "w")
    with pytest.raises(AudioError, match="bad.wav"):
        loop.train(get_task(cfg, w), cfg, w, _one_device())
    assert not os.path.exists(os.path.join(w, "units"))


def test_sigterm_checkpoints_and_the_same_command_resumes(cache_dir, tmp_path):
    w = str(tmp_path / "w")
    args = [
        sys.executable,
        "-m",
        "avjax.main",
        "--config=configs/speechssm.py",
        f"--workdir={w}",
        *_cli_args(
            cache_dir, **{"train.steps": 400, "train.eval_every": 0, "train.checkpoint_every": 1000}
        ),
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    metrics = os.path.join(w, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and any("loss" in r for r in read_jsonl(metrics)):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()[-3000:]  # preempted: requeue me
    stopped = ckpt_lib.make_manager(w, 3).latest_step()
    assert stopped is not None and 0 < stopped < 400
    logged = [r["step"] for r in read_jsonl(metrics) if "loss" in r]
    assert logged[-1] == stopped
    # The same command again (with a nearer end) resumes at the next step.
    args2 = [
        a if not a.startswith("--config.train.steps=") else f"--config.train.steps={stopped + 2}"
        for a in args
    ]
    r = subprocess.run(args2, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    logged = [r["step"] for r in read_jsonl(metrics) if "loss" in r]
    assert logged == list(range(1, stopped + 3))
    assert json.load(open(os.path.join(w, "data_facts.json")))["num_units"] == 32


def test_units_are_frozen_under_a_checkpoint_and_read_only_prepare_never_writes(
    cache_dir, tmp_path
):
    from avjax.data import artifacts

    w = str(tmp_path / "w")
    cfg = _config(cache_dir, **{"train.steps": 1, "train.eval_every": 0})
    # Read-only (sample/eval) on a workdir without units: names the path, writes nothing.
    with pytest.raises(artifacts.ArtifactMissingError, match=f"{w}/units"):
        get_task(cfg, w).prepare(read_only=True)
    assert not os.path.exists(os.path.join(w, "units"))
    loop.train(get_task(cfg, w), cfg, w, _one_device())
    manifest = os.path.join(w, "units", "manifest.json")
    before = open(manifest).read()
    # Data that would refit the units (more stories held out) under the checkpoint: refused,
    # naming the field, in training and in read-only runs alike; nothing rewritten.
    other = _config(cache_dir, **{"train.steps": 2, "data.heldout_fraction": 0.6})
    for read_only in (False, True):
        with pytest.raises(artifacts.ArtifactMismatchError, match="heldout_fraction: 0.1 -> 0.6"):
            get_task(other, w).prepare(read_only=read_only)
    refit = _config(cache_dir, **{"data.refit_units": True})
    with pytest.raises(artifacts.ArtifactMismatchError, match="new --workdir"):
        get_task(refit, w).prepare()
    assert open(manifest).read() == before
    facts = os.path.join(w, "data_facts.json")
    os.utime(facts, (1, 1))
    task = get_task(cfg, w)
    task.read_only = True  # as main.py sets it for --mode=sample|eval
    assert task.prepare()["num_units"] == 32 and os.stat(facts).st_mtime == 1
    # The entry point marks sample runs read-only: sampling rewrites nothing it depends on.
    assert run(cfg, w, "sample")["tokens"] == 100
    assert os.stat(facts).st_mtime == 1 and open(manifest).read() == before
