"""A TFDS builder for audio-visual corpora (LRS3, LRS2, LRW, GRID, a folder of videos).

The corpus is read from a local `manual_dir` in its published layout by
`avjax.data.video.layouts.scan` (never downloaded); every utterance is decoded once (25 fps,
16 kHz), cut to the configured region of interest (mouth crop or the whole frame), resized and
stored as ArrayRecord (random access, for grain), one TFDS split per corpus split (`train`,
`val`, `pretrain`, ...), each in reading order. Example features:

  video   uint8  [num_frames, image_size, image_size, C]   (C = 1 grey, 3 RGB), zero-padded
  audio   int16  [num_frames * 640]                         16 kHz, zero-padded
  length  int32  valid frames (<= num_frames)
  uid, split, speaker, text, word                           strings ("" where unknown)

    builder = build_av("lrw", manual_dir="/data/lrw", data_dir="/cache/tfds", num_frames=29)
    source = builder.as_data_source(split="train")          # source[i] -> example dict

A corrupt video raises `VideoError` naming the file, or with `skip_bad=True` is skipped and
counted (`builder.info.metadata["skipped"]`). `AVData` stores its decoded arrays this way with
`--config.data.storage=tfds`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from avjax.data.tfds.base import split_name

SAMPLES_PER_FRAME = 640  # 16 kHz audio per 25 fps frame

# `decode(item) -> (video [T, S, S, C] uint8, audio [T * 640] int16, valid frames)`.
Decode = Callable[[Any], tuple[np.ndarray, np.ndarray, int]]


@dataclasses.dataclass(eq=False)
class AVBuilderConfig(tfds.core.BuilderConfig):
    """What shapes the stored arrays (the config name must differ when any of these do)."""

    layout: str = "lrw"
    num_frames: int = 29
    image_size: int = 96
    channels: int = 1


class AvjaxAV(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Decoded AV utterances of one corpus; made with the utterances and a decoder.

    Args (besides TFDS' `data_dir`, `config`):
      items: the corpus' `layouts.AVItem`s (from `layouts.scan`), in the order to store.
      decode: one item -> arrays (`Decode`); `VideoError` for an unreadable video.
      text_of: the transcript to store for an item (default `item.text`).
      skip_bad: skip and count undecodable videos instead of raising.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First avjax release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Give the corpus folder in its published layout as manual_dir."

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))  # (TFDS' lookup needs importlib_resources)

    def __init__(
        self,
        *,
        items: Sequence[Any] = (),
        decode: Decode | None = None,
        text_of: Callable[[Any], str] | None = None,
        skip_bad: bool = False,
        **kwargs: Any,
    ):
        self.items, self.decode, self.skip_bad = list(items), decode, bool(skip_bad)
        self.text_of = text_of or (lambda item: item.text)
        self.skipped: list[list[str]] = []
        kwargs.setdefault("file_format", tfds.core.FileFormat.ARRAY_RECORD)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        t, s = int(c.num_frames), int(c.image_size)
        return self.dataset_info_from_configs(
            description=f"{c.layout} audio-visual utterances read from a local manual_dir.",
            features=tfds.features.FeaturesDict(
                {
                    "video": tfds.features.Tensor(shape=(t, s, s, c.channels), dtype=np.uint8),
                    "audio": tfds.features.Tensor(shape=(t * SAMPLES_PER_FRAME,), dtype=np.int16),
                    "length": np.int32,
                    **{k: tfds.features.Text() for k in ("uid", "split", "speaker", "text")},
                    "word": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager  # the items were scanned from manual_dir already
        if self.decode is None or not self.items:
            raise ValueError("AvjaxAV needs items and a decode function to build")
        splits = sorted({it.split for it in self.items})
        return {split_name(s): self._generate_examples(s) for s in splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Examples of one corpus split in reading order; undecodable videos per `skip_bad`."""
        from avjax.data.video.io import VideoError

        for item in self.items:
            if item.split != split:
                continue
            try:
                video, audio, length = self.decode(item)
            except VideoError as e:
                if not self.skip_bad:
                    raise
                self.skipped.append([item.path, str(e)])
                continue
            yield item.uid, self._example(item, video, audio, length)
        self.info.metadata["skipped"] = list(self.skipped)

    def _example(self, item: Any, video: np.ndarray, audio: np.ndarray, n: int) -> dict:
        return {
            "video": video,
            "audio": audio,
            "length": np.int32(n),
            "uid": item.uid,
            "split": item.split,
            "speaker": item.speaker,
            "text": self.text_of(item),
            "word": item.word or "",
        }


def config_for(layout: str, num_frames: int, image_size: int, channels: int, key: str):
    """A builder config named by `layout` and `key` (a fingerprint of every other input)."""
    return AVBuilderConfig(
        name=f"{layout}_{key}",
        layout=layout,
        num_frames=int(num_frames),
        image_size=int(image_size),
        channels=int(channels),
    )


def write(
    data_dir: str | os.PathLike,
    config: AVBuilderConfig,
    items: Sequence[Any],
    decode: Decode,
    *,
    text_of: Callable[[Any], str] | None = None,
    skip_bad: bool = False,
) -> AvjaxAV:
    """Builds the dataset of `items` into `data_dir` (once; a later call loads it)."""
    builder = AvjaxAV(
        data_dir=os.fspath(data_dir),
        config=config,
        items=items,
        decode=decode,
        text_of=text_of,
        skip_bad=skip_bad,
    )
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder


def load(data_dir: str | os.PathLike, config: AVBuilderConfig) -> AvjaxAV:
    """The built dataset in `data_dir` (an error naming it when it is not there)."""
    builder = AvjaxAV(data_dir=os.fspath(data_dir), config=config)
    if not builder.is_prepared():
        raise FileNotFoundError(f"{data_dir}: no built {config.name} AV dataset")
    return builder


def build_av(
    layout: str,
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    num_frames: int = 29,
    image_size: int = 96,
    grayscale: bool = True,
    roi: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
    splits: Sequence[str] | None = None,
    skip_bad: bool = False,
) -> AvjaxAV:
    """Scans `manual_dir` in `layout` and builds (or loads) its dataset under `data_dir`.

    The stored arrays are those `AVData` trains on with the same `num_frames`, `image_size`,
    `grayscale` and `roi` (`config.data` fields): `av_data.decode_item` makes both.
    """
    import ml_collections

    from avjax.data import artifacts
    from avjax.data.video import av_data, layouts

    items = layouts.scan(layout, manual_dir, splits, skip_bad=skip_bad)
    dc = ml_collections.ConfigDict(
        {"num_frames": num_frames, "image_size": image_size, "grayscale": grayscale, "roi": roi}
    )
    key = artifacts.fingerprint(
        {
            "manual_dir": os.path.abspath(os.fspath(manual_dir)),
            "uids": sorted(it.uid for it in items),
            "roi": [float(v) for v in roi],
            "skip_bad": bool(skip_bad),
        }
    )
    config = config_for(layout, num_frames, image_size, 1 if grayscale else 3, key)
    return write(
        data_dir,
        config,
        items,
        lambda item: av_data.decode_item(item, dc),
        text_of=lambda item: av_data.text_within(item, num_frames / 25.0),
        skip_bad=skip_bad,
    )
