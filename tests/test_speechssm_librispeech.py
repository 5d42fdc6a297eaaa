"""SpeechSSM from a LibriSpeech-layout folder via the main CLI: build, tokenise, train, reuse."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_speechssm import REPO, TINY, _config

from avjax.data.speech.token_store import TokenStore
from avjax.data.tfds import LayoutError, testing
from avjax.tasks import get_task
from avjax.train.metrics import read_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _write_corpus(root):
    # 2 train chapters x 4 utterances x 1.2 s, 1 dev chapter: ~12 s of audio in all.
    return testing.write_librispeech(
        str(root),
        {
            "train-clean-100": [("19", "198", 4), ("103", "1240", 4)],
            "dev-clean": [("84", "121", 3)],
        },
        seconds=1.2,
    )


def test_main_cli_trains_on_a_librispeech_folder_and_reuses_the_cache(tmp_path):
    _write_corpus(tmp_path / "ls")
    w = str(tmp_path / "w")
    settings = {
        **TINY,
        "data.name": "librispeech",
        "data.manual_dir": str(tmp_path / "ls"),
        "data.cache_dir": str(tmp_path / "cache"),
        "data.num_units": 16,
        "data.seq_len": 32,
        "data.pack": True,
        "data.fit_minutes": 1.0,
        "data.min_vectors_per_unit": 10,  # ~240 vectors for 16 units
        "data.vocoder_steps": 0,  # the per-unit mel table only: no vocoder training to compile
        "train.steps": 3,
        "train.eval_every": 3,
    }
    args = [
        sys.executable,
        "-m",
        "avjax.main",
        "--config=configs/speechssm.py",
        f"--workdir={w}",
        *[f"--config.{k}={v}" for k, v in settings.items()],
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    facts = json.load(open(os.path.join(w, "data_facts.json")))
    assert facts["corpus"] == "librispeech" and facts["num_units"] == 16
    assert facts["train_splits"] == ["train_clean_100"] and facts["eval_split"] == "dev_clean"
    # Chapters are documents: 2 train chapters of 4 x 30 units, 1 dev chapter of 3 x 30.
    assert (facts["train_docs"], facts["train_tokens"]) == (2, 240)
    assert (facts["heldout_docs"], facts["heldout_tokens"]) == (1, 90)
    assert facts["skipped_bad_files"] == 0 and facts["tokenize_hours_per_cpu_minute"] > 0
    metrics = read_jsonl(os.path.join(w, "metrics.jsonl"))
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert any("eval_loss" in m for m in metrics)
    tfds_dirs = os.listdir(os.path.join(tmp_path, "cache", "tfds"))
    assert len(tfds_dirs) == 1 and tfds_dirs[0].startswith("librispeech-")
    # Same folder, new workdir, in-process: the TFDS build is reused, units are refitted.
    cfg = _config(tmp_path / "cache", **settings)
    task = get_task(cfg, str(tmp_path / "w2"))
    assert task.prepare()["train_tokens"] == 240
    assert os.listdir(os.path.join(tmp_path, "cache", "tfds")) == tfds_dirs


def test_bad_file_strict_vs_skip_bad_and_missing_folder(tmp_path):
    paths = _write_corpus(tmp_path / "ls")
    testing.corrupt(paths[1], "corrupt")
    base = {
        "data.name": "librispeech",
        "data.manual_dir": str(tmp_path / "ls"),
        "data.num_units": 16,
        "data.fit_minutes": 1.0,
        "data.min_vectors_per_unit": 10,
        "data.vocoder_steps": 2,
    }
    cfg = _config(tmp_path / "cache", **base)
    from avjax.data.audio import AudioError

    with pytest.raises(AudioError, match="19-198-0001.flac"):
        get_task(cfg, str(tmp_path / "a")).prepare()
    cfg = _config(tmp_path / "cache", **base, **{"data.skip_bad": True})
    facts = get_task(cfg, str(tmp_path / "b")).prepare()
    assert facts["skipped_bad_files"] == 1 and facts["train_tokens"] == 210
    cfg = _config(tmp_path / "cache", **{**base, "data.manual_dir": str(tmp_path / "none")})
    with pytest.raises(LayoutError, match=r"(?s)does not exist.*LibriSpeech/<split>"):
        get_task(cfg, str(tmp_path / "c")).prepare()
    cfg = _config(tmp_path / "cache", **{**base, "data.name": "libri"})
    with pytest.raises(ValueError, match="librispeech_long"):
        get_task(cfg, str(tmp_path / "d")).prepare()


def test_split_choice():
    from avjax.tasks.speechssm import _choose_splits

    ls = ["dev_clean", "dev_other", "train_clean_100", "train_other_500"]
    assert _choose_splits(ls, "", "") == (["train_clean_100", "train_other_500"], "dev_clean")
    assert _choose_splits(ls, "train_other_500", "dev_other") == (["train_other_500"], "dev_other")
    assert _choose_splits(["small", "medium"], "", "") == (["small", "medium"], "")
    long = ["dev_clean", "test_clean"]
    assert _choose_splits(long, "", "") == (["test_clean"], "dev_clean")
    with pytest.raises(ValueError, match="has"):
        _choose_splits(ls, "train", "")


def test_librilight_files_are_documents_held_out_by_fraction(tmp_path):
    testing.write_librilight(
        str(tmp_path / "ll"),
        {"small": [("1", "book_a", [2.0, 2.0]), ("2", "book_b", [2.0, 2.0])]},
    )
    cfg = _config(
        tmp_path / "cache",
        **{
            "data.name": "librilight",
            "data.manual_dir": str(tmp_path / "ll"),
            "data.builder_config": "cut30s",
            "data.heldout_fraction": 0.25,
            "data.num_units": 8,
            "data.fit_minutes": 1.0,
            "data.min_vectors_per_unit": 10,  # 141 vectors for 8 units
            "data.vocoder_steps": 0,
        },
    )
    task = get_task(cfg, str(tmp_path / "w"))
    facts = task.prepare()
    # Each 2 s file: 4 VAD blocks of 0.4 s speech kept -> one 1.9 s segment, 47 units.
    assert facts["eval_split"].startswith("heldout_fraction")
    assert (facts["train_docs"], facts["heldout_docs"]) == (3, 1)
    assert facts["train_tokens"] == 3 * 47 and facts["heldout_tokens"] == 47
    # Documents come memory-mapped from the consolidated store: train as uint16 views,
    # held-out as int32 copies; one store split into train / held-out by document.
    train, heldout = task.data.docs["train"], task.data.docs["heldout"]
    assert isinstance(train, TokenStore) and np.shares_memory(train[0], train._parts[0].mmap)
    assert heldout[0].dtype == np.int32 and len(heldout[0]) == 47
    assert set(train.doc_ids).isdisjoint(heldout.doc_ids) and len(facts["token_stores"]) == 1
    batch = next(iter(task.train_dataset(0, 1)))
    assert batch["inputs"].shape == (cfg.train.batch_size, cfg.data.seq_len)
    # MFCC units through the config: fitted, recorded in the tokenizer, same 25 Hz counts.
    cfg.data.features = "mfcc"
    task = get_task(cfg, str(tmp_path / "mfcc"))
    facts = task.prepare()
    assert task.data.tokenizer.features == "mfcc"
    assert facts["train_tokens"] == 3 * 47 and facts["heldout_tokens"] == 47
