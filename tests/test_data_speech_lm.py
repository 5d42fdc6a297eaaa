"""The spoken-LM data module and the tasks composed over it (no corpus is built here)."""

import importlib.util
import os

import numpy as np
import pytest

from avjax.data.speech import speech_lm
from avjax.tasks import get_task
from avjax.tasks.speechssm import SpeechSSMTask
from avjax.tasks.speechtransformer import SpeechTransformerTask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, f"configs/{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


UNITS = {
    "name": "default",
    "minutes": 120.0,
    "manual_dir": "",
    "num_units": 256,
    "kmeans_iters": 30,
}


def test_compatibility_stamps_of_existing_workdirs_are_unchanged():
    # The stamps workdirs were trained under before tasks became compositions: any change
    # refuses their checkpoints.
    ssm = get_task(_load("speechssm"), "/nowhere")
    assert ssm.compatibility() == {
        "task": "speechssm",
        # `out_init_scale` (added later) only shapes a fresh init: not part of the stamp
        "model": {
            k: v for k, v in _load("speechssm").model.to_dict().items() if k != "out_init_scale"
        },
        "units": UNITS,
        "seed": 0,
    }
    assert list(ssm.compatibility()) == ["task", "model", "units", "seed"]
    tf_cfg = _load("speechtransformer")
    stamp = get_task(tf_cfg, "/nowhere").compatibility()
    assert stamp["task"] == "speechtransformer" and stamp["units"] == UNITS
    assert set(tf_cfg.model) - set(stamp["model"]) == {"max_len", "decode_block"}
    hubert = _load("speechssm")
    hubert.data.update({"name": "librispeech", "features": "hubert", "hubert_dir": "/x"})
    assert get_task(hubert, "/nowhere").compatibility()["units"] == {
        **UNITS,
        "name": "librispeech",
        "features": "hubert",
        "hubert_dir": "/x",
        "hubert_layer": 6,
    }


def test_tasks_compose_one_data_module_and_never_inherit_each_other():
    assert SpeechSSMTask not in SpeechTransformerTask.__mro__
    assert SpeechTransformerTask not in SpeechSSMTask.__mro__
    for name in ("speechssm", "speechtransformer"):
        task = get_task(_load(name), "/nowhere")
        assert isinstance(task.data, speech_lm.SpeechLMData)
        task.read_only = True  # (main.py for --mode=sample|eval): the data module's flag
        assert task.data.read_only and task.read_only


def _prepared_data(**kw):
    """A SpeechLMData with in-memory documents in place of a prepared corpus."""
    cfg = _load("speechssm")
    cfg.data.seq_len = 8
    cfg.train.batch_size, cfg.train.eval_batches = 2, 1
    data = speech_lm.SpeechLMData.from_config(cfg, "/nowhere")
    rng = np.random.default_rng(0)
    docs = {
        "train": [rng.integers(0, 16, n).astype(np.int32) for n in (30, 41)],
        "heldout": [np.arange(40, dtype=np.int32) % 16, np.arange(30, dtype=np.int32) % 7],
    }
    facts = speech_lm.document_facts(docs, 16)
    data._prepared = {"facts": facts, "tokenizer": None, "vocoder": None, "docs": docs}
    return data


def test_batches_prompts_and_facts_of_prepared_documents():
    with pytest.raises(RuntimeError, match="before prepare"):
        _ = speech_lm.SpeechLMData.from_config(_load("speechssm"), "/nowhere").docs
    data = _prepared_data()
    assert data.facts["train_tokens"] == 71 and data.facts["heldout_docs"] == 2
    assert 0 < data.facts["unigram_entropy_nats"] <= np.log(16)
    dummy = data.dummy_batch()
    assert {k: v.shape for k, v in dummy.items()} == {k: (2, 8) for k in dummy}
    batch = next(iter(data.train_dataset(0, 1)))
    assert batch["inputs"].shape == (2, 8) and batch["inputs"].dtype == np.int32
    (held,) = data.eval_batches(0, 1)
    np.testing.assert_array_equal(held["targets"][0], np.arange(1, 9))
    # Prompts: the first 25 units (1 s) of the held-out documents, cycled over the batch.
    prompts = data.prompts(3, 1.0)
    assert prompts.shape == (3, 25)
    np.testing.assert_array_equal(prompts[2], prompts[0])
    with pytest.raises(ValueError, match="held-out document 1 has 1.2 s < .*prompt_seconds=1.5"):
        data.prompts(2, 1.5)
