"""The `Task` interface: what train/eval/sample need to know about one paper's model.

`avjax/train`, `avjax/sample` and `avjax/eval` never import a model; they call a Task. A task
owns its model, its data pipeline, its loss and its inference hooks. Batches are dicts of
numpy arrays whose leading axis is this process's share of the global batch.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np

Batch = Mapping[str, np.ndarray]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossContext:
    """What one loss evaluation may use besides params and batch (built by the train loop).

    Attributes:
      train: True in a train step (dropout on, batch statistics computed from the batch and
        updated); False in eval and sampling (stored statistics, no dropout).
      rng: the step's key (a function of seed, step, micro-batch and part only).
      rngs: one key per stream the task declares in `Task.rng_streams` (`dropout`, `noise`).
      model_state: the model's non-param collections, e.g. `{"batch_stats": ...}`.
      part: the named part being updated (`Task.parts`), None for a single model and in eval.
    """

    train: bool
    rng: jax.Array
    rngs: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    model_state: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    part: str | None = None

    def apply(self, model: nn.Module, params: Any, *args, **kwargs) -> tuple[Any, dict]:
        """`model.apply` with these collections and RNG streams; returns `(output,
        new_model_state)`. In training every non-param collection is mutable (and returned
        updated); in eval they are read only and returned unchanged."""
        variables = {"params": params, **self.model_state}
        mutable = list(self.model_state) if self.train and self.model_state else False
        out = model.apply(variables, *args, rngs=dict(self.rngs), mutable=mutable, **kwargs)
        if not mutable:
            return out, dict(self.model_state)
        out, updated = out
        return out, {**self.model_state, **updated}


class Task(abc.ABC):
    """One model family: build data and model, define the loss, run inference.

    Attributes:
      config: the full experiment config.
      workdir: the experiment directory (checkpoints, tokenizers, samples, logs).
      read_only: True in sample/eval modes: data preparation must not write.
      rng_streams: names of the RNG streams the model uses (`LossContext.rngs`), e.g.
        `("dropout", "noise")`; each is derived per step from (seed, step, name).
      parts: named models trained in alternation, each with its own optimizer state (a GAN:
        `("generator", "discriminator")`), stepped in this order every step; they are the
        top-level keys of the param tree. Empty: one model, one optimizer.
      model_state: the restored non-param collections (e.g. `batch_stats`) of the checkpoint
        being sampled or evaluated; set by `avjax.main` before `sample` and the evaluators.
        `self.variables(params)` gives what `model.apply` takes.
    """

    name: str = "task"
    rng_streams: tuple[str, ...] = ()
    parts: tuple[str, ...] = ()

    # The task's data (`avjax.data.module.DataModule`: `SpeechLMData`, `AVData`, ...): a task
    # that sets one gets the data methods below from it; a task without one overrides them.
    data: Any = None

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = workdir
        # Set by main.run for --mode=sample|eval: prepare() loads what a checkpoint was
        # trained on and never builds, refits or rewrites it.
        self.read_only = False
        self.model_state: dict[str, Any] = {}

    def variables(self, params: Any) -> dict[str, Any]:
        """`{"params": params, **model_state}` for `model.apply` in sampling and evaluation."""
        return {"params": params, **(self.model_state or {})}

    @property
    def read_only(self) -> bool:
        """Sample/eval: data preparation never writes (the data module's flag, if any)."""
        return self.data.read_only if self.data is not None else self._read_only

    @read_only.setter
    def read_only(self, value: bool) -> None:
        if self.data is not None:
            self.data.read_only = bool(value)
        else:
            self._read_only = bool(value)

    def _data_module(self) -> Any:
        if self.data is None:
            raise NotImplementedError(
                f"task {self.name!r} has no data module (self.data): override the data methods"
            )
        return self.data

    # --- data -------------------------------------------------------------------------------
    def prepare(self, read_only: bool | None = None) -> dict[str, Any]:
        """Builds or loads corpora and tokenizers (idempotent); returns facts worth logging."""
        return self._data_module().prepare(read_only)

    def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        """An endless, deterministic, checkpointable iterator of this process's batches."""
        return self._data_module().train_dataset(process_index, process_count)

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        """A fixed list of held-out batches (same every call)."""
        return self._data_module().eval_batches(process_index, process_count)

    def dummy_batch(self) -> Batch:
        """A global-batch-shaped batch of zeros, used to initialise and to compile."""
        return self._data_module().dummy_batch()

    # --- model ------------------------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The linen module described by `config.model`."""

    def init_variables(self, model: nn.Module, rng: jax.Array, batch: Batch) -> Any:
        """Initial variables (params boxed with logical axis names, and any other collection,
        e.g. `batch_stats`, which the loop keeps as `TrainState.model_state`)."""
        if self.rng_streams:
            rng = {
                "params": rng,
                **{n: jax.random.fold_in(rng, i + 1) for i, n in enumerate(self.rng_streams)},
            }
        return model.init(rng, **self.model_inputs(batch))

    @abc.abstractmethod
    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        """Keyword arguments of `model.apply` taken from a batch."""

    def loss(
        self, model: nn.Module, params: Any, batch: Batch, rng: jax.Array
    ) -> tuple[jax.Array, Metrics]:
        """Returns `(loss_sum, metrics)`; `metrics["weight"]` is what loss_sum is a sum over.

        Summed (not averaged) so gradient accumulation and data parallelism weigh every
        target equally. Other metrics are sums too and are divided by the weight for logging.
        A task whose model needs a train flag, mutable collections, named RNG streams or parts
        overrides `apply_loss` instead.
        """
        raise NotImplementedError(f"task {self.name!r} defines neither loss nor apply_loss")

    def apply_loss(
        self, model: nn.Module, params: Any, batch: Batch, ctx: LossContext
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        """`(loss_sum, metrics, new_model_state)` as `loss`, given a `LossContext`.

        With `parts`, it is called once per part with `ctx.part` set (gradients are taken
        with respect to `params[ctx.part]` only) and with `ctx.part=None` in eval. The
        default calls `loss(model, params, batch, ctx.rng)` and keeps the model state.
        """
        loss_sum, metrics = self.loss(model, params, batch, ctx.rng)
        return loss_sum, metrics, dict(ctx.model_state)

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
