"""TensorBoard writers for any folder: direct when local, staged and uploaded when remote.

Used by the train loop's writer (`avjax.train.metrics.create_writer`) and by evaluators'
reports, so the loop and the evaluators share one writer without importing each other.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from clu import metric_writers

from avjax.io import PathLike, as_path, is_remote


class StagedSummaryWriter(metric_writers.MetricWriter):
    """TensorBoard events for a remote folder, written locally and uploaded through epath.

    TensorFlow's own GCS client only talks to Google's endpoint (it cannot be pointed at an
    emulator or another object store), and object stores cannot append: events go to a local
    staging folder and each changed event file is copied whole to `logdir` at most every
    `upload_every_s` seconds, on `flush()` and on `close()`. A preempted job loses at most
    that interval of TensorBoard curves (metrics.jsonl and checkpoints are unaffected).
    """

    def __init__(self, logdir: PathLike, upload_every_s: float = 60.0):
        self._remote = as_path(logdir)
        self._local = tempfile.mkdtemp(prefix="avjax-tb-")
        self._inner = metric_writers.SummaryWriter(self._local)
        self._sizes: dict[str, int] = {}
        self._every = upload_every_s
        self._last = time.time()

    def _upload(self, force: bool = False) -> None:
        if not force and time.time() - self._last < self._every:
            return
        self._inner.flush()
        for folder, _, names in os.walk(self._local):
            for name in names:
                src = os.path.join(folder, name)
                rel = os.path.relpath(src, self._local)
                size = os.path.getsize(src)
                if self._sizes.get(rel) != size:
                    dst = self._remote / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with open(src, "rb") as f:
                        dst.write_bytes(f.read())
                    self._sizes[rel] = size
        self._last = time.time()

    def write_scalars(self, step, scalars):  # noqa: D102
        self._inner.write_scalars(step, scalars)
        self._upload()

    def write_summaries(self, step, values, metadata=None):  # noqa: D102
        self._inner.write_summaries(step, values, metadata)

    def write_images(self, step, images):  # noqa: D102
        self._inner.write_images(step, images)

    def write_videos(self, step, videos):  # noqa: D102
        self._inner.write_videos(step, videos)

    def write_audios(self, step, audios, *, sample_rate):  # noqa: D102
        self._inner.write_audios(step, audios, sample_rate=sample_rate)

    def write_texts(self, step, texts):  # noqa: D102
        self._inner.write_texts(step, texts)

    def write_histograms(self, step, arrays, num_buckets=None):  # noqa: D102
        self._inner.write_histograms(step, arrays, num_buckets)

    def write_hparams(self, hparams):  # noqa: D102
        self._inner.write_hparams(hparams)

    def flush(self) -> None:
        self._upload(force=True)

    def close(self) -> None:
        self._upload(force=True)
        self._inner.close()
        shutil.rmtree(self._local, ignore_errors=True)


def summary_writer(logdir: PathLike) -> metric_writers.MetricWriter:
    """A TensorBoard writer for `logdir`: direct when local, staged and uploaded when remote."""
    if is_remote(logdir):
        return StagedSummaryWriter(logdir)
    return metric_writers.SummaryWriter(os.fspath(as_path(logdir)))
