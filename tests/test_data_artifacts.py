"""Prepared artifacts: atomic publication, keys, leftovers of killed builds, read-only and
frozen artifacts, and several processes (threads standing in for them) sharing or not
sharing a filesystem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from avjax.data import artifacts
from avjax.data.speech.pipeline import has_checkpoint


def _writer(calls: list, content: str = "hello"):
    def build(tmp):
        calls.append(str(tmp))
        assert not str(tmp).endswith("/art")  # never the final folder
        (tmp / "data.txt").write_text(content)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.bin").write_bytes(b"\x00\x01")
        return {"size": len(content)}

    return build


def test_builds_once_publishes_with_manifest_and_rebuilds_for_other_fields(tmp_path):
    calls = []
    path = tmp_path / "art"
    a = artifacts.prepare_artifact(path, {"n": 1}, _writer(calls), what="a test artifact")
    assert a.built and a.info == {"size": 5} and (path / "data.txt").read_text() == "hello"
    m = json.loads((path / "manifest.json").read_text())
    assert m["key"] == artifacts.fingerprint({"n": 1}) and m["fields"] == {"n": 1}
    b = artifacts.prepare_artifact(path, {"n": 1}, _writer(calls))
    assert not b.built and len(calls) == 1 and b.info == {"size": 5}
    c = artifacts.prepare_artifact(path, {"n": 2}, _writer(calls, "other"))
    assert c.built and len(calls) == 2 and (path / "data.txt").read_text() == "other"
    assert sorted(os.listdir(tmp_path)) == ["art"]  # no .tmp- / .old- folders left


def test_a_failed_build_leaves_nothing(tmp_path):
    def fail(tmp):
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        artifacts.prepare_artifact(tmp_path / "art", {"n": 1}, fail)
    assert os.listdir(tmp_path) == []


def test_leftovers_of_killed_builds_are_removed_running_ones_kept(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    host = __import__("socket").gethostname()
    for name, pid in [("art.tmp-dead", int(dead.stdout)), ("art.tmp-live", os.getpid())]:
        (tmp_path / name).mkdir()
        (tmp_path / name / ".owner.json").write_text(json.dumps({"host": host, "pid": pid}))
    (tmp_path / "art.old-1234").mkdir()
    artifacts.prepare_artifact(tmp_path / "art", {"n": 1}, _writer([]))
    assert sorted(os.listdir(tmp_path)) == ["art", "art.tmp-live"]


def test_read_only_never_writes_and_names_the_path_or_the_fields(tmp_path):
    path = tmp_path / "art"
    with pytest.raises(artifacts.ArtifactMissingError, match=f"{path}.*not there"):
        artifacts.prepare_artifact(path, {"n": 1}, _writer([]), read_only=True)
    assert not path.exists()
    artifacts.prepare_artifact(path, {"n": 1}, _writer([]))
    with pytest.raises(artifacts.ArtifactMissingError, match="n: 1 -> 2"):
        artifacts.prepare_artifact(path, {"n": 2}, _writer([]), read_only=True)
    assert artifacts.prepare_artifact(path, {"n": 1}, _writer([]), read_only=True).key


def test_frozen_artifacts_are_never_rebuilt(tmp_path):
    path = tmp_path / "art"
    frozen = "the checkpoints in W"
    with pytest.raises(artifacts.ArtifactMismatchError, match="missing.*checkpoints in W"):
        artifacts.prepare_artifact(path, {"n": 1}, _writer([]), frozen_by=frozen)
    artifacts.prepare_artifact(path, {"n": 1, "k": "a"}, _writer([]), context={"why": 0.1})
    before = (path / "manifest.json").read_text()
    with pytest.raises(artifacts.ArtifactMismatchError) as e:
        artifacts.prepare_artifact(
            path, {"n": 1, "k": "b"}, _writer([]), frozen_by=frozen, context={"why": 0.3}
        )
    assert "k: 'a' -> 'b'" in str(e.value) and "(context) why: 0.1 -> 0.3" in str(e.value)
    with pytest.raises(artifacts.ArtifactMismatchError, match="new --workdir"):
        artifacts.prepare_artifact(
            path, {"n": 1, "k": "a"}, _writer([]), frozen_by=frozen, force=True
        )
    assert (path / "manifest.json").read_text() == before
    # Not frozen: force rebuilds a current artifact.
    calls = []
    assert artifacts.prepare_artifact(path, {"n": 1, "k": "a"}, _writer(calls), force=True).built


def test_staged_build_uploads_with_the_manifest_last(tmp_path):
    """The remote path (gs://): built locally, copied over an older version, manifest last."""
    path = tmp_path / "art"
    artifacts.prepare_artifact(path, {"n": 1}, _writer([], "old"), stage_locally=True)
    (path / "stale.txt").write_text("from the old version")
    a = artifacts.prepare_artifact(path, {"n": 2}, _writer([], "new"), stage_locally=True)
    assert a.built and (path / "data.txt").read_text() == "new"
    assert (path / "sub" / "x.bin").read_bytes() == b"\x00\x01"
    assert not (path / "stale.txt").exists() and artifacts.is_current(path, a.key)


def test_adopts_a_complete_folder_made_before_manifests(tmp_path):
    path = tmp_path / "art"
    path.mkdir()
    (path / "stamp.json").write_text('{"n": 1}')
    adopt = lambda p: {"legacy": True} if (p / "stamp.json").exists() else None  # noqa: E731
    a = artifacts.prepare_artifact(path, {"n": 1}, _writer([]), adopt=adopt)
    assert not a.built and a.info == {"legacy": True}
    assert artifacts.read_manifest(path)["key"] == a.key


def test_has_checkpoint(tmp_path):
    assert not has_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)
    assert not has_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "3").mkdir()
    assert has_checkpoint(tmp_path)


class _Threads:
    """`Processes` for threads of one test: a shared barrier, broadcast and allgather."""

    def __init__(self, count: int):
        self.count, self._barrier, self._slots = count, threading.Barrier(count), {}

    def view(self, index: int):
        outer = self

        class View:
            def __init__(self):
                self.index, self.count = index, outer.count

            def broadcast(self, text):
                if index == 0:
                    outer._slots["b"] = text
                outer._barrier.wait()
                out = outer._slots["b"]
                outer._barrier.wait()
                return out

            def allgather(self, flags):
                outer._slots[index] = list(flags)
                outer._barrier.wait()
                out = [outer._slots[j] for j in range(outer.count)]
                outer._barrier.wait()
                return out

            def barrier(self, name):
                outer._barrier.wait()

        return View()


def _in_threads(fn, count=2):
    procs, results, errors = _Threads(count), [None] * count, [None] * count

    def run(i):
        try:
            results[i] = fn(i, procs.view(i))
        except Exception as e:  # noqa: BLE001
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def test_shared_filesystem_one_build_others_wait(tmp_path):
    calls = []

    def job(i, procs):
        group = artifacts.filesystem_group(tmp_path / "cache", procs, timeout_s=2)
        art = artifacts.prepare_artifact(
            tmp_path / "cache" / "art", {"n": 1}, _writer(calls), group=group, processes=procs
        )
        return group, art

    results, errors = _in_threads(job)
    assert errors == [None, None]
    assert [r[0].members for r in results] == [(0, 1), (0, 1)]
    assert [r[1].built for r in results] == [True, False] and len(calls) == 1
    assert sorted(os.listdir(tmp_path / "cache")) == ["art"]  # (nonce files removed)


def test_node_local_caches_each_host_builds_its_own(tmp_path):
    calls = []

    def job(i, procs):
        root = tmp_path / f"host{i}"  # the "same" cache path, on two hosts' own disks
        group = artifacts.filesystem_group(root, procs, timeout_s=0.5)
        art = artifacts.prepare_artifact(root / "art", {"n": 1}, _writer(calls), group=group)
        with pytest.raises(artifacts.SharedFilesystemError, match=rf"processes \[{1 - i}\]"):
            artifacts.require_shared(group, root, "--workdir")
        return group, art

    results, errors = _in_threads(job)
    assert errors == [None, None]
    assert [r[0].members for r in results] == [(0,), (1,)]
    assert [r[1].built for r in results] == [True, True] and len(calls) == 2


def test_a_waiter_times_out_naming_the_path_and_the_builder(tmp_path):
    group = artifacts.Group((0, 1), 1, 2)  # process 1 waits; process 0 never builds
    with pytest.raises(artifacts.ArtifactTimeoutError, match=f"process 0 .*{tmp_path / 'art'}"):
        artifacts.prepare_artifact(
            tmp_path / "art", {"n": 1}, _writer([]), group=group, timeout_s=0.3
        )
