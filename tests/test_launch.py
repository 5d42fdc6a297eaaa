"""launch/ scripts: their --dry-run output is valid bash, and the avjax command line it would run
parses with avjax.main's own flags into the workdir, config, mode and overrides we passed,
arguments with spaces, quotes, `$` and backticks included."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A value that breaks any launch script that does not quote what it passes on.
WEIRD = "/data/my corpus/$HOME \"q\" 'x' `id` $(id) ; & *"


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        ["bash", os.path.join(REPO, "launch", script), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _bash_syntax_ok(text: str) -> None:
    """Fails unless `bash -n` accepts `text`."""
    out = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"bash -n: {out.stderr}\n--- input ---\n{text}"


def _avjax_args(words: list[str]) -> tuple[list[str], list[str]]:
    """Splits a shell command's words at `-m avjax.main`: (what comes before, its arguments up
    to the first redirection or command separator)."""
    i = next(j for j in range(len(words) - 1) if words[j : j + 2] == ["-m", "avjax.main"])
    rest = []
    for w in words[i + 2 :]:
        if w in ("&", "&&", ";", "|") or w.startswith((">", "2>")):
            break
        rest.append(w)
    return words[:i], rest


_PARSE = r"""
import json, sys
from absl import flags
import avjax.main  # noqa: F401  (defines --config, --workdir, --mode)
sys.argv = ["avjax.main", *json.load(sys.stdin)]  # config_flags reads overrides from sys.argv
flags.FLAGS(sys.argv)
f = flags.FLAGS
print(json.dumps({
    "config_file": f["config"].config_filename,
    "workdir": f.workdir,
    "mode": f.mode,
    "manual_dir": f.config.data.manual_dir,
    "steps": f.config.train.steps,
}))
"""


def _parse_with_avjax_flags(args: list[str]) -> dict:
    """Parses `args` with avjax.main's flags (config file loaded) in a fresh process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", _PARSE],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, f"avjax.main rejects {args}:\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


TPU = {"TPU_NAME": "spk", "ZONE": "us-west4-a", "PROJECT": "proj"}


def test_tpu_create_and_queued_create():
    out = _run("tpu_vm.sh", "create", "--dry-run", **TPU)
    assert out.returncode == 0, out.stderr
    _bash_syntax_ok(out.stdout)
    assert shlex.split(out.stdout) == shlex.split(
        "gcloud compute tpus tpu-vm create spk --zone=us-west4-a --project=proj "
        "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite"
    )
    out = _run("tpu_vm.sh", "create", "--dry-run", QUEUED="1", ACCELERATOR="v5p-32", **TPU)
    _bash_syntax_ok(out.stdout)
    words = shlex.split(out.stdout)
    assert words[:7] == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "spk-qr",
        "--node-id=spk",
    ]
    assert "--accelerator-type=v5p-32" in words
    # Without PROJECT no empty argument is passed on.
    out = _run("tpu_vm.sh", "create", "--dry-run", TPU_NAME="spk", ZONE="z")
    assert "" not in shlex.split(out.stdout) and "--project" not in out.stdout


def test_tpu_setup_copies_and_installs_on_every_worker():
    out = _run("tpu_vm.sh", "setup", "--dry-run", **TPU)
    assert out.returncode == 0, out.stderr
    _bash_syntax_ok(out.stdout)
    tar, scp, ssh = (shlex.split(line) for line in out.stdout.strip().splitlines())
    assert tar[:3] == ["tar", "czf", "/tmp/avjax-src.tgz"] and "--exclude=.venv" in tar
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/avjax-src.tgz"]
    assert "--worker=all" in scp and "--worker=all" in ssh
    command = next(a for a in ssh if a.startswith("--command="))[len("--command=") :]
    _bash_syntax_ok(command)
    assert "pip install -q -e '.[tpu]'" in command


def test_tpu_run_passes_every_argument_on_intact():
    out = _run("tpu_vm.sh", "run", "--dry-run", **TPU)
    assert out.returncode != 0 and "WORKDIR" in out.stderr  # a shared gs:// dir is required
    out = _run(
        "tpu_vm.sh",
        "run",
        "--dry-run",
        f"--config.data.manual_dir={WEIRD}",
        "--mode=sample",
        WORKDIR="gs://b/run 1",
        CONFIG="configs/speechssm.py:2b",
        EXTRA="--config.train.steps=10",
        **TPU,
    )
    assert out.returncode == 0, out.stderr
    _bash_syntax_ok(out.stdout)
    words = shlex.split(out.stdout)
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "spk"]
    assert "--worker=all" in words and "--project=proj" in words
    remote = next(a for a in words if a.startswith("--command="))[len("--command=") :]
    _bash_syntax_ok(remote)  # what the remote shell runs
    before, args = _avjax_args(shlex.split(remote))
    assert before[-1] == ".venv/bin/python" and remote.rstrip().endswith("2>&1 &")
    parsed = _parse_with_avjax_flags(args)
    assert parsed == {
        "config_file": "configs/speechssm.py:2b",
        "workdir": "gs://b/run 1",
        "mode": "sample",
        "manual_dir": WEIRD,
        "steps": 10,
    }


def test_tpu_logs_delete_and_usage():
    logs = _run("tpu_vm.sh", "logs", "--dry-run", **TPU).stdout
    _bash_syntax_ok(logs)
    assert "--worker=0" in shlex.split(logs)
    delete = _run("tpu_vm.sh", "delete", "--dry-run", **TPU).stdout
    _bash_syntax_ok(delete)
    assert shlex.split(delete)[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "spk"]
    bad = _run("tpu_vm.sh", "explode", "--dry-run", **TPU)
    assert bad.returncode == 2 and "usage" in bad.stderr
    assert _run("tpu_vm.sh", "create", "--dry-run").returncode != 0  # TPU_NAME required
    # Only `run` takes arguments for avjax.main.
    assert _run("tpu_vm.sh", "create", "--dry-run", "--mode=eval", **TPU).returncode == 2


@pytest.mark.parametrize("nodes", ["1", "4"])
def test_slurm_dry_run_prints_a_job_that_runs_our_command(nodes, tmp_path):
    workdir = str(tmp_path / "shared run $x")
    out = _run(
        "slurm_gpu.sh",
        "--dry-run",
        "--mode=eval",
        f"--config.data.manual_dir={WEIRD}",
        NODES=nodes,
        GPUS_PER_NODE="8",
        WORKDIR=workdir,
        PARTITION="a100",
        EXTRA="--config.train.steps=3",
    )
    assert out.returncode == 0, out.stderr
    s = out.stdout
    _bash_syntax_ok(s)  # the job script (the sbatch command is a comment above it)
    lines = s.splitlines()
    submit = shlex.split(lines[0].removeprefix("# would run:").split("<")[0])
    assert submit == ["sbatch", f"--output={workdir}/slurm-%j.log"]
    assert f"#SBATCH --nodes={nodes}" in lines and "#SBATCH --ntasks-per-node=8" in lines
    assert "#SBATCH --partition=a100" in lines and "#SBATCH --gpus-per-node=8" in lines
    cd = next(shlex.split(x) for x in lines if x.startswith("cd "))
    assert cd == ["cd", REPO]
    srun = shlex.split(next(x for x in lines if x.startswith("srun ")))
    before, args = _avjax_args(srun)
    assert before == ["srun", "--kill-on-bad-exit=1", os.path.join(REPO, ".venv/bin/python")]
    if nodes == "1":  # one parse is enough (a subprocess that loads the config)
        assert _parse_with_avjax_flags(args) == {
            "config_file": "configs/speechssm.py",
            "workdir": workdir,
            "mode": "eval",
            "manual_dir": WEIRD,
            "steps": 3,
        }
    assert not os.path.exists(workdir)  # a dry run creates nothing


def test_slurm_refuses_values_that_would_break_sbatch_lines():
    bad = _run("slurm_gpu.sh", "--dry-run", WORKDIR="/w", PARTITION="a\n#SBATCH --x")
    assert bad.returncode == 2 and "PARTITION" in bad.stderr
    bad = _run("slurm_gpu.sh", "--dry-run", WORKDIR="/w", NODES="2 --x")
    assert bad.returncode == 2 and "NODES" in bad.stderr


# --- the test set-up and CI's own checks ------------------------------------------------------


def test_tests_run_on_8_cpu_devices():
    import jax

    assert os.environ["JAX_PLATFORMS"] == "cpu"
    assert jax.default_backend() == "cpu" and jax.device_count() == 8


def _pytest(args: list[str], env: dict[str, str], cwd: str = REPO, pre: str = ""):
    code = f"import sys, pytest\n{pre}\nsys.exit(pytest.main({args!r}))"
    env = {k: v for k, v in env.items() if k != "PYTEST_ADDOPTS"}  # not CI's --junitxml
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_conftest_forces_8_cpu_devices_whatever_platform_is_asked_for():
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cuda",  # e.g. exported on a GPU machine
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    node = "tests/test_launch.py::test_tests_run_on_8_cpu_devices"
    r = _pytest(["-q", "-p", "no:cacheprovider", node], env)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_conftest_stops_the_session_when_8_devices_are_missing():
    # JAX started with 2 devices before conftest ran: an error, not skipped 8-device tests.
    pre = "import jax; jax.config.update('jax_num_cpu_devices', 2); jax.devices()"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    node = "tests/test_launch.py::test_tests_run_on_8_cpu_devices"
    r = _pytest(["-q", "-p", "no:cacheprovider", node], env, pre=pre)
    assert r.returncode not in (0, 5), r.stdout[-3000:]
    assert "tests need 8 CPU devices" in r.stdout + r.stderr


_GUARDED_FILES = (
    "test_convert_mamba",
    "test_nn_griffin",
    "test_nn_mamba",
    "test_hubert",
    "test_train_sharding",
    "test_multihost",
    "test_gcs_workdir",
)


def _fake_repo(tmp_path, skipped: str | None, extra_test: str = "") -> str:
    """A repository with .ci/, a README test command (pytest) and one test per guarded file;
    `skipped` names the file whose test skips (a missing reference package)."""
    import shutil

    root = tmp_path / "repo"
    (root / ".ci").mkdir(parents=True)
    for f in ("run", "check_skips.py"):
        shutil.copy(os.path.join(REPO, ".ci", f), root / ".ci" / f)
    cmd = f"{shlex.quote(sys.executable)} -m pytest -q -p no:cacheprovider tests"
    (root / "README.md").write_text(f"# x\n<!-- test-command -->\n```bash\n{cmd}\n```\n")
    (root / "tests").mkdir()
    for name in _GUARDED_FILES:
        head = "import pytest\n"
        if name == skipped:
            head += "pytest.importorskip('a_reference_that_is_not_installed')\n"
        (root / "tests" / f"{name}.py").write_text(head + "def test_it():\n    pass\n")
    (root / "tests" / "test_other.py").write_text("import pytest\n" + extra_test)
    return str(root)


@pytest.mark.parametrize("skipped", [None, "test_hubert", "test_convert_mamba"])
def test_ci_run_fails_when_a_parity_or_sharding_test_is_skipped(tmp_path, skipped):
    root = _fake_repo(tmp_path, skipped, "def test_fine():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    r = subprocess.run(
        ["bash", ".ci/run"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    if skipped is None:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "every parity and 8-device test ran" in r.stdout
    else:
        assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
        assert f"skipped: tests.{skipped}" in r.stderr
        assert "no test ran from tests/test_" in r.stderr


def test_ci_run_fails_when_an_8_device_test_is_skipped_anywhere(tmp_path):
    root = _fake_repo(
        tmp_path,
        None,
        "@pytest.mark.skipif(True, reason='needs 8 host devices')\ndef test_mesh():\n    pass\n",
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    r = subprocess.run(
        ["bash", ".ci/run"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 1 and "tests.test_other.test_mesh" in r.stderr, r.stderr[-3000:]
