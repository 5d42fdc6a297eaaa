"""launch/ scripts: their --dry-run prints the commands a pod / SLURM launch would run."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        ["bash", os.path.join(REPO, "launch", script), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


TPU = {"TPU_NAME": "spk", "ZONE": "us-west4-a", "PROJECT": "proj"}


def test_tpu_create_and_queued_create():
    out = _run("tpu_vm.sh", "create", "--dry-run", **TPU)
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.split()
        == (
            "gcloud compute tpus tpu-vm create spk --zone=us-west4-a --project=proj "
            "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite"
        ).split()
    )
    out = _run("tpu_vm.sh", "create", "--dry-run", QUEUED="1", ACCELERATOR="v5p-32", **TPU)
    assert "queued-resources create spk-qr --node-id=spk" in out.stdout
    assert "--accelerator-type=v5p-32" in out.stdout


def test_tpu_setup_copies_and_installs_on_every_worker():
    out = _run("tpu_vm.sh", "setup", "--dry-run", **TPU)
    assert out.returncode == 0, out.stderr
    tar, scp, ssh = (shlex.split(line) for line in out.stdout.strip().splitlines())
    assert tar[:3] == ["tar", "czf", "/tmp/avjax-src.tgz"] and "--exclude=.venv" in tar
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/avjax-src.tgz"]
    assert "--worker=all" in scp and "--worker=all" in ssh
    command = next(a for a in ssh if a.startswith("--command="))
    assert "pip install -q -e '.[tpu]'" in command


def test_tpu_run_starts_the_same_command_on_all_workers():
    out = _run("tpu_vm.sh", "run", "--dry-run", **TPU)
    assert out.returncode != 0 and "WORKDIR" in out.stderr  # a shared gs:// dir is required
    out = _run(
        "tpu_vm.sh",
        "run",
        "--dry-run",
        WORKDIR="gs://b/run1",
        CONFIG="configs/speechssm_2b.py",
        EXTRA="--config.train.steps=10",
        **TPU,
    )
    assert out.returncode == 0, out.stderr
    assert "tpu-vm ssh spk --zone=us-west4-a --project=proj --worker=all" in out.stdout
    command = next(a for a in shlex.split(out.stdout) if a.startswith("--command="))
    assert (
        "-m avjax.main --config=configs/speechssm_2b.py --workdir=gs://b/run1 "
        "--config.train.steps=10" in command
    )


def test_tpu_logs_delete_and_usage():
    assert "--worker=0" in _run("tpu_vm.sh", "logs", "--dry-run", **TPU).stdout
    assert "tpu-vm delete spk" in _run("tpu_vm.sh", "delete", "--dry-run", **TPU).stdout
    bad = _run("tpu_vm.sh", "explode", "--dry-run", **TPU)
    assert bad.returncode == 2 and "usage" in bad.stderr
    assert _run("tpu_vm.sh", "create", "--dry-run").returncode != 0  # TPU_NAME required


@pytest.mark.parametrize("nodes", ["1", "4"])
def test_slurm_dry_run_prints_the_job(nodes):
    out = _run(
        "slurm_gpu.sh",
        "--dry-run",
        NODES=nodes,
        GPUS_PER_NODE="8",
        WORKDIR="/shared/run",
        PARTITION="a100",
    )
    assert out.returncode == 0, out.stderr
    s = out.stdout
    assert f"#SBATCH --nodes={nodes}" in s and "#SBATCH --ntasks-per-node=8" in s
    assert "#SBATCH --partition=a100" in s and "#SBATCH --gpus-per-node=8" in s
    assert "srun --kill-on-bad-exit=1" in s
    assert "-m avjax.main --config=configs/speechssm.py --workdir=/shared/run" in s
    assert not os.path.exists("/shared/run")  # a dry run creates nothing
