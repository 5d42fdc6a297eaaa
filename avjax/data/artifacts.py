"""Prepared artifacts: folders built once, published atomically, keyed by what shapes them.

A prepared artifact (a corpus, a TFDS dataset, the units + vocoder of a workdir, ...) is a
folder whose `manifest.json` is its commit record:

  <path>/manifest.json   {"key": <16 hex>, "fields": {...}, "info": {...}}

`key` is a hash of `fields`: the keys of its inputs and the config fields that shape it. A
folder whose manifest holds the wanted key is complete and current; anything else (no
manifest, another key) is not.

`prepare_artifact(path, fields, build)`:

- Local paths: `build(tmp)` writes into a unique sibling `<name>.tmp-<hex>` (holding an
  `.owner.json` with host and pid while it is built), the manifest is written last, and the
  folder is renamed into place (an older build is moved aside and removed). A build killed
  half way leaves only its `.tmp-` folder, which the next build removes (its owner process is
  gone).
- Remote paths (`gs://...`): built in a local temporary folder, then uploaded with the
  manifest last (an object store has no folder rename; the manifest is the commit).
- Several processes: one process per filesystem builds (the *leader* of a `Group`: the lowest
  process index that sees the same files), the others poll for the manifest with a progress
  line every minute and fail after `timeout_s` naming the path and the builder.

`filesystem_group(root)` finds which processes share `root` (checked up front, in seconds):
process 0 broadcasts a nonce, every process writes `<root>/.avjax-fs-<nonce>-<index>`, and
each one reports whose files it sees. A shared filesystem gives one group of all processes;
node-local caches give one group per host, and each host builds its own copy (the builds
are deterministic, e.g. the default corpus). A workdir must be shared (`require_shared`).

Frozen artifacts: `frozen_by` (e.g. "the checkpoints in W/checkpoints") makes a missing or
different artifact an `ArtifactMismatchError` naming the fields that differ, never a rebuild.
`read_only=True` (sampling, evaluation) never writes: an artifact that is not there and
current is an `ArtifactMissingError` naming the path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from absl import logging
from etils import epath

from avjax import io as io_lib

MANIFEST = "manifest.json"
OWNER = ".owner.json"
DEFAULT_TIMEOUT_S = 6 * 3600.0
LOG_EVERY_S = 60.0
STALE_AFTER_S = 24 * 3600.0  # tmp folders without a readable owner older than this are removed


class ArtifactError(RuntimeError):
    """Base of the errors below."""


class ArtifactMissingError(ArtifactError, FileNotFoundError):
    """A read-only run needs an artifact that is not there (or not current)."""


class ArtifactMismatchError(ArtifactError, ValueError):
    """A frozen artifact differs from what this run would build (names the fields)."""


class ArtifactTimeoutError(ArtifactError, TimeoutError):
    """Waited too long for another process to publish an artifact."""


class SharedFilesystemError(ArtifactError):
    """A folder that every process must see is not shared by all of them."""


# --- keys ------------------------------------------------------------------------------------


def fingerprint(fields: Any) -> str:
    """16 hex digits of a SHA-256 of `fields` as canonical JSON (sorted keys)."""
    text = json.dumps(fields, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix or "(value)": d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, name) if isinstance(v, dict) else {name: v})
    return out


def diff_fields(old: Any, new: Any) -> list[str]:
    """`["name: old -> new", ...]` for the (dotted) fields that differ."""
    a, b = _flatten(old or {}), _flatten(new or {})
    return [
        f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "(absent)") != b.get(k, "(absent)")
    ]


def _differences(found: dict[str, Any], fields: dict[str, Any], context: dict[str, Any]) -> list:
    """What differs between a manifest and this run: fields, then context (the likely cause)."""
    diffs = diff_fields(found.get("fields"), fields)
    diffs += [f"(context) {d}" for d in diff_fields(found.get("context"), context)]
    return diffs or ["(the contents of its inputs)"]


def read_manifest(path: io_lib.PathLike) -> dict[str, Any] | None:
    """The artifact's manifest, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((io_lib.as_path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_current(path: io_lib.PathLike, key: str) -> bool:
    """Whether `path` holds a complete artifact with `key`."""
    m = read_manifest(path)
    return m is not None and m.get("key") == key


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A published artifact: where it is, its key, fields and build info; `built` by this call."""

    path: epath.Path
    key: str
    fields: dict[str, Any]
    info: dict[str, Any]
    built: bool = False


# --- processes and shared filesystems --------------------------------------------------------


class Processes(Protocol):
    """What the coordination below needs from a multi-process job."""

    index: int
    count: int

    def broadcast(self, text: str) -> str:
        """Process 0's `text`, on every process."""

    def allgather(self, flags: list[bool]) -> list[list[bool]]:
        """Every process's `flags` (same length everywhere), indexed by process."""

    def barrier(self, name: str) -> None:
        """Returns once every process has reached it."""


class JaxProcesses:
    """`Processes` over `jax.distributed` (multihost_utils collectives)."""

    _WIDTH = 256  # bytes a broadcast string may have

    def __init__(self) -> None:
        import jax

        self.index, self.count = jax.process_index(), jax.process_count()

    def broadcast(self, text: str) -> str:
        import numpy as np
        from jax.experimental import multihost_utils

        if self.count == 1:
            return text
        data = text.encode()
        if len(data) > self._WIDTH:
            raise ValueError(f"broadcast text longer than {self._WIDTH} bytes: {text[:40]}...")
        buf = np.zeros(self._WIDTH + 1, np.uint8)
        buf[0], buf[1 : 1 + len(data)] = len(data), np.frombuffer(data, np.uint8)
        out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
        return bytes(out[1 : 1 + int(out[0])].astype(np.uint8)).decode()

    def allgather(self, flags: list[bool]) -> list[list[bool]]:
        import numpy as np
        from jax.experimental import multihost_utils

        if self.count == 1:
            return [list(flags)]
        out = np.asarray(multihost_utils.process_allgather(np.asarray(flags, np.int32)))
        return [[bool(x) for x in row] for row in out.reshape(self.count, len(flags))]

    def barrier(self, name: str) -> None:
        from jax.experimental import multihost_utils

        if self.count > 1:
            multihost_utils.sync_global_devices(name)


@dataclasses.dataclass(frozen=True)
class Group:
    """The processes that see the same files under a folder as this one.

    Attributes:
      members: their process indices, ascending; `leader` (the first) builds.
      index: this process's index.
      count: all processes of the job.
    """

    members: tuple[int, ...]
    index: int
    count: int

    @property
    def leader(self) -> int:
        return self.members[0]

    @property
    def is_leader(self) -> bool:
        return self.index == self.leader

    @property
    def rank(self) -> int:
        """This process's position among `members` (its share of group-wide work)."""
        return self.members.index(self.index)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def shared_by_all(self) -> bool:
        return self.size == self.count


SINGLE = Group((0,), 0, 1)


def filesystem_group(
    root: io_lib.PathLike,
    processes: Processes | None = None,
    *,
    timeout_s: float = 10.0,
    read_only: bool = False,
) -> Group:
    """Which processes share the filesystem under `root` (see the module docstring).

    Every process must call this together. One process: `SINGLE`, nothing written.
    `read_only`: nothing is written; the group is assumed shared (read-only runs build
    nothing there).
    """
    procs = processes or JaxProcesses()
    if procs.count == 1:
        return SINGLE
    root = io_lib.as_path(root)
    if read_only:
        return Group(tuple(range(procs.count)), procs.index, procs.count)
    nonce = procs.broadcast(uuid.uuid4().hex[:16])
    root.mkdir(parents=True, exist_ok=True)
    mine = root / f".avjax-fs-{nonce}-{procs.index}"
    mine.write_text(socket.gethostname())
    procs.barrier(f"avjax-fs-written-{nonce}")
    names = [root / f".avjax-fs-{nonce}-{j}" for j in range(procs.count)]
    deadline = time.time() + timeout_s
    seen = [p.exists() for p in names]
    while not all(seen) and time.time() < deadline:  # (NFS attribute caches may lag)
        time.sleep(0.2)
        seen = [s or p.exists() for s, p in zip(seen, names, strict=True)]
    table = procs.allgather(seen)
    procs.barrier(f"avjax-fs-read-{nonce}")
    mine.unlink(missing_ok=True)
    members = tuple(j for j in range(procs.count) if table[procs.index][j])
    group = Group(members, procs.index, procs.count)
    if not group.shared_by_all:
        logging.info(
            "%s is not shared by all %d processes: process %d shares it with %s",
            root,
            procs.count,
            procs.index,
            list(members),
        )
    return group


def require_shared(group: Group, root: io_lib.PathLike, what: str) -> None:
    """Raises SharedFilesystemError unless every process sees the same files under `root`."""
    if not group.shared_by_all:
        missing = sorted(set(range(group.count)) - set(group.members))
        raise SharedFilesystemError(
            f"{what} {io_lib.as_path(root)} is not one filesystem shared by all "
            f"{group.count} processes: process {group.index} cannot see the files of "
            f"processes {missing} there. Use a folder every host sees (a gs:// bucket or NFS)."
        )


# --- building and waiting --------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(tmp: epath.Path) -> bool:
    """Whether a `.tmp-` / `.old-` sibling was left by a build that is no longer running."""
    if ".old-" in tmp.name:
        return True
    try:
        owner = json.loads((tmp / OWNER).read_text())
    except (OSError, ValueError):
        owner = None
    if owner and owner.get("host") == socket.gethostname():
        return not _pid_alive(int(owner.get("pid", -1)))
    try:
        return time.time() - os.stat(os.fspath(tmp)).st_mtime > STALE_AFTER_S
    except OSError:
        return False


def clean_stale(path: io_lib.PathLike) -> list[str]:
    """Removes `<name>.tmp-*` / `<name>.old-*` (and older `.<name>.tmp-*`) siblings of `path`
    left by killed builds; returns their names. Builds still running are kept."""
    path = io_lib.as_path(path)
    if io_lib.is_remote(path) or not path.parent.exists():
        return []
    removed = []
    patterns = (f"{path.name}.tmp-*", f"{path.name}.old-*", f".{path.name}.tmp-*")
    for pattern in patterns:
        for tmp in path.parent.glob(pattern):
            if tmp.is_dir() and _is_stale(tmp):
                shutil.rmtree(os.fspath(tmp), ignore_errors=True)
                removed.append(tmp.name)
    if removed:
        logging.info("Removed leftovers of killed builds beside %s: %s", path, removed)
    return removed


def _manifest(
    key: str, fields: dict[str, Any], info: dict[str, Any] | None, context: dict[str, Any]
) -> str:
    body = {
        "key": key,
        "fields": fields,
        "context": context,
        "info": info or {},
        "created": time.time(),
    }
    return json.dumps(body, indent=2, default=str)


def _publish_local(tmp: epath.Path, path: epath.Path) -> None:
    """Renames the finished `tmp` onto `path`, moving an older build aside first."""
    old = None
    if path.exists():
        old = path.parent / f"{path.name}.old-{uuid.uuid4().hex[:8]}"
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(os.fspath(old), ignore_errors=True)


def _upload(local: str, path: epath.Path) -> None:
    """Copies the local folder onto remote `path`, replacing it; its manifest goes last."""
    if path.exists():
        (path / MANIFEST).unlink(missing_ok=True)  # readers stop trusting it first
        path.rmtree()
    for dirpath, _, files in os.walk(local):
        rel = os.path.relpath(dirpath, local)
        dest = path if rel == "." else path / rel
        dest.mkdir(parents=True, exist_ok=True)
        for name in files:
            if rel == "." and name == MANIFEST:
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                (dest / name).write_bytes(f.read())
    with open(os.path.join(local, MANIFEST), "rb") as f:
        (path / MANIFEST).write_bytes(f.read())


def _build(
    path: epath.Path,
    key: str,
    fields: dict[str, Any],
    build: Callable[[epath.Path], dict[str, Any] | None],
    stage_locally: bool,
    context: dict[str, Any],
) -> dict[str, Any]:
    """Runs `build` into a private folder and publishes it; returns the build info."""
    if stage_locally:
        local = tempfile.mkdtemp(prefix=f"avjax-{path.name}-")
        try:
            info = build(epath.Path(local)) or {}
            with open(os.path.join(local, MANIFEST), "w") as f:
                f.write(_manifest(key, fields, info, context))
            _upload(local, path)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        return info
    clean_stale(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = io_lib.unique_tmp(path)
    tmp.mkdir()
    try:
        (tmp / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        info = build(tmp) or {}
        (tmp / OWNER).unlink()
        (tmp / MANIFEST).write_text(_manifest(key, fields, info, context))
        _publish_local(tmp, path)
    except BaseException:
        shutil.rmtree(os.fspath(tmp), ignore_errors=True)
        raise
    return info


def wait_for(
    ready: Callable[[], bool],
    path: io_lib.PathLike,
    what: str,
    *,
    builder: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_s: float = 2.0,
) -> None:
    """Polls `ready()` until it holds; logs progress every minute; ArtifactTimeoutError after
    `timeout_s` naming `path` and the process that builds it."""
    t0 = last_log = time.time()
    while not ready():
        now = time.time()
        if now - t0 > timeout_s:
            raise ArtifactTimeoutError(
                f"waited {timeout_s:.0f} s for process {builder} to publish {what} at {path}: "
                f"is process {builder} still running (see its log), and does it see the same "
                "files there as this process?"
            )
        if now - last_log >= LOG_EVERY_S:
            logging.info(
                "Waiting for process %d to build %s at %s (%.0f s so far, timeout %.0f s)",
                builder,
                what,
                path,
                now - t0,
                timeout_s,
            )
            last_log = now
        time.sleep(poll_s)


def prepare_artifact(
    path: io_lib.PathLike,
    fields: dict[str, Any],
    build: Callable[[epath.Path], dict[str, Any] | None],
    *,
    what: str = "",
    context: dict[str, Any] | None = None,
    group: Group = SINGLE,
    processes: Processes | None = None,
    read_only: bool = False,
    frozen_by: str = "",
    force: bool = False,
    adopt: Callable[[epath.Path], dict[str, Any] | None] | None = None,
    stage_locally: bool | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Artifact:
    """The artifact at `path` with `fields`, built by `build(folder)` when it is not there.

    Args:
      path: the artifact folder (local or remote).
      fields: what shapes it (JSON-able); its key is `fingerprint(fields)`. With `processes`
        given and a group of all processes, process 0's key is used by everyone (hosts whose
        inputs differ in incidental ways, e.g. paths, agree on process 0's build).
      build: writes the artifact's files into the folder it is given (never `path` itself);
        returns JSON-able info kept in the manifest (or None).
      what: a name for logs and errors ("the default corpus").
      context: kept in the manifest and shown in mismatch errors, not part of the key (e.g.
        the config fields that chose the inputs, when the inputs' keys are in `fields`).
      group: the processes sharing `path`'s filesystem (`filesystem_group`); its leader builds.
      read_only: never write; ArtifactMissingError when the artifact is not there and current.
      frozen_by: non-empty when something depends on the existing artifact (e.g. "the
        checkpoints in W/checkpoints"): a missing or different artifact is an
        ArtifactMismatchError naming the differing fields, never rebuilt.
      force: rebuild even when current (not with `frozen_by` or `read_only`).
      adopt: for folders made before manifests existed: returns build info if `path` holds a
        complete build with these fields (a manifest is then written; not when read-only).
      stage_locally: build in a local temp folder and upload (default: for remote paths).
      timeout_s: how long non-leaders wait for the leader's build.
    """
    path = io_lib.as_path(path)
    what = what or path.name
    context = context or {}
    key = fingerprint(fields)
    if processes is not None and group.shared_by_all and group.count > 1:
        key = processes.broadcast(key)
    found = read_manifest(path)
    if found is None and adopt is not None and path.exists():
        legacy = adopt(path)
        if legacy is not None:
            if not read_only and group.is_leader:
                (path / MANIFEST).write_text(_manifest(key, fields, legacy, context))
            found = {"key": key, "fields": fields, "context": context, "info": legacy}
    current = found is not None and found.get("key") == key
    if frozen_by and (not current or force):
        if found is None:
            raise ArtifactMismatchError(
                f"{what} at {path} is missing (no {MANIFEST}), but {frozen_by} depend on it: "
                "restore it, or start a new --workdir"
            )
        if force:
            raise ArtifactMismatchError(
                f"{what} at {path} cannot be rebuilt: {frozen_by} depend on it; "
                "start a new --workdir to rebuild it"
            )
        diffs = _differences(found, fields, context)
        raise ArtifactMismatchError(
            f"{what} at {path} was made with other settings or data than this run's, and "
            f"{frozen_by} depend on it. Differing fields (saved -> now):\n  "
            + "\n  ".join(diffs)
            + "\nUse the original settings and data, or a new --workdir."
        )
    if current and not force:
        return Artifact(path, key, found.get("fields", fields), found.get("info", {}))
    if read_only:
        detail = "it is not there"
        if found is not None:
            detail = "it was made with other settings: " + "; ".join(
                _differences(found, fields, context)
            )
        raise ArtifactMissingError(
            f"{what} at {path} is needed but {detail}; this run is read-only (sample/eval) and "
            "builds nothing: train first with the same settings"
        )
    if group.is_leader:
        t0 = time.time()
        logging.info("Building %s at %s", what, path)
        stage = io_lib.is_remote(path) if stage_locally is None else stage_locally
        info = _build(path, key, fields, build, stage, context)
        logging.info("Built %s at %s in %.1f s", what, path, time.time() - t0)
        return Artifact(path, key, fields, info, built=True)
    before = found.get("created") if (force and found is not None) else None

    def ready() -> bool:  # (with `force`: a newer build than the one seen above)
        m = read_manifest(path)
        return m is not None and m.get("key") == key and m.get("created") != before

    wait_for(ready, path, what, builder=group.leader, timeout_s=timeout_s)
    return Artifact(path, key, fields, (read_manifest(path) or {}).get("info", {}))
