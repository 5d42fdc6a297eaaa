"""Paths that understand URLs: local folders and `gs://` (or other remote) workdirs alike.

Every place that touches a workdir, cache or output path goes through `as_path`, so a
`gs://bucket/run` workdir is written to the bucket by every host (orbax, TensorBoard and our
own JSON files), never to `<cwd>/gs:/bucket/run` on each host's boot disk.

    path = as_path(workdir) / "checkpoints"
    write_text_atomic(path / "stamp.json", json.dumps(...))
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

from etils import epath

PathLike = str | os.PathLike | epath.Path


def is_remote(path: PathLike) -> bool:
    """True for URLs such as `gs://bucket/x` (anything with a `scheme://`)."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """An `epath.Path`: URLs kept as they are; local paths made absolute (with `~` expanded)."""
    text = os.fspath(path)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def unique_tmp(path: PathLike) -> epath.Path:
    """A sibling of `path` with a unique temporary name (`<name>.tmp-<hex>`)."""
    p = as_path(path)
    return p.parent / f"{p.name}.tmp-{uuid.uuid4().hex[:12]}"


def write_text_atomic(path: PathLike, text: str) -> epath.Path:
    """Writes `text` to `path` so that readers see the old content or the new, never half.

    Local files go through a unique temporary file and a rename. Remote objects are written
    in place: an object store publishes an object only when its upload completes, and a
    "rename" there is a copy plus a delete (three requests, and not atomic), so a temporary
    object would add cost and no safety.
    """
    return write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: PathLike, data: bytes) -> epath.Path:
    """`write_text_atomic` for bytes."""
    p = as_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(p):
        p.write_bytes(data)
        return p
    tmp = unique_tmp(p)
    try:
        tmp.write_bytes(data)
        tmp.replace(p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


@contextlib.contextmanager
def local_then_copy(path: PathLike) -> Iterator[str]:
    """Yields a local file name for a writer that needs one (soundfile, matplotlib, np.save);
    on a clean exit the file becomes `path`, which may be a URL.

    Local `path`: the temporary file sits beside it and keeps its suffix (writers infer the
    format from it; `np.save` would append `.npy` otherwise), then is renamed into place
    (atomic). Remote `path`: the file is written to a local temporary folder and streamed to
    `path`. On an error nothing is published and the temporary file is removed.

        with local_then_copy(out / "sample_0.wav") as f:
            soundfile.write(f, wav, 16000)
    """
    p = as_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(p):
        tmp = p.parent / f"{p.stem}.tmp-{uuid.uuid4().hex[:12]}{p.suffix}"
        try:
            yield os.fspath(tmp)
            os.replace(tmp, p)
        finally:
            if tmp.exists():
                tmp.unlink()
        return
    with tempfile.TemporaryDirectory(prefix="avjax-") as d:
        local = os.path.join(d, p.name)
        yield local
        with open(local, "rb") as src, p.open("wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
