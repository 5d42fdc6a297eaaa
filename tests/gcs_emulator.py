"""A local GCS emulator on 127.0.0.1 for `gs://` tests (PyPI `gcp-storage-emulator`).

    with gcs_emulator(bucket="bkt") as env:      # env: variables that point clients at it
        subprocess.run([...], env={**os.environ, **env})

Clients are pointed at it by environment variables: `STORAGE_EMULATOR_HOST` for gcsfs
(etils.epath's fsspec back end; `EPATH_USE_TF=false`, since TensorFlow's GCS file system
cannot be pointed at an emulator) and `TENSORSTORE_GCS_HTTP_URL` for orbax's tensorstore.
The emulator runs in its own process, in memory; nothing leaves this machine.

One gap of the emulator is filled here: its media downloads lack the `x-goog-generation`
header that real GCS sends and tensorstore's OCDBT (orbax's format) needs for conditional
writes, so `_serve` adds it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator


def available() -> bool:
    """Whether the emulator and gcsfs are installed (the `test` extra)."""
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("gcp_storage_emulator", "gcsfs"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
    """Environment variables that send every GCS client of avjax to `url`."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "EPATH_USE_TF": "false",
        "GOOGLE_CLOUD_PROJECT": "avjax-test",
        # No credentials exist here: gcsfs and tensorstore must not look for a metadata server.
        "GCE_METADATA_HOST": "127.0.0.1:1",
        "GCE_METADATA_ROOT": "127.0.0.1:1",
        "NO_GCE_CHECK": "true",
    }


@contextlib.contextmanager
def gcs_emulator(bucket: str = "bkt", timeout_s: float = 60.0) -> Iterator[dict[str, str]]:
    """Starts the emulator with `bucket`; yields the client environment; stops it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, os.path.abspath(__file__), str(port), bucket]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"GCS emulator did not start on {url}: {cmd}") from None
                time.sleep(0.2)
        yield client_env(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _serve(port: int, bucket: str) -> None:
    """Runs the emulator in this process (until killed), downloads carrying generations."""
    from gcp_storage_emulator.handlers import objects

    plain_download = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain_download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # not found: the plain handler has answered 404
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    objects.download = download  # before `server` builds its routing table from it
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.run()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2])
