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
from avjax.data.tfds.librispeech import numeric_key

LAYOUT = """  manual_dir/librispeech-long/<split>/<speaker>/<chapter>/<chapter>_<segment>.flac
  manual_dir/librispeech-long/<split>/<speaker>/<chapter>/<chapter>_<segment>.txt
  (<split> e.g. dev-clean, test-clean; manual_dir may also be the librispeech-long/ folder)"""


def _is_split_dir(path: str) -> bool:
    for spk in base.subdirs(path):
        for chap in base.subdirs(os.path.join(path, spk)):
            d = os.path.join(path, spk, chap)
            if any(n.startswith(f"{chap}_") and n.endswith(".flac") for n in os.listdir(d)):
                return True
    return False


class AvjaxLibrispeechLong(base.SpeechCorpusBuilder):
    """LibriSpeech-Long segments (<= 4 min) with speaker, chapter and transcript."""

    CORPUS = "LibriSpeech-Long"
    LAYOUT = LAYOUT
    DOC_FEATURE = "chapter"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place LibriSpeech-Long in manual_dir:\n" + LAYOUT

    def _find_splits(self, manual_dir: str) -> dict[str, str]:
        root = os.path.join(manual_dir, "librispeech-long")
        if not os.path.isdir(root):
            root = manual_dir
        splits = {n: os.path.join(root, n) for n in base.subdirs(root)}
        splits = {n: p for n, p in splits.items() if _is_split_dir(p)}
        if not splits:
            raise base.LayoutError(
                self.CORPUS,
                manual_dir,
                f"no LibriSpeech-Long split folder found (in {root}: {base.listing(root)})",
                LAYOUT,
            )
        return splits

    def _utterances(self, split_dir: str) -> Iterator[dict[str, Any]]:
        for spk in sorted(base.subdirs(split_dir), key=numeric_key):
            for chap in sorted(base.subdirs(os.path.join(split_dir, spk)), key=numeric_key):
                d = os.path.join(split_dir, spk, chap)
                stems = sorted(
                    (
                        os.path.splitext(n)[0]
                        for n in os.listdir(d)
                        if n.endswith(".flac") and not n.startswith(".")
                    ),
                    key=numeric_key,
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
