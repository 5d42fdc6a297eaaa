"""A `gs://` workdir end to end against a local GCS emulator (127.0.0.1), as on a TPU VM.

Through `python -m avjax.main` with the working directory an empty folder: train 2 steps
(a checkpoint in the bucket), rerun to 4 steps (it resumes from the bucket's checkpoint, as a
preempted job's rerun does), sample. Everything the run writes — checkpoints, stamp, metrics.jsonl, TensorBoard events,
units, samples — is in the bucket; nothing is written under the current directory.
"""

import os
import subprocess
import sys

import pytest
from gcs_emulator import available, gcs_emulator
from test_main_cli import REPO
from test_speechssm import _cli_args

pytestmark = pytest.mark.skipif(not available(), reason="needs the test extra (GCS emulator)")

CONFIG = f"--config={os.path.join(REPO, 'configs', 'speechssm.py')}"
WORKDIR = "gs://bkt/run"


def _main(cwd, env, *args):
    e = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **env)
    e.pop("XLA_FLAGS", None)
    e["PYTHONPATH"] = REPO
    return subprocess.run(
        [sys.executable, "-m", "avjax.main", CONFIG, f"--workdir={WORKDIR}", *args],
        cwd=cwd,
        env=e,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _objects(env) -> list[str]:
    """Every object in the bucket, as `run/...` names."""
    code = "import gcsfs; print('\\n'.join(gcsfs.GCSFileSystem().find('bkt')))"
    r = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return [n.split("/", 1)[1] for n in r.stdout.split()]


def test_train_resume_sample_in_a_bucket(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cache = tmp_path / "cache"  # the corpus cache may be node-local
    common = _cli_args(cache, **{"train.eval_every": 0, "train.checkpoint_every": 100})
    with gcs_emulator("bkt") as env:
        r = _main(cwd, env, *common, "--config.train.steps=2")
        assert r.returncode == 0, r.stderr[-4000:]
        names = _objects(env)
        assert any(n.startswith("run/checkpoints/2/") for n in names), names

        r = _main(cwd, env, *common, "--config.train.steps=4")
        assert r.returncode == 0, r.stderr[-4000:]
        assert "Resuming from checkpoint step 2" in r.stderr

        r = _main(
            cwd,
            env,
            *common,
            "--config.train.steps=4",
            "--mode=sample",
            "--config.sample.seconds=2",
            "--config.sample.prompt_seconds=1",
        )
        assert r.returncode == 0, r.stderr[-4000:]
        names = _objects(env)

    assert any(n.startswith("run/checkpoints/4/") for n in names), names
    for expected in ("run/metrics.jsonl", "run/checkpoints/compatibility.json"):
        assert expected in names, names
    assert any("events.out.tfevents" in n for n in names), names
    assert any(n.startswith("run/units/") for n in names), names
    assert any(n.startswith("run/samples/") and n.endswith("sample_0.wav") for n in names)
    assert list(cwd.iterdir()) == []
