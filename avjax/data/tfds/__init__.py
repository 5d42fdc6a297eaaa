"""TFDS builders for real speech corpora, read from a local `manual_dir` (never downloaded).

  data.name         TFDS name                  layout (see each module)
  librispeech       avjax_librispeech          LibriSpeech/<split>/<spk>/<chapter>/*.flac
  librilight        avjax_librilight/<cfg>     <subset>/<spk>/<book>/*.flac + .json
  librispeech_long  avjax_librispeech_long     librispeech-long/<split>/<spk>/<chapter>/*.flac

(TFDS ships its own `librispeech`, which downloads; ours are prefixed `avjax_`.) All write
ArrayRecord and are read back with `tfds.data_source` (random access, for grain):

  builder = build("librispeech", manual_dir="/data", data_dir="/cache/tfds")
  source = builder.as_data_source(split="train_clean_100")   # source[i] -> example dict
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from avjax.data.tfds.base import LayoutError, SpeechCorpusBuilder, split_name
from avjax.data.tfds.librilight import AvjaxLibrilight, LibriLightConfig, cut_by_vad
from avjax.data.tfds.librispeech import AvjaxLibrispeech
from avjax.data.tfds.librispeech_long import AvjaxLibrispeechLong

BUILDERS: dict[str, type[SpeechCorpusBuilder]] = {
    "librispeech": AvjaxLibrispeech,
    "librilight": AvjaxLibrilight,
    "librispeech_long": AvjaxLibrispeechLong,
}

__all__ = [
    "BUILDERS",
    "AvjaxLibrilight",
    "AvjaxLibrispeech",
    "AvjaxLibrispeechLong",
    "LayoutError",
    "LibriLightConfig",
    "SpeechCorpusBuilder",
    "build",
    "cut_by_vad",
    "manual_dir_fingerprint",
    "split_name",
]


def builder_class(name: str) -> type[SpeechCorpusBuilder]:
    """The builder for a corpus name (`librispeech`, `librilight`, `librispeech_long`)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown corpus {name!r}: expected one of {sorted(BUILDERS)}")
    return BUILDERS[name]


def manual_dir_fingerprint(manual_dir: str | os.PathLike) -> str:
    """A hash of the corpus files under `manual_dir` (relative paths, sizes, mtimes).

    Symlinked folders and files count by what they point to (the files TFDS would read), so
    a file added through a link changes the fingerprint.
    """
    from avjax.data.speech.corpus import walk_files

    root = os.path.abspath(os.fspath(manual_dir))
    h = hashlib.sha256(root.encode())
    for path in walk_files(root):
        if path.endswith((".flac", ".wav", ".txt", ".json")):
            st = os.stat(path)  # (follows links)
            rel = os.path.relpath(path, root)
            h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def build(
    name: str,
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    skip_bad: bool = False,
    config: str | tfds.core.BuilderConfig | None = None,
) -> SpeechCorpusBuilder:
    """Builds corpus `name` from `manual_dir` into `data_dir` (once; later calls load it).

    Raises:
      LayoutError: `manual_dir` is missing or not in the corpus layout (the message shows
        the expected layout and what was found).
      AudioError / ValueError: a bad file (named), unless `skip_bad`.
    """
    cls = builder_class(name)
    kwargs: dict[str, Any] = {"data_dir": os.fspath(data_dir), "skip_bad": skip_bad}
    if config is not None:
        kwargs["config"] = config
    builder = cls(**kwargs)
    if not builder.is_prepared():
        manual_dir = os.path.abspath(os.fspath(manual_dir)) if manual_dir else ""
        builder.check_manual_dir(manual_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
        )
        skipped = sum(len(v) for v in builder.skipped.values())
        logging.info(
            "Built %s in %s: %s (%d bad files skipped)",
            builder.name,
            builder.data_dir,
            {k: v.num_examples for k, v in builder.info.splits.items()},
            skipped,
        )
    return builder
