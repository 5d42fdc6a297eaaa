"""A `gs://` workdir end to end against a local GCS emulator (127.0.0.1), as on a TPU VM.

Through `python -m avjax.main` with the working directory an empty folder: train until the
first logged step, SIGTERM (the job checkpoints into the bucket and exits 143, as preempted),
rerun (it resumes from the bucket's checkpoint), sample. Everything the runs write —
checkpoints, stamp, metrics.jsonl, TensorBoard events, units, samples — is in the bucket;
nothing is written under the current directory.
"""

import os
import re
import signal
import subprocess
import sys
import threading

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


def _preempted_training(cwd, env, *args) -> int:
    """Starts training, SIGTERMs it as soon as it logs a step; returns the exit code.

    The step is read from the job's own log (stderr), not from the bucket: metrics reach the
    bucket asynchronously, so waiting for them could let a short run finish first.
    """
    e = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **env)
    e.pop("XLA_FLAGS", None)
    e["PYTHONPATH"] = REPO
    cmd = [sys.executable, "-m", "avjax.main", CONFIG, f"--workdir={WORKDIR}", *args]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    err: list[str] = []
    stepped = threading.Event()

    def read():
        for line in proc.stderr:
            err.append(line)
            if re.search(r"\] step \d+: ", line):
                stepped.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stepped.wait(timeout=600)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    assert stepped.is_set() and proc.returncode == 143, "".join(err)[-4000:]
    return proc.returncode


def test_train_preempt_resume_sample_in_a_bucket(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cache = tmp_path / "cache"  # the corpus cache may be node-local
    common = _cli_args(
        cache, **{"train.eval_every": 0, "train.checkpoint_every": 1000, "train.log_every": 1}
    )
    with gcs_emulator("bkt") as env:
        _preempted_training(cwd, env, *common, "--config.train.steps=100000")
        names = _objects(env)
        stopped = sorted(
            int(n.split("/")[2])
            for n in names
            if n.split("/")[:2] == ["run", "checkpoints"] and n.split("/")[2].isdigit()
        )
        assert stopped, names  # the SIGTERM checkpoint, in the bucket
        step = stopped[-1]

        r = _main(cwd, env, *common, f"--config.train.steps={step + 2}")
        assert r.returncode == 0, r.stderr[-4000:]
        assert f"Resuming from checkpoint step {step}" in r.stderr

        r = _main(
            cwd,
            env,
            *common,
            "--mode=sample",
            "--config.sample.seconds=2",
            "--config.sample.prompt_seconds=1",
        )
        assert r.returncode == 0, r.stderr[-4000:]
        names = _objects(env)

    assert any(n.startswith(f"run/checkpoints/{step + 2}/") for n in names), names
    for expected in ("run/metrics.jsonl", "run/checkpoints/compatibility.json"):
        assert expected in names, names
    assert any("events.out.tfevents" in n for n in names), names
    assert any(n.startswith("run/units/") for n in names), names
    assert any(n.startswith("run/samples/") and n.endswith("sample_0.wav") for n in names)
    assert not [n for n in names if ".tmp-" in n], names  # object writes need no temporaries
    assert list(cwd.iterdir()) == []
