"""espeak-ng through ctypes (audio + phone timings) and the procedural story generator."""

import threading

import numpy as np
import pytest

from avjax.data.speech import espeak
from avjax.data.text import stories

TEXT = "The old fisherman Tobias walked slowly to the harbour. He carried a brass lantern."


def test_synthesize_audio_and_phone_timings():
    s = espeak.synthesize(TEXT)
    assert s.sample_rate == 16000 and s.wav.dtype == np.float32 and s.wav.ndim == 1
    assert 3.0 < s.duration < 8.0
    rms = float(np.sqrt(np.mean(s.wav**2)))
    assert rms > 0.02 and np.abs(s.wav).max() <= 1.0
    # Phones: contiguous, strictly increasing, covering [0, duration].
    starts = np.array([p[0] for p in s.phones])
    ends = np.array([p[1] for p in s.phones])
    assert len(s.phones) > 40
    assert np.all(np.diff(starts) > 0) and np.all(ends > starts)
    np.testing.assert_allclose(starts[1:], ends[:-1])
    assert starts[0] == 0.0 and ends[-1] == pytest.approx(s.duration)
    symbols = {p[2] for p in s.phones}
    assert {"f", "ʃ", "t", "l"} <= symbols  # IPA symbols of "fisherman", "lantern"
    # Words: in order, with the text's words.
    words = [w for _, w in s.words]
    assert words[:4] == ["The", "old", "fisherman", "Tobias"]
    assert np.all(np.diff([t for t, _ in s.words]) > 0)
    # The audio is speech where the phones say so: louder inside words than in the pauses.
    t_fisher = dict((w, t) for t, w in s.words)["fisherman"]
    seg = s.wav[int(t_fisher * 16000) : int((t_fisher + 0.3) * 16000)]
    assert np.sqrt(np.mean(seg**2)) > rms * 0.5


def test_repeatable_and_thread_safe():
    # espeak-ng keeps a little state between calls (pitch flutter), so repeated audio is not
    # bit-identical; the phones and length (to a few samples) are.
    a = espeak.synthesize("Hello there, Anna.", "en-us+f3", rate_wpm=160, pitch=60)
    results = []

    def worker():
        results.append(espeak.synthesize("Hello there, Anna.", "en-us+f3", 160, 60))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    for r in results:
        assert abs(len(r.wav) - len(a.wav)) < 50
        assert [p[2] for p in r.phones] == [p[2] for p in a.phones]
        n = min(len(r.wav), len(a.wav))
        assert np.corrcoef(np.abs(r.wav[:n]), np.abs(a.wav[:n]))[0, 1] > 0.5


def test_voices_are_distinct_speakers():
    assert len(espeak.SPEAKERS) >= 8
    lens = set()
    spectra = []
    for voice, pitch, rate in espeak.SPEAKERS[:4]:
        s = espeak.synthesize("The quick brown fox jumps over the lazy dog.", voice, rate, pitch)
        lens.add(len(s.wav))
        spec = np.abs(np.fft.rfft(s.wav[:16000]))
        spectra.append(spec / spec.sum())
    assert len(lens) == 4
    for i in range(4):
        for j in range(i):
            assert np.abs(spectra[i] - spectra[j]).sum() > 0.2
    # "en-gb" is an alias of espeak-ng's British "en".
    assert espeak.synthesize("Good morning.", "en-gb+m3").duration > 0.3


def test_bad_voice_and_empty_text():
    with pytest.raises(ValueError, match="no voice 'xx-nope'"):
        espeak.synthesize("hello", "xx-nope")
    with pytest.raises(ValueError, match="empty text"):
        espeak.synthesize("   ")
    assert espeak.synthesize("hello").duration > 0.2  # still works afterwards


def test_stories_deterministic_with_recurring_entities():
    a = stories.generate_story(7, 10)
    b = stories.generate_story(7, 10)
    c = stories.generate_story(8, 10)
    assert a == b and a.text != c.text
    assert len(a.paragraphs) == 10
    first, rest = a.paragraphs[0], a.paragraphs[1:]
    # The hero, friend, third character and home place are introduced in paragraph 1 ...
    for name in a.characters:
        assert name in first
    assert a.places[0] in first
    # ... and keep coming back: the hero in most paragraphs, the object and places too.
    hero = a.characters[0]
    assert sum(hero in p for p in rest) >= 6
    assert sum(a.object.split()[-1] in p for p in rest) >= 4
    for place in a.places:
        assert sum(place in p for p in a.paragraphs) >= 2
    assert sum(a.characters[2] in p for p in a.paragraphs[4:]) >= 1  # long-range recurrence


def test_stories_are_varied():
    texts = [stories.generate_story(s, 8) for s in range(30)]
    words = set()
    sentences = set()
    for t in texts:
        words |= set(t.text.replace(".", " ").replace(",", " ").split())
        sentences |= set(t.text.split(". "))
    assert len(words) > 300
    assert len(sentences) > 800
    assert len({t.title for t in texts}) == 30
    short = stories.generate_story(1, 4, max_sentences=2)
    assert all(p.count(".") + p.count("?") <= 3 for p in short.paragraphs)
