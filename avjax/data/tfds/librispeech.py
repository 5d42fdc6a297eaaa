"""LibriSpeech (Panayotov et al., 2015) from a local copy: TFDS builder `avjax_librispeech`.

Layout (the archives from openslr.org/12 unpacked into manual_dir):

  manual_dir/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
  manual_dir/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt

(`manual_dir` may also be the `LibriSpeech/` folder itself.) Each split folder found
(train-clean-100, dev-clean, ...) becomes a TFDS split with "-" replaced by "_". One example
per utterance; a chapter is a document (`document` = "<speaker>-<chapter>"), utterances in
file order. The transcript is the utterance's line of the chapter's `.trans.txt`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from avjax.data.tfds import base

LAYOUT = """  manual_dir/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
  manual_dir/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
  (<split> e.g. train-clean-100, dev-clean; manual_dir may also be the LibriSpeech/ folder)"""


def read_transcripts(path: str) -> dict[str, str]:
    """`<utt id> <TEXT>` lines of a `.trans.txt` -> {utt id: text}."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.strip().split(" ", 1)
            if parts[0]:
                out[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
    return out


class AvjaxLibrispeech(base.SpeechCorpusBuilder):
    """LibriSpeech utterances with speaker, chapter and transcript (ArrayRecord)."""

    CORPUS = "LibriSpeech"
    LAYOUT = LAYOUT
    DOC_FEATURE = "chapter"
    ROOT = "LibriSpeech"

    def _is_split_dir(self, path: str) -> bool:
        """Whether `path` holds <speaker>/<chapter>/<speaker>-<chapter>.trans.txt somewhere."""
        return any(
            os.path.exists(os.path.join(d, f"{spk}-{chap}.trans.txt"))
            for spk, chap, d in base.speaker_folders(path)
        )

    def _utterances(self, split_dir: str) -> Iterator[dict[str, Any]]:
        for spk, chap, d in base.speaker_folders(split_dir):
            trans_path = os.path.join(d, f"{spk}-{chap}.trans.txt")
            texts = read_transcripts(trans_path) if os.path.exists(trans_path) else {}
            audio = {
                os.path.splitext(n)[0]: os.path.join(d, n)
                for n in os.listdir(d)
                if n.endswith(".flac") and not n.startswith(".")
            }
            for index, uid in enumerate(sorted(set(texts) | set(audio), key=base.numeric_key)):
                utt = {
                    "path": audio.get(uid, os.path.join(d, uid + ".flac")),
                    "speaker": spk,
                    "document": f"{spk}-{chap}",
                    "doc": chap,
                    "id": uid,
                    "index": index,
                    "text": texts.get(uid, ""),
                }
                if uid not in texts:
                    utt["error"] = f"{utt['path']}: no transcript line in {trans_path}"
                yield utt
