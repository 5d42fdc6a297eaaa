r"""Long-form evaluation of trained workdirs side by side (SpeechSSM vs the Transformer baseline).

  python tools/eval_longform.py \
      --config=configs/speechssm.py --workdir=workdir/speechssm \
      --baseline_config=configs/speechtransformer.py --baseline_workdir=workdir/speechtf \
      --seconds=240 --prompt_seconds=10 --num_prompts=4 --out=workdir/longform_eval

Restores the newest checkpoint of each workdir, takes prompts from the held-out split of the
first one (both workdirs must tokenise the corpus into the same units: the same data settings),
continues them with each model and writes `report.md`, `plots/*.png`, `eval.json`,
`tensorboard/` and `audio/` into `--out` (see `avjax/eval/longform.py`). Config overrides work
as in `avjax.main` (`--config.sample.temperature=0.8`, `--baseline_config.model...`). Without
`--baseline_workdir` one model is evaluated. SC-L (transcripts) needs the `eval` extra:
`pip install -e '.[eval]'`; `--transcripts=auto` skips it with a note when absent.
"""

from __future__ import annotations

import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
# Run as a script, tools/ is sys.path[0], where a tools/tokenize.py would shadow the standard
# library's `tokenize` (imported by jax): drop it, add the repository root instead.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _TOOLS]
sys.path.insert(0, os.path.dirname(_TOOLS))

import json  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config of --workdir.", lock_config=False)
_BASE_CONFIG = config_flags.DEFINE_config_file(
    "baseline_config", None, "Config of --baseline_workdir.", lock_config=False
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir (e.g. SpeechSSM).")
_BASE_WORKDIR = flags.DEFINE_string("baseline_workdir", None, "Second trained workdir.")
_NAME = flags.DEFINE_string("name", "", "Display name of --workdir ('' = its task name).")
_BASE_NAME = flags.DEFINE_string("baseline_name", "", "Display name of --baseline_workdir.")
for _flag in ("name", "baseline_name"):  # a name is also a file name: audio/<name>_<i>.wav
    flags.register_validator(
        _flag,
        lambda v: v in ("", None) or (v not in (".", "..") and not set(v) & set("/\\\x00")),
        message=f"--{_flag} must be a plain name (no '/', '\\', NUL, or '.'/'..' alone)",
    )
_OUT = flags.DEFINE_string("out", None, "Output folder for the report.")
_SECONDS = flags.DEFINE_float("seconds", None, "Continuation length (default: config.sample).")
_PROMPT = flags.DEFINE_float("prompt_seconds", None, "Prompt length (default: config.sample).")
_SLICE = flags.DEFINE_float("slice_seconds", 0.0, "Slice length; 0 = automatic (<= 16 slices).")
_NUM = flags.DEFINE_integer("num_prompts", None, "Prompts (default: config.sample.batch_size).")
_TEMP = flags.DEFINE_float("temperature", None, "Sampling temperature (default: config.sample).")
_TOPK = flags.DEFINE_integer("top_k", None, "Top-k (default: config.sample).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (default: config.sample).")
_TRANSCRIPTS = flags.DEFINE_enum(
    "transcripts", "auto", ["auto", "true", "false"], "SC-L with pocketsphinx + MiniLM."
)
_SAVE_AUDIO = flags.DEFINE_bool("save_audio", True, "Keep the decoded WAVs.")
_ASR_SECONDS = flags.DEFINE_float(
    "asr_seconds", 0.0, "SC-L: transcribe only the first this many seconds of each slice (0: all)."
)


def _restore(config, workdir: str):
    """(task, model, params, step) of the newest checkpoint in `workdir`."""
    from avjax.tasks import get_task
    from avjax.train import loop
    from avjax.train.sharding import apply_preset, make_mesh

    apply_preset(config)
    task = get_task(config, workdir)
    mesh = make_mesh(config.mesh)
    trainer, params, step = loop.restore_params(task, config, workdir, mesh)
    return task, trainer.model, params, step


def _same_docs(a, b) -> bool:
    import numpy as np

    if len(a) != len(b):
        return False
    la, lb = getattr(a, "lengths", None), getattr(b, "lengths", None)
    if la is not None and lb is not None and not np.array_equal(la, lb):
        return False
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))  # streamed, not held


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from avjax.eval import longform

    if (_BASE_WORKDIR.value is None) != (_BASE_CONFIG.value is None):
        raise app.UsageError("--baseline_workdir and --baseline_config go together")
    runs = [(_CONFIG.value, _WORKDIR.value, _NAME.value)]
    if _BASE_WORKDIR.value:
        runs.append((_BASE_CONFIG.value, _BASE_WORKDIR.value, _BASE_NAME.value))
    cfg = longform.LongformConfig.from_config(_CONFIG.value)
    for field, flag in [
        ("seconds", _SECONDS),
        ("prompt_seconds", _PROMPT),
        ("num_prompts", _NUM),
        ("temperature", _TEMP),
        ("top_k", _TOPK),
        ("seed", _SEED),
    ]:
        if flag.value is not None:
            setattr(cfg, field, flag.value)
    cfg.slice_seconds = _SLICE.value
    cfg.transcripts = {"auto": "auto", "true": True, "false": False}[_TRANSCRIPTS.value]
    cfg.save_audio = _SAVE_AUDIO.value
    cfg.asr_seconds = _ASR_SECONDS.value

    entries, docs, vocoder, step = [], None, None, 0
    for config, workdir, name in runs:
        # The sampler (and a Transformer's KV cache, sized from config.sample) must cover the
        # prompt + continuation evaluated here.
        config.sample.seconds = float(cfg.seconds)
        config.sample.prompt_seconds = float(cfg.prompt_seconds)
        task, model, params, s = _restore(config, workdir)
        d, v = longform.task_eval_data(task)
        if docs is None:
            docs, vocoder, step = d, v, s
        elif not _same_docs(docs, d):
            raise ValueError(
                f"{workdir}: its held-out units differ from {runs[0][1]}'s (another corpus or "
                "unit tokenizer); train both on the same data settings to compare them"
            )
        label = name or task.name
        if any(e.name == label for e in entries):
            label = f"{label}_{len(entries)}"
        entries.append(longform.ModelEntry(label, model, params))
        logging.info("%s: step %d from %s", label, s, workdir)
    summary = longform.evaluate_longform(entries, docs, vocoder, _OUT.value, cfg, step=step)
    print(json.dumps(summary, indent=1, default=str))
    print(f"report: {os.path.join(_OUT.value, 'report.md')}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir", "out"])
    app.run(main)
