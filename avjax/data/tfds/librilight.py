"""LibriLight (Kahn et al., 2020) from a local copy: TFDS builder `avjax_librilight`.

Unlabelled audiobook speech (60k hours in `large`). Layout (the subset archives unpacked
into manual_dir):

  manual_dir/<subset>/<speaker>/<book>/<file>.flac
  manual_dir/<subset>/<speaker>/<book>/<file>.json   (voice_activity: [[start_s, end_s], ...])

Subsets (small, medium, large, duplicate, or any folder in that layout) become splits. Files
run up to hours; as LibriLight's `cut_by_vad.py` does, each file is cut into segments of at
most `max_minutes` (the builder config: `cut4min` by default, SpeechSSM's 4-minute training
length; `cut30s`; `full` keeps whole files), cutting only inside silences between the
json's voice-activity intervals (an interval longer than the limit is cut hard). A file
without a json is cut every `max_minutes`. Silence outside voice activity at the file's
ends is dropped. One example per segment; the file is the document (`document` =
"<speaker>/<book>/<file>", segments in order), `book` the book folder; `text` is "".
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from avjax.data import audio as audio_lib
from avjax.data.tfds import base

LAYOUT = """  manual_dir/<subset>/<speaker>/<book>/<file>.flac
  manual_dir/<subset>/<speaker>/<book>/<file>.json  (with "voice_activity": [[start, end], ...])
  (<subset> e.g. small, medium, large)"""


@dataclasses.dataclass(eq=False)
class LibriLightConfig(tfds.core.BuilderConfig):
    """`max_minutes`: the longest segment a file is cut into (0 = whole files)."""

    max_minutes: float = 4.0


def cut_by_vad(
    intervals: Sequence[Sequence[float]], total_seconds: float, max_seconds: float
) -> list[tuple[float, float]]:
    """Segments `(start_s, end_s)` of at most `max_seconds`, cut between VAD intervals.

    Consecutive voice-activity intervals are grouped while the group spans <= `max_seconds`;
    an interval longer than that is split into `max_seconds` pieces. With no intervals the
    whole file is cut every `max_seconds`. `max_seconds <= 0`: one segment (all speech).
    """
    ivs = sorted(
        (max(0.0, float(a)), min(float(b), total_seconds))
        for a, b in intervals
        if float(b) > float(a)
    )
    ivs = [(a, b) for a, b in ivs if b > a]
    if not ivs:
        ivs = [(0.0, total_seconds)]
    if max_seconds <= 0:
        return [(ivs[0][0], ivs[-1][1])]
    pieces: list[tuple[float, float]] = []
    for a, b in ivs:  # hard-split intervals longer than the limit
        while b - a > max_seconds:
            pieces.append((a, a + max_seconds))
            a += max_seconds
        pieces.append((a, b))
    segments: list[tuple[float, float]] = []
    start, end = pieces[0]
    for a, b in pieces[1:]:
        if b - start <= max_seconds:
            end = b
        else:
            segments.append((start, end))
            start, end = a, b
    segments.append((start, end))
    return segments


class AvjaxLibrilight(base.SpeechCorpusBuilder):
    """LibriLight audiobook files cut into <= max_minutes segments (no transcripts)."""

    CORPUS = "LibriLight"
    LAYOUT = LAYOUT
    DOC_FEATURE = "book"
    BUILDER_CONFIGS = [
        LibriLightConfig(name="cut4min", description="segments <= 4 min", max_minutes=4.0),
        LibriLightConfig(name="cut30s", description="segments <= 30 s", max_minutes=0.5),
        LibriLightConfig(name="full", description="whole files", max_minutes=0.0),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "cut4min"

    SPLIT_WORD = "subset"

    def _is_split_dir(self, path: str) -> bool:
        return any(
            any(n.endswith(".flac") for n in os.listdir(d))
            for _, _, d in base.speaker_folders(path, numeric=False)
        )

    def _utterances(self, split_dir: str) -> Iterator[dict[str, Any]]:
        for spk, book, d in base.speaker_folders(split_dir, numeric=False):
            for name in sorted(os.listdir(d)):
                if not name.endswith(".flac") or name.startswith("."):
                    continue
                stem = os.path.splitext(name)[0]
                yield {
                    "path": os.path.join(d, name),
                    "json": os.path.join(d, stem + ".json"),
                    "speaker": spk,
                    "document": f"{spk}/{book}/{stem}",
                    "doc": book,
                    "id": f"{spk}/{book}/{stem}",
                    "index": 0,
                    "text": "",
                }

    def _load(self, utt: dict[str, Any]) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        intervals: list = []
        if os.path.exists(utt["json"]):
            try:
                with open(utt["json"], encoding="utf-8") as f:
                    intervals = json.load(f).get("voice_activity", [])
            except (OSError, ValueError, AttributeError) as e:
                raise audio_lib.AudioError(utt["json"], f"unreadable LibriLight json ({e})") from e
        wav = audio_lib.load_audio(utt["path"], strict_rate=True)
        max_seconds = 60.0 * float(self.builder_config.max_minutes)
        segments = cut_by_vad(intervals, len(wav) / base.SAMPLE_RATE, max_seconds)
        k = 0
        for a, b in segments:
            piece = wav[int(round(a * base.SAMPLE_RATE)) : int(round(b * base.SAMPLE_RATE))]
            if len(piece) == 0:
                continue
            yield {**utt, "id": f"{utt['id']}/{k:04d}", "index": k}, piece
            k += 1
