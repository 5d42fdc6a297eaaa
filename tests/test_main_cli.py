"""The entry point's command line: config errors are clear and write nothing."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env=None, timeout=300):
    e = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    e.pop("XLA_FLAGS", None)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "avjax.main", *args],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_unknown_config_key_is_an_error_and_writes_nothing(tmp_path):
    workdir = tmp_path / "w"
    r = _run("--config=configs/speechssm.py", f"--workdir={workdir}", "--config.train.stepz=3")
    assert r.returncode != 0
    assert "stepz" in r.stderr
    assert not workdir.exists()


def test_missing_config_file_is_named(tmp_path):
    r = _run("--config=configs/nope.py", f"--workdir={tmp_path / 'w'}")
    assert r.returncode != 0
    assert "configs/nope.py" in r.stderr


def test_sample_without_a_checkpoint_fails_before_building_anything(tmp_path):
    workdir, cache = tmp_path / "w", tmp_path / "cache"
    r = _run(
        "--config=configs/speechssm.py",
        f"--workdir={workdir}",
        "--mode=sample",
        env={"AVJAX_CACHE": str(cache)},
    )
    assert r.returncode != 0
    assert "FileNotFoundError" in r.stderr and f"--mode=train --workdir={workdir}" in r.stderr
    assert not workdir.exists() and not cache.exists()
