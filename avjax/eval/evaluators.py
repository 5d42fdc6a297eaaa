r"""Evaluators from the config (big_vision's `config.evals`): named, each with its cadence.

  c.evals = ml_collections.ConfigDict()
  c.evals.eval = dict(type="loss", every=100, prefix="eval_")   # metrics.jsonl: eval_loss
  c.evals.longform = dict(type="longform", every=0, seconds=240.0)

Each entry of `config.evals` is one evaluator: its key is its name, `type` a registered
evaluator, `every` its cadence in training steps (0: only in `--mode=eval`; > 0: at every
multiple of it and at the last step, and in `--mode=eval`), `prefix` the key prefix of what it
writes (default `"<name>/"`), and every other key is its own option. The train loop runs the
ones that are due after a step and writes their scalars through its writer (metrics.jsonl,
TensorBoard); `--mode=eval` runs all of them and returns their summaries.

An evaluator is a class (subclass of `Evaluator`) or a function `fn(ctx, options) -> dict`,
registered under a type name:

  @evaluators.register("wer")
  def wer(ctx: evaluators.EvalContext, options) -> dict[str, float | str]:
      ...  # ctx.task, ctx.model, ctx.params, ctx.step, ctx.out_dir(...)
      return {"wer": 0.12, "report": "/path/report.md"}

Numbers in the returned dict are scalars (written as `<prefix><key>`), strings are files it
wrote (logged, and returned in the summary). A module that registers evaluators is imported
by whoever uses them (a test, a task module, or `BUILTIN` below for the library's own), so a
new metric plugs in without editing the loop or a task.

Without `config.evals` the defaults are today's: the held-out loss every
`config.train.eval_every` steps (`eval_loss`) and, in `--mode=eval`, `Task.evaluate`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
from absl import logging

from avjax.io import PathLike, as_path

# type -> module that registers it on import (imported only when a config names the type).
BUILTIN = {"longform": "avjax.eval.longform"}
_REGISTRY: dict[str, Callable[[str, Mapping[str, Any]], Evaluator]] = {}
_COMMON = ("type", "every", "prefix")


@dataclasses.dataclass
class EvalContext:
    """What an evaluator gets.

    Attributes:
      task: the `Task` (data, `prepare()` facts, hooks).
      model: the task's linen module.
      params: its parameters (sharded as the train state's).
      step: the training step evaluated.
      workdir: the experiment directory (a path or a URL).
      mode: "train" (inside the train loop) or "eval" (`--mode=eval`).
      heldout_loss: `params -> mean held-out loss per target` through the trainer's jitted,
        sharded eval step; None where there are no held-out batches.
      results: the prefixed summaries of the evaluators run before this one at this step.
    """

    task: Any
    model: Any
    params: Any
    step: int
    workdir: PathLike
    mode: str = "eval"
    heldout_loss: Callable[[Any], float] | None = None
    results: dict[str, Any] = dataclasses.field(default_factory=dict)

    def out_dir(self, *parts: str):
        """`<workdir>/eval/step_<step>/<parts...>` (an `epath.Path`; not created)."""
        return as_path(self.workdir).joinpath("eval", f"step_{self.step}", *parts)


class Evaluator:
    """One named evaluator of `config.evals`: `every`, `prefix` and its own `options`."""

    def __init__(self, name: str, spec: Mapping[str, Any]):
        self.name = name
        self.type = str(spec["type"])
        self.every = int(spec.get("every", 0))
        if self.every < 0:
            raise ValueError(f"config.evals.{name}.every={self.every}: must be >= 0")
        self.prefix = str(spec.get("prefix", f"{name}/"))
        self.options = {k: v for k, v in spec.items() if k not in _COMMON}

    def due(self, step: int, last: bool) -> bool:
        """Whether to run after training step `step` (`last`: the final step)."""
        return self.every > 0 and (step % self.every == 0 or last)

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        """`{key: number (a scalar) | str (a file written)}`, keys without the prefix."""
        raise NotImplementedError


class _FunctionEvaluator(Evaluator):
    fn: Callable[[EvalContext, Mapping[str, Any]], dict[str, Any]]

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        return self.fn(ctx, self.options)


def register(type_name: str) -> Callable:
    """Decorator: registers an `Evaluator` subclass or a function `fn(ctx, options)`."""

    def deco(obj):
        if isinstance(obj, type) and issubclass(obj, Evaluator):
            _REGISTRY[type_name] = obj
        elif callable(obj):
            _REGISTRY[type_name] = type(
                f"{type_name}_evaluator", (_FunctionEvaluator,), {"fn": staticmethod(obj)}
            )
        else:
            raise TypeError(f"@register({type_name!r}) needs an Evaluator class or a function")
        return obj

    return deco


def known_types() -> list[str]:
    return sorted({*_REGISTRY, *BUILTIN})


def build(name: str, spec: Mapping[str, Any]) -> Evaluator:
    """The evaluator `config.evals.<name>` describes.

    Raises:
      ValueError: no `type`, or a type nobody registered (naming it and the known ones).
    """
    spec = spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else dict(spec)
    kind = spec.get("type")
    if not kind:
        raise ValueError(f"config.evals.{name} has no `type`; known types: {known_types()}")
    if kind not in _REGISTRY and kind in BUILTIN:
        importlib.import_module(BUILTIN[kind])
    if kind not in _REGISTRY:
        raise ValueError(
            f"config.evals.{name}.type={kind!r} is not a registered evaluator; known types: "
            f"{known_types()} (register one with @avjax.eval.evaluators.register({kind!r}) "
            "in a module imported before training)"
        )
    return _REGISTRY[kind](name, spec)


def default_specs(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """The evaluators of a config without `evals`: held-out loss every
    `config.train.eval_every` steps, and `Task.evaluate` in `--mode=eval`."""
    every = int(config.train.get("eval_every", 0) or 0)
    return {
        "eval": {"type": "loss", "every": every, "prefix": "eval_"},
        "task": {"type": "task", "every": 0, "prefix": ""},
    }


def from_config(config: ml_collections.ConfigDict) -> list[Evaluator]:
    """The evaluators of `config.evals` (in order), or `default_specs` when it has none."""
    specs = config.get("evals")
    specs = default_specs(config) if specs is None else specs
    return [build(name, spec) for name, spec in specs.items()]


def uses_heldout_loss(evaluators: list[Evaluator]) -> bool:
    return any(e.type == "loss" for e in evaluators)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in summary.items() if _is_number(v) and math.isfinite(float(v))}


def run(
    evaluators: list[Evaluator],
    ctx: EvalContext,
    writer: Any = None,
    *,
    last: bool = False,
) -> dict[str, Any]:
    """Runs the evaluators (all of them in `ctx.mode == "eval"`, else those due at
    `ctx.step`), in order; writes their finite scalars at `ctx.step` through `writer` (a clu
    `MetricWriter`, or None) and returns `{<prefix><key>: value}` of all of them."""
    out: dict[str, Any] = {}
    for ev in evaluators:
        if ctx.mode != "eval" and not ev.due(ctx.step, last):
            continue
        ctx.results = out
        summary = {f"{ev.prefix}{k}": v for k, v in ev.run(ctx).items()}
        out.update(summary)
        scalars = _scalars(summary)
        if writer is not None and scalars:
            writer.write_scalars(ctx.step, scalars)
        files = {k: v for k, v in summary.items() if isinstance(v, str)}
        logging.info(
            "step %d: %s: %s",
            ctx.step,
            ev.name,
            ", ".join(
                [f"{k}={v:.4g}" for k, v in scalars.items()]
                + [f"{k}: {v}" for k, v in files.items()]
            ),
        )
    return out


# --- built-in evaluators ------------------------------------------------------------------


@register("loss")
def heldout_loss(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, Any]:
    """The mean held-out loss per target (`loss`), and `perplexity` = exp(loss) when
    `options["perplexity"]`; nothing where the task has no held-out batches."""
    if ctx.heldout_loss is None:
        return {}
    loss = float(ctx.heldout_loss(ctx.params))
    out: dict[str, Any] = {"loss": loss}
    if options.get("perplexity", False):
        out["perplexity"] = math.exp(loss) if loss < 700 else math.inf
    return out


@register("facts")
def data_facts(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, Any]:
    """Numbers among the task's `prepare()` facts: those named in `options["keys"]`
    (comma-separated), or all of them."""
    facts = ctx.task.prepare()
    keys = [k.strip() for k in str(options.get("keys", "")).split(",") if k.strip()]
    missing = [k for k in keys if k not in facts]
    if missing:
        raise ValueError(f"task {ctx.task.name!r} has no data facts {missing}; has {sorted(facts)}")
    return {k: v for k, v in facts.items() if (not keys or k in keys) and _is_number(v)}


@register("task")
def task_evaluate(ctx: EvalContext, options: Mapping[str, Any]) -> dict[str, Any]:
    """`Task.evaluate(model, params, step, eval_loss)` (the task's own hook, the fallback for
    configs without `evals`); `eval_loss` is the summary key `options["loss_key"]`
    (default "eval_loss") of an evaluator run before it, else None."""
    eval_loss = ctx.results.get(str(options.get("loss_key", "eval_loss")))
    return dict(ctx.task.evaluate(ctx.model, ctx.params, ctx.step, eval_loss))
