"""The `Task` interface: what train/eval/sample need to know about one paper's model.

`avjax/train`, `avjax/sample` and `avjax/eval` never import a model; they call a Task. A task
owns its model, its data pipeline, its loss and its inference hooks. Batches are dicts of
numpy arrays whose leading axis is this process's share of the global batch.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np

Batch = Mapping[str, np.ndarray]
Metrics = dict[str, jax.Array]


class Task(abc.ABC):
    """One model family: build data and model, define the loss, run inference.

    Attributes:
      config: the full experiment config.
      workdir: the experiment directory (checkpoints, tokenizers, samples, logs).
      read_only: True in sample/eval modes: data preparation must not write.
    """

    name: str = "task"

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = workdir
        # Set by main.run for --mode=sample|eval: prepare() loads what a checkpoint was
        # trained on and never builds, refits or rewrites it.
        self.read_only = False

    # --- data -------------------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self) -> dict[str, Any]:
        """Builds or loads corpora and tokenizers (idempotent); returns facts worth logging."""

    @abc.abstractmethod
    def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        """An endless, deterministic, checkpointable iterator of this process's batches."""

    @abc.abstractmethod
    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        """A fixed list of held-out batches (same every call)."""

    @abc.abstractmethod
    def dummy_batch(self) -> Batch:
        """A global-batch-shaped batch of zeros, used to initialise and to compile."""

    # --- model ------------------------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The linen module described by `config.model`."""

    def init_variables(self, model: nn.Module, rng: jax.Array, batch: Batch) -> Any:
        """Initial variables (params boxed with logical axis names)."""
        return model.init(rng, **self.model_inputs(batch))

    @abc.abstractmethod
    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        """Keyword arguments of `model.apply` taken from a batch."""

    @abc.abstractmethod
    def loss(
        self, model: nn.Module, params: Any, batch: Batch, rng: jax.Array
    ) -> tuple[jax.Array, Metrics]:
        """Returns `(loss_sum, metrics)`; `metrics["weight"]` is what loss_sum is a sum over.

        Summed (not averaged) so gradient accumulation and data parallelism weigh every
        target equally. Other metrics are sums too and are divided by the weight for logging.
        """

    def tokens_per_batch(self, batch: Batch) -> int:
        """Tokens in a batch, for tokens/s."""
        return int(sum(np.prod(v.shape) for k, v in batch.items() if k == "inputs"))

    def flops_per_token(self) -> float | None:
        """Analytic training FLOPs per token (6 × matmul params + attention), for MFU."""
        return None

    def compatibility(self) -> dict[str, Any]:
        """Config facts a checkpoint must share with this run to be restored."""
        return {"task": self.name, "model": self.config.model.to_dict()}

    # --- inference --------------------------------------------------------------------------
    def sample(self, model: nn.Module, params: Any, step: int) -> dict[str, Any]:
        """Generates outputs under `<workdir>/samples/`; returns a summary."""
        raise NotImplementedError(f"task {self.name!r} has no sampling mode")

    def evaluate(
        self, model: nn.Module, params: Any, step: int, eval_loss: float | None
    ) -> dict[str, Any]:
        """Task-specific evaluation beyond the held-out loss (reports, plots)."""
        return {}


def batches_of(it: Iterator[Batch], n: int) -> list[Batch]:
    """The first `n` items of an iterator (as a list)."""
    out = []
    for _ in range(n):
        out.append(next(it))
    return out
