"""Metric writers: TensorBoard + logging (clu) and `<workdir>/metrics.jsonl`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
    """Appends one JSON object per written step: `{"step": 10, "loss": 2.3, ...}`."""

    def __init__(self, path: str):
        self._path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._f = open(path, "a")  # noqa: SIM115 - kept open for the run

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = {"step": int(step)}
        row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

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
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard + log + JSONL on process 0; logging only elsewhere."""
    if jax.process_index() != 0:
        return metric_writers.LoggingWriter()
    return metric_writers.MultiWriter(
        [
            metric_writers.create_default_writer(workdir, asynchronous=False),
            JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
        ]
    )


def read_jsonl(path: str) -> list[dict[str, float]]:
    """Reads `metrics.jsonl` back (for scripts and tests)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
