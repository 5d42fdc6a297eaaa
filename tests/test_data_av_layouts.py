"""Readers for LRS3 / LRS2 / LRW / GRID / dir layouts and the AV data module on real layouts."""

from __future__ import annotations

import os

import numpy as np
import pytest

from avjax.data.video import av_data, layouts
from avjax.data.video.io import VideoError, write_video


def _clip(path: str, frames: int = 6, value: int = 0) -> None:
    """A tiny real MP4 (H.264 + AAC) whose frames carry `value` (to recognise it)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    video = np.full((frames, 32, 32, 3), value, np.uint8)
    video[:, :, :16] = 255 - value  # a left/right asymmetry (flips are visible)
    t = np.arange(frames * 640) / 16000
    write_video(path, video, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


LRS_TXT = (
    "Text:  HELLO WORLD\nConf:  4\n\n"
    "WORD START END ASDSCORE\nHELLO 0.00 0.10 5.2\nWORLD 0.10 0.22 4.1\n"
)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """One fixture folder per layout, in the published layouts."""
    root = tmp_path_factory.mktemp("layouts")
    # LRS3: pretrain / trainval / test
    for split, spk, utt in [("trainval", "abcXYZ", "00001"), ("test", "zzz111", "00002")]:
        base = os.path.join(root, "lrs3", split, spk, utt)
        _clip(base + ".mp4")
        _write(base + ".txt", LRS_TXT)
    # LRS2: main + split lists
    for name in (
        "5535415699068794046/00001",
        "5535415699068794046/00002",
        "6330311066473698535/00011",
    ):
        base = os.path.join(root, "lrs2", "main", name)
        _clip(base + ".mp4")
        _write(base + ".txt", "Text:  WHEN YOU'RE COOKING\nConf:  4\n")
    _write(
        os.path.join(root, "lrs2", "train.txt"),
        "5535415699068794046/00001\n5535415699068794046/00002\n",
    )
    _write(os.path.join(root, "lrs2", "val.txt"), "6330311066473698535/00011 NF\n")
    # LRW: <WORD>/{train,val,test}/<WORD>_<n>
    for word, value in (("ABOUT", 40), ("WATER", 200)):
        for split in ("train", "val"):
            for n in (1, 2) if split == "train" else (3,):
                base = os.path.join(root, "lrw", word, split, f"{word}_{n:05d}")
                _clip(base + ".mp4", value=value)
                _write(base + ".txt", f"Text: {word}\nConf: 8\n\nDuration: 0.300000 seconds\n")
    # GRID: s<N>/*.mpg + align
    for spk, utt in (("s1", "bbaf2n"), ("s3", "lgwt4s")):
        _clip(os.path.join(root, "grid", spk, utt + ".mpg"))
        _write(
            os.path.join(root, "grid", "align", spk, utt + ".align"),
            "0 2000 sil\n2000 3500 bin\n3500 5000 blue\n5000 6000 sil\n",
        )
    # dir: any videos
    _clip(os.path.join(root, "dir", "alice", "a.mp4"))
    _clip(os.path.join(root, "dir", "val", "bob", "b.mp4"))
    _write(os.path.join(root, "dir", "val", "bob", "b.txt"), "good morning\n")
    return str(root)


def test_lrs3_and_lrs2(corpora):
    items = layouts.scan("lrs3", os.path.join(corpora, "lrs3"))
    assert [(i.split, i.speaker, i.uid) for i in items] == [
        ("trainval", "abcXYZ", "trainval/abcXYZ/00001"),
        ("test", "zzz111", "test/zzz111/00002"),
    ]
    assert items[0].text == "HELLO WORLD"
    assert items[0].words == (("HELLO", 0.0, 0.1), ("WORLD", 0.1, 0.22))
    lrs2 = layouts.scan("lrs2", os.path.join(corpora, "lrs2"))
    assert sorted(i.split for i in lrs2) == ["train", "train", "val"]  # from the split lists
    assert lrs2[0].text == "WHEN YOU'RE COOKING" and lrs2[0].words == ()


def test_lrw_grid_dir(corpora):
    lrw = layouts.scan("lrw", os.path.join(corpora, "lrw"))
    assert len(lrw) == 6 and {i.word for i in lrw} == {"ABOUT", "WATER"}
    assert lrw[0].words == (("ABOUT", pytest.approx(0.43), pytest.approx(0.73)),)
    assert len(layouts.scan("lrw", os.path.join(corpora, "lrw"), ["val"])) == 2
    grid = layouts.scan("grid", os.path.join(corpora, "grid"))
    assert [(g.speaker, g.split, g.text) for g in grid] == [
        ("s1", "test", "BIN BLUE"),
        ("s3", "train", "BIN BLUE"),
    ]
    assert grid[0].words[0] == ("BIN", 0.08, 0.14)
    found = layouts.scan("dir", os.path.join(corpora, "dir"))
    assert [(d.split, d.speaker, d.text) for d in found] == [
        ("train", "alice", ""),
        ("val", "bob", "GOOD MORNING"),
    ]


def test_bad_files_strict_or_skipped(corpora, tmp_path):
    root = tmp_path / "lrw"
    for n, ok in ((1, True), (2, False)):
        base = os.path.join(root, "ABOUT", "train", f"ABOUT_{n:05d}")
        if ok:
            _clip(base + ".mp4")
        else:
            _write(base + ".mp4", "not a video")
        _write(base + ".txt", "Text: ABOUT\nDuration: 0.3 seconds\n")
    _write(os.path.join(root, "ABOUT", "train", "ABOUT_00003.mp4"), "x")  # no .txt
    with pytest.raises(layouts.LayoutError, match="ABOUT_00003.txt is missing"):
        layouts.scan("lrw", root)
    skipped = []
    items = layouts.scan("lrw", root, skip_bad=True, skipped=skipped, probe=True)
    assert len(items) == 1 and len(skipped) == 2
    assert {os.path.basename(p) for p, _ in skipped} == {"ABOUT_00002.mp4", "ABOUT_00003.mp4"}
    _write(os.path.join(root, "ABOUT", "train", "ABOUT_00003.txt"), "Conf: 3\n")
    with pytest.raises(layouts.LayoutError, match="ABOUT_00003.txt: no 'Text:' line"):
        layouts.scan("lrw", root)
    # Decoding for the data module: a corrupt video is named (strict) or skipped and counted.
    for ext in (".mp4", ".txt"):
        os.remove(os.path.join(root, "ABOUT", "train", "ABOUT_00003" + ext))
    dc = _config("lrw", str(root), tmp_path / "cache")
    with pytest.raises(VideoError, match="ABOUT_00002.mp4"):
        av_data.AVData(dc, batch_size=1).prepare()
    dc.skip_bad = True
    facts = av_data.AVData(dc, batch_size=1).prepare()
    assert facts["skipped"] == 1 and facts["train_items"] == 1


def _config(name: str, manual_dir: str, cache, **overrides):
    dc = av_data.default_config()
    dc.name, dc.manual_dir, dc.cache_dir = name, manual_dir, str(cache)
    dc.num_frames, dc.image_size, dc.crop_size = 8, 16, 12
    dc.update(overrides)
    return dc


def test_av_data_on_lrw_layout(corpora, tmp_path):
    dc = _config("lrw", os.path.join(corpora, "lrw"), tmp_path, grayscale=False, hflip=1.0)
    data = av_data.AVData(dc, batch_size=2, seed=0)
    facts = data.prepare()
    assert (facts["train_items"], facts["eval_items"], facts["vocab_size"]) == (4, 2, 2)
    assert data.vocabulary == ["ABOUT", "WATER"]
    batch = next(iter(data.train_dataset(0, 1)))
    assert batch["video"].shape == (2, 8, 12, 12, 3)
    assert (batch["length"] == 6).all()  # 6 real frames, padded to 8
    assert (batch["video"][:, 6:] == 0).all()
    # ABOUT clips are dark on the right, WATER clips bright: the label matches the pixels.
    for video, label in zip(batch["video"], batch["label"], strict=True):
        right = video[0, :, -3:].mean()  # flipped: the original left half is now on the right
        assert (right > 128) == (data.vocabulary[label] == "ABOUT")
    held = data.eval_batches(0, 1)[0]
    assert held["video"].shape == (2, 8, 12, 12, 3) and (held["label"] == [0, 1]).all()
    # grid and lrs3 through the same module
    g = av_data.AVData(_config("grid", os.path.join(corpora, "grid"), tmp_path), batch_size=1)
    assert g.prepare()["train_items"] == 1
    held = g.eval_batches(0, 1)[0]
    assert bytes(held["text"][0]).rstrip(b"\0") == b"BIN BLUE" and held["label"][0] == -1


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_tfds_storage_gives_the_same_batches(corpora, tmp_path, layout):
    """`data.storage=tfds` (ArrayRecord through the TFDS builder) == the memory-mapped cache."""
    root = os.path.join(corpora, layout)
    splits = {"lrs3": "trainval", "lrs2": "train", "grid": "train", "dir": "train"}
    extra = {"train_splits": splits[layout]} if layout in splits else {}
    if layout in ("lrs3", "lrs2", "grid", "dir"):
        extra["eval_splits"] = {"lrs3": "test", "lrs2": "val", "grid": "test", "dir": "val"}[layout]
    if layout == "grid":
        extra["train_splits"] = "train,test"  # (the fixture's two speakers are both train)
    got = {}
    for storage in ("npy", "tfds"):
        dc = _config(layout, root, tmp_path, storage=storage, **extra)
        data = av_data.AVData(dc, batch_size=1, seed=0)
        facts = data.prepare()
        assert facts["storage"] == storage
        got[storage] = (facts["train_items"], data.eval_batches(0, 1)[0])
        got[storage] += (next(iter(data.train_dataset(0, 1))),)
    (n_npy, held_npy, train_npy), (n_tfds, held_tfds, train_tfds) = got["npy"], got["tfds"]
    assert n_npy == n_tfds > 0
    for a, b in ((held_npy, held_tfds), (train_npy, train_tfds)):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{layout} {k}")


def test_tfds_builder_reads_a_layout_and_skips_a_bad_video(corpora, tmp_path):
    from avjax.data.tfds import av as tfds_av

    root = tmp_path / "lrw"
    import shutil

    shutil.copytree(os.path.join(corpora, "lrw"), root)
    (root / "WATER" / "train" / "WATER_00002.mp4").write_bytes(b"not a video")
    with pytest.raises(VideoError, match="WATER_00002.mp4"):
        tfds_av.build_av("lrw", root, tmp_path / "tfds", num_frames=8, image_size=16)
    builder = tfds_av.build_av(
        "lrw", root, tmp_path / "tfds", num_frames=8, image_size=16, skip_bad=True
    )
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "val": 2}
    skipped = builder.info.metadata["skipped"]
    assert len(skipped) == 1 and skipped[0][0].endswith("WATER_00002.mp4")
    ex = builder.as_data_source(split="val")[1]
    assert ex["video"].shape == (8, 16, 16, 1) and ex["video"].dtype == np.uint8
    assert ex["audio"].shape == (8 * 640,) and int(ex["length"]) == 6
    assert (ex["word"], ex["split"]) == (b"WATER", b"val") and np.abs(ex["audio"]).max() > 1000
    # Built once: a second call loads it (even with the bad file gone).
    (root / "WATER" / "train" / "WATER_00002.mp4").unlink()
    again = tfds_av.build_av("lrw", root, tmp_path / "tfds", num_frames=8, image_size=16)
    assert again.info.splits["train"].num_examples == 3


def test_preprocessed_crops_are_read_in_place_of_the_videos(corpora, tmp_path):
    """`data.crops_dir` (tools/preprocess_video.py's output, at the corpus' relative paths)."""
    root = os.path.join(corpora, "lrw")
    crops = tmp_path / "crops"
    items = layouts.scan("lrw", root)
    for it in items:  # stand-ins for the mouth crops: a uniform grey of 90
        _clip(os.path.join(crops, *it.uid.split("/"), "mouth.mp4"), value=90)
    os.remove(os.path.join(crops, "WATER", "val", "WATER_00003", "mouth.mp4"))
    dc = _config("lrw", root, tmp_path, crops_dir=str(crops))
    with pytest.raises(FileNotFoundError, match="WATER_00003/mouth.mp4"):
        av_data.AVData(dc, batch_size=1).prepare()
    dc.skip_bad = True
    data = av_data.AVData(dc, batch_size=1)
    facts = data.prepare()
    assert (facts["train_items"], facts["eval_items"], facts["skipped"]) == (4, 1, 1)
    held = data.eval_batches(0, 1)[0]
    left = held["video"][0, 0, :, :4].mean()  # the stand-in's left half is 255 - 90
    assert abs(left - 165) < 12, left
    raw = av_data.AVData(_config("lrw", root, tmp_path), batch_size=1)
    assert raw.prepare()["cache"] != facts["cache"]
