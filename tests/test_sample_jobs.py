"""Sampling jobs keyed by what defines them: parameter values, request fields, job folders."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avjax.io import local_then_copy
from avjax.nn.griffin import GriffinLM
from avjax.sample import resumable


def _params(seed=0):
    model = GriffinLM(vocab_size=32, width=32, mlp_width=64, num_heads=2, num_layers=3, window=8)
    x = jnp.zeros((1, 4), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(4), x.shape)
    return nn.meta.unbox(model.init(jax.random.key(seed), x, pos)["params"])


def test_params_digest_keys_values_not_only_shapes():
    a, b = _params(0), _params(1)
    assert jax.tree.map(jnp.shape, a) == jax.tree.map(jnp.shape, b)
    da = resumable.params_digest(a)
    assert da == resumable.params_digest(jax.tree.map(np.asarray, a))  # host or device
    assert da != resumable.params_digest(b)
    # One value of one leaf changed by one float32 ulp.
    leaves, tree = jax.tree.flatten(a)
    bumped = np.array(leaves[-1])
    bumped.flat[0] = np.nextafter(bumped.flat[0], np.float32(np.inf))
    nudged = jax.tree.unflatten(tree, [*leaves[:-1], bumped])
    assert resumable.params_digest(nudged) != da


def test_job_key_changes_with_every_field_of_the_request():
    prompt = np.arange(10, dtype=np.int32).reshape(2, 5)
    base = dict(params_sha256="p", seed=0, temperature=1.0, top_k=0, top_p=1.0, chunk_tokens=10)
    spec = resumable.job_spec(prompt, 100, **base, extra={"checkpoint_step": 4})
    key = resumable.job_key(spec)
    assert key == resumable.job_key(json.loads(json.dumps(spec)))  # stable through JSON
    others = [
        resumable.job_spec(prompt, 200, **base, extra={"checkpoint_step": 4}),
        resumable.job_spec(prompt + 1, 100, **base, extra={"checkpoint_step": 4}),
        resumable.job_spec(prompt[:1], 100, **base, extra={"checkpoint_step": 4}),
        resumable.job_spec(prompt, 100, **base, extra={"checkpoint_step": 5}),
    ]
    for field, value in [
        ("params_sha256", "q"),
        ("seed", 1),
        ("temperature", 0.8),
        ("top_k", 50),
        ("top_p", 0.9),
        ("chunk_tokens", 20),
    ]:
        others.append(
            resumable.job_spec(prompt, 100, **{**base, field: value}, extra={"checkpoint_step": 4})
        )
    keys = {resumable.job_key(s) for s in others}
    assert key not in keys and len(keys) == len(others)


def test_claim_job_records_then_refuses_another_request_by_field(tmp_path):
    prompt = np.ones((1, 5), np.int32)
    spec = resumable.job_spec(prompt, 100, params_sha256="p", temperature=1.0)
    assert not resumable.claim_job(tmp_path / "job", spec)
    assert json.loads((tmp_path / "job" / "job.json").read_text()) == spec
    assert resumable.claim_job(tmp_path / "job", spec)  # the same request: found again
    other = resumable.job_spec(prompt, 200, params_sha256="p", temperature=0.8)
    with pytest.raises(resumable.ResumeMismatchError) as e:
        resumable.claim_job(tmp_path / "job", other)
    assert "num_tokens: saved 100, requested 200" in str(e.value)
    assert "temperature: saved 1.0, requested 0.8" in str(e.value)
    assert "seed" not in str(e.value)
    # Other processes only read.
    assert not resumable.claim_job(tmp_path / "job2", spec, write=False)
    assert not (tmp_path / "job2").exists()


def test_local_then_copy_publishes_whole_files_with_their_suffix(tmp_path):
    out = tmp_path / "a" / "units.npy"
    with local_then_copy(out) as f:
        assert f.endswith(".npy") and f != str(out)
        np.save(f, np.arange(3))  # np.save appends .npy to other names
        assert not out.exists()
    np.testing.assert_array_equal(np.load(out), np.arange(3))
    with pytest.raises(RuntimeError), local_then_copy(out) as f:
        np.save(f, np.arange(5))
        raise RuntimeError("killed")
    np.testing.assert_array_equal(np.load(out), np.arange(3))  # the old file stays
    assert sorted(p.name for p in out.parent.iterdir()) == ["units.npy"]


_BUCKET_SCRIPT = r"""
import io, json
import numpy as np
from etils import epath
from avjax.io import local_then_copy
from avjax.sample import resumable

job = "gs://bkt/run/samples/step_4/2s_t1.0_k0_seed0-0123abcd"
spec = resumable.job_spec(np.ones((1, 5), np.int32), 50, params_sha256="p")
assert not resumable.claim_job(job, spec)
assert resumable.claim_job(job, spec)
try:
    resumable.claim_job(job, {**spec, "seed": 1})
    raise SystemExit("another request was accepted")
except resumable.ResumeMismatchError as e:
    assert "seed: saved 0, requested 1" in str(e), e
units = np.arange(75, dtype=np.int32)
with local_then_copy(job + "/sample_0.npy") as f:
    np.save(f, units)
saved = np.load(io.BytesIO(epath.Path(job + "/sample_0.npy").read_bytes()))
np.testing.assert_array_equal(saved, units)
print(json.dumps(sorted(str(p) for p in epath.Path(job).iterdir())))
"""


def test_job_files_in_a_bucket(tmp_path):
    """Against a local GCS emulator: job.json claimed and checked, outputs copied to `gs://`,
    nothing written under the current directory. (Sampler state in a bucket, through the
    CLI: tests/test_gcs_workdir.py.)"""
    import os
    import subprocess
    import sys

    from gcs_emulator import available, gcs_emulator
    from test_main_cli import REPO

    if not available():
        pytest.skip("needs the test extra (GCS emulator)")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with gcs_emulator("bkt") as env:
        e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **env)
        r = subprocess.run(
            [sys.executable, "-c", _BUCKET_SCRIPT],
            cwd=cwd,
            env=e,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert r.returncode == 0, r.stderr[-4000:]
    names = json.loads(r.stdout.strip().splitlines()[-1])
    job = "gs://bkt/run/samples/step_4/2s_t1.0_k0_seed0-0123abcd"
    assert f"{job}/job.json" in names and f"{job}/sample_0.npy" in names, names
    assert not [n for n in names if ".tmp" in n], names
    assert list(cwd.iterdir()) == []
