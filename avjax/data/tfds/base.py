"""Shared machinery of the speech-corpus TFDS builders: features, bad-file policy, layout errors.

Every builder reads a local `manual_dir` (never the network) and writes ArrayRecord shards in
reading order (`disable_shuffling`), so the utterances of one document (chapter, book file)
are consecutive and `index` gives their order. Example features:

  audio:    int16 `[samples]` at 16 kHz (float = audio / 32768)
  speaker:  speaker id (str)
  document: what consecutive utterances join into (a chapter, a LibriLight file)
  <doc>:    "chapter" (LibriSpeech, LibriSpeech-Long) or "book" (LibriLight)
  id:       unique utterance / segment id
  index:    int32 position within the document
  text:     transcript, "" where unknown (LibriLight)
  duration: float32 seconds

Bad input: a corrupt, empty or wrong-rate audio file (or an utterance without a transcript)
raises `AudioError`/`ValueError` naming the file, unless the builder was made with
`skip_bad=True`: then it is skipped, logged and counted in `builder.skipped[split]`.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from avjax.data import audio as audio_lib

SAMPLE_RATE = audio_lib.SAMPLE_RATE


def split_name(directory_name: str) -> str:
    """TFDS split name for a corpus folder name: `train-clean-100` -> `train_clean_100`."""
    return re.sub(r"\W", "_", directory_name)


def to_int16(wav: np.ndarray) -> np.ndarray:
    """float32 `[samples]` in [-1, 1] -> int16 `[samples]` (how audio is stored)."""
    return (np.clip(wav, -1.0, 32767.0 / 32768.0) * 32768.0).round().astype(np.int16)


def listing(path: str, limit: int = 12) -> str:
    """A short description of what a folder holds, for layout errors."""
    if not os.path.exists(path):
        return "the path does not exist"
    if not os.path.isdir(path):
        return "it is a file, not a folder"
    names = sorted(os.listdir(path))
    if not names:
        return "an empty folder"
    shown = ", ".join(n + ("/" if os.path.isdir(os.path.join(path, n)) else "") for n in names)
    if len(names) > limit:
        shown = ", ".join(names[:limit]) + f", ... ({len(names)} entries)"
    return f"{len(names)} entries: {shown}"


class LayoutError(FileNotFoundError):
    """`manual_dir` is missing or does not hold the corpus in its expected layout."""

    def __init__(self, corpus: str, manual_dir: str, problem: str, layout: str):
        self.manual_dir = manual_dir
        super().__init__(
            f"{corpus}: manual_dir {manual_dir!r}: {problem}.\nExpected layout:\n{layout}"
        )


def subdirs(path: str) -> list[str]:
    """Sorted names of the visible sub-folders of `path`."""
    return sorted(
        n
        for n in os.listdir(path)
        if not n.startswith(".") and os.path.isdir(os.path.join(path, n))
    )


def numeric_key(name: str) -> tuple[int, int | str]:
    """Sorts "19" before "103" (ids are numbers) and other names after, alphabetically."""
    stem = name.split(".")[0].split("_")[-1].split("-")[-1]
    return (0, int(stem)) if stem.isdigit() else (1, name)


def speaker_folders(split_dir: str, numeric: bool = True) -> Iterator[tuple[str, str, str]]:
    """`(speaker, sub-folder name, sub-folder path)` of `split_dir/<speaker>/<chapter or book>/`.

    Speakers in `numeric_key` order; sub-folders too (`numeric`) or alphabetically.
    """
    for spk in sorted(subdirs(split_dir), key=numeric_key):
        inner = subdirs(os.path.join(split_dir, spk))
        for sub in sorted(inner, key=numeric_key) if numeric else inner:
            yield spk, sub, os.path.join(split_dir, spk, sub)


class SpeechCorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the avjax speech corpora: subclasses define the layout and the examples.

    Subclasses set `CORPUS` (a display name), `LAYOUT` (the expected layout, shown in errors),
    `DOC_FEATURE` ("chapter" or "book"), `ROOT` (the corpus' own top folder inside
    manual_dir, which may also be manual_dir itself; "" for none) and implement
    `_is_split_dir(path)` (does this folder hold a split in the layout) and
    `_utterances(split_dir)`; `_load` when one file gives several examples.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First avjax release."}
    CORPUS = "corpus"
    LAYOUT = ""
    DOC_FEATURE = "chapter"
    ROOT = ""
    SPLIT_WORD = "split"  # what a split folder is called in errors ("subset" for LibriLight)
    disable_shuffling = True  # keep reading order: documents stay contiguous

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS' own lookup imports the optional `importlib_resources` package (not a dependency
        # here); the builder's source file is all it needs (there is no checksums file).
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, skip_bad: bool = False, **kwargs: Any):
        self.skip_bad = bool(skip_bad)
        self.skipped: dict[str, list[str]] = {}
        kwargs.setdefault("file_format", tfds.core.FileFormat.ARRAY_RECORD)
        super().__init__(**kwargs)

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.MANUAL_DOWNLOAD_INSTRUCTIONS = cls.manual_instructions()

    @classmethod
    def manual_instructions(cls) -> str:
        return f"Place {cls.CORPUS} in manual_dir:\n{cls.LAYOUT}"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=f"{self.CORPUS} read from a local manual_dir (avjax).",
            features=tfds.features.FeaturesDict(
                {
                    "audio": tfds.features.Audio(
                        shape=(None,), dtype=np.int16, sample_rate=SAMPLE_RATE
                    ),
                    "speaker": tfds.features.Text(),
                    "document": tfds.features.Text(),
                    self.DOC_FEATURE: tfds.features.Text(),
                    "id": tfds.features.Text(),
                    "index": np.int32,
                    "text": tfds.features.Text(),
                    "duration": np.float32,
                }
            ),
            supervised_keys=None,
            disable_shuffling=True,
        )

    # --- layout -----------------------------------------------------------------------------
    def check_manual_dir(self, manual_dir: str | os.PathLike | None) -> dict[str, str]:
        """The corpus splits found under `manual_dir` ({folder name: path}); LayoutError if none."""
        if not manual_dir:
            raise LayoutError(self.CORPUS, "", "no manual_dir given", self.LAYOUT)
        manual_dir = os.fspath(manual_dir)
        if not os.path.isdir(manual_dir):
            raise LayoutError(
                self.CORPUS, manual_dir, f"not a folder ({listing(manual_dir)})", self.LAYOUT
            )
        return self._find_splits(manual_dir)

    def _is_split_dir(self, path: str) -> bool:
        raise NotImplementedError

    def _find_splits(self, manual_dir: str) -> dict[str, str]:
        """{split folder name: path} under `manual_dir/ROOT` (or `manual_dir`)."""
        root = os.path.join(manual_dir, self.ROOT) if self.ROOT else manual_dir
        if not os.path.isdir(root):
            root = manual_dir
        splits = {n: os.path.join(root, n) for n in subdirs(root)}
        splits = {n: p for n, p in splits.items() if self._is_split_dir(p)}
        if not splits:
            raise LayoutError(
                self.CORPUS,
                manual_dir,
                f"no {self.CORPUS} {self.SPLIT_WORD} folder found (in {root}: {listing(root)})",
                self.LAYOUT,
            )
        return splits

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        # dl_manager.manual_dir asserts existence with TFDS' own message; ours names the layout.
        manual_dir = dl_manager._manual_dir  # noqa: SLF001
        splits = self.check_manual_dir(manual_dir)
        return {split_name(n): self._generate_examples(n, p) for n, p in splits.items()}

    # --- examples ---------------------------------------------------------------------------
    def _utterances(self, split_dir: str) -> Iterator[dict[str, Any]]:
        """Per utterance: dict(path=..., speaker, document, doc, id, index, text) in order.

        May set `error` (a message) instead of a field it could not read (e.g. a transcript).
        """
        raise NotImplementedError

    def _load(self, utt: dict[str, Any]) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        """The utterance's `(fields, float32 waveform)` pieces (LibriLight cuts files)."""
        wav = audio_lib.load_audio(utt["path"], strict_rate=True)
        yield utt, wav

    def _bad(self, split: str, path: str, err: Exception) -> None:
        if not self.skip_bad:
            raise err
        self.skipped.setdefault(split, []).append(f"{path}: {err}")
        logging.warning("Skipping bad file (skip_bad=True): %s", err)

    def _generate_examples(
        self, split: str, split_dir: str
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Examples of one split folder, in reading order, with the bad-file policy applied."""
        self.skipped[split] = []
        count = 0
        for utt in self._utterances(split_dir):
            if "error" in utt:
                self._bad(split, utt["path"], ValueError(utt["error"]))
                continue
            try:
                pieces = list(self._load(utt))
            except audio_lib.AudioError as e:
                self._bad(split, utt["path"], e)
                continue
            for fields, wav in pieces:
                count += 1
                yield (
                    fields["id"],
                    {
                        "audio": to_int16(wav),
                        "speaker": fields["speaker"],
                        "document": fields["document"],
                        self.DOC_FEATURE: fields["doc"],
                        "id": fields["id"],
                        "index": int(fields["index"]),
                        "text": fields.get("text", ""),
                        "duration": np.float32(len(wav) / SAMPLE_RATE),
                    },
                )
        bad = len(self.skipped[split])
        if bad:
            logging.warning(
                "%s %s: skipped %d bad file(s) (skip_bad=True), kept %d examples",
                self.CORPUS,
                split,
                bad,
                count,
            )
        else:
            logging.info("%s %s: %d examples", self.CORPUS, split, count)
        if count == 0:
            raise ValueError(
                f"{self.CORPUS}: split folder {split_dir} gave no examples "
                f"({bad} bad files skipped). Expected layout:\n{self.LAYOUT}"
            )
