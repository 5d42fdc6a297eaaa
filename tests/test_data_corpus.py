"""The embedded espeak-ng story corpus (build, cache, splits) and scanning user audio folders."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

from avjax.data import audio
from avjax.data.speech import corpus, espeak


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "default"
    utts = corpus.build_default_corpus(root, minutes=0.5, progress=False)
    return root, utts


def test_tiny_corpus_layout_and_splits(tiny):
    root, utts = tiny
    summary = corpus.summarize(utts)
    assert summary["minutes"] >= 0.5
    assert summary["docs"] >= 2 and summary["heldout_docs"] >= 1
    assert {u.split for u in utts} == {"train", "heldout"}
    assert summary["speakers"] >= 2
    assert (root / "manifest.jsonl").exists() and (root / "stamp.json").exists()
    assert not [p for p in os.listdir(root.parent) if ".tmp-" in p]
    # Documents are consecutive, utterances in reading order, one speaker and split per doc.
    seen_docs = []
    for u in utts:
        if not seen_docs or seen_docs[-1] != u.doc_id:
            assert u.doc_id not in seen_docs
            seen_docs.append(u.doc_id)
    for d in seen_docs:
        du = [u for u in utts if u.doc_id == d]
        assert [u.index for u in du] == list(range(len(du)))
        assert len({u.speaker for u in du}) == 1 and len({u.split for u in du}) == 1
    for u in utts:
        wav = audio.load_audio(u.audio_path, strict_rate=True)
        assert len(wav) == u.num_samples and u.sample_rate == 16000
        assert np.sqrt(np.mean(wav**2)) > 0.01
        assert u.text and u.phones and u.phones[-1][1] == pytest.approx(u.duration, abs=0.01)


def test_manifest_reload_and_cache_hit(tiny, monkeypatch):
    root, utts = tiny
    assert corpus.load_manifest(root) == utts

    def no_synthesis(*a, **k):
        raise AssertionError("re-synthesised a cached corpus")

    monkeypatch.setattr(espeak, "synthesize", no_synthesis)
    again = corpus.build_default_corpus(root, minutes=0.5, progress=False)
    assert again == utts


def test_other_parameters_rebuild(tmp_path):
    root = tmp_path / "c"
    a = corpus.build_default_corpus(root, minutes=0.3, progress=False, seed=1)
    stamp = json.loads((root / "stamp.json").read_text())
    assert stamp["params"]["seed"] == 1
    b = corpus.build_default_corpus(root, minutes=0.3, progress=False, seed=2)
    assert json.loads((root / "stamp.json").read_text())["params"]["seed"] == 2
    assert [u.text for u in a] != [u.text for u in b]
    assert sorted(os.listdir(tmp_path)) == ["c"]  # old build removed, no temp dirs left


def test_build_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("synthesis crashed")

    monkeypatch.setattr(espeak, "synthesize", broken)
    with pytest.raises(RuntimeError, match="synthesis crashed"):
        corpus.build_default_corpus(tmp_path / "c", minutes=0.3, progress=False)
    assert os.listdir(tmp_path) == []


def test_missing_manifest_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "manifest.jsonl")):
        corpus.load_manifest(tmp_path)


def _write(path, seconds=0.5, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, 0.3 * np.sin(2 * np.pi * 200 * t), rate)


def test_scan_audio_dir(tmp_path):
    _write(tmp_path / "alice" / "ch1.wav")
    _write(tmp_path / "alice" / "ch2.flac", 1.0, 22050)
    (tmp_path / "alice" / "ch2.txt").write_text("hello   world\n")
    _write(tmp_path / "bob" / "x" / "ch3.wav", 0.25)
    (tmp_path / "notes.md").write_text("not audio")
    utts = corpus.scan_audio_dir(tmp_path, heldout_fraction=0.34, progress=False)
    assert [u.id for u in utts] == ["alice/ch1", "alice/ch2", "bob/x/ch3"]
    assert [u.speaker for u in utts] == ["alice", "alice", "x"]
    assert utts[1].text == "hello world" and utts[0].text == ""
    assert utts[1].num_samples == 16000 and utts[1].sample_rate == 16000
    assert sorted(u.split for u in utts) == ["heldout", "train", "train"]


def test_scan_audio_dir_errors_name_the_file(tmp_path):
    _write(tmp_path / "spk" / "good.wav")
    bad = tmp_path / "spk" / "broken.wav"
    bad.write_bytes(b"this is not a wav file at all")
    with pytest.raises(audio.AudioError, match=r"broken\.wav"):
        corpus.scan_audio_dir(tmp_path, progress=False)
    bad.unlink()
    sf.write(tmp_path / "spk" / "empty.wav", np.zeros(0), 16000)
    with pytest.raises(audio.AudioError, match=r"empty\.wav: empty audio"):
        corpus.scan_audio_dir(tmp_path, progress=False)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="no .wav/.flac files"):
        corpus.scan_audio_dir(tmp_path / "nothing", progress=False)
    with pytest.raises(FileNotFoundError, match="audio directory not found"):
        corpus.scan_audio_dir(tmp_path / "missing", progress=False)


def test_worker_processes_give_the_same_corpus(tmp_path):
    a = corpus.build_default_corpus(tmp_path / "a", minutes=0.3, progress=False, num_workers=1)
    b = corpus.build_default_corpus(tmp_path / "b", minutes=0.3, progress=False, num_workers=2)
    key = lambda u: (u.id, u.doc_id, u.speaker, u.split, u.text)  # noqa: E731
    assert [key(u) for u in a] == [key(u) for u in b]
    # espeak-ng's pitch flutter carries state between calls: lengths agree to a few samples.
    assert all(abs(x.num_samples - y.num_samples) < 200 for x, y in zip(a, b, strict=True))
    assert len(os.listdir(tmp_path / "b" / "wavs")) == len({u.doc_id for u in b})


def test_leftovers_of_a_killed_build_are_removed_by_the_next(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    killed = tmp_path / "c.tmp-0123456789ab"  # SIGKILLed while synthesising
    (killed / "wavs").mkdir(parents=True)
    (killed / ".owner.json").write_text(
        json.dumps({"host": __import__("socket").gethostname(), "pid": int(dead.stdout)})
    )
    older = tmp_path / ".c.tmp-1234abcd"  # the naming of earlier versions, days old
    older.mkdir()
    os.utime(older, (1e9, 1e9))
    corpus.build_default_corpus(tmp_path / "c", minutes=0.3, progress=False)
    assert os.listdir(tmp_path) == ["c"]
    assert (tmp_path / "c" / "manifest.json").exists()  # published with its artifact manifest


def test_scan_audio_dir_follows_symlinked_folders(tmp_path):
    real = tmp_path / "elsewhere" / "spk2"
    real.mkdir(parents=True)
    sf.write(str(real / "b.wav"), np.full(16000, 0.1, np.float32), 16000)
    (tmp_path / "audio" / "spk1").mkdir(parents=True)
    sf.write(str(tmp_path / "audio" / "spk1" / "a.wav"), np.full(16000, 0.1, np.float32), 16000)
    os.symlink(real, tmp_path / "audio" / "spk2")
    utts = corpus.scan_audio_dir(tmp_path / "audio", heldout_fraction=0.0, progress=False)
    assert [u.id for u in utts] == ["spk1/a", "spk2/b"] and utts[1].speaker == "spk2"
