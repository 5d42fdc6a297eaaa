"""Tiny corpora in the real LibriSpeech / LibriLight / LibriSpeech-Long layouts (for tests).

The audio is synthetic (harmonic tones with a moving pitch and a syllable-rate envelope,
plus a little noise), a fraction of a second per file, written as FLAC at 16 kHz.
"""

from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000


def tone(seconds: float, seed: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speech-like synthetic audio, float32 `[round(seconds * sample_rate)]` in [-1, 1]."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    f0 = 110 + 60 * rng.random() + 30 * np.sin(2 * np.pi * (0.5 + rng.random()) * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    wav = sum(np.sin(k * phase) / k for k in range(1, 6))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * (3 + 2 * rng.random()) * t) ** 2
    wav = 0.2 * env * wav + 0.01 * rng.normal(size=n)
    return np.clip(wav, -1, 1).astype(np.float32)


def write_librispeech(
    root: str,
    splits: dict[str, list[tuple[str, str, int]]],
    seconds: float = 0.6,
    text: bool = True,
) -> list[str]:
    """Writes `root/LibriSpeech/<split>/<spk>/<chapter>/...`; returns the audio paths.

    `splits`: {split: [(speaker, chapter, utterances), ...]}.
    """
    paths = []
    seed = 0
    for split, chapters in splits.items():
        for spk, chap, n in chapters:
            d = os.path.join(root, "LibriSpeech", split, spk, chap)
            os.makedirs(d, exist_ok=True)
            lines = []
            for u in range(n):
                uid = f"{spk}-{chap}-{u:04d}"
                path = os.path.join(d, uid + ".flac")
                sf.write(path, tone(seconds, seed), SAMPLE_RATE)
                seed += 1
                paths.append(path)
                lines.append(f"{uid} WORDS OF UTTERANCE {u} IN CHAPTER {chap}")
            if text:
                with open(os.path.join(d, f"{spk}-{chap}.trans.txt"), "w") as f:
                    f.write("\n".join(lines) + "\n")
    return paths


def write_librilight(
    root: str, subsets: dict[str, list[tuple[str, str, list[float]]]], vad: bool = True
) -> list[str]:
    """Writes `root/<subset>/<spk>/<book>/<file>.flac + .json`; returns the audio paths.

    `subsets`: {subset: [(speaker, book, [file seconds, ...]), ...]}. The json's voice
    activity marks every 0.5 s block but the last 0.1 s of each as speech.
    """
    paths = []
    seed = 100
    for subset, books in subsets.items():
        for spk, book, lengths in books:
            d = os.path.join(root, subset, spk, book)
            os.makedirs(d, exist_ok=True)
            for i, seconds in enumerate(lengths):
                stem = f"chapter_{i:02d}_{book}_64kb"
                path = os.path.join(d, stem + ".flac")
                sf.write(path, tone(seconds, seed), SAMPLE_RATE)
                seed += 1
                paths.append(path)
                if vad:
                    starts = np.arange(0.0, seconds, 0.5)
                    activity = [[float(a), float(min(a + 0.4, seconds))] for a in starts]
                    meta = {"speaker": spk, "voice_activity": activity, "snr": 20.0}
                    with open(os.path.join(d, stem + ".json"), "w") as f:
                        json.dump(meta, f)
    return paths


def write_librispeech_long(
    root: str, splits: dict[str, list[tuple[str, str, int]]], seconds: float = 0.8
) -> list[str]:
    """Writes `root/librispeech-long/<split>/<spk>/<chapter>/<chapter>_<seg>.flac + .txt`."""
    paths = []
    seed = 200
    for split, chapters in splits.items():
        for spk, chap, n in chapters:
            d = os.path.join(root, "librispeech-long", split, spk, chap)
            os.makedirs(d, exist_ok=True)
            for s in range(n):
                path = os.path.join(d, f"{chap}_{s}.flac")
                sf.write(path, tone(seconds, seed), SAMPLE_RATE)
                seed += 1
                paths.append(path)
                with open(os.path.join(d, f"{chap}_{s}.txt"), "w") as f:
                    f.write(f"SEGMENT {s} OF CHAPTER {chap}\n")
    return paths


def corrupt(path: str, kind: str) -> None:
    """Makes `path` bad: "corrupt" (garbage bytes), "empty" (0 samples), "rate" (8 kHz)."""
    if kind == "corrupt":
        with open(path, "wb") as f:
            f.write(b"fLaC\x00\x00garbage" * 4)
    elif kind == "empty":
        sf.write(path, np.zeros(0, np.float32), SAMPLE_RATE, format="FLAC")
    elif kind == "rate":
        sf.write(path, tone(0.5, 7, 8000), 8000, format="FLAC")
    else:
        raise ValueError(f"unknown kind {kind!r}: corrupt | empty | rate")
