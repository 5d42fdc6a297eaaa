"""Visemes, the talking-face renderer, the embedded AV corpus and the AV data module on it."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import pytest

from avjax.data.video import av_corpus, av_data, faces, layouts, visemes
from avjax.data.video.io import read_video

SPEC = av_corpus.TINY


# --- visemes ---------------------------------------------------------------------------------
def test_phone_classes_cover_espeak_symbols():
    assert visemes.phone_classes("p") == ["PP"]
    assert visemes.phone_classes("ˈuː") == ["ou"]
    assert visemes.phone_classes("ˈaʊ") == ["aa", "ou"]  # a diphthong: two targets
    assert visemes.phone_classes("ˈeɪ") == ["E", "ih"]
    assert visemes.phone_classes("tʃ") == ["CH"]
    assert visemes.phone_classes("_") == ["sil"]
    assert visemes.phone_classes("¿") == ["schwa"]  # unknown -> neutral


def test_viseme_trajectory_closure_and_coarticulation():
    # "aa p aa" at 100 fps: the lips must close for /p/ even though it is short.
    phones = [("ɑ", 0.0, 0.2), ("p", 0.2, 0.26), ("ɑ", 0.26, 0.46)]
    traj = visemes.viseme_trajectory(phones, fps=100, num_frames=46)
    assert traj.shape == (46, visemes.NUM_PARAMS) and traj.dtype == np.float32
    assert 0.0 <= traj.min() and traj.max() <= 1.0
    jaw = traj[:, 0]
    assert jaw[10] > 0.7 and jaw[36] > 0.7  # open vowels
    assert jaw[23] < 0.2  # closure at the centre of /p/
    assert np.abs(np.diff(jaw)).max() < 0.25  # smooth, no jumps between frames
    # espeak's (start, end, ipa) order gives the same trajectory.
    same = visemes.viseme_trajectory([(a, b, p) for p, a, b in phones], 100, 46)
    np.testing.assert_array_equal(traj, same)
    # Rounded /u/ vs spread /i/: rounding and width move the opposite ways.
    u = visemes.viseme_trajectory([("uː", 0.0, 0.3)], 25, 8)[3]
    i = visemes.viseme_trajectory([("iː", 0.0, 0.3)], 25, 8)[3]
    assert u[2] > i[2] + 0.5 and i[1] > u[1] + 0.4


# --- renderer --------------------------------------------------------------------------------
def test_identities_are_distinct():
    ids = [faces.make_identity(i) for i in range(40)]
    keys = {(i.skin, i.hair, i.hair_style, i.bg_a, round(i.face_w, 3)) for i in ids}
    assert len(keys) == 40
    assert len({i.hair_style for i in ids}) == len(faces.HAIR_STYLES)
    assert faces.make_identity(3) == faces.make_identity(3)


def test_only_the_mouth_depends_on_what_is_said():
    ident, size = faces.make_identity(7), 96
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 1, (2, 6, 5)).astype(np.float32)
    b[:, 0] = 1 - a[:, 0]  # different jaw openings
    fa = faces.render_talking_face(ident, a, size=size).astype(int)
    fb = faces.render_talking_face(ident, b, size=size).astype(int)
    x0, y0, x1, y1 = faces.mouth_box(ident, size)
    inside = np.zeros((size, size), bool)
    inside[y0:y1, x0:x1] = True
    diff = np.abs(fa - fb).max(axis=(0, 3))
    assert diff[~inside].max() == 0  # identity, pose, noise: the same pixels
    assert np.abs(fa - fb)[:, inside].mean() > 5  # the mouth region differs
    assert inside.mean() < 0.15  # and it is a small part of the frame
    # With head motion, blinks and flicker (same nuisance seed): still only around the mouth.
    nu = faces.sample_nuisance(3, 6)
    ga = faces.render_talking_face(ident, a, nu, size=size).astype(int)
    gb = faces.render_talking_face(ident, b, nu, size=size).astype(int)
    moved = np.abs(ga - gb).max(axis=(0, 3))
    assert moved[: int(0.5 * size)].max() == 0  # eyes, hair, upper background untouched
    assert moved.sum() > 0
    # Another nuisance seed moves the whole face (nuisance is not a word cue by construction).
    hb = faces.render_talking_face(ident, a, faces.sample_nuisance(4, 6), size=size)
    assert np.abs(hb.astype(int) - ga)[:, : size // 2].mean() > 1


# --- the corpus and its data module ---------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The tiny corpus, built through the data module (as a config would)."""
    root = str(tmp_path_factory.mktemp("avcache"))
    dc = _data_config(root)
    t0 = time.time()
    facts = av_data.AVData(dc, batch_size=4).prepare()
    assert facts["layout"] == "lrw" and time.time() - t0 < 120
    return root


def _data_config(root: str, **overrides):
    dc = av_data.default_config()
    dc.cache_dir = root
    dc.synthetic = dataclasses.asdict(SPEC)
    dc.build_workers = 1
    dc.image_size, dc.crop_size = 48, 40
    dc.update(overrides)
    return dc


def test_corpus_in_real_layouts(cache):
    root = av_corpus.corpus_dir(cache, SPEC)
    summary = json.load(open(os.path.join(root, "summary.json")))
    assert summary["lrw_clips"] == SPEC.num_speakers * SPEC.clips_per_speaker
    assert summary["lrs3_sentences"] == SPEC.num_sentences
    words = layouts.scan("lrw", os.path.join(root, "lrw"))
    assert len(words) == summary["lrw_clips"]
    assert {w.word for w in words} <= set(av_corpus.VOCABULARY[: SPEC.vocab_size])
    frames, audio, info = read_video(words[0].path)
    assert frames.shape == (av_corpus.LRW_FRAMES, SPEC.size, SPEC.size, 3)
    assert audio.shape == (av_corpus.LRW_FRAMES * 640,) and np.abs(audio).max() > 0.05
    assert info.video_codec == "h264" and info.audio_codec == "aac"
    ((_, start, end),) = words[0].words  # the word is centred in the clip
    assert abs((start + end) / 2 - 0.58) < 1e-6 and 0.1 < end - start < 1.0
    # Speakers are held out: a speaker's clips are all in one split.
    split_of = {}
    for w in words:
        assert split_of.setdefault(w.speaker, w.split) == w.split
    assert set(split_of.values()) == {"train", "val", "test"}
    sentences = layouts.scan("lrs3", os.path.join(root, "lrs3"))
    assert {s.split for s in sentences} == {"trainval", "test"}
    for s in sentences:
        assert " ".join(w for w, _, _ in s.words) == s.text
        starts = [a for _, a, _ in s.words]
        assert starts == sorted(starts) and all(b > a for _, a, b in s.words)


def test_corpus_is_cached_by_spec(cache):
    root = av_corpus.corpus_dir(cache, SPEC)
    mtime = os.path.getmtime(os.path.join(root, "manifest.json"))
    t0 = time.time()
    info = av_corpus.build_av_corpus(root, SPEC, num_workers=1, progress=False)
    assert time.time() - t0 < 5 and info["lrw_clips"] == 12
    assert os.path.getmtime(os.path.join(root, "manifest.json")) == mtime
    assert av_corpus.corpus_dir(cache, dataclasses.replace(SPEC, seed=1)) != root


def test_av_data_batches_resume_and_augment(cache):
    dc = _data_config(cache, mel=True, time_masks=1, erase_prob=1.0, babble_prob=1.0)
    dc.spec_freq_masks = dc.spec_time_masks = 1
    data = av_data.AVData(dc, batch_size=4, seed=3)
    facts = data.prepare()
    assert facts["train_items"] == 6 and facts["eval_items"] == 3  # 2 + 1 speakers
    it = iter(data.train_dataset(0, 1))
    batch = next(it)
    shapes = {k: v.shape for k, v in batch.items()}
    assert shapes == {k: v.shape for k, v in data.dummy_batch().items()}
    assert shapes["video"] == (4, 29, 40, 40, 1) and shapes["mel"] == (4, 116, 80)
    assert batch["video"].dtype == np.uint8 and batch["audio"].dtype == np.float32
    assert (batch["label"] >= 0).all() and (batch["label"] < len(data.vocabulary)).all()
    for label, text in zip(batch["label"], batch["text"], strict=True):
        assert bytes(text).rstrip(b"\0").decode() == data.vocabulary[label]
    state = it.get_state()
    after = [next(it) for _ in range(2)]
    it.set_state(state)
    again = [next(it) for _ in range(2)]
    for x, y in zip(after, again, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # Eval: centre crop, no augmentation, the same every call.
    ev1, ev2 = data.eval_batches(0, 1), data.eval_batches(0, 1)
    np.testing.assert_array_equal(ev1[0]["video"], ev2[0]["video"])
    clean = av_data.AVData(_data_config(cache), batch_size=4).eval_batches(0, 1)[0]
    np.testing.assert_array_equal(clean["audio"], ev1[0]["audio"])


def test_read_processes_give_the_same_batches_and_resume(cache):
    """`data.read_processes` (grain worker processes) changes who computes, not what."""
    dc = _data_config(cache, mel=True, erase_prob=1.0, babble_prob=1.0)
    batches, states = {}, {}
    for procs in (0, 2):
        dc.read_processes = procs
        it = iter(av_data.AVData(dc, batch_size=2, seed=5).train_dataset(0, 1))
        first = [next(it) for _ in range(2)]
        states[procs] = it.get_state()
        batches[procs] = first + [next(it) for _ in range(3)]
    for x, y in zip(batches[0], batches[2], strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # A fresh multi-process iterator resumes from a saved state (a checkpoint).
    it = iter(av_data.AVData(dc, batch_size=2, seed=5).train_dataset(0, 1))
    it.set_state(states[2])
    for want in batches[2][2:]:
        got = next(it)
        np.testing.assert_array_equal(got["video"], want["video"])
        np.testing.assert_array_equal(got["mel"], want["mel"])


def test_babble_snr_and_masks():
    rng = np.random.default_rng(0)
    wav, noise = rng.normal(0, 0.1, 16000), rng.normal(0, 0.3, 16000)
    mixed = av_data.mix_babble(wav, noise, 10.0)
    snr = 10 * np.log10(np.mean(wav**2) / np.mean((mixed - wav) ** 2))
    assert abs(snr - 10.0) < 1e-3
    dc = _data_config("", time_masks=1, time_mask_frames=29, hflip=0.0, erase_prob=0.0)
    video = np.full((29, 48, 48, 1), 100, np.uint8)
    aug = av_data._Augment(None, dc, train=True)
    out = aug._video(video, 29, np.random.default_rng(1))
    assert out.shape == (29, 40, 40, 1)
    zeroed = (out == 0).all(axis=(1, 2, 3))
    assert 0 < zeroed.sum() <= 29 and ((out == 100) | (out == 0)).all()
