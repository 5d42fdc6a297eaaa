"""Corpus-scale data preparation as Apache Beam pipelines (`pip install avjax[beam]`).

Three stages, each a thin Beam driver around the single-machine implementation it scales
out (one implementation per stage, so Beam and non-Beam outputs are the same bytes):

  tokens  `avjax.data.beam.tokens`: audio -> features -> units of an already fitted
          `UnitTokenizer`, one element per ArrayRecord shard of `avjax.data.speech.tokenize`
          (written by `tokenize.tokenize_split` itself), then the token stores.
  crops   `avjax.data.beam.crops`: face / mouth crops of a video folder, one element per
          video (`avjax.data.video.crops.run_one`).
  tfds    `avjax.data.beam.tfds`: a TFDS speech corpus built with TFDS' own Beam support
          (the audio is decoded in the workers).

Every element is idempotent: an output that is complete (a shard's `.done` marker, a video's
`info.json`) is skipped, so rerunning after a failure or preemption redoes only what is
missing. Each stage writes `<out>/prepare-<stage>.json` with the prepared-artifact key of
what it made (`avjax.data.artifacts.fingerprint` of its fields) and a report of the run.

Runners: the DirectRunner (several local processes with `num_workers > 1`) by default;
`DataflowRunner`, `FlinkRunner`, `SparkRunner` take their usual Beam flags (see
`tools/prepare.py` and `launch/prepare_dataflow.py`). Workers and the launcher must see the
same output folder (a shared filesystem; the tokens stage writes local-file ArrayRecord).

Nothing outside this package imports Beam.
"""

from __future__ import annotations

from typing import Any

INSTALL_HINT = "Apache Beam is not installed: `pip install avjax[beam]` (or apache-beam)"


def require_beam() -> Any:
    """The `apache_beam` module, or an ImportError saying how to install it."""
    try:
        import apache_beam as beam
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(INSTALL_HINT) from e
    return beam


def pipeline_options(
    runner: str = "DirectRunner", num_workers: int = 1, beam_args: list[str] | None = None
) -> Any:
    """`PipelineOptions` for `runner`; with the DirectRunner and `num_workers > 1`, that many
    local worker processes (`direct_running_mode=multi_processing`, unless `beam_args` set
    `--direct_running_mode=multi_threading`, say). `beam_args` are extra
    Beam flags (e.g. `--project=... --region=... --temp_location=gs://...` for Dataflow)."""
    beam = require_beam()
    kwargs: dict[str, Any] = {"runner": runner}
    if runner == "DirectRunner":
        kwargs["direct_num_workers"] = max(1, int(num_workers))
        if not any(a.startswith("--direct_running_mode") for a in beam_args or []):
            kwargs["direct_running_mode"] = "multi_processing" if num_workers > 1 else "in_memory"
    return beam.options.pipeline_options.PipelineOptions(list(beam_args or []), **kwargs)
