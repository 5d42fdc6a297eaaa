"""LibriSpeech-Long (Park et al., 2025) from a local copy: TFDS builder `avjax_librispeech_long`.

LibriSpeech dev/test chapters re-cut into contiguous segments of up to 4 minutes, for
long-form evaluation of spoken LMs. Layout (the released archive unpacked into manual_dir):

  manual_dir/librispeech-long/<split>/<speaker>/<chapter>/<chapter>_<segment>.flac
  manual_dir/librispeech-long/<split>/<speaker>/<chapter>/<chapter>_<segment>.txt

(`manual_dir` may also be the `librispeech-long/` folder itself.) Splits dev-clean,
dev-other, test-clean, test-other become dev_clean, ... One example per segment; a chapter is
a document (`document` = "<speaker>-<chapter>"), segments in number order; `text` is the
segment's one-line transcript.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from avjax.data.tfds import base

LAYOUT = """  manual_dir/librispeech-long/<split>/<speaker>/<chapter>/<chapter>_<segment>.flac
  manual_dir/librispeech-long/<split>/<speaker>/<chapter>/<chapter>_<segment>.txt
  (<split> e.g. dev-clean, test-clean; manual_dir may also be the librispeech-long/ folder)"""


class AvjaxLibrispeechLong(base.SpeechCorpusBuilder):
    """LibriSpeech-Long segments (<= 4 min) with speaker, chapter and transcript."""

    CORPUS = "LibriSpeech-Long"
    LAYOUT = LAYOUT
    DOC_FEATURE = "chapter"
    ROOT = "librispeech-long"

    def _is_split_dir(self, path: str) -> bool:
        return any(
            any(n.startswith(f"{chap}_") and n.endswith(".flac") for n in os.listdir(d))
            for _, chap, d in base.speaker_folders(path)
        )

    def _utterances(self, split_dir: str) -> Iterator[dict[str, Any]]:
        for spk, chap, d in base.speaker_folders(split_dir):
            stems = sorted(
                (
                    os.path.splitext(n)[0]
                    for n in os.listdir(d)
                    if n.endswith(".flac") and not n.startswith(".")
                ),
                key=base.numeric_key,
            )
            for index, stem in enumerate(stems):
                path = os.path.join(d, stem + ".flac")
                utt = {
                    "path": path,
                    "speaker": spk,
                    "document": f"{spk}-{chap}",
                    "doc": chap,
                    "id": f"{spk}-{stem}",
                    "index": index,
                }
                txt = os.path.join(d, stem + ".txt")
                if os.path.exists(txt):
                    with open(txt, encoding="utf-8") as f:
                        utt["text"] = " ".join(f.read().split())
                else:
                    utt["error"] = f"{path}: transcript {txt} not found"
                yield utt
