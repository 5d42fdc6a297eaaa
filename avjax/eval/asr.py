"""Offline speech recognition for transcript-based metrics (SC-L): pocketsphinx, en-us.

pocketsphinx (PyPI `pocketsphinx==5.1.1`, part of the `eval` extra) ships its US-English
acoustic model, language model and dictionary in the wheel, so nothing is downloaded. It is a
small, old-style recogniser: accurate on clean read speech, poor on synthetic or vocoded
speech, which is why SC-L is reported beside the ground-truth continuation decoded through the
same vocoder (its SC-L is the ceiling a model can reach under this ASR).
"""

from __future__ import annotations

import numpy as np

from avjax.eval._deps import require

SAMPLE_RATE = 16000


class PocketSphinxASR:
    """`transcribe(wav)` -> lower-case words, with pocketsphinx's bundled en-us model.

    Long audio is decoded as consecutive utterances of at most `max_utterance_s` seconds
    (bounded search memory); their hypotheses are joined with spaces.
    """

    def __init__(self, max_utterance_s: float = 30.0):
        ps = require("pocketsphinx", "pocketsphinx==5.1.1", "speech recognition (avjax.eval.asr)")
        self._decoder = ps.Decoder(samprate=SAMPLE_RATE, loglevel="ERROR")
        self.max_utterance_s = float(max_utterance_s)

    def transcribe(self, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> str:
        """Words recognised in `wav` `[samples]` (float in [-1, 1]); "" when none."""
        wav = np.asarray(wav, np.float32).reshape(-1)
        if sample_rate != SAMPLE_RATE:
            from avjax.data.audio import resample

            wav = resample(wav, sample_rate, SAMPLE_RATE)
        pcm = (np.clip(wav, -1.0, 1.0) * 32767.0).astype(np.int16)
        step = max(1, int(self.max_utterance_s * SAMPLE_RATE))
        words = []
        for i in range(0, len(pcm), step):
            piece = pcm[i : i + step]
            if len(piece) < SAMPLE_RATE // 10:  # < 0.1 s: nothing to recognise
                continue
            d = self._decoder
            d.start_utt()
            d.process_raw(piece.tobytes(), no_search=False, full_utt=True)
            d.end_utt()
            hyp = d.hyp()
            if hyp is not None and hyp.hypstr.strip():
                words.append(hyp.hypstr.strip())
        return " ".join(words)
