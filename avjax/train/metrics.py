"""Metric writers: TensorBoard + logging (clu) and `<workdir>/metrics.jsonl`.

Paths go through `avjax.io.as_path`, so a `gs://` workdir gets its TensorBoard events and
its `metrics.jsonl` in the bucket. A crash while a row is being written can leave a truncated
last line; `read_jsonl` skips it and `truncate_jsonl` (run on every start and resume)
rewrites the file without it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers

from avjax.eval.writers import StagedSummaryWriter, summary_writer  # noqa: F401
from avjax.io import PathLike, as_path, is_remote, write_text_atomic


class JsonlWriter(metric_writers.MetricWriter):
    """Appends one JSON object per written step: `{"step": 10, "loss": 2.3, ...}`.

    Local files are appended to; remote ones (object stores cannot append) are rewritten
    whole, atomically, on every write (the file holds one row per logged step: small).
    """

    def __init__(self, path: PathLike):
        self._path = as_path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._remote = is_remote(self._path)
        self._rows: list[str] = []
        self._f = None
        if self._remote and self._path.exists():
            self._rows = [json.dumps(r) + "\n" for r in read_jsonl(self._path)]
        else:
            self._f = self._path.open("a")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = {"step": int(step)}
        row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
        line = json.dumps(row) + "\n"
        if self._f is not None:
            self._f.write(line)
            self._f.flush()
        else:
            self._rows.append(line)
            write_text_atomic(self._path, "".join(self._rows))

    def write_summaries(self, step, values, metadata=None):  # noqa: D102 - not logged as JSON
        pass

    def write_images(self, step, images):  # noqa: D102
        pass

    def write_videos(self, step, videos):  # noqa: D102
        pass

    def write_audios(self, step, audios, *, sample_rate):  # noqa: D102
        pass

    def write_texts(self, step, texts):  # noqa: D102
        pass

    def write_histograms(self, step, arrays, num_buckets=None):  # noqa: D102
        pass

    def write_hparams(self, hparams):  # noqa: D102
        pass

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def create_writer(workdir: PathLike) -> metric_writers.MetricWriter:
    """TensorBoard + log + JSONL on process 0; logging only elsewhere."""
    if jax.process_index() != 0:
        return metric_writers.LoggingWriter()
    root = as_path(workdir)
    return metric_writers.MultiWriter(
        [
            metric_writers.LoggingWriter(),
            summary_writer(root),
            JsonlWriter(root / "metrics.jsonl"),
        ]
    )


def _parse(path: PathLike) -> tuple[list[dict[str, float]], bool]:
    """The rows of a metrics file and whether its last line was truncated (and dropped)."""
    lines = [x for x in as_path(path).read_text().splitlines() if x.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # a row cut short by a crash mid-write
                return rows, True
            raise ValueError(f"{path}, line {i + 1}: not a JSON row: {line[:80]!r}") from e
    return rows, False


def read_jsonl(path: PathLike) -> list[dict[str, float]]:
    """Reads `metrics.jsonl` back (for scripts and tests); a truncated last line is skipped.

    Raises:
      ValueError: a line other than the last is not JSON (naming the file and line).
    """
    return _parse(path)[0]


def truncate_jsonl(path: PathLike, last_step: int) -> None:
    """Keeps only rows logged at or before `last_step` (the step training restarts from) and
    drops a truncated last line; rewrites the file atomically if anything was dropped."""
    path = as_path(path)
    if jax.process_index() != 0 or not path.exists():
        return
    rows, cut = _parse(path)
    kept = [r for r in rows if r["step"] <= last_step]
    if cut or len(kept) != len(rows):
        logging.info(
            "%s: dropping %d row(s) after step %d%s",
            path,
            len(rows) - len(kept),
            last_step,
            " and a truncated last line" if cut else "",
        )
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
