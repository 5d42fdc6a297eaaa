"""Evaluators from the config (`config.evals`): registry, cadence, the loop and --mode=eval.

The toy evaluators below are registered from this test file: they plug into the train loop
and `avjax.main` without any edit of the loop or of a task.
"""

import importlib.util
import json
import os

import ml_collections
import pytest
from toy_task import ToyTask, single_device_mesh, toy_config

from avjax import main as avjax_main
from avjax.eval import evaluators
from avjax.io import as_path, write_text_atomic
from avjax.tasks import REGISTRY
from avjax.train import loop
from avjax.train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@evaluators.register("toy_step_score")
def _toy_step_score(ctx: evaluators.EvalContext, options) -> dict:
    """A scalar that names the step it was computed at, times `scale`."""
    return {"score": float(ctx.step) * float(options.get("scale", 1.0))}


@evaluators.register("toy_report")
class _ToyReport(evaluators.Evaluator):
    """Writes a file and returns its path beside the held-out loss it computed itself."""

    def run(self, ctx):
        path = ctx.out_dir(self.name, "report.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        loss = ctx.heldout_loss(ctx.params)
        write_text_atomic(path, f"step {ctx.step}: loss {loss}\n")
        return {"loss": loss, "report": os.fspath(path)}


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(REGISTRY, "toy", "toy_task:ToyTask")


def _evals(**specs) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({name: dict(spec) for name, spec in specs.items()})


def test_a_test_registered_evaluator_runs_in_the_loop_at_its_cadence(tmp_path):
    cfg = toy_config(steps=4, log_every=1, eval_every=0, checkpoint_every=4)
    cfg.evals = _evals(toy={"type": "toy_step_score", "every": 2, "scale": 0.5})
    loop.train(ToyTask(cfg, str(tmp_path)), cfg, str(tmp_path), single_device_mesh())
    rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["toy/score"]) for r in rows if "toy/score" in r] == [(2, 1.0), (4, 2.0)]
    assert not any("eval_loss" in r for r in rows)  # config.evals replaces the defaults


def test_cadence_every_and_last_step():
    ev = evaluators.build("x", {"type": "toy_step_score", "every": 3})
    assert [s for s in range(1, 5) if ev.due(s, last=s == 4)] == [3, 4]
    never = evaluators.build("y", {"type": "toy_step_score"})  # every=0: --mode=eval only
    assert never.every == 0 and not any(never.due(s, last=s == 4) for s in range(1, 5))
    assert (ev.prefix, never.prefix, ev.options) == ("x/", "y/", {})
    with pytest.raises(ValueError, match=r"evals.z.every=-1"):
        evaluators.build("z", {"type": "toy_step_score", "every": -1})


def test_unknown_type_names_it_and_the_known_ones():
    with pytest.raises(ValueError, match=r"evals.wer.type='wer_typo'.*'longform'.*'loss'"):
        evaluators.build("wer", {"type": "wer_typo"})
    with pytest.raises(ValueError, match=r"evals.wer has no `type`"):
        evaluators.build("wer", {"every": 2})
    cfg = toy_config()
    cfg.evals = _evals(ok={"type": "loss"}, bad={"type": "nope"})
    with pytest.raises(ValueError, match="'nope'"):
        evaluators.from_config(cfg)


def test_defaults_are_the_held_out_loss_and_task_evaluate():
    evs = evaluators.from_config(toy_config(eval_every=4))
    assert [(e.name, e.type, e.every, e.prefix) for e in evs] == [
        ("eval", "loss", 4, "eval_"),
        ("task", "task", 0, ""),
    ]
    # The model configs: eval_loss every train.eval_every (one knob), long-form in eval mode.
    for name in ("speechssm", "speechtransformer"):
        path = os.path.join(REPO, "configs", f"{name}.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config()
        c.train.eval_every = 7
        evs = {e.name: e for e in evaluators.from_config(c)}
        assert (evs["eval"].type, evs["eval"].every, evs["eval"].prefix) == ("loss", 7, "eval_")
        assert (evs["longform"].type, evs["longform"].every) == ("longform", 0)


def test_longform_options_are_checked():
    from avjax.eval import longform

    cfg = toy_config()
    ev = evaluators.build("lf", {"type": "longform", "secnds": 4.0})
    assert isinstance(ev, longform.LongformEvaluator)
    ctx = evaluators.EvalContext(ToyTask(cfg, "w"), None, None, 1, "w")
    with pytest.raises(ValueError, match=r"evals.lf: unknown options \['secnds'\]"):
        ev.run(ctx)


def test_eval_mode_runs_every_evaluator(tmp_path, toy_registered):
    cfg = toy_config(steps=2, log_every=1, eval_every=0, checkpoint_every=2)
    cfg.mesh.update({"data": -1, "sequence": 1, "preset": "", "dcn_data": 1})
    cfg.evals = _evals(
        eval={"type": "loss", "every": 0, "prefix": "eval_", "perplexity": True},
        toy={"type": "toy_step_score"},
        rep={"type": "toy_report"},
    )
    assert avjax_main.run(cfg, str(tmp_path), "train") == {"step": 2}
    rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert not any(k.startswith(("toy", "rep", "eval")) for r in rows for k in r)  # every=0
    summary = avjax_main.run(cfg, str(tmp_path), "eval")
    assert summary["step"] == 2 and summary["toy/score"] == 2.0
    assert summary["eval_perplexity"] > 1 and summary["rep/loss"] == summary["eval_loss"]
    report = as_path(summary["rep/report"])
    assert report == tmp_path / "eval" / "step_2" / "rep" / "report.txt"
    assert report.read_text().startswith("step 2: loss ")
    json.dumps(summary)  # what main logs


def test_evaluators_a_task_module_registers_are_known_to_main(tmp_path, monkeypatch):
    """`config.evals` may name a type that only the task's own module registers: main imports
    that module before it checks the evaluators (here it then stops for want of a checkpoint,
    not for an unknown evaluator type)."""
    (tmp_path / "task_with_evaluator.py").write_text(
        "from avjax.eval import evaluators\n"
        "from toy_task import ToyTask\n\n"
        "@evaluators.register('only_in_task_module')\n"
        "def _score(ctx, options):\n"
        "    return {'score': 1.0}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(REGISTRY, "toy_ev", "task_with_evaluator:ToyTask")
    cfg = toy_config(steps=2)
    cfg.task = "toy_ev"
    cfg.evals = _evals(mine={"type": "only_in_task_module"})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        avjax_main.run(cfg, str(tmp_path / "w"), "eval")
    assert "only_in_task_module" in evaluators.known_types()
