"""The data module of spoken LMs over 25 Hz speech units (SpeechSSM, SpeechTransformer, ...).

A task composes one `SpeechLMData` with its model, loss, evaluators and sampling hooks:

    data = SpeechLMData.from_config(config, workdir)
    facts = data.prepare()                      # corpus -> units + vocoder -> documents
    it = data.train_dataset(process_index, process_count)   # endless, checkpointable
    held = data.eval_batches(process_index, process_count)  # fixed held-out windows
    prompt = data.prompts(batch_size=2, prompt_seconds=1.0)  # [2, 25] int32

Preparation is `avjax.data.speech.pipeline.prepare_speech` (every step a prepared artifact of
`avjax.data.artifacts`: built once by process 0, frozen under a checkpoint, never written by
read-only runs). Batches are `{"inputs", "targets", "segment_pos": [batch, seq_len] int32,
"mask": [batch, seq_len] float32}` (`avjax.data.speech.lm_windows`). This module knows no model.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import numpy as np
from etils import epath

from avjax.data.module import DataModule
from avjax.data.speech import lm_windows, pipeline
from avjax.data.speech.units import UNIT_RATE
from avjax.io import as_path

Batch = dict[str, np.ndarray]


def cache_root(data_cfg: Any) -> epath.Path:
    """Where corpora are cached: `config.data.cache_dir`, $AVJAX_CACHE or ~/.cache/avjax.

    A local folder (it may be node-local on a pod: each host then builds its own copy)."""
    return as_path(
        data_cfg.cache_dir or os.environ.get("AVJAX_CACHE") or os.path.expanduser("~/.cache/avjax")
    )


def units_compatibility(dc: Any) -> dict[str, Any]:
    """The `config.data` fields that define the unit vocabulary (a checkpoint's stamp).

    Other units would make trained weights meaningless. Log-mel workdirs keep the stamp they
    had before other features existed (no `features` keys)."""
    units = {k: dc[k] for k in ("name", "minutes", "manual_dir", "num_units", "kmeans_iters")}
    if str(dc.get("features", "logmel")) != "logmel":
        units.update({k: dc.get(k) for k in ("features", "hubert_dir", "hubert_layer")})
    return units


def document_facts(docs: dict[str, Any], num_units: int) -> dict[str, Any]:
    """Token counts, hours and the unigram entropy of the train / held-out documents.

    `docs["train"]` is a list of `[tokens]` arrays or a memory-mapped `TokenStore`
    (counted in chunks, never loaded whole)."""
    train, heldout = docs["train"], docs["heldout"]
    if hasattr(train, "unigram_counts"):
        counts = train.unigram_counts(num_units)
        train_tokens = int(train.lengths.sum())
    else:
        counts = np.bincount(np.concatenate(train), minlength=num_units)
        train_tokens = int(sum(len(d) for d in train))
    p = counts[counts > 0] / counts.sum()
    lengths = getattr(heldout, "lengths", None)
    return {
        "num_units": num_units,
        "unigram_entropy_nats": float(-(p * np.log(p)).sum()),
        "train_tokens": train_tokens,
        "train_hours": train_tokens / UNIT_RATE / 3600,
        "heldout_tokens": int(
            lengths.sum() if lengths is not None else sum(len(d) for d in heldout)
        ),
        "train_docs": len(train),
        "heldout_docs": len(heldout),
    }


def _check_prepared(dc: Any, tokenizer: Any, docs: dict[str, Any]) -> None:
    """Errors naming the config field when the prepared data cannot serve this config."""
    if not docs["heldout"]:
        raise ValueError("the corpus has no held-out documents: raise config.data.heldout_fraction")
    want = str(dc.get("features", "logmel"))
    if getattr(tokenizer, "features", "logmel") != want:
        raise ValueError(
            f"config.data.features={want!r}, but the units of data.name={dc.name!r} are "
            f"{tokenizer.features}: other features are fitted for the real corpora only "
            "(librispeech, librilight, librispeech_long)"
        )


class SpeechLMData(DataModule):
    """Unit documents of one corpus, cut into LM windows; prepared once, lazily.

    Fields as `DataModule`: `data` is `config.data` (corpus, units, windows: `seq_len`, `pack`);
    `workdir` receives the units, token stores and data_facts.json; `seed` fixes the units, the
    held-out choice and the shuffling.
    """

    # --- preparation ------------------------------------------------------------------------
    def prepare(self, read_only: bool | None = None) -> dict[str, Any]:
        """Builds the corpus, the unit tokenizer/decoder and the documents once; loads after.

        `read_only` (default: the `read_only` attribute; sampling, evaluation): nothing is
        written to the workdir; units or token stores that are not there (or were made from
        other settings) are errors naming the path. All processes call this together (process
        0 builds, the others wait). Returns facts worth logging (also written to
        `<workdir>/data_facts.json` unless read-only).
        """
        if self._prepared is not None:
            return self._prepared["facts"]
        dc = self.data
        read_only = self._resolve_read_only(read_only)
        ctx = pipeline.Context(
            as_path(self.workdir),
            cache_root(dc),
            seed=self.seed,
            read_only=read_only,
            refit_units=bool(dc.get("refit_units", False)),
        )
        prepared = pipeline.prepare_speech(dc, ctx)
        _check_prepared(dc, prepared.tokenizer, prepared.docs)
        facts = {**document_facts(prepared.docs, prepared.tokenizer.num_units), **prepared.extra}
        self._prepared = {
            "facts": facts,
            "tokenizer": prepared.tokenizer,
            "vocoder": prepared.vocoder,
            "docs": prepared.docs,
        }
        self._write_facts(facts, read_only)
        return facts

    @property
    def docs(self) -> dict[str, Any]:
        """`{"train", "heldout"}`: sequences of `[tokens]` unit documents (after prepare)."""
        return self._get("docs")

    @property
    def tokenizer(self) -> Any:
        """The unit tokenizer (`avjax.data.speech.units.UnitTokenizer`)."""
        return self._get("tokenizer")

    @property
    def vocoder(self) -> Any:
        """The unit vocoder (`avjax.data.speech.vocoder.UnitVocoder`): units -> mel -> audio."""
        return self._get("vocoder")

    def compatibility(self) -> dict[str, Any]:
        """`{"units": ...}`: what a checkpoint trained on these data must share."""
        return {"units": units_compatibility(self.data)}

    # --- batches ----------------------------------------------------------------------------
    def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        """Endless shuffled `[batch_size // process_count, seq_len]` windows (checkpointable)."""
        self.prepare()
        return lm_windows.train_windows(
            self.docs["train"],
            int(self.data.seq_len),
            self.per_process_batch(process_count),
            seed=self.seed,
            process_index=process_index,
            process_count=process_count,
            pack=bool(self.data.pack),
        )

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        """`num_eval_batches` fixed held-out batches (this process's share)."""
        self.prepare()
        return lm_windows.eval_windows(
            self.docs["heldout"],
            int(self.data.seq_len),
            self.per_process_batch(process_count),
            self.num_eval_batches,
            process_index,
            process_count,
        )

    def dummy_batch(self) -> Batch:
        """A global `[batch_size, seq_len]` batch of zeros (initialisation, compilation)."""
        shape = (self.batch_size, int(self.data.seq_len))
        return {
            "inputs": np.zeros(shape, np.int32),
            "targets": np.zeros(shape, np.int32),
            "segment_pos": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
            "mask": np.ones(shape, np.float32),
        }

    # --- sampling ---------------------------------------------------------------------------
    def prompts(self, batch_size: int, prompt_seconds: float) -> np.ndarray:
        """`[batch_size, prompt_len]` int32: the starts of held-out documents (cycled).

        `prompt_len = max(1, round(prompt_seconds * 25))`; a shorter document is an error."""
        self.prepare()
        prompt_len = max(1, int(round(prompt_seconds * UNIT_RATE)))
        heldout = self.docs["heldout"]
        prompts = []
        for i in range(int(batch_size)):
            doc = heldout[i % len(heldout)]
            if len(doc) < prompt_len:
                raise ValueError(
                    f"held-out document {i} has {len(doc) / UNIT_RATE:.1f} s < "
                    f"config.sample.prompt_seconds={prompt_seconds}"
                )
            prompts.append(doc[:prompt_len])
        return np.stack(prompts)
