"""`DataModule`: what a task's data is (one per modality family, composed into tasks).

A task (`avjax.tasks.base.Task`) holds one data module as `task.data` and gets its data
methods from it. A data module prepares its artifacts once and lazily (corpora, tokenizers,
caches; see `avjax.data.artifacts`), then serves this process's share of the batches:

    data = SpeechLMData.from_config(config, workdir)     # or AVData, MeshData, TTAIDData
    facts = data.prepare()                               # idempotent; all processes call it
    it = data.train_dataset(process_index, process_count)  # endless, checkpointable (grain)
    held = data.eval_batches(process_index, process_count)  # a fixed list of held-out batches
    zeros = data.dummy_batch()                            # global-batch shapes (init, compile)

Batches are dicts of numpy arrays whose leading axis is `batch_size // process_count`
(`dummy_batch`: `batch_size`). In sampling and evaluation `read_only` is set: `prepare` then
loads what a checkpoint was trained on and never builds, refits or writes.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Self

import grain
import numpy as np

from avjax.io import as_path, write_text_atomic

Batch = Mapping[str, np.ndarray]


@dataclasses.dataclass
class DataModule(abc.ABC):
    """The shared fields and the interface of every data module.

    Attributes:
      data: `config.data` (each module documents its fields).
      workdir: the experiment folder (`data_facts.json`, fitted tokenizers, ...).
      seed: the config's seed (held-out choice, shuffling, augmentation).
      batch_size: the global batch (each process gets `batch_size // process_count`).
      num_eval_batches: held-out batches per evaluation.
      read_only: sampling / evaluation: `prepare` never writes.
    """

    data: Any
    workdir: str = ""
    seed: int = 0
    batch_size: int = 8
    num_eval_batches: int = 1
    read_only: bool = False
    _prepared: dict[str, Any] | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: Any, workdir: str) -> Self:
        """From an experiment config (`data`, `seed`, `train.batch_size`, `.eval_batches`)."""
        return cls(
            config.data,
            workdir,
            seed=int(config.seed),
            batch_size=int(config.train.batch_size),
            num_eval_batches=int(config.train.eval_batches),
        )

    @abc.abstractmethod
    def prepare(self, read_only: bool | None = None) -> dict[str, Any]:
        """Builds (or, read-only, loads) what the batches need, once; returns facts to log."""

    @abc.abstractmethod
    def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        """An endless, deterministic, checkpointable iterator of this process's batches."""

    @abc.abstractmethod
    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        """A fixed list of this process's held-out batches (the same every call)."""

    @abc.abstractmethod
    def dummy_batch(self) -> Batch:
        """A global-batch-shaped batch of zeros (initialisation and compilation)."""

    def compatibility(self) -> dict[str, Any]:
        """What a checkpoint trained on these data must share with a run that resumes it
        (compared by `avjax.train.checkpoint`; a mismatch names the field)."""
        return {}

    @property
    def facts(self) -> dict[str, Any]:
        """What `prepare` returned (after prepare)."""
        return self._get("facts")

    def _write_facts(self, facts: dict[str, Any], read_only: bool) -> None:
        """`<workdir>/data_facts.json` (atomically; local or gs://), by process 0, unless
        read-only or without a workdir."""
        import jax

        if self.workdir and not read_only and jax.process_index() == 0:
            write_text_atomic(
                as_path(self.workdir) / "data_facts.json", json.dumps(facts, indent=2)
            )

    def _resolve_read_only(self, read_only: bool | None) -> bool:
        """`prepare`'s argument, or the module's `read_only` flag when it is None."""
        return self.read_only if read_only is None else bool(read_only)

    def _get(self, name: str) -> Any:
        """One prepared item; an error naming the module if `prepare` has not run."""
        if self._prepared is None:
            raise RuntimeError(f"{type(self).__name__}.{name} before prepare()")
        return self._prepared[name]

    def per_process_batch(self, process_count: int) -> int:
        """`batch_size // process_count`; an error naming the field when it does not divide."""
        if self.batch_size % process_count:
            raise ValueError(
                f"config.train.batch_size={self.batch_size} is not divisible by the "
                f"{process_count} processes"
            )
        return self.batch_size // process_count
