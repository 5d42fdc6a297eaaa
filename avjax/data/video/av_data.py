"""The audio-visual data module: a corpus on disk -> cached arrays -> augmented fixed-shape batches.

A task composes one `AVData` (like `avjax.data.speech.speech_lm.SpeechLMData`):

    data = AVData.from_config(config, workdir)
    facts = data.prepare()              # corpus (built if synthetic) -> decoded, resized arrays
    it = data.train_dataset(process_index, process_count)   # endless, checkpointable (grain)
    held = data.eval_batches(process_index, process_count)  # fixed held-out batches

Corpora (`config.data.name`): `synthetic` (the embedded corpus, `av_corpus`, built in the
cache on first use; `config.data.view` = `lrw` word clips or `lrs3` sentences) or a real one
read from `config.data.manual_dir` in its published layout (`lrs3`, `lrs2`, `lrw`, `grid`,
`dir`; `layouts`). The same readers serve both, so the default path is the real path.

Decoding happens once: every utterance of the chosen splits is decoded (`io.read_video`,
25 fps, 16 kHz), cut to the `roi` box (fractions of the frame), resized to `image_size`
(grey if `grayscale`), padded / truncated to `num_frames`, and stored as a prepared artifact
(`avjax.data.artifacts`) under the cache: `video.npy` uint8 `[N, T, S, S, C]`, `audio.npy`
int16 `[N, T * 640]`, `meta.json`. Training reads them memory-mapped, never the MP4s.
A corrupt video is an error naming it; with `skip_bad=True` it is skipped and counted.

Batches (numpy, fixed shapes; `B` = `batch_size // process_count`):

    video    uint8   [B, T, crop, crop, C]   (C = 1 grey or 3 RGB)
    audio    float32 [B, T * 640]            16 kHz, babble noise added when enabled
    mel      float32 [B, 4 * T, 80]          log-mel at 100 Hz (only with `mel=True`)
    label    int32   [B]                     word index in `vocabulary` (-1: no word label)
    text     uint8   [B, max_text]           upper-case transcript bytes, 0-padded
    length   int32   [B]                     valid frames (<= T)
    speaker  int32   [B]                     index in `speakers`

Training augmentations (deterministic per element through grain's `random_map`, so an
iterator restored from a checkpoint continues exactly): random crop (eval: centre crop),
horizontal flip, time masking (frames zeroed), random erasing (one box in every frame),
babble noise from other utterances at an SNR drawn from `babble_snr_db`, and SpecAugment
(frequency and time masks) on the mel.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from typing import Any

import grain
import ml_collections
import numpy as np

from avjax.data.module import DataModule
from avjax.data.video import av_corpus, layouts

Batch = dict[str, np.ndarray]
SAMPLES_PER_FRAME = av_corpus.SAMPLES_PER_FRAME
CACHE_VERSION = 1
NAMES = ("synthetic",) + layouts.LAYOUTS

# (train splits, eval splits) per layout, matched against `AVItem.split`.
DEFAULT_SPLITS = {
    "lrw": (("train",), ("val",)),
    "lrs3": (("pretrain", "trainval"), ("test",)),
    "lrs2": (("train", "pretrain"), ("val",)),
    "grid": (("train",), ("test",)),
    "dir": (("train",), ("val", "test")),
}


def default_config() -> ml_collections.ConfigDict:
    """`config.data` for AV models (override per config; unknown keys are errors)."""
    return ml_collections.ConfigDict(
        {
            "name": "synthetic",  # synthetic | lrs3 | lrs2 | lrw | grid | dir
            "manual_dir": "",
            "cache_dir": "",
            "view": "lrw",  # synthetic only: lrw (word clips) | lrs3 (sentences)
            "synthetic": dataclasses.asdict(av_corpus.CorpusSpec()),
            "build_workers": 2,  # corpus render processes; decoding threads
            "train_splits": "",  # comma-separated; "" = the layout's default
            "eval_splits": "",
            "skip_bad": False,
            "storage": "npy",  # npy (memory-mapped arrays) | tfds (ArrayRecord: data.tfds.av)
            "crops_dir": "",  # tools/preprocess_video.py --out: read DIR/<uid>/<crop>.mp4
            "crop": "mouth",  # with crops_dir: mouth (96² grey ROI) | face (128² aligned)
            "num_frames": 29,
            "image_size": 96,
            "crop_size": 88,
            "roi": (0.0, 0.0, 1.0, 1.0),  # x0, y0, x1, y1 as fractions of the frame
            "grayscale": True,
            "mel": False,
            "max_text": 64,
            "hflip": 0.5,
            "time_masks": 0,
            "time_mask_frames": 5,
            "erase_prob": 0.0,
            "babble_prob": 0.0,
            "babble_snr_db": (0.0, 20.0),
            "spec_freq_masks": 0,
            "spec_time_masks": 0,
            "spec_mask_width": 10,
            "read_threads": 2,  # grain threads making batches (decoded arrays -> augmented)
            "prefetch_batches": 2,
            # worker processes making batches (grain `mp_prefetch`; 0: threads of this
            # process only). Augmentation is numpy, so threads share one interpreter lock:
            # processes use every core (a host feeding accelerators: its cores / 2)
            "read_processes": 0,
        }
    )


def cache_root(dc: Any) -> str:
    """`config.data.cache_dir`, $AVJAX_CACHE or ~/.cache/avjax."""
    return os.path.expanduser(
        dc.cache_dir or os.environ.get("AVJAX_CACHE") or os.path.expanduser("~/.cache/avjax")
    )


def _splits(dc: Any, layout: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    train, held = DEFAULT_SPLITS[layout]
    if dc.train_splits:
        train = tuple(s.strip() for s in dc.train_splits.split(",") if s.strip())
    if dc.eval_splits:
        held = tuple(s.strip() for s in dc.eval_splits.split(",") if s.strip())
    return train, held


def _artifact_options(root: str, read_only: bool) -> dict[str, Any]:
    """One builder per filesystem when there are several processes (the others wait)."""
    import jax

    from avjax.data import artifacts

    if jax.process_count() == 1:
        return {"read_only": read_only}
    os.makedirs(root, exist_ok=True)
    processes = artifacts.JaxProcesses()
    group = artifacts.filesystem_group(root, processes, read_only=read_only)
    return {"read_only": read_only, "group": group, "processes": processes}


def corpus_root(dc: Any, read_only: bool = False) -> tuple[str, str, dict[str, Any]]:
    """`(layout, folder, identity fields)` of the configured corpus; builds the synthetic one."""
    if dc.name not in NAMES:
        raise ValueError(f"config.data.name={dc.name!r}; expected one of {NAMES}")
    if dc.name == "synthetic":
        if dc.view not in ("lrw", "lrs3"):
            raise ValueError(f"config.data.view={dc.view!r}; expected 'lrw' or 'lrs3'")
        spec = av_corpus.CorpusSpec(**dict(dc.synthetic))
        root = av_corpus.corpus_dir(cache_root(dc), spec)
        av_corpus.build_av_corpus(
            root,
            spec,
            num_workers=int(dc.build_workers),
            **_artifact_options(cache_root(dc), read_only),
        )
        return dc.view, os.path.join(root, dc.view), spec.fields()
    if not dc.manual_dir:
        raise ValueError(f"config.data.name={dc.name!r} needs --config.data.manual_dir=DIR")
    root = os.path.abspath(os.path.expanduser(dc.manual_dir))
    return dc.name, root, {"manual_dir": root}


def _roi_resize(frames: np.ndarray, dc: Any) -> np.ndarray:
    """`[t, H, W, 3]` uint8 -> `[t, S, S, C]`: the roi box, resized, grey if asked."""
    from PIL import Image

    h, w = frames.shape[1:3]
    x0, y0, x1, y1 = (float(v) for v in dc.roi)
    box = (int(round(x0 * w)), int(round(y0 * h)), int(round(x1 * w)), int(round(y1 * h)))
    size = int(dc.image_size)
    out = []
    for f in frames:
        img = Image.fromarray(f).crop(box).resize((size, size), Image.Resampling.BILINEAR)
        out.append(np.asarray(img.convert("L"))[..., None] if dc.grayscale else np.asarray(img))
    return np.stack(out)


def decode_item(item: layouts.AVItem, dc: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """`(video uint8 [T, S, S, C], audio int16 [T * 640], valid frames)` of one utterance.

    Reads only the first `num_frames` frames (streaming); a silent video gets silent audio.
    Raises `io.VideoError` naming the file when it cannot be decoded.
    """
    from avjax.data.video import io as video_io

    t = int(dc.num_frames)
    frames, audio = [], []
    got = 0
    for chunk in video_io.iter_video(item.path, chunk_frames=t, require_audio=False):
        frames.append(chunk.frames[: t - got])
        audio.append(chunk.audio[: (t - got) * SAMPLES_PER_FRAME])
        got += len(frames[-1])
        if got >= t:
            break
    video = _roi_resize(np.concatenate(frames), dc)
    length = len(video)
    out = np.zeros((t, *video.shape[1:]), np.uint8)
    out[:length] = video
    wav = np.zeros(t * SAMPLES_PER_FRAME, np.int16)
    a = np.concatenate(audio)
    wav[: len(a)] = np.round(np.clip(a, -1, 1) * 32767).astype(np.int16)
    return out, wav, length


def text_within(item: layouts.AVItem, seconds: float) -> str:
    """The transcript, cut to the words that start within the first `seconds`."""
    if not item.words or item.word is not None or item.words[-1][1] < seconds:
        return item.text
    return " ".join(w for w, start, _ in item.words if start < seconds)


def _write_cache(tmp: str, items: list[layouts.AVItem], dc: Any) -> dict[str, Any]:
    """Decodes `items` into `tmp` (video.npy, audio.npy, meta.json); returns build info."""
    from avjax.data.video import io as video_io

    t, size, ch = int(dc.num_frames), int(dc.image_size), 1 if dc.grayscale else 3
    video = np.lib.format.open_memmap(
        os.path.join(tmp, "video.npy"), "w+", np.uint8, (len(items), t, size, size, ch)
    )
    audio = np.lib.format.open_memmap(
        os.path.join(tmp, "audio.npy"), "w+", np.int16, (len(items), t * SAMPLES_PER_FRAME)
    )
    meta, skipped = [], []

    def decode(item: layouts.AVItem) -> tuple | video_io.VideoError:
        try:
            return decode_item(item, dc)
        except video_io.VideoError as e:
            return e

    # Threads: FFmpeg decoding and PIL resizing release the GIL.
    with concurrent.futures.ThreadPoolExecutor(max(int(dc.build_workers), 1)) as pool:
        results = pool.map(decode, items)
        for item, res in zip(items, results, strict=True):
            if isinstance(res, video_io.VideoError):
                if not dc.skip_bad:
                    raise res
                skipped.append([item.path, str(res)])
                continue
            v, a, n = res
            i = len(meta)
            video[i], audio[i] = v, a
            text = text_within(item, t / av_corpus.FPS)
            meta.append([item.uid, item.split, item.speaker, text, item.word, n])
    video.flush()
    audio.flush()
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"items": meta, "skipped": skipped}, f)
    return {"items": len(meta), "skipped": len(skipped), "bytes": video.nbytes + audio.nbytes}


def _write_tfds(tmp: str, items: list[layouts.AVItem], layout: str, dc: Any) -> dict:
    """As `_write_cache`, but the arrays go into a TFDS dataset (`avjax.data.tfds.av`) in
    `tmp`; meta.json lists the kept items in the same order and format."""
    from avjax.data.tfds import av as tfds_av

    t = int(dc.num_frames)
    lengths: dict[str, int] = {}

    def decode(item: layouts.AVItem) -> tuple[np.ndarray, np.ndarray, int]:
        video, audio, lengths[item.uid] = decode_item(item, dc)
        return video, audio, lengths[item.uid]

    builder = tfds_av.write(
        tmp,
        _tfds_config(layout, dc),
        items,
        decode,
        text_of=lambda item: text_within(item, t / av_corpus.FPS),
        skip_bad=bool(dc.skip_bad),
    )
    skipped = builder.info.metadata.get("skipped", [])
    bad = {path for path, _ in skipped}
    meta = [
        [it.uid, it.split, it.speaker, text_within(it, t / av_corpus.FPS), it.word, lengths[it.uid]]
        for it in items
        if it.path not in bad
    ]
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"items": meta, "skipped": skipped}, f)
    sizes = {k: v.num_bytes for k, v in builder.info.splits.items()}
    return {"items": len(meta), "skipped": len(skipped), "bytes": int(sum(sizes.values()))}


def _tfds_config(layout: str, dc: Any) -> Any:
    from avjax.data.tfds import av as tfds_av

    ch = 1 if dc.grayscale else 3
    return tfds_av.config_for(layout, dc.num_frames, dc.image_size, ch, "avdata")


def _tfds_positions(meta: list) -> list[tuple[str, int]]:
    """`(TFDS split, position in it)` of each meta row (splits keep reading order)."""
    from avjax.data.tfds.base import split_name

    seen: dict[str, int] = {}
    out = []
    for m in meta:
        split = split_name(m[1])
        out.append((split, seen.get(split, 0)))
        seen[split] = out[-1][1] + 1
    return out


class _NpyStore:
    """Decoded arrays of `_write_cache` (memory-mapped; opened lazily in each process)."""

    def __init__(self, folder: str):
        self.folder = folder
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:  # a worker process maps the files itself
        return {**self.__dict__, "_arrays": None}

    def get(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """`(video [T, S, S, C] uint8, audio [T * 640] int16)` of meta row `j`."""
        if self._arrays is None:
            self._arrays = (
                np.load(os.path.join(self.folder, "video.npy"), mmap_mode="r"),
                np.load(os.path.join(self.folder, "audio.npy"), mmap_mode="r"),
            )
        return self._arrays[0][j], self._arrays[1][j]


class _TfdsStore:
    """Decoded arrays of `_write_tfds` (TFDS data sources, opened lazily in each process)."""

    def __init__(self, folder: str, layout: str, meta: list, dc: Any):
        self.folder, self.config = folder, _tfds_config(layout, dc)
        self.where = _tfds_positions(meta)
        self._sources: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:  # a worker process opens the sources itself
        return {**self.__dict__, "_sources": None}

    def get(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        if self._sources is None:
            from avjax.data.tfds import av as tfds_av

            builder = tfds_av.load(self.folder, self.config)
            self._sources = {s: builder.as_data_source(split=s) for s in builder.info.splits}
        split, i = self.where[j]
        ex = self._sources[split][i]
        return ex["video"], ex["audio"]


class _Source:
    """Random access to the cached examples of some meta rows (`indices`) through a store."""

    def __init__(self, store: Any, indices: np.ndarray, meta: list, vocab: dict, spk: dict, dc):
        self.store, self.indices, self.meta = store, indices, meta
        self.vocab, self.spk, self.max_text = vocab, spk, int(dc.max_text)

    def __len__(self) -> int:
        return len(self.indices)

    def audio(self, i: int) -> np.ndarray:
        """float32 `[T * 640]` of source element `i`."""
        return self.store.get(int(self.indices[i]))[1].astype(np.float32) / 32767.0

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        j = int(self.indices[i])
        video, audio = self.store.get(j)
        _, _, speaker, text, word, length = self.meta[j]
        raw = text.encode("utf-8")[: self.max_text]
        text_arr = np.zeros(self.max_text, np.uint8)
        text_arr[: len(raw)] = np.frombuffer(raw, np.uint8)
        return {
            "video": np.asarray(video),
            "audio": audio.astype(np.float32) / 32767.0,
            "label": np.int32(self.vocab.get(word, -1) if word else -1),
            "text": text_arr,
            "length": np.int32(length),
            "speaker": np.int32(self.spk.get(speaker, -1)),
        }


def _crop(video: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """`[T, S, S, C]` -> `[T, size, size, C]`: random (rng given) or centre crop."""
    s = video.shape[1]
    if size >= s:
        return video
    if rng is None:
        y = x = (s - size) // 2
    else:
        y, x = (int(v) for v in rng.integers(0, s - size + 1, 2))
    return video[:, y : y + size, x : x + size]


def mix_babble(wav: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """`wav [samples]` + `noise [samples]` (same length) scaled so that power(wav) /
    power(noise) is `snr_db` dB -> float32 `[samples]`; `wav` unchanged if either is silent."""
    p_s, p_n = float(np.mean(wav**2)), float(np.mean(noise**2))
    if p_s <= 0 or p_n <= 0:
        return wav
    return (wav + noise * np.sqrt(p_s / (p_n * 10 ** (snr_db / 10)))).astype(np.float32)


def _spec_augment(mel: np.ndarray, dc: Any, rng: np.random.Generator) -> np.ndarray:
    """Frequency and time masks (filled with the mean) on `[frames, mels]`."""
    mel = mel.copy()
    fill = float(mel.mean())
    width = int(dc.spec_mask_width)
    for axis, count in ((1, int(dc.spec_freq_masks)), (0, int(dc.spec_time_masks))):
        for _ in range(count):
            w = int(rng.integers(0, width + 1))
            start = int(rng.integers(0, max(mel.shape[axis] - w, 0) + 1))
            if axis == 1:
                mel[:, start : start + w] = fill
            else:
                mel[start : start + w] = fill
    return mel


def _mel(wav: np.ndarray, num_frames: int) -> np.ndarray:
    from avjax.data.speech import logmel

    return logmel.unit_mel(logmel.log_mel(wav), num_frames)


class _Augment:
    """The per-example transform: crop, flip, masks, erasing, babble, mel, SpecAugment."""

    def __init__(self, source: _Source, dc: Any, train: bool):
        self.source, self.dc, self.train = source, dc, train

    def _video(self, video: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
        dc = self.dc
        video = _crop(video, int(dc.crop_size), rng)
        if rng.random() < float(dc.hflip):
            video = video[:, :, ::-1]
        video = np.ascontiguousarray(video)
        for _ in range(int(dc.time_masks)):
            w = int(rng.integers(0, int(dc.time_mask_frames) + 1))
            start = int(rng.integers(0, max(length - w, 0) + 1))
            video[start : start + w] = 0
        if rng.random() < float(dc.erase_prob):
            h = video.shape[1]
            area = rng.uniform(0.02, 0.2) * h * h
            aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
            eh = int(min(h, round(np.sqrt(area * aspect))))
            ew = int(min(h, round(np.sqrt(area / aspect))))
            y, x = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, h - ew + 1))
            video[:, y : y + eh, x : x + ew] = rng.integers(0, 256, (1, eh, ew, video.shape[3]))
        return video

    def __call__(self, ex: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
        dc = self.dc
        ex = dict(ex)
        if not self.train:
            ex["video"] = np.ascontiguousarray(_crop(ex["video"], int(dc.crop_size), None))
            if dc.mel:
                ex["mel"] = _mel(ex["audio"], int(dc.num_frames))
            return ex
        ex["video"] = self._video(ex["video"], int(ex["length"]), rng)
        if rng.random() < float(dc.babble_prob) and len(self.source) > 1:
            other = int(rng.integers(len(self.source) - 1))
            noise = self.source.audio(other)  # (may be the example itself: rare, harmless)
            lo, hi = (float(v) for v in dc.babble_snr_db)
            ex["audio"] = mix_babble(ex["audio"], noise, float(rng.uniform(lo, hi)))
        if dc.mel:
            ex["mel"] = _spec_augment(_mel(ex["audio"], int(dc.num_frames)), dc, rng)
        return ex


def _in_processes(ds: grain.IterDataset, processes: int) -> grain.IterDataset:
    """`ds` made by `processes` worker processes (grain `mp_prefetch`), or `ds` itself for 0.

    The workers split the batches round-robin, so the batches and their order are those of
    `ds`, and the iterator's state (a checkpoint) holds every worker's position.
    """
    if processes <= 0:
        return ds
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads its own absl flags in the workers
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=processes))


def with_crops(items: list[layouts.AVItem], dc: Any) -> tuple[list[layouts.AVItem], int]:
    """`(items, skipped)`: with `data.crops_dir` set, each item reads its preprocessed crop
    `crops_dir/<uid>/<crop>.mp4` (`tools/preprocess_video.py --input=<manual_dir>` writes them
    at the same relative paths) instead of its video; an item without one (e.g. a video in
    which no face was found) is an error naming the file, or skipped and counted with
    `skip_bad`. Without `crops_dir`, the items as they are (the raw frames)."""
    if not dc.crops_dir:
        return items, 0
    if dc.crop not in ("mouth", "face"):
        raise ValueError(f"config.data.crop={dc.crop!r}; expected 'mouth' or 'face'")
    root, out = os.path.abspath(os.path.expanduser(dc.crops_dir)), []
    for it in items:
        path = os.path.join(root, *it.uid.split("/"), f"{dc.crop}.mp4")
        if os.path.exists(path):
            out.append(dataclasses.replace(it, path=path))
        elif not dc.skip_bad:
            raise FileNotFoundError(
                f"{path}: no {dc.crop} crop of {it.path} in config.data.crops_dir (run "
                f"tools/preprocess_video.py --input=<manual_dir> --out={dc.crops_dir}, or set "
                "config.data.skip_bad=True to skip videos without one)"
            )
    return out, len(items) - len(out)


def _decoded_cache(
    dc: Any, layout: str, identity: dict, items: list[layouts.AVItem], read_only: bool
) -> tuple[str, list, int]:
    """`(folder, meta rows, skipped)` of the prepared artifact holding `items` decoded.

    Keyed by the corpus, the utterances and every field that shapes the arrays; stored as
    memory-mapped arrays (`data.storage="npy"`) or a TFDS dataset (`"tfds"`)."""
    from avjax.data import artifacts

    if dc.storage not in ("npy", "tfds"):
        raise ValueError(f"config.data.storage={dc.storage!r}; expected 'npy' or 'tfds'")
    fields = {
        "version": CACHE_VERSION,
        "corpus": identity,
        "layout": layout,
        "uids": artifacts.fingerprint(sorted(it.uid for it in items)),
        **{k: dc[k] for k in ("num_frames", "image_size", "grayscale", "skip_bad")},
        "roi": [float(v) for v in dc.roi],
    }
    if dc.storage == "tfds":  # (npy caches keep the key they had before storage existed)
        fields["storage"] = "tfds"
    if dc.crops_dir:
        fields["crops"] = [os.path.abspath(os.path.expanduser(dc.crops_dir)), str(dc.crop)]
    folder = os.path.join(cache_root(dc), "av_frames", artifacts.fingerprint(fields))
    if dc.storage == "tfds":
        build = lambda tmp: _write_tfds(os.fspath(tmp), items, layout, dc)  # noqa: E731
    else:
        build = lambda tmp: _write_cache(os.fspath(tmp), items, dc)  # noqa: E731
    art = artifacts.prepare_artifact(
        folder,
        fields,
        build,
        what=f"the decoded {layout} frames",
        **_artifact_options(cache_root(dc), read_only),
    )
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)["items"]
    return folder, meta, int(art.info.get("skipped", 0))


class AVData(DataModule):
    """One AV corpus as cached arrays and grain pipelines; prepared once, lazily.

    Fields as `DataModule`: `data` is `config.data` (see `default_config`); `seed` drives the
    shuffling and the augmentations; `workdir` receives `data_facts.json`.
    """

    def prepare(self, read_only: bool | None = None) -> dict[str, Any]:
        """Builds the synthetic corpus if needed and the decoded-array cache; returns facts."""
        if self._prepared is not None:
            return self._prepared["facts"]
        dc = self.data
        read_only = self._resolve_read_only(read_only)
        layout, root, identity = corpus_root(dc, read_only)
        train_splits, eval_splits = _splits(dc, layout)
        items = layouts.scan(layout, root, skip_bad=bool(dc.skip_bad))
        scanned = len(items)
        items = [it for it in items if it.split in train_splits + eval_splits]
        items, no_crop = with_crops(items, dc)
        if not items:
            raise ValueError(
                f"{root}: no {layout} utterances in splits {train_splits + eval_splits}"
            )
        folder, meta, skipped = _decoded_cache(dc, layout, identity, items, read_only)
        skipped += no_crop
        vocab = sorted({m[4] for m in meta if m[4]})
        spk = sorted({m[2] for m in meta})
        split_of = np.array([m[1] for m in meta])
        facts = {
            "layout": layout,
            "root": root,
            "cache": folder,
            "storage": str(dc.storage),
            "scanned": scanned,
            "train_items": int(np.isin(split_of, train_splits).sum()),
            "eval_items": int(np.isin(split_of, eval_splits).sum()),
            "skipped": skipped,
            "vocab_size": len(vocab),
            "speakers": len(spk),
        }
        store = _TfdsStore(folder, layout, meta, dc) if dc.storage == "tfds" else _NpyStore(folder)
        self._prepared = {
            "facts": facts,
            "meta": meta,
            "store": store,
            "vocab": {w: i for i, w in enumerate(vocab)},
            "speakers": {s: i for i, s in enumerate(spk)},
            "train": np.flatnonzero(np.isin(split_of, train_splits)),
            "eval": np.flatnonzero(np.isin(split_of, eval_splits)),
        }
        self._write_facts(facts, read_only)
        return facts

    @property
    def vocabulary(self) -> list[str]:
        """Word labels (`label` indexes it)."""
        return list(self._get("vocab"))

    @property
    def speakers(self) -> list[str]:
        return list(self._get("speakers"))

    def compatibility(self) -> dict[str, Any]:
        """What a checkpoint trained on these data must share (the label vocabulary)."""
        self.prepare()
        return {"av_data": {"name": self.data.name, "vocabulary": self.vocabulary}}

    def _source(self, split: str) -> _Source:
        p = self._prepared if self._prepared is not None else None
        if p is None:
            self.prepare()
            p = self._prepared
        idx = p[split]
        if not len(idx):
            raise ValueError(f"AVData: no {split} utterances ({self.facts})")
        return _Source(p["store"], idx, p["meta"], p["vocab"], p["speakers"], self.data)

    def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        """Endless shuffled, augmented batches of this process's share (checkpointable)."""
        src = self._source("train")
        if len(src) < process_count:
            raise ValueError(f"{len(src)} examples cannot be split over {process_count} processes")
        ds = grain.MapDataset.source(src).shuffle(seed=self.seed).repeat(None)
        ds = ds[process_index::process_count]
        ds = ds.random_map(_Augment(src, self.data, train=True), seed=self.seed + 1)
        ds = ds.batch(self.per_process_batch(process_count), drop_remainder=True)
        options = grain.ReadOptions(
            num_threads=int(self.data.read_threads),
            prefetch_buffer_size=int(self.data.prefetch_batches),
        )
        return _in_processes(ds.to_iter_dataset(options), int(self.data.read_processes))

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        """`num_eval_batches` fixed held-out batches (centre crop, no augmentation), cycled."""
        src = self._source("eval")
        aug = _Augment(src, self.data, train=False)
        per = self.per_process_batch(process_count)
        total = per * process_count * self.num_eval_batches
        order = [i % len(src) for i in range(total)][process_index::process_count]
        out = []
        for b in range(0, len(order), per):
            exs = [aug(src[i], None) for i in order[b : b + per]]
            out.append({k: np.stack([x[k] for x in exs]) for k in exs[0]})
        return out

    def dummy_batch(self) -> Batch:
        """A global batch of zeros with the batch shapes (initialisation, compilation)."""
        dc, b, t = self.data, self.batch_size, int(self.data.num_frames)
        c, s = 1 if dc.grayscale else 3, min(int(dc.crop_size), int(dc.image_size))
        batch = {
            "video": np.zeros((b, t, s, s, c), np.uint8),
            "audio": np.zeros((b, t * SAMPLES_PER_FRAME), np.float32),
            "label": np.zeros((b,), np.int32),
            "text": np.zeros((b, int(dc.max_text)), np.uint8),
            "length": np.full((b,), t, np.int32),
            "speaker": np.zeros((b,), np.int32),
        }
        if dc.mel:
            batch["mel"] = np.zeros((b, 4 * t, 80), np.float32)
        return batch
