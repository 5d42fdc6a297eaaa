"""GE2E speaker embeddings (JAX port) against resemblyzer, DNSMOS against speechmos."""

import sys
import types

import numpy as np
import pytest

from avjax.eval import dnsmos, speaker


@pytest.fixture(scope="module")
def reference_encoder():
    try:
        import webrtcvad  # noqa: F401  (resemblyzer imports it for VAD trimming only)
    except ImportError:  # webrtcvad 2.0.10 imports pkg_resources, gone from new setuptools
        sys.modules["webrtcvad"] = types.ModuleType("webrtcvad")
    from resemblyzer import VoiceEncoder

    return VoiceEncoder(device="cpu", verbose=False)


@pytest.fixture(scope="module")
def encoder():
    return speaker.GE2EEncoder(volume_norm=False)


def _speechlike(n, f0, seed):
    """A harmonic tone with a syllable-rate envelope plus a little noise, `[n]` float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    tone = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 8))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.1 * tone * env + 0.01 * rng.standard_normal(n)).astype(np.float32)


def test_ge2e_matches_resemblyzer(reference_encoder, encoder):
    rng = np.random.default_rng(0)
    # Shorter than one partial (padded); 3 partials with a ragged end.
    for n in (9000, 3 * 16000 + 77):
        wav = (rng.standard_normal(n) * 0.1).astype(np.float32)
        ref, ref_partials, wav_slices = reference_encoder.embed_utterance(wav, return_partials=True)
        assert speaker.partial_starts(n) == [s.start // speaker.HOP for s in wav_slices]
        partials = encoder.partials(wav)
        assert partials.shape == ref_partials.shape
        np.testing.assert_allclose(partials, ref_partials, atol=1e-4, rtol=0)
        np.testing.assert_allclose(encoder.embed(wav), ref, atol=1e-4, rtol=0)
    from resemblyzer.audio import normalize_volume

    quiet = (rng.standard_normal(16000) * 0.003).astype(np.float32)
    np.testing.assert_allclose(
        speaker.normalize_volume(quiet), normalize_volume(quiet, -30, increase_only=True), rtol=1e-5
    )
    loud = quiet * 100
    np.testing.assert_array_equal(speaker.normalize_volume(loud), loud)  # never lowered


def test_ge2e_similarity_by_slice(encoder):
    a = _speechlike(3 * 16000, 120.0, 0)
    b = _speechlike(3 * 16000, 260.0, 1)
    sims = encoder.similarity_by_slice(a, np.concatenate([a, b, b[:8000]]), 3 * 16000)
    assert sims.shape == (3,)
    assert sims[0] == pytest.approx(1.0, abs=1e-5)  # the prompt itself
    assert sims[1] < sims[0] - 0.02 and -1 <= sims[2] <= 1


def test_dnsmos_matches_speechmos():
    sd = pytest.importorskip("speechmos.dnsmos")  # speechmos imports requests
    scorer = dnsmos.DNSMOS()
    clean = _speechlike(10 * 16000, 150.0, 2)  # 10 s: one 9.01 s window
    noisy = clean + np.random.default_rng(3).standard_normal(len(clean)).astype(np.float32) * 0.1
    scores = {}
    for name, wav in (("clean", clean), ("noisy", noisy)):
        ours = scorer.score(wav)
        ref = sd.run(wav, 16000)
        for k in ("sig", "bak", "ovrl"):
            assert ours[k] == pytest.approx(float(ref[f"{k}_mos"]), abs=1e-5)
            assert 1.0 <= ours[k] <= 5.0
        scores[name] = ours
    assert scores["noisy"]["bak"] < scores["clean"]["bak"]  # BAK rates background noise
    # Per slice: 10 s in 6 s slices -> 2 slices (each looped to 9 s).
    by_slice = dnsmos.DNSMOS(max_windows=1).score_by_slice(clean, 6 * 16000)
    assert set(by_slice) == {"sig", "bak", "ovrl"} and by_slice["ovrl"].shape == (2,)
    assert np.isfinite(by_slice["sig"]).all()
    assert len(scorer.windows(np.zeros(30 * 16000, np.float32))) == 21
    assert len(dnsmos.DNSMOS(max_windows=4).windows(np.zeros(30 * 16000, np.float32))) == 4
