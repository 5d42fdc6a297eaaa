"""The real SpeechSSM task prepared and trained by 2 processes on one machine (4 CPU devices
each, gloo collectives through `jax.distributed`, as tests/test_multihost.py): process 0
builds the shared artifacts once, the other waits; node-local caches each get their own
corpus; a checkpointed workdir refuses units from other data, in every process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = {"train.steps": 2, "train.eval_every": 0, "train.checkpoint_every": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _job(workdir: str, cache: str, **overrides) -> list[dict]:
    """Runs both processes; returns what each reported (raises with logs if one crashed)."""
    port = _free_port()
    procs, logs = [], []
    for pid in range(2):
        env = dict(
            os.environ,
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
            WORKER_DEVICES="4",
            XLA_FLAGS="",
        )
        log = open(f"{workdir}.p{pid}.log", "w+")  # noqa: SIM115
        logs.append(log)
        args = [workdir, cache, json.dumps({**STEPS, **overrides})]
        cmd = [sys.executable, os.path.join(HERE, "multihost_prepare_worker.py"), *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for pid, log in enumerate(logs):
        log.seek(0)
        text = log.read()
        log.close()
        path = f"{workdir}.p{pid}.json"
        if codes[pid] or not os.path.exists(path):
            raise AssertionError(f"process {pid} exited {codes[pid]}:\n{text[-4000:]}")
        with open(path) as f:
            results.append({**json.load(f), "log": text})
    return results


def _built_by(log: str) -> bool:
    return "Building the unit tokenizer and vocoder" in log


def test_two_processes_prepare_once_with_node_local_caches_then_units_are_frozen(tmp_path):
    work = str(tmp_path / "w")
    # Node-local caches: each process (host) builds its own corpus; units once, by process 0.
    first = _job(work, str(tmp_path / "cache{process}"))
    assert all(r["ok"] for r in first), [r.get("message") for r in first]
    assert [_built_by(r["log"]) for r in first] == [True, False]
    for pid in range(2):
        cache = tmp_path / f"cache{pid}"
        corpora = [p for p in os.listdir(cache) if p.startswith("default_corpus")]
        assert corpora == ["default_corpus_1min"], os.listdir(cache)
        assert (cache / corpora[0] / "manifest.json").exists()
    units = json.loads((tmp_path / "w" / "units" / "manifest.json").read_text())
    assert units["fields"]["units"]["num_units"] == 32
    assert not [p for p in os.listdir(tmp_path / "w") if ".tmp" in p]
    # Other data under the checkpoint (more stories held out): both processes refuse,
    # naming the field, and nothing in the workdir changes.
    second = _job(work, str(tmp_path / "cache{process}"), **{"data.heldout_fraction": 0.6})
    for r in second:
        assert not r["ok"] and r["type"] == "ArtifactMismatchError", r
        assert "heldout_fraction: 0.1 -> 0.6" in r["message"], r["message"]
    again = json.loads((tmp_path / "w" / "units" / "manifest.json").read_text())
    assert again == units


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
