"""Tokenising a corpus to ArrayRecord: records, sharding over processes, resuming, the CLI."""

import os
import subprocess
import sys

import numpy as np
import pytest

from avjax.data import tfds as corpora
from avjax.data.speech import tokenize
from avjax.data.speech import units as units_lib
from avjax.data.tfds import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    testing.write_librispeech(
        str(root / "m"),
        {"train-clean-100": [("19", "198", 3), ("103", "1240", 3)], "dev-clean": [("84", "1", 2)]},
        seconds=0.5,
    )
    builder = corpora.build("librispeech", root / "m", root / "tfds")
    source = builder.as_data_source(split="train_clean_100")
    feats = [units_lib.unit_features(tokenize.to_float(source[i]["audio"])) for i in range(6)]
    tok = units_lib.UnitTokenizer.fit(feats, num_units=8, iters=3)
    tok.save(str(root / "tokenizer"))
    return root, builder, source, tok


def _read(out, split):
    return list(tokenize.read_split(out, split))


def test_record_roundtrip():
    units = np.array([0, 7, 65535], np.int32)
    r = tokenize.decode_record(tokenize.encode_record(units, {"id": "a", "text": "é"}))
    np.testing.assert_array_equal(r["units"], units)
    assert r["id"] == "a" and r["text"] == "é" and r["num_tokens"] == 3
    big = tokenize.decode_record(tokenize.encode_record(np.array([70000]), {}))
    assert big["units"].tolist() == [70000]


def test_resume_after_deleting_a_marker_gives_the_same_output(corpus, tmp_path):
    root, _, source, tok = corpus
    out = str(tmp_path / "units")
    first = tokenize.tokenize_split(source, tok, out, "train", num_shards=3, progress=False)
    assert (first.shards_done, first.examples) == (3, 6)
    records = _read(out, "train")
    assert [r["id"] for r in records] == [f"19-198-{i:04d}" for i in range(3)] + [
        f"103-1240-{i:04d}" for i in range(3)
    ]
    for i, r in enumerate(records):  # 0.5 s -> 12 units at 25 Hz
        np.testing.assert_array_equal(r["units"], tok.encode(tokenize.to_float(source[i]["audio"])))
        assert len(r["units"]) == 12 and r["speaker"] in {"19", "103"}
    assert records[4]["text"] == "WORDS OF UTTERANCE 1 IN CHAPTER 1240"
    shard1 = tokenize.shard_path(out, "train", 1, 3)
    before = {p: os.path.getmtime(p) for p in tokenize.split_status(out, "train")[0]}
    os.remove(shard1[: -len(".array_record")] + ".done")
    with pytest.raises(FileNotFoundError, match="not tokenised yet"):
        _read(out, "train")
    again = tokenize.tokenize_split(source, tok, out, "train", num_shards=3, progress=False)
    assert (again.shards_done, again.shards_skipped, again.examples) == (1, 2, 2)
    after = _read(out, "train")
    assert [r["id"] for r in after] == [r["id"] for r in records]
    for a, b in zip(records, after, strict=True):
        np.testing.assert_array_equal(a["units"], b["units"])
    # Only the unfinished shard was rewritten.
    for p, t in before.items():
        assert (os.path.getmtime(p) == t) == (p != shard1)
    docs = tokenize.documents(iter(after))
    assert [(d, s, len(u)) for d, s, u in docs] == [("19-198", "19", 36), ("103-1240", "103", 36)]


def test_leftovers_of_a_killed_shard_writer_are_removed(corpus, tmp_path):
    _, _, source, tok = corpus
    out = tmp_path / "u"
    shard = tokenize.shard_path(str(out), "train", 0, 2)
    os.makedirs(os.path.dirname(shard))
    for stale in (shard + ".tmp-12345", tokenize.done_path(shard) + ".tmp"):
        open(stale, "w").close()  # a writer SIGKILLed mid-shard (old and new temp names)
    tokenize.tokenize_split(source, tok, out, "train", num_shards=2, progress=False)
    assert sorted(os.listdir(out / "train")) == [
        "tokenize.json",
        "units-00000-of-00002.array_record",
        "units-00000-of-00002.done",
        "units-00001-of-00002.array_record",
        "units-00001-of-00002.done",
    ]


def test_processes_split_the_shards(corpus, tmp_path):
    root, _, source, tok = corpus
    out = str(tmp_path / "units")
    a = tokenize.tokenize_split(
        source, tok, out, "train", num_shards=4, process_index=0, process_count=2, progress=False
    )
    assert a.shards_done == 2 and len(tokenize.split_status(out, "train")[1]) == 2
    b = tokenize.tokenize_split(
        source, tok, out, "train", num_shards=4, process_index=1, process_count=2, progress=False
    )
    assert b.shards_done == 2 and a.examples + b.examples == 6
    assert len(_read(out, "train")) == 6
    other = units_lib.UnitTokenizer(tok.centroids[::-1], tok.mean, tok.std)
    with pytest.raises(ValueError, match="other settings"):
        tokenize.tokenize_split(source, other, out, "train", num_shards=4, progress=False)


def test_cli_tokenises_a_built_corpus_and_reports_throughput(corpus, tmp_path):
    root, _, _, _ = corpus
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "tokenize_corpus.py"),
        "--corpus=librispeech",
        f"--manual_dir={root / 'm'}",
        f"--data_dir={root / 'tfds'}",
        f"--tokenizer={root / 'tokenizer'}",
        f"--out={tmp_path / 'u'}",
        "--num_shards=2",
        "--no_progress",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "h audio/min/process" in r.stdout and "total: 4 shards written" in r.stdout
    assert len(_read(str(tmp_path / "u"), "dev_clean")) == 2
    r2 = subprocess.run(
        cmd + ["--consolidate"], capture_output=True, text=True, env=env, timeout=600
    )
    assert "total: 0 shards written, 4 already done" in r2.stdout, r2.stdout + r2.stderr[-2000:]
    assert "dev_clean: token store" in r2.stdout and "M tokens/s" in r2.stdout, r2.stdout
    from avjax.data.speech.token_store import TokenStore, store_path

    store = TokenStore.open(store_path(tmp_path / "u", "dev_clean"))
    assert store.doc_ids == ["84-1"] and store.num_tokens == 2 * 12


def test_fit_units_on_mfcc_features_tokenises_with_them(corpus, tmp_path, monkeypatch):
    from avjax.data.speech import features

    _, _, source, _ = corpus
    builds = []  # every real fit (the cache must not refit)
    real_fit = tokenize._fit
    monkeypatch.setattr(tokenize, "_fit", lambda *a, **k: builds.append(1) or real_fit(*a, **k))
    fit = dict(num_units=6, kmeans_iters=3, vocoder_steps=0, max_minutes=1.0, progress=False)
    fit["min_vectors_per_unit"] = 10  # 72 vectors for 6 units (the default refuses < 30)
    tok, voc = tokenize.fit_units([source], tmp_path / "fit", features="mfcc", **fit)
    assert tok.features == "mfcc" and tok.feature_dim == 156 and voc.num_units == 6
    again, _ = tokenize.fit_units([source], tmp_path / "fit", features="mfcc", **fit)  # cached
    assert len(builds) == 1
    np.testing.assert_array_equal(again.centroids, tok.centroids)
    assert again.extractor == tok.extractor
    tokenize.tokenize_split(source, again, tmp_path / "u", "train", num_shards=2, progress=False)
    mfcc = features.get_extractor("mfcc")
    for i, r in enumerate(_read(tmp_path / "u", "train")):
        wav = tokenize.to_float(source[i]["audio"])
        np.testing.assert_array_equal(r["units"], tok.encode_features(mfcc(wav)))
        assert len(r["units"]) == 12
    logmel, _ = tokenize.fit_units([source], tmp_path / "fit", **fit)  # another key: refitted
    assert len(builds) == 2
    assert logmel.features == "logmel" and logmel.feature_dim == 320
