"""Speech corpora as lists of `Utterance`s: the embedded default corpus and user audio folders.

Default corpus (`build_default_corpus`): procedurally generated stories (`stories.py`) read by
espeak-ng voices (`espeak.py`). Each story is one document read by one voice; each paragraph is
one utterance, listed in reading order, so concatenating a document's utterances gives minutes
of continuous speech with long-range structure. Whole stories are held out. Built offline on
first use into `root`, cached, rebuilt when the parameters change:

  root/stamp.json         parameters + version + summary (the cache key)
  root/manifest.jsonl     one Utterance per line, documents in order, paragraphs in order
  root/wavs/<doc>/<utt>.wav   16 kHz 16-bit mono

User corpora (`scan_audio_dir`): every *.wav / *.flac under a folder (recursively); speaker =
parent folder name, one document per file, optional sibling `<name>.txt` transcript. Each file
is decoded once to validate it; a corrupt or empty file raises `AudioError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging

from avjax.data import audio as audio_lib

CORPUS_VERSION = 2  # bump whenever stories, voices or synthesis change
MANIFEST = "manifest.jsonl"
STAMP = "stamp.json"
SPLITS = ("train", "heldout")


@dataclasses.dataclass
class Utterance:
    """One audio file of a document.

    Attributes:
      id: unique utterance id.
      doc_id: the document (story, chapter, file) it belongs to; a document's utterances are
        consecutive in corpus lists and in reading order.
      speaker: speaker / voice name.
      split: "train" or "heldout" (whole documents).
      text: transcript ("" when unknown).
      audio_path: absolute path of the audio file.
      num_samples: length at `sample_rate` (after resampling to it).
      sample_rate: 16000.
      phones: `(start_s, end_s, symbol)` phone timings within the file ([] when unknown).
      index: position of the utterance within its document.
    """

    id: str
    doc_id: str
    speaker: str
    split: str
    text: str
    audio_path: str
    num_samples: int
    sample_rate: int = audio_lib.SAMPLE_RATE
    phones: list[tuple[float, float, str]] = dataclasses.field(default_factory=list)
    index: int = 0

    @property
    def duration(self) -> float:
        """Seconds."""
        return self.num_samples / self.sample_rate

    def to_json(self, root: str | None = None) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if root is not None:
            d["audio_path"] = os.path.relpath(self.audio_path, root)
        d["phones"] = [[round(a, 4), round(b, 4), s] for a, b, s in self.phones]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], root: str | None = None) -> Utterance:
        d = dict(d)
        if root is not None and not os.path.isabs(d["audio_path"]):
            d["audio_path"] = os.path.join(root, d["audio_path"])
        d["phones"] = [(float(a), float(b), str(s)) for a, b, s in d.get("phones", [])]
        return cls(**d)


def _stamp_params(minutes: float, heldout_fraction: float, seed: int) -> dict[str, Any]:
    return {
        "version": CORPUS_VERSION,
        "kind": "espeak-stories",
        "minutes": float(minutes),
        "heldout_fraction": float(heldout_fraction),
        "seed": int(seed),
        "sample_rate": audio_lib.SAMPLE_RATE,
    }


def default_corpus_key(minutes: float, heldout_fraction: float, seed: int = 0) -> dict[str, Any]:
    """What defines a default corpus (its stories, voices and splits): its cache key."""
    return _stamp_params(minutes, heldout_fraction, seed)


def _read_stamp(root: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(root, STAMP)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _story_plan(
    seed: int, index: int, minutes: float
) -> tuple[int, int, int | None, tuple[str, int, int]]:
    """(story seed, paragraphs, sentence cap, speaker) of the `index`-th story of a corpus.

    Stories have 6-10 paragraphs (~2-3.5 min); corpora under 4 minutes (tests) get short
    4-paragraph stories of 2 sentences per paragraph (~20 s) so they still hold several.
    """
    from avjax.data.speech.espeak import SPEAKERS

    r = random.Random(f"avjax-corpus-{seed}-{index}")
    # Speakers cycle in a seeded order so every block of len(SPEAKERS) stories uses all voices.
    order = list(range(len(SPEAKERS)))
    random.Random(f"avjax-corpus-speakers-{seed}").shuffle(order)
    speaker = SPEAKERS[order[index % len(SPEAKERS)]]
    if minutes < 4:
        return seed * 100_003 + index, 4, 2, speaker
    return seed * 100_003 + index, r.randint(6, 10), None, speaker


def _synth_story(args: tuple[int, int, float, str]) -> dict[str, Any]:
    """Synthesises story `index` into `tmp_root`; returns its utterances (relative paths)."""
    seed, index, minutes, tmp_root = args
    from avjax.data.speech import espeak
    from avjax.data.text import stories

    story_seed, num_paragraphs, max_sentences, (voice, pitch, rate) = _story_plan(
        seed, index, minutes
    )
    story = stories.generate_story(story_seed, num_paragraphs, max_sentences)
    doc_id = f"story_{index:04d}"
    speaker = f"{voice}_p{pitch}_r{rate}"
    os.makedirs(os.path.join(tmp_root, "wavs", doc_id), exist_ok=True)
    utts = []
    total = 0
    for p, text in enumerate(story.paragraphs):
        syn = espeak.synthesize(text, voice=voice, rate_wpm=rate, pitch=pitch)
        if len(syn.wav) == 0 or float(abs(syn.wav).max()) == 0.0:
            raise RuntimeError(f"espeak-ng produced silence for {doc_id} paragraph {p}")
        utt_id = f"{doc_id}_p{p:02d}"
        rel = os.path.join("wavs", doc_id, utt_id + ".wav")
        audio_lib.write_wav(os.path.join(tmp_root, rel), syn.wav, syn.sample_rate)
        total += len(syn.wav)
        utts.append(
            Utterance(
                id=utt_id,
                doc_id=doc_id,
                speaker=speaker,
                split="train",
                text=text,
                audio_path=rel,
                num_samples=len(syn.wav),
                sample_rate=syn.sample_rate,
                phones=syn.phones,
                index=p,
            ).to_json()
        )
    return {"doc_id": doc_id, "title": story.title, "utts": utts, "samples": total}


def _story_results(
    seed: int, minutes: float, tmp_root: str, num_workers: int
) -> Iterator[dict[str, Any]]:
    """Synthesised stories 0, 1, 2, ... in order (in a process pool when num_workers > 1)."""
    if num_workers <= 1:
        i = 0
        while True:
            yield _synth_story((seed, i, minutes, tmp_root))
            i += 1
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # espeak-ng and JAX state must not be forked
    with ctx.Pool(num_workers) as pool:
        i = 0
        while True:  # batches keep at most a few stories of over-production
            batch = [(seed, i + j, minutes, tmp_root) for j in range(2 * num_workers)]
            yield from pool.imap(_synth_story, batch)
            i += len(batch)


def build_default_corpus(
    root: str | os.PathLike,
    *,
    minutes: float = 40.0,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    num_workers: int = 1,
    progress: bool = True,
    **artifact_options: Any,
) -> list[Utterance]:
    """Builds (or loads from cache) the embedded espeak-ng story corpus under `root`.

    Args:
      root: cache folder (a local path): a prepared artifact (`avjax.data.artifacts`) keyed
        by the parameters below, replaced if built with others.
      minutes: total speech to synthesise (stories are added until at least this much).
      heldout_fraction: fraction of stories held out (at least one when there are >= 2).
      seed: selects the stories and the voice order.
      num_workers: synthesis processes (the result does not depend on it).
      progress: show a tqdm bar.
      artifact_options: for `artifacts.prepare_artifact` (group: the build is deterministic,
        so each filesystem's group leader builds its own copy; the others wait).

    Returns:
      All utterances, documents in order, train and held-out ("split") together.
    """
    from avjax.data import artifacts

    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    params = _stamp_params(minutes, heldout_fraction, seed)

    def adopt(path) -> dict[str, Any] | None:  # built before manifests: stamp.json
        stamp = _read_stamp(os.fspath(path))
        ok = stamp is not None and stamp.get("params") == params
        return (
            stamp.get("summary", {})
            if ok and os.path.exists(os.path.join(path, MANIFEST))
            else None
        )

    def build(tmp) -> dict[str, Any]:
        return _synthesize_corpus(os.fspath(tmp), params, num_workers, progress)

    artifacts.prepare_artifact(
        root, params, build, what="the default corpus", adopt=adopt, **artifact_options
    )
    return load_manifest(root)


def _synthesize_corpus(
    tmp_root: str, params: dict[str, Any], num_workers: int, progress: bool
) -> dict[str, Any]:
    """Synthesises the stories of `params` into `tmp_root` (wavs, manifest, stamp)."""
    t0 = time.time()
    seed, minutes = params["seed"], params["minutes"]
    target = int(minutes * 60 * audio_lib.SAMPLE_RATE)
    os.makedirs(os.path.join(tmp_root, "wavs"), exist_ok=True)
    bar = _progress(progress, total=round(minutes * 60), desc="espeak corpus", unit="s")
    docs: list[dict[str, Any]] = []
    done = 0
    for res in _story_results(seed, minutes, tmp_root, num_workers):
        docs.append(res)
        done += res["samples"]
        if bar is not None:
            bar.update(round(res["samples"] / audio_lib.SAMPLE_RATE))
        if done >= target:
            break
    if bar is not None:
        bar.close()
    # Stories synthesised beyond the target by the pool are dropped from disk too.
    keep = {d["doc_id"] for d in docs}
    for name in os.listdir(os.path.join(tmp_root, "wavs")):
        if name not in keep:
            shutil.rmtree(os.path.join(tmp_root, "wavs", name))
    heldout = _pick_heldout([d["doc_id"] for d in docs], params["heldout_fraction"], seed)
    utts = []
    for d in docs:
        for u in d["utts"]:
            u["split"] = "heldout" if d["doc_id"] in heldout else "train"
            utts.append(Utterance.from_json(u))
    _write_manifest(tmp_root, utts)
    summary = summarize(utts)
    with open(os.path.join(tmp_root, STAMP), "w") as f:
        json.dump({"params": params, "summary": summary}, f, indent=2)
    logging.info(
        "Synthesised the default corpus in %.1f s: %.1f min, %d stories (%d held out), %d speakers",
        time.time() - t0,
        summary["minutes"],
        summary["docs"],
        summary["heldout_docs"],
        summary["speakers"],
    )
    return summary


def _progress(enabled: bool, **kw):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(mininterval=1.0, **kw)


def _pick_heldout(doc_ids: Sequence[str], fraction: float, seed: int) -> set[str]:
    """A seeded choice of whole documents: round(fraction * n), at least 1 when n >= 2."""
    n = len(doc_ids)
    if fraction <= 0 or n < 2:
        return set()
    k = min(max(1, round(fraction * n)), n - 1)
    order = sorted(doc_ids)
    random.Random(f"avjax-heldout-{seed}").shuffle(order)
    return set(order[:k])


def _write_manifest(root: str, utts: Sequence[Utterance]) -> None:
    with open(os.path.join(root, MANIFEST), "w") as f:
        for u in utts:
            f.write(json.dumps(u.to_json(root if os.path.isabs(u.audio_path) else None)) + "\n")


def load_manifest(root: str | os.PathLike) -> list[Utterance]:
    """Reads `root/manifest.jsonl`; audio paths come back absolute."""
    root = os.path.abspath(os.fspath(root))
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no corpus manifest (build it with build_default_corpus)")
    utts = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                utts.append(Utterance.from_json(json.loads(line), root))
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{path}:{i + 1}: bad manifest line ({e})") from e
    if not utts:
        raise ValueError(f"{path}: empty manifest")
    return utts


def summarize(utts: Sequence[Utterance]) -> dict[str, Any]:
    """Counts and durations of a corpus (per split), for logs and stamps."""
    secs = {s: sum(u.duration for u in utts if u.split == s) for s in SPLITS}
    docs = {s: len({u.doc_id for u in utts if u.split == s}) for s in SPLITS}
    return {
        "utterances": len(utts),
        "docs": len({u.doc_id for u in utts}),
        "heldout_docs": docs["heldout"],
        "speakers": len({u.speaker for u in utts}),
        "minutes": sum(secs.values()) / 60,
        "train_minutes": secs["train"] / 60,
        "heldout_minutes": secs["heldout"] / 60,
    }


AUDIO_EXTENSIONS = (".wav", ".flac")


def walk_files(root: str | os.PathLike) -> Iterator[str]:
    """Every file under `root` in sorted order, following symlinked folders (each real folder
    once: a link cycle is not followed twice). Paths are as seen through `root`."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(os.fspath(root), followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def scan_audio_dir(
    root: str | os.PathLike,
    *,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> list[Utterance]:
    """Lists a folder of your own audio as a corpus: one document per file.

    Every `*.wav` / `*.flac` under `root` (recursively, sorted) becomes one utterance and one
    document; `speaker` is its parent folder's name; a sibling `<stem>.txt` is its transcript.
    Each file is decoded with `load_audio` (resampled to 16 kHz) to validate it and get its
    length. Whole files are held out (seeded, at least one when there are >= 2 files).

    Raises:
      FileNotFoundError: `root` does not exist or holds no audio files.
      AudioError: a file is corrupt, unreadable or empty (the message names it).
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: audio directory not found")
    files = [
        path
        for path in walk_files(root)
        if path.lower().endswith(AUDIO_EXTENSIONS) and not os.path.basename(path).startswith(".")
    ]
    if not files:
        raise FileNotFoundError(f"{root}: no {'/'.join(AUDIO_EXTENSIONS)} files found")
    bar = _progress(progress and len(files) > 20, total=len(files), desc="scan audio")
    utts = []
    for path in files:
        wav = audio_lib.load_audio(path)
        rel = os.path.splitext(os.path.relpath(path, root))[0]
        txt = os.path.splitext(path)[0] + ".txt"
        text = ""
        if os.path.exists(txt):
            with open(txt, encoding="utf-8") as f:
                text = " ".join(f.read().split())
        utts.append(
            Utterance(
                id=rel.replace(os.sep, "/"),
                doc_id=rel.replace(os.sep, "/"),
                speaker=os.path.basename(os.path.dirname(path)) or "unknown",
                split="train",
                text=text,
                audio_path=path,
                num_samples=len(wav),
                sample_rate=audio_lib.SAMPLE_RATE,
            )
        )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    heldout = _pick_heldout([u.doc_id for u in utts], heldout_fraction, seed)
    for u in utts:
        if u.doc_id in heldout:
            u.split = "heldout"
    return utts
