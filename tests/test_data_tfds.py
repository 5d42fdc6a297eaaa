"""TFDS builders on tiny self-made corpora in the real layouts: features, counts, bad files."""

import os

import numpy as np
import pytest
import soundfile as sf

from avjax.data import audio as audio_lib
from avjax.data import tfds as corpora
from avjax.data.tfds import testing


def _examples(builder, split):
    src = builder.as_data_source(split=split)
    return [src[i] for i in range(len(src))]


def _s(x):
    return x.decode() if isinstance(x, bytes) else x


def test_librispeech_features_order_and_splits(tmp_path):
    paths = testing.write_librispeech(
        str(tmp_path / "m"),
        {
            "train-clean-100": [("19", "198", 3), ("103", "1240", 2)],
            "dev-clean": [("84", "121", 2)],
        },
    )
    b = corpora.build("librispeech", tmp_path / "m", tmp_path / "tfds")
    assert b.name == "avjax_librispeech"
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {
        "train_clean_100": 5,
        "dev_clean": 2,
    }
    assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(b.data_dir))
    ex = _examples(b, "train_clean_100")
    # Reading order: speakers numerically (19 before 103), utterances in order.
    assert [_s(e["id"]) for e in ex] == [
        "19-198-0000",
        "19-198-0001",
        "19-198-0002",
        "103-1240-0000",
        "103-1240-0001",
    ]
    assert [_s(e["document"]) for e in ex] == ["19-198"] * 3 + ["103-1240"] * 2
    assert [int(e["index"]) for e in ex] == [0, 1, 2, 0, 1]
    assert _s(ex[4]["speaker"]) == "103" and _s(ex[4]["chapter"]) == "1240"
    assert _s(ex[1]["text"]) == "WORDS OF UTTERANCE 1 IN CHAPTER 198"
    ref, rate = sf.read(paths[0], dtype="float32")
    assert rate == 16000 and ex[0]["audio"].dtype == np.int16
    np.testing.assert_allclose(ex[0]["audio"] / 32768.0, ref, atol=1e-4)
    assert abs(float(ex[0]["duration"]) - len(ref) / 16000) < 1e-6
    # grain reads the ArrayRecord shards through tfds.data_source (random access).
    import grain
    import tensorflow_datasets as tfds

    src = tfds.data_source("avjax_librispeech", split="dev_clean", data_dir=str(tmp_path / "tfds"))
    ds = grain.MapDataset.source(src).map(lambda e: len(e["audio"]))
    assert list(ds) == [round(0.6 * 16000)] * 2
    # A second build call loads the prepared data (no manual_dir needed).
    again = corpora.build("librispeech", "", tmp_path / "tfds")
    assert again.info.splits["dev_clean"].num_examples == 2


def test_librilight_cuts_by_vad_into_segments(tmp_path):
    testing.write_librilight(
        str(tmp_path / "m"), {"small": [("100", "book_a", [2.0, 1.0]), ("7", "book_b", [1.5])]}
    )
    cfg = corpora.LibriLightConfig(name="cut1s", max_minutes=1.0 / 60)
    b = corpora.build("librilight", tmp_path / "m", tmp_path / "tfds", config=cfg)
    ex = _examples(b, "small")
    # VAD: speech in [k*0.5, k*0.5+0.4]; groups of two intervals span 0.9 s <= 1 s.
    # 2.0 s -> 2 segments, 1.0 s -> 1, 1.5 s -> 2 (speaker 7 sorts first).
    assert [_s(e["document"]) for e in ex] == ["7/book_b/chapter_00_book_b_64kb"] * 2 + [
        "100/book_a/chapter_00_book_a_64kb"
    ] * 2 + ["100/book_a/chapter_01_book_a_64kb"]
    assert [int(e["index"]) for e in ex] == [0, 1, 0, 1, 0]
    durations = [float(e["duration"]) for e in ex]
    np.testing.assert_allclose(durations, [0.9, 0.4, 0.9, 0.9, 0.9], atol=1e-3)
    assert all(len(e["audio"]) == round(d * 16000) for e, d in zip(ex, durations, strict=True))
    assert _s(ex[0]["book"]) == "book_b" and _s(ex[0]["text"]) == ""
    assert b.builder_config.name == "cut1s"


def test_cut_by_vad_rules():
    assert corpora.cut_by_vad([[0, 1], [1.5, 2], [2.2, 5]], 6, 2.5) == [
        (0, 2),
        (2.2, 4.7),
        (4.7, 5),
    ]
    assert corpora.cut_by_vad([], 5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert corpora.cut_by_vad([[1, 2], [3, 4]], 5, 0) == [(1, 4)]


def test_librispeech_long_segments_and_transcripts(tmp_path):
    testing.write_librispeech_long(
        str(tmp_path / "m"),
        {"test-clean": [("1089", "134686", 3)], "dev-clean": [("84", "121", 1)]},
    )
    b = corpora.build("librispeech_long", tmp_path / "m", tmp_path / "tfds")
    assert b.name == "avjax_librispeech_long"
    ex = _examples(b, "test_clean")
    assert [_s(e["id"]) for e in ex] == ["1089-134686_0", "1089-134686_1", "1089-134686_2"]
    assert [_s(e["text"]) for e in ex][2] == "SEGMENT 2 OF CHAPTER 134686"
    assert {_s(e["chapter"]) for e in ex} == {"134686"} and int(ex[2]["index"]) == 2
    np.testing.assert_allclose([float(e["duration"]) for e in ex], 0.8, atol=1e-6)
    assert len(b.as_data_source(split="dev_clean")) == 1


@pytest.mark.parametrize("kind", ["corrupt", "empty", "rate"])
def test_bad_file_strict_names_it_skip_bad_counts_it(tmp_path, kind):
    paths = testing.write_librispeech(
        str(tmp_path / "m"), {"train-clean-100": [("19", "198", 3)]}, seconds=0.3
    )
    testing.corrupt(paths[1], kind)
    with pytest.raises(audio_lib.AudioError, match="19-198-0001.flac"):
        corpora.build("librispeech", tmp_path / "m", tmp_path / "strict")
    b = corpora.build("librispeech", tmp_path / "m", tmp_path / "skip", skip_bad=True)
    assert len(b.skipped["train-clean-100"]) == 1
    assert "19-198-0001.flac" in b.skipped["train-clean-100"][0]
    ids = [_s(e["id"]) for e in _examples(b, "train_clean_100")]
    assert ids == ["19-198-0000", "19-198-0002"]


def test_missing_manual_dir_and_wrong_layout_say_what_is_expected(tmp_path):
    with pytest.raises(corpora.LayoutError, match=r"(?s)does not exist.*LibriSpeech/<split>"):
        corpora.build("librispeech", tmp_path / "nowhere", tmp_path / "tfds")
    (tmp_path / "flat").mkdir()
    sf.write(str(tmp_path / "flat" / "a.flac"), testing.tone(0.2, 0), 16000)
    with pytest.raises(corpora.LayoutError, match=r"(?s)found.*a\.flac.*<subset>/<speaker>"):
        corpora.build("librilight", tmp_path / "flat", tmp_path / "tfds")
    with pytest.raises(corpora.LayoutError, match="librispeech-long/<split>"):
        corpora.build("librispeech_long", tmp_path / "flat", tmp_path / "tfds")
    with pytest.raises(ValueError, match="librispeech_long"):
        corpora.builder_class("libri")


def test_fingerprint_follows_symlinked_folders(tmp_path):
    """A corpus folder that is (or holds) a link: files added through it change the
    fingerprint, so a new TFDS build is made rather than a stale one reused."""
    real = tmp_path / "real" / "LibriSpeech"
    (real / "train-clean-100" / "19").mkdir(parents=True)
    (real / "train-clean-100" / "19" / "a.flac").write_bytes(b"x")
    holder = tmp_path / "holder"
    holder.mkdir()
    os.symlink(real, holder / "LibriSpeech")  # manual_dir holds a linked corpus folder
    os.symlink(tmp_path / "real", tmp_path / "link")  # manual_dir is itself a link
    before = [corpora.manual_dir_fingerprint(p) for p in (holder, tmp_path / "link")]
    (holder / "LibriSpeech" / "train-clean-100" / "19" / "b.flac").write_bytes(b"yy")
    after = [corpora.manual_dir_fingerprint(p) for p in (holder, tmp_path / "link")]
    assert before[0] != after[0] and before[1] != after[1]
    os.symlink(real, real / "train-clean-100" / "loop")  # a cycle is walked once
    assert corpora.manual_dir_fingerprint(holder)
