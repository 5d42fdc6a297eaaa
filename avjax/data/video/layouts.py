"""Readers for audio-visual corpora in their published on-disk layouts (nothing downloaded).

Each reader walks a `manual_dir` and returns `AVItem`s (video path, split, speaker, text,
word label, word timings):

  * `lrs3`: `{pretrain,trainval,test}/<id>/<utt>.mp4` + `<utt>.txt`:
        Text:  SO WE'RE GOING TO TALK
        Conf:  4
        <blank>
        WORD START END ASDSCORE
        SO 0.11 0.25 1.9
        ...
    (`<id>` is the YouTube id, used as the speaker; the word table is optional).
  * `lrs2`: `{main,pretrain}/<id>/<utt>.mp4` + `.txt`, the same format (main: no word table).
    Splits come from `train.txt` / `val.txt` / `test.txt` lists of `<id>/<utt>` at the root
    when present (LRS2's published split lists); otherwise the folder name is the split.
  * `lrw`: `<WORD>/{train,val,test}/<WORD>_<n>.mp4` + `.txt` (`Text: WORD`, `Duration: 0.34
    seconds`: the word is centred in the 1.16 s clip); an optional `Speaker:` line (the
    embedded corpus writes one) gives the speaker.
  * `grid`: `s<N>/<utt>.mpg` with alignments `s<N>/align/<utt>.align`, `align/s<N>/<utt>.align`,
    `alignments/s<N>/<utt>.align` or `align/<utt>.align` (lines `start end word` in 1/25000 s
    units; `sil` and `sp` are pauses). Speakers 1, 2, 20 and 22 are the `test` split (the
    usual unseen-speaker protocol), the others `train`.
  * `dir`: any folder of videos (`.mp4 .avi .mpg .mpeg .mkv .mov .webm`), recursively; a
    sidecar `.txt` (`Text:` line, or the whole file) is the transcript; a top-level
    `train|val|test` folder is the split (else `train`), the video's parent folder the speaker.

Texts are upper-case. A file that cannot be parsed (missing or malformed `.txt` / `.align`,
an unreadable video when `probe=True`) raises `LayoutError` naming it; with `skip_bad=True`
it is skipped, and appended with the reason to `skipped` when a list is given.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Sequence

from absl import logging

LAYOUTS = ("lrs3", "lrs2", "lrw", "grid", "dir")
VIDEO_EXTS = (".mp4", ".avi", ".mpg", ".mpeg", ".mkv", ".mov", ".webm")
LRW_CLIP_S = 1.16  # 29 frames at 25 fps
GRID_TEST_SPEAKERS = ("s1", "s2", "s20", "s22")
GRID_UNITS_PER_S = 25000.0


class LayoutError(ValueError):
    """A corpus file is missing or malformed; the message names it."""


@dataclasses.dataclass(frozen=True)
class AVItem:
    """One utterance of an AV corpus.

    Attributes:
      path: the video file.
      split: the corpus's split name (`pretrain`, `trainval`, `test`, `main`, `train`, `val`).
      speaker: speaker (or channel / video id where the corpus has no speakers).
      text: upper-case transcript ("" when unknown).
      word: LRW's word label (None for sentence corpora).
      words: `(WORD, start_s, end_s)` timings, empty when the corpus gives none.
      uid: a stable id unique within the corpus (relative path without extension).
    """

    path: str
    split: str
    speaker: str
    text: str
    word: str | None = None
    words: tuple[tuple[str, float, float], ...] = ()
    uid: str = ""


def parse_lrs_txt(path: str) -> tuple[str, tuple[tuple[str, float, float], ...]]:
    """`(text, word timings)` from an LRS2/LRS3 `.txt`; LayoutError naming it if malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise LayoutError(f"{path}: cannot read the transcript ({e})") from e
    text = None
    words: list[tuple[str, float, float]] = []
    in_table = False
    for i, line in enumerate(lines):
        if line.startswith("Text:"):
            text = " ".join(line[5:].split()).upper()
        elif line.split()[:2] == ["WORD", "START"]:
            in_table = True
        elif in_table and line.strip():
            parts = line.split()
            try:
                words.append((parts[0].upper(), float(parts[1]), float(parts[2])))
            except (IndexError, ValueError) as e:
                raise LayoutError(f"{path}:{i + 1}: bad word timing line {line!r}") from e
    if text is None:
        raise LayoutError(f"{path}: no 'Text:' line")
    return text, tuple(words)


def parse_lrw_txt(path: str) -> tuple[str, float | None, str | None]:
    """`(word, duration_s or None, speaker or None)` from an LRW `.txt`."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise LayoutError(f"{path}: cannot read the label ({e})") from e
    word = duration = speaker = None
    for line in lines:
        if line.startswith("Text:"):
            word = line[5:].strip().upper()
        elif line.startswith("Duration:"):
            m = re.match(r"Duration:\s*([0-9.]+)", line)
            if m is None:
                raise LayoutError(f"{path}: bad Duration line {line!r}")
            duration = float(m.group(1))
        elif line.startswith("Speaker:"):
            speaker = line[8:].strip()
    if not word:
        raise LayoutError(f"{path}: no 'Text:' line")
    return word, duration, speaker


def parse_grid_align(path: str) -> tuple[str, tuple[tuple[str, float, float], ...]]:
    """`(text, word timings)` from a GRID `.align` (1/25000 s units; sil/sp dropped)."""
    words = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
    except OSError as e:
        raise LayoutError(f"{path}: cannot read the alignment ({e})") from e
    for i, line in enumerate(lines):
        parts = line.split()
        try:
            start, end, w = float(parts[0]), float(parts[1]), parts[2]
        except (IndexError, ValueError) as e:
            raise LayoutError(f"{path}:{i + 1}: bad alignment line {line!r}") from e
        if w.lower() not in ("sil", "sp"):
            words.append((w.upper(), start / GRID_UNITS_PER_S, end / GRID_UNITS_PER_S))
    if not lines:
        raise LayoutError(f"{path}: empty alignment")
    return " ".join(w for w, _, _ in words), tuple(words)


def _videos(folder: str) -> Iterator[str]:
    """Video files under `folder`, sorted, recursively."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(VIDEO_EXTS) and not name.startswith("."):
                yield os.path.join(dirpath, name)


class _Collector:
    """Applies the strict / skip_bad policy while items are made."""

    def __init__(self, skip_bad: bool, skipped: list[tuple[str, str]] | None, probe: bool):
        self.skip_bad, self.skipped, self.probe = skip_bad, skipped, probe
        self.items: list[AVItem] = []
        self.num_skipped = 0

    def add(self, video: str, make: Callable[[], AVItem]) -> None:
        try:
            item = make()
            if self.probe:
                from avjax.data.video import io as video_io

                video_io.probe_video(video)
        except (LayoutError, ValueError) as e:
            if not self.skip_bad:
                if isinstance(e, LayoutError):
                    raise
                raise LayoutError(f"{video}: {e}") from e
            self.num_skipped += 1
            if self.skipped is not None:
                self.skipped.append((video, str(e)))
            return
        self.items.append(item)


def _rel_uid(root: str, video: str) -> str:
    return os.path.splitext(os.path.relpath(video, root))[0].replace(os.sep, "/")


def _sidecar(video: str, ext: str = ".txt") -> str:
    path = os.path.splitext(video)[0] + ext
    if not os.path.exists(path):
        raise LayoutError(f"{video}: its {ext} file {path} is missing")
    return path


def _scan_lrs(root: str, splits: Sequence[str], col: _Collector, split_lists: bool) -> None:
    lists = _lrs2_split_lists(root) if split_lists else {}
    for split in splits:
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            continue
        for video in _videos(folder):
            if not video.endswith(".mp4"):
                continue
            uid = _rel_uid(root, video)
            inner = uid.split("/", 1)[1]

            def make(video: str = video, uid: str = uid, split: str = split, inner: str = inner):
                text, words = parse_lrs_txt(_sidecar(video))
                speaker = inner.split("/")[0]
                return AVItem(video, lists.get(inner, split), speaker, text, None, words, uid)

            col.add(video, make)


def _lrs2_split_lists(root: str) -> dict[str, str]:
    out = {}
    for split in ("train", "val", "test"):
        path = os.path.join(root, f"{split}.txt")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        out[line.split()[0]] = split
    return out


def _scan_lrw(root: str, splits: Sequence[str], col: _Collector) -> None:
    for word in sorted(os.listdir(root)):
        if not os.path.isdir(os.path.join(root, word)):
            continue
        for split in splits:
            folder = os.path.join(root, word, split)
            if not os.path.isdir(folder):
                continue
            for video in _videos(folder):

                def make(video: str = video, split: str = split, word: str = word):
                    label, duration, speaker = parse_lrw_txt(_sidecar(video))
                    if label != word.upper():
                        raise LayoutError(f"{video}: label {label!r} in a {word!r} folder")
                    timing: tuple = ()
                    if duration is not None:
                        mid = LRW_CLIP_S / 2
                        timing = ((label, mid - duration / 2, mid + duration / 2),)
                    return AVItem(
                        video, split, speaker or "", label, label, timing, _rel_uid(root, video)
                    )

                col.add(video, make)


def _grid_align(root: str, speaker: str, utt: str) -> str:
    for cand in (
        os.path.join(root, speaker, "align", utt + ".align"),
        os.path.join(root, "align", speaker, utt + ".align"),
        os.path.join(root, "alignments", speaker, utt + ".align"),
        os.path.join(root, "align", utt + ".align"),
    ):
        if os.path.exists(cand):
            return cand
    raise LayoutError(f"{os.path.join(root, speaker, utt)}: no .align file for it")


def _scan_grid(root: str, splits: Sequence[str], col: _Collector) -> None:
    speakers = [d for d in os.listdir(root) if re.fullmatch(r"s\d+", d)]
    for speaker in sorted(speakers, key=lambda s: int(s[1:])):
        split = "test" if speaker in GRID_TEST_SPEAKERS else "train"
        if split not in splits:
            continue
        folder = os.path.join(root, speaker)
        for name in sorted(os.listdir(folder)):
            if not name.lower().endswith(VIDEO_EXTS):
                continue
            video = os.path.join(folder, name)

            def make(video: str = video, speaker: str = speaker, split: str = split):
                utt = os.path.splitext(os.path.basename(video))[0]
                text, words = parse_grid_align(_grid_align(root, speaker, utt))
                return AVItem(video, split, speaker, text, None, words, f"{speaker}/{utt}")

            col.add(video, make)


def _scan_dir(root: str, splits: Sequence[str] | None, col: _Collector) -> None:
    for video in _videos(root):
        uid = _rel_uid(root, video)
        top = uid.split("/")[0] if "/" in uid else ""
        split = top if top in ("train", "val", "test") else "train"
        if splits is not None and split not in splits:
            continue

        def make(video: str = video, uid: str = uid, split: str = split):
            txt = os.path.splitext(video)[0] + ".txt"
            text = ""
            if os.path.exists(txt):
                try:
                    text = parse_lrs_txt(txt)[0]
                except LayoutError:
                    with open(txt, encoding="utf-8") as f:
                        text = " ".join(f.read().split()).upper()
            speaker = os.path.basename(os.path.dirname(video)) if "/" in uid else ""
            return AVItem(video, split, speaker, text, None, (), uid)

        col.add(video, make)


DEFAULT_SPLITS = {
    "lrs3": ("pretrain", "trainval", "test"),
    "lrs2": ("main", "pretrain"),
    "lrw": ("train", "val", "test"),
    "grid": ("train", "test"),
}


def scan(
    layout: str,
    root: str | os.PathLike,
    splits: Sequence[str] | None = None,
    *,
    skip_bad: bool = False,
    skipped: list[tuple[str, str]] | None = None,
    probe: bool = False,
) -> list[AVItem]:
    """The utterances of the corpus at `root` in `layout` (`LAYOUTS`), in a stable order.

    Args:
      layout: `lrs3`, `lrs2`, `lrw`, `grid` or `dir`.
      root: the corpus folder (the `manual_dir`).
      splits: folder-level splits to read (LRS3: pretrain/trainval/test, LRS2: main/pretrain,
        LRW: train/val/test, GRID: train/test, dir: train/val/test); default all.
      skip_bad: skip (and count) malformed files instead of raising `LayoutError`.
      skipped: receives `(path, reason)` for each skipped file.
      probe: open every video (PyAV) so unreadable ones are found now, not when decoded.

    Returns:
      `AVItem`s; an empty corpus is a LayoutError naming `root` and the layout expected.
    """
    root = os.fspath(root)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown AV layout {layout!r}; expected one of {LAYOUTS}")
    if not os.path.isdir(root):
        raise LayoutError(f"{root}: no such folder (the {layout} manual_dir)")
    col = _Collector(skip_bad, skipped, probe)
    if layout == "dir":
        _scan_dir(root, splits, col)
    else:
        chosen = tuple(splits) if splits is not None else DEFAULT_SPLITS[layout]
        {
            "lrs3": lambda: _scan_lrs(root, chosen, col, split_lists=False),
            "lrs2": lambda: _scan_lrs(root, chosen, col, split_lists=True),
            "lrw": lambda: _scan_lrw(root, chosen, col),
            "grid": lambda: _scan_grid(root, chosen, col),
        }[layout]()
    if col.num_skipped:
        logging.warning("%s at %s: skipped %d bad files", layout, root, col.num_skipped)
    if not col.items:
        raise LayoutError(
            f"{root}: no {layout} utterances found (splits {splits or 'all'}); see "
            "avjax.data.video.layouts for the layout expected"
        )
    return col.items
