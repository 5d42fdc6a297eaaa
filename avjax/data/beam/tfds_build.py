"""Beam stage `tfds`: an avjax speech corpus (`avjax.data.tfds`) built with TFDS' Beam support.

The launcher lists the corpus (its folders and transcripts: cheap) in reading order; the
workers decode and check the audio (`builder._load`, the builder's own code, so LibriLight's
VAD cuts too) and TFDS' Beam writer writes the ArrayRecord shards. Examples are keyed by
their position in reading order (`utterance * 10000 + piece`), which the writer sorts by
(the builders disable shuffling), so the dataset holds the same examples in the same order
as the single-process build and is read by `tfds.data_source` / `corpora.build` unchanged:
the Beam builder keeps the TFDS name, version and config of the corpus' builder.

`build_tfds` publishes the build as the prepared artifact the training path
(`avjax.data.speech.pipeline.tfds_dataset`) looks for: `<cache>/tfds/<corpus>-<fingerprint>` with
the same manifest fields, so training finds it current and builds nothing. Bad files with
`skip_bad` are skipped in the workers and counted (`skipped.json`, with the paths).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from typing import Any

import numpy as np

from avjax import io as io_lib
from avjax.data import artifacts
from avjax.data import audio as audio_lib
from avjax.data import tfds as corpora
from avjax.data.beam import pipeline_options, require_beam

REPORT = "prepare-tfds.json"
SKIPPED = "skipped.json"
PIECES = 10_000  # examples one file may give (LibriLight cuts), for the ordering key


def default_data_dir(cache: str, corpus: str, manual_dir: str, skip_bad: bool = False) -> str:
    """Where the training path caches the TFDS build of `manual_dir` (`<cache>/tfds/...`)."""
    tag = corpora.manual_dir_fingerprint(manual_dir) + ("-skipbad" if skip_bad else "")
    return os.path.join(os.path.abspath(os.path.expanduser(cache)), "tfds", f"{corpus}-{tag}")


@functools.cache
def beam_builder_class(corpus: str) -> type:
    """A subclass of the corpus' builder whose splits are Beam transforms (same TFDS name).

    Set `skipped_dir` on an instance to collect the skipped files (`skip_bad`) per split.
    """
    base = corpora.builder_class(corpus)
    ns = {
        "name": base.name,
        "__module__": __name__,
        "CORPUS_KEY": corpus,
        "skipped_dir": "",
        "_split_generators": _split_generators,
    }
    return type(f"{base.__name__}Beam", (base,), ns, skip_registration=True)


def _split_generators(self: Any, dl_manager: Any) -> dict[str, Any]:
    beam = require_beam()
    splits = self.check_manual_dir(dl_manager._manual_dir)  # noqa: SLF001
    config = self.builder_config.name if self.builder_config else ""
    out = {}
    for folder, split_dir in splits.items():
        split = corpora.split_name(folder)
        utts = list(enumerate(self._utterances(split_dir)))
        load = functools.partial(
            _examples, corpus=self.CORPUS_KEY, config=config, split=split, skip_bad=self.skip_bad
        )
        skipped = os.path.join(self.skipped_dir, f"{split}.json") if self.skipped_dir else ""
        out[split] = _LoadSplit(beam, utts, load, skipped)
    return out


def _LoadSplit(beam: Any, utts: list, load: Any, skipped_path: str) -> Any:  # noqa: N802
    """The PTransform of one split: utterances -> examples; skipped files to `skipped_path`."""

    class LoadSplit(beam.PTransform):
        def expand(self, root: Any) -> Any:
            res = (
                root
                | "Utterances" >> beam.Create(utts)
                | "Load" >> beam.FlatMap(load).with_outputs("skipped", main="examples")
            )
            if skipped_path:
                _ = (
                    res.skipped
                    | "Gather" >> beam.combiners.ToList()
                    | "WriteSkipped" >> beam.Map(_write_skipped, skipped_path)
                )
            return res.examples

    return LoadSplit()


def _write_skipped(rows: list[tuple[int, str]], path: str) -> None:
    io_lib.write_text_atomic(path, json.dumps([m for _, m in sorted(rows)]))


@functools.cache
def _loader(corpus: str, config: str) -> Any:
    """A builder instance in the worker, for its `_load` (which reads only its config)."""
    kwargs: dict[str, Any] = {"data_dir": os.path.join(tempfile.gettempdir(), "avjax-unused")}
    if config:
        kwargs["config"] = config
    return corpora.builder_class(corpus)(**kwargs)


def _examples(
    item: tuple[int, dict[str, Any]], *, corpus: str, config: str, split: str, skip_bad: bool
) -> Any:
    """One utterance -> its `(ordering key, example)` pairs (the fields of
    `SpeechCorpusBuilder._generate_examples`); a bad file raises unless `skip_bad`, then it
    goes to the `skipped` output as `(ordinal, message)`."""
    import apache_beam as beam

    ordinal, utt = item
    builder = _loader(corpus, config)
    try:
        if "error" in utt:
            raise ValueError(utt["error"])
        pieces = list(builder._load(utt))  # noqa: SLF001
    except (audio_lib.AudioError, ValueError) as e:
        if not skip_bad:
            raise
        beam.metrics.Metrics.counter("avjax.tfds", f"skipped_{split}").inc()
        yield beam.pvalue.TaggedOutput("skipped", (ordinal, f"{utt['path']}: {e}"))
        return
    for k, (fields, wav) in enumerate(pieces):
        yield (
            ordinal * PIECES + k,
            {
                "audio": corpora.base.to_int16(wav),
                "speaker": fields["speaker"],
                "document": fields["document"],
                builder.DOC_FEATURE: fields["doc"],
                "id": fields["id"],
                "index": int(fields["index"]),
                "text": fields.get("text", ""),
                "duration": np.float32(len(wav) / audio_lib.SAMPLE_RATE),
            },
        )


def default_cache() -> str:
    """$AVJAX_CACHE or ~/.cache/avjax (where the training path caches corpora)."""
    return os.environ.get("AVJAX_CACHE") or os.path.expanduser("~/.cache/avjax")


def build_tfds(
    corpus: str,
    manual_dir: str,
    *,
    data_dir: str = "",
    cache: str = "",
    config: str = "",
    skip_bad: bool = False,
    runner: str = "DirectRunner",
    num_workers: int = 1,
    beam_args: list[str] | None = None,
) -> dict[str, Any]:
    """Builds `corpus` from `manual_dir` with Beam as the training path's prepared artifact.

    Args:
      corpus: `librispeech | librilight | librispeech_long`.
      manual_dir: the corpus on disk (its layout: `avjax.data.tfds`).
      data_dir: the TFDS data_dir (default: `default_data_dir(cache, ...)`, where training
        looks; another folder is fine for `tools/tokenize_corpus.py` / stage `tokens`).
      config: builder config (LibriLight: `cut4min | cut30s | full`); "" for the default.
      skip_bad: skip and list bad files (`skipped.json`) instead of failing on the first.

    Returns the report (also in `<data_dir>/prepare-tfds.json`): `key`, `fields`,
    `data_dir`, `built` (False when a current build was there), splits' example counts.
    """
    import tensorflow_datasets as tfds

    manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
    tag = corpora.manual_dir_fingerprint(manual_dir) + ("-skipbad" if skip_bad else "")
    data_dir = data_dir or default_data_dir(cache or default_cache(), corpus, manual_dir, skip_bad)
    fields = {  # as avjax.data.speech.pipeline.tfds_dataset keys the same build
        "corpus": corpus,
        "manual_dir": manual_dir,
        "fingerprint": tag,
        "skip_bad": bool(skip_bad),
        "builder_config": str(config or ""),
        "version": str(corpora.builder_class(corpus).VERSION),
    }
    options = pipeline_options(runner, num_workers, beam_args)

    def build_into(tmp: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"data_dir": os.fspath(tmp), "skip_bad": skip_bad}
        if config:
            kwargs["config"] = config
        builder = beam_builder_class(corpus)(**kwargs)
        builder.skipped_dir = os.path.join(os.fspath(tmp), ".skipped")
        splits = builder.check_manual_dir(manual_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir, beam_options=options
            )
        )
        skipped = {}
        for folder in splits:
            path = os.path.join(builder.skipped_dir, corpora.split_name(folder) + ".json")
            with open(path) as f:
                skipped[folder] = json.load(f)
            os.remove(path)
        os.rmdir(builder.skipped_dir)
        io_lib.write_text_atomic(os.path.join(os.fspath(tmp), SKIPPED), json.dumps(skipped))
        return {"skipped": skipped}

    art = artifacts.prepare_artifact(
        data_dir, fields, build_into, what=f"the {corpus} TFDS dataset (Beam)"
    )
    builder = corpora.build(corpus, manual_dir, data_dir, skip_bad=skip_bad, config=config or None)
    report = {
        "stage": "tfds",
        "key": art.key,
        "fields": fields,
        "data_dir": os.fspath(data_dir),
        "built": art.built,
        "runner": runner,
        "num_workers": num_workers,
        "splits": {k: v.num_examples for k, v in builder.info.splits.items()},
        "skipped": art.info.get("skipped", {}),
    }
    io_lib.write_text_atomic(
        os.path.join(os.fspath(data_dir), REPORT), json.dumps(report, indent=1)
    )
    return report
