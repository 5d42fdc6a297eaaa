"""Beam stage `tokens`: a corpus -> 25 Hz unit shards (ArrayRecord) + token stores.

One Beam element per output shard `(split, shard)`. A worker tokenises its shard with
`avjax.data.speech.tokenize.tokenize_split(..., process_index=shard, process_count=num_shards)`:
the very code the single-machine path runs, so shards are byte-equal to it, and a shard
with its `.done` marker is skipped (a rerun redoes only missing shards; a shard is written to
a temporary file and renamed, and a killed writer's leftovers are removed on retry). The
split and tokenizer manifests (`tokenize.json`) are checked by every worker, so another
tokenizer or source in the same folder is refused.

After the pipeline the launcher consolidates each finished split into its memory-mapped
token store (`avjax.data.speech.token_store.consolidate`, single pass, tens of M tokens/s) and
writes `<out>/prepare-tokens.json`: the artifact key of the shards + stores (tokenizer
fingerprint, each split's manifest and store key) and this run's report.

Pointing training at the output: the training path (`avjax.data.speech.pipeline.prepare_tfds`)
tokenises into `<workdir>/units/tokens-<tokenizer fingerprint>/` with source id
`<tfds full name>@<data_dir>:<split>` and `data.num_shards` shards; a Beam run with that
`out_dir`, the same TFDS data_dir and `num_shards` leaves training only done shards to skip
and a current store to open (`source_id_for` gives the id).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from avjax import io as io_lib
from avjax.data import artifacts
from avjax.data.beam import pipeline_options, require_beam
from avjax.data.speech import tokenize

REPORT = "prepare-tokens.json"


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A split of a prepared avjax TFDS corpus (`avjax.data.tfds`), opened in each worker.

    Attributes:
      corpus: `librispeech | librilight | librispeech_long`.
      data_dir: the TFDS data_dir it was built in (see stage `tfds`).
      config: builder config name (LibriLight: `cut4min`, ...); "" for the default.
    """

    corpus: str
    data_dir: str
    config: str = ""

    def builder(self) -> Any:
        from avjax.data import tfds as corpora

        kwargs: dict[str, Any] = {"data_dir": self.data_dir}
        if self.config:
            kwargs["config"] = self.config
        b = corpora.builder_class(self.corpus)(**kwargs)
        if not b.is_prepared():
            raise FileNotFoundError(
                f"{self.corpus} is not built in {self.data_dir}: run the `tfds` stage first"
            )
        return b

    def open(self, split: str) -> Any:
        return self.builder().as_data_source(split=split)


def source_id_for(builder: Any, data_dir: str, split: str) -> str:
    """The source id the training path (`pipeline.prepare_tfds`) keys a split's shards with."""
    return tokenize.tfds_source_id(builder, data_dir, split)


def effective_num_shards(num_examples: int, num_shards: int) -> int:
    """The shard count `tokenize.tokenize_split` uses for `num_shards` (0: ~2,000 per shard)."""
    if num_shards <= 0:
        num_shards = max(1, -(-num_examples // 2000))
    return min(num_shards, max(num_examples, 1))


class TokenizeShardFn:
    """Beam DoFn body: `(split, shard)` -> that shard written (or found done) + its stats.

    `sources` maps split -> a picklable random-access source (e.g. a scanned
    `tokenize.DirSource`) or a `TfdsSource` (opened once per worker).
    """

    def __init__(
        self,
        sources: dict[str, Any],
        tokenizer_dir: str,
        out_dir: str,
        num_shards: dict[str, int],
        source_ids: dict[str, str],
        hubert_batch_size: int = 1,
    ):
        self.sources = sources
        self.hubert_batch_size = int(hubert_batch_size)
        self.tokenizer_dir = tokenizer_dir
        self.out_dir = out_dir
        self.num_shards = num_shards
        self.source_ids = source_ids
        self._tok = None
        self._open: dict[str, Any] = {}

    def setup(self) -> None:
        from avjax.data.speech.units import UnitTokenizer

        self._tok = UnitTokenizer.load(self.tokenizer_dir)

    def _source(self, split: str) -> Any:
        if split not in self._open:
            src = self.sources[split]
            self._open[split] = src.open(split) if isinstance(src, TfdsSource) else src
        return self._open[split]

    def process(self, element: tuple[str, int]) -> list[dict[str, Any]]:
        split, shard = element
        if self._tok is None:
            self.setup()
        c0 = time.process_time()
        source, tok, n = self._source(split), self._tok, self.num_shards[split]
        if self.hubert_batch_size > 1 and tok.features == "hubert":
            from avjax.data.beam.hubert_batch import BatchedTokenizer

            rows = range(*tokenize.shard_bounds(len(source), n)[shard])
            tok = BatchedTokenizer(tok, source, rows, self.hubert_batch_size)
        stats = tokenize.tokenize_split(
            source,
            tok,
            self.out_dir,
            split,
            num_shards=n,
            process_index=shard,
            process_count=n,
            source_id=self.source_ids[split],
            progress=False,
        )
        return [
            {
                "split": split,
                "shard": shard,
                "written": bool(stats.shards_done),
                "examples": stats.examples,
                "audio_seconds": stats.audio_seconds,
                "tokens": stats.tokens,
                "wall_seconds": stats.wall_seconds,
                "cpu_seconds": time.process_time() - c0,
                "pid": os.getpid(),
            }
        ]


def _write_json(path: str, rows: list[dict[str, Any]]) -> None:
    io_lib.write_text_atomic(path, json.dumps(sorted(rows, key=lambda r: str(r)), indent=1))


def run_tokens(
    sources: dict[str, Sequence[dict[str, Any]] | TfdsSource],
    tokenizer_dir: str,
    out_dir: str,
    *,
    source_ids: dict[str, str],
    num_shards: int = 0,
    runner: str = "DirectRunner",
    num_workers: int = 1,
    beam_args: list[str] | None = None,
    consolidate: bool = True,
    join_documents: bool = True,
    hubert_batch_size: int = 1,
) -> dict[str, Any]:
    """Tokenises every split of `sources` into `out_dir/<split>/` with Beam; returns the report.

    Args:
      sources: {split: random-access source (picklable: it travels to the workers) or
        `TfdsSource`}.
      tokenizer_dir: a fitted `UnitTokenizer` folder every worker can read.
      out_dir: output root (shared by the workers and this process).
      source_ids: {split: id kept in the split's manifest} (`source_id_for` for TFDS).
      num_shards: per split (0: ~2,000 examples per shard), as `tokenize.tokenize_split`.
      runner, num_workers, beam_args: see `avjax.data.beam.pipeline_options`.
      consolidate: also write each split's token store (`token_store.consolidate`).
      hubert_batch_size: > 1 with a HuBERT tokenizer: utterances' chunks are encoded in
        batches of this many on the worker's device (`avjax.data.beam.hubert_batch`; units
        may then differ from the unbatched path's at k-means boundaries).

    The report (also in `out_dir/prepare-tokens.json`) holds `key` and `fields` (the artifact
    key of what is in `out_dir`), `shards_written`, `shards_skipped`, audio hours, CPU
    seconds of the workers and wall seconds.
    """
    beam = require_beam()
    from avjax.data.speech import token_store
    from avjax.data.speech.units import UnitTokenizer

    tok = UnitTokenizer.load(tokenizer_dir)
    out_dir = os.path.abspath(os.fspath(out_dir))
    counts = {s: len(_open_here(src, s)) for s, src in sources.items()}
    shards = {s: effective_num_shards(n, num_shards) for s, n in counts.items()}
    elements = [(s, i) for s in sorted(shards) for i in range(shards[s])]
    fn = TokenizeShardFn(
        dict(sources), tokenizer_dir, out_dir, shards, dict(source_ids), hubert_batch_size
    )
    stats_path = os.path.join(out_dir, ".prepare-tokens-stats.json")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    with beam.Pipeline(options=pipeline_options(runner, num_workers, beam_args)) as p:
        _ = (
            p
            | "Shards" >> beam.Create(elements)
            | "Spread" >> beam.Reshuffle()
            | "Tokenize" >> beam.FlatMap(_call, fn)
            | "Gather" >> beam.combiners.ToList()
            | "Write" >> beam.Map(_write_json_fn, stats_path)
        )
    wall = time.time() - t0
    with open(stats_path) as f:
        rows = json.load(f)
    fields: dict[str, Any] = {"tokenizer": tokenize.tokenizer_fingerprint(tok), "splits": {}}
    for split in sorted(shards):
        with open(os.path.join(out_dir, split, tokenize.MANIFEST)) as f:
            entry: dict[str, Any] = {"shards": json.load(f)}
        if consolidate:
            st = token_store.consolidate(
                out_dir, split, num_units=tok.num_units, join_documents=join_documents
            )
            entry["store"] = {
                "path": os.path.relpath(st.path, out_dir),
                "num_units": tok.num_units,
                "join_documents": bool(join_documents),
            }
        fields["splits"][split] = entry
    return _report(out_dir, fields, rows, wall, runner, num_workers)


def _call(element: tuple[str, int], fn: TokenizeShardFn) -> list[dict[str, Any]]:
    return fn.process(element)


def _write_json_fn(rows: list[dict[str, Any]], path: str) -> None:
    _write_json(path, rows)


def _open_here(src: Any, split: str) -> Any:
    return src.open(split) if isinstance(src, TfdsSource) else src


def _report(
    out_dir: str,
    fields: dict[str, Any],
    rows: list[dict[str, Any]],
    wall: float,
    runner: str,
    num_workers: int,
) -> dict[str, Any]:
    """Writes and returns `prepare-tokens.json` (artifact key + this run's numbers)."""
    written = [r for r in rows if r["written"]]
    audio = sum(r["audio_seconds"] for r in written)
    cpu = sum(r["cpu_seconds"] for r in written)
    report = {
        "stage": "tokens",
        "key": artifacts.fingerprint(fields),
        "fields": fields,
        "runner": runner,
        "num_workers": num_workers,
        "shards_written": sorted([r["split"], r["shard"]] for r in written),
        "shards_skipped": len(rows) - len(written),
        "audio_hours": audio / 3600,
        "worker_cpu_seconds": cpu,
        "wall_seconds": wall,
        "hours_per_cpu_minute": audio / 3600 / max(cpu / 60, 1e-9) if written else 0.0,
    }
    io_lib.write_text_atomic(os.path.join(out_dir, REPORT), json.dumps(report, indent=1))
    return report
