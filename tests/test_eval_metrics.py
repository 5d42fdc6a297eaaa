"""Long-form metrics on constructed inputs with known answers."""

import math

import jax
import numpy as np
import pytest

from avjax.data.speech import units as units_lib
from avjax.eval import metrics

SR = 16000


def _tone(seconds, freq=220.0, seed=0):
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).normal(0, 0.01, len(t))
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def _voice(seconds, f0, formants, seed=0):
    """A buzzy source through resonances: a crude 'speaker' with a given spectral envelope."""
    from scipy.signal import lfilter

    n = int(seconds * SR)
    src = np.zeros(n)
    src[:: int(SR / f0)] = 1.0
    src += np.random.default_rng(seed).normal(0, 0.02, n)
    y = src
    for f in formants:
        r = 0.97
        a = [1, -2 * r * np.cos(2 * np.pi * f / SR), r * r]
        y = lfilter([1.0], a, y)
    return (0.3 * y / np.abs(y).max()).astype(np.float32)


def test_slice_bounds():
    assert metrics.slice_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert metrics.slice_bounds(0, 4) == []
    with pytest.raises(ValueError):
        metrics.slice_bounds(5, 0)


def test_token_logprobs_and_perplexity_of_known_distribution():
    # Uniform over V gives ppl V; a one-hot-ish distribution gives ppl ~1.
    v, t = 8, 12
    logits = np.zeros((t, v), np.float32)
    targets = np.arange(t) % v
    lp = np.asarray(metrics.token_logprobs(jax.numpy.asarray(logits), targets))
    np.testing.assert_allclose(lp, -math.log(v), rtol=1e-6)
    np.testing.assert_allclose(metrics.perplexity_by_slice(lp, 5), [v, v, v], rtol=1e-6)
    # Slice 0: p=1/2 for every token -> ppl 2; slice 1: p = 1/4 -> 4.
    lp2 = np.array([math.log(0.5)] * 3 + [math.log(0.25)] * 3)
    np.testing.assert_allclose(metrics.perplexity_by_slice(lp2, 3), [2.0, 4.0])
    # Batch pooling with a mask: row 1's masked tokens do not count.
    lp3 = np.stack([lp2, np.full(6, -100.0)])
    mask = np.stack([np.ones(6), np.zeros(6)])
    np.testing.assert_allclose(metrics.perplexity_by_slice(lp3, 3, mask), [2.0, 4.0])
    assert np.isnan(metrics.perplexity_by_slice(lp2, 3, np.zeros(6))).all()
    # Geometric mean: p = 1/2 and 1/8 in one slice -> ppl 4.
    np.testing.assert_allclose(metrics.perplexity_by_slice(np.log([0.5, 0.125]), 2), [4.0])


def test_distinct_n_and_longest_repeat():
    loop = np.tile([1, 2, 3], 10)  # 30 units, period 3
    assert metrics.distinct_n(loop, 1) == pytest.approx(3 / 30)
    assert metrics.distinct_n(loop, 2) == pytest.approx(3 / 29)
    assert metrics.distinct_n(np.arange(30), 4) == 1.0
    assert metrics.distinct_n(np.full(10, 5), 2) == pytest.approx(1 / 9)
    assert math.isnan(metrics.distinct_n(np.arange(2), 3))
    assert metrics.longest_repeat(loop) == 27
    assert metrics.longest_repeat(np.full(10, 5)) == 9
    assert metrics.longest_repeat(np.arange(50)) == 0
    assert metrics.longest_repeat(np.array([9, 1, 2, 3, 7, 1, 2, 3, 8])) == 3
    # Large unit ids do not overflow the n-gram codes.
    big = np.array([2**40, 1] * 3 + [2**40])  # 7 units: 4 four-grams, 2 distinct
    assert metrics.distinct_n(big, 4) == pytest.approx(1 / 2)


def test_ngram_stats_per_slice():
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 1000, 50)
    fresh = rng.integers(1000, 100000, 100)  # slice 0: new random units (no repeats)
    copy = prompt[:50].copy()  # slice 1: copies the prompt
    loop = np.tile([7, 8], 25)  # slice 2: a 2-unit loop
    s = metrics.ngram_stats(np.concatenate([fresh[:50], copy, loop]), 50, context=prompt)
    assert s["distinct_1"][0] == 1.0 and s["distinct_4"][0] == 1.0
    assert s["repeat_4"][0] == 0.0
    # Every 4-gram starting in slice 1 except the last 3 (which straddle into the loop)
    # was seen in the prompt.
    assert s["repeat_4"][1] == pytest.approx(47 / 50)
    assert s["distinct_1"][2] == pytest.approx(2 / 50)
    assert s["longest_repeat_s"][2] == pytest.approx(48 / 25)
    assert s["longest_repeat_s"][0] == 0.0
    assert set(s) == {
        "distinct_1",
        "distinct_2",
        "distinct_3",
        "distinct_4",
        "repeat_4",
        "longest_repeat_s",
    }


def test_speaker_similarity():
    a = _voice(2.0, 110, [500, 1500, 2500])
    assert metrics.cosine_similarity(
        metrics.speaker_embedding(a), metrics.speaker_embedding(a)
    ) == pytest.approx(1.0)
    same_speaker = _voice(2.0, 110, [500, 1500, 2500], seed=1)
    other = _voice(2.0, 240, [800, 2200, 3200], seed=2)
    sims = metrics.speaker_similarity_by_slice(a, np.concatenate([same_speaker, other]), 2 * SR)
    assert sims.shape == (2,)
    assert sims[0] > 0.99 and sims[0] > sims[1] + 0.05
    assert np.isnan(metrics.cosine_similarity(np.zeros(3), np.ones(3)))
    assert metrics.speaker_embedding(np.zeros(SR)).shape == (38,)


def test_spectral_distance_and_continuity():
    mel = units_lib.log_mel(_tone(3.0))
    assert metrics.spectral_distance(mel[:50], mel[:50]) == 0.0
    # Steady tone: continuity ~0 everywhere (boundary and within), far below a real jump.
    c = metrics.continuity(mel[:300], start=100, slice_frames=100, window_frames=50)
    assert c["boundary"].shape == c["within"].shape == (2,)
    assert np.all(c["boundary"] < 1.0) and np.all(c["within"] < 1.0)
    # A jump to another tone at the second slice boundary shows as a large boundary distance.
    jump = np.concatenate([_tone(2.0, 220.0), _tone(1.0, 1800.0)])
    mj = units_lib.log_mel(jump)[:300]
    cj = metrics.continuity(mj, start=100, slice_frames=100, window_frames=50)
    assert cj["boundary"][1] > 5 * cj["within"][1] and cj["boundary"][1] > 5.0
    assert cj["boundary"][0] < 1.0
    # Known value: a constant 1-nat offset over all bins is 10/ln(10) dB ~ 4.34 dB.
    assert metrics.spectral_distance(np.zeros((5, 4)), np.ones((5, 4))) == pytest.approx(
        10 / math.log(10)
    )
    # No room for a window before the start: NaN.
    assert np.isnan(metrics.continuity(mel, start=10, slice_frames=100)["boundary"][0])


def test_semantic_coherence_with_a_bag_of_words_embedder():
    vocab = ["cat", "dog", "mat", "stock", "market"]

    def embed(texts):
        return np.array([[t.split().count(w) for w in vocab] for t in texts], float)

    out = metrics.semantic_coherence("cat mat", ["cat mat", "stock market", "", "cat dog"], embed)
    np.testing.assert_allclose(out, [1.0, 0.0, 0.0, 0.5])
    assert np.isnan(metrics.semantic_coherence("", ["cat"], embed)).all()
