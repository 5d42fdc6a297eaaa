"""The embedded audio-visual corpus: espeak-ng speech + rendered talking faces, offline.

Built on first use into a cache folder (a prepared artifact, `avjax.data.artifacts`, keyed by
`CorpusSpec`) and written in the REAL corpora's layouts, so it is read by the same readers
(`avjax.data.video.layouts`) as LRW and LRS3 themselves:

  <root>/lrw/<WORD>/{train,val,test}/<WORD>_<nnnnn>.mp4 + .txt   word clips, 29 frames (1.16 s)
  <root>/lrs3/{trainval,test}/<speaker>/<nnnnn>.mp4 + .txt       sentences + word timings
  <root>/speakers.json                                           voice, face, split per speaker

Every MP4 is H.264 + AAC (`io.write_video`) at 25 fps with 16 kHz audio, `CorpusSpec.size`
square frames (128 by default). Speaker `i` has face `faces.make_identity(i, seed)` and an
espeak-ng voice (variant, pitch, rate) drawn for it; the face and the voice are the only
speaker cues and are independent of what is said. Speakers are split (held out) into
train / val / test; the LRS3 view puts train and val speakers in `trainval`.

Word clips: each of `clips_per_speaker` clips of a speaker says one vocabulary word (≥ 100
LRW words) inside a carrier sentence ("they said WORD again today"); the clip is the 29
frames centred on the word, as in LRW, so neighbouring words show at its edges. Words are
dealt to clips by a seeded permutation, independent of the speaker; the nuisance of a clip
(head drift, blinks, zoom, flicker, noise, compression) is seeded by (speaker, clip) only.
The mouth is therefore the only visual cue to the word.

Sentences: `num_sentences` random 4-9 word sentences over the same vocabulary plus function
words, spread over the speakers, with espeak-ng's word timings.

The default `CorpusSpec()` (measured on the shared 2-core development machine): 40 speakers
(32 train, 4 val, 4 test), 1,000 LRW-view clips over 125 words (8 per word; chance 0.8 %) and
200 LRS3-view sentences; 40,047 frames (0.45 h) at 128x128; 24.8 MB of MP4 (33 MB on disk).
Building it costs about 130 CPU-seconds (0.11 s per clip: espeak, rendering, H.264 + AAC),
about 70 s on two idle cores with `num_workers=2`; on the shared machine at load average 16
it took 8.3 min. `TINY` (4 speakers, 16 clips, 64x64) builds in about 3 s.

How much the mouth alone tells (ridge regression on 12x12 grey crops of all 29 frames, trained
on the 800 train-speaker clips, tested on the 200 clips of the 8 held-out speakers): the mouth
region 3.5 % word accuracy, the upper face (eyes, hair, brows) 1.0-1.5 %, chance 0.8 %: only
the mouth carries the word, and a pixel-linear model barely reads it (a lip reader must learn
the shapes). `faces.render_talking_face` guarantees the first part by construction: with the
same nuisance, frames for different words differ only inside `faces.mouth_box`.

Build with `num_workers > 1` from a script only under `if __name__ == "__main__":` (the
render processes are spawned; a spawned child re-imports the main module).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from avjax.data.video import layouts

CORPUS_VERSION = 1
FPS = 25
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS
LRW_FRAMES = 29

VOCABULARY = tuple(
    """ABOUT ACCESS AFTERNOON AGAIN AGREE ALLOW AMOUNT ANSWER AREAS ARMED BECAUSE BEFORE BEHIND
    BENEFIT BETTER BLACK BORDER BRITAIN BUDGET BUILD BUSINESS CAMPAIGN CAPITAL CHANGE CHARGE
    CHILDREN CHOICE CLEAR CLOSE COMING COMMUNITY COUNCIL COURT CRIME CRISIS DEBATE DECISION
    DIFFERENT DURING ECONOMY EDUCATION ENERGY EUROPE EVENING EVERYBODY EXPECT FAMILY FIGURES
    FOLLOWING FORCES FUTURE GIVING GREAT GROWTH HAPPEN HEALTH HEAVY HOUSE HUNDREDS IMPACT ISSUE
    JUSTICE KILLED LABOUR LEADER LEVEL LITTLE LONDON MAJOR MEMBERS MIDDLE MILLION MONEY MORNING
    MOVING NATIONAL NEVER NORTH NOTHING NUMBER OFFICE OPPOSITION PARTY PEOPLE PERHAPS PLACE
    POLICE POLITICS POWER PRESSURE PRICE PROBLEM PUBLIC QUESTION RATHER REALLY RECORD RIGHT
    RULES SCHOOL SECURITY SEVERAL SHOULD SIMPLY SOCIAL SOUTH SPEAKING SPEND STAND STILL SUPPORT
    SYSTEM THEIR THOUSANDS THREE TODAY TOGETHER UNDER UNTIL VICTIMS WATER WEATHER WELFARE
    WESTERN WHETHER WITHOUT WOMEN WORLD YEARS YOUNG""".split()
)
_PREFIXES = (
    "they said",
    "we saw the",
    "I think",
    "you know the",
    "then came",
    "she heard",
    "it was",
    "he wrote",
    "look at",
    "we need",
)
_SUFFIXES = (
    "again today",
    "right now",
    "was fine",
    "for them",
    "in here",
    "at last",
    "this year",
    "and more",
)
_FUNCTION = "the a of to and in is we they it was for on with that".split()
_VOICE_BASES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-rp")
_VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4")


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """What shapes the embedded AV corpus (its cache key).

    Attributes:
      num_speakers: identities (face + voice), >= 3 so every split has one.
      clips_per_speaker: LRW-view word clips per speaker.
      num_sentences: LRS3-view sentences (dealt round-robin over the speakers).
      vocab_size: words of `VOCABULARY` used (<= 130).
      val_speakers, test_speakers: held-out speakers.
      size: frame size (square, pixels).
      seed: everything random.
    """

    num_speakers: int = 40
    clips_per_speaker: int = 25
    num_sentences: int = 200
    vocab_size: int = 125
    val_speakers: int = 4
    test_speakers: int = 4
    size: int = 128
    seed: int = 0

    def fields(self) -> dict[str, Any]:
        return {
            "version": CORPUS_VERSION,
            "kind": "espeak-talking-faces",
            **dataclasses.asdict(self),
        }


TINY = CorpusSpec(
    num_speakers=4,
    clips_per_speaker=3,
    num_sentences=4,
    vocab_size=6,
    val_speakers=1,
    test_speakers=1,
    size=64,
)


def speakers(spec: CorpusSpec) -> list[dict[str, Any]]:
    """Per speaker: id, split, voice, pitch, rate (deterministic in `spec`)."""
    rng = np.random.default_rng([spec.seed, 0xA5])
    order = rng.permutation(spec.num_speakers)
    split = {}
    for rank, i in enumerate(order):
        split[int(i)] = (
            "test"
            if rank < spec.test_speakers
            else "val"
            if rank < spec.test_speakers + spec.val_speakers
            else "train"
        )
    out = []
    for i in range(spec.num_speakers):
        voice = _VOICE_BASES[int(rng.integers(len(_VOICE_BASES)))]
        voice += _VARIANTS[int(rng.integers(len(_VARIANTS)))]
        out.append(
            {
                "id": f"spk{i:03d}",
                "index": i,
                "split": split[i],
                "voice": voice,
                "pitch": int(rng.integers(30, 76)),
                "rate": int(rng.integers(140, 191)),
            }
        )
    return out


def _jobs(spec: CorpusSpec) -> Iterator[dict[str, Any]]:
    """Every clip to make: LRW word clips then LRS3 sentences."""
    spk = speakers(spec)
    vocab = VOCABULARY[: spec.vocab_size]
    rng = np.random.default_rng([spec.seed, 0x77])
    n_clips = spec.num_speakers * spec.clips_per_speaker
    deck = np.concatenate(
        [rng.permutation(len(vocab)) for _ in range(math.ceil(n_clips / len(vocab)))]
    )
    for s in spk:
        for c in range(spec.clips_per_speaker):
            k = s["index"] * spec.clips_per_speaker + c
            word = vocab[int(deck[k])]
            pre, suf = (
                _PREFIXES[int(rng.integers(len(_PREFIXES)))],
                _SUFFIXES[int(rng.integers(len(_SUFFIXES)))],
            )
            yield {
                "view": "lrw",
                "speaker": s,
                "clip": c,
                "word": word,
                "text": f"{pre} {word.lower()} {suf}",
            }
    for j in range(spec.num_sentences):
        s = spk[j % len(spk)]
        n = int(rng.integers(4, 10))
        words = [
            vocab[int(rng.integers(len(vocab)))].lower()
            if rng.random() < 0.6
            else _FUNCTION[int(rng.integers(len(_FUNCTION)))]
            for _ in range(n)
        ]
        yield {"view": "lrs3", "speaker": s, "clip": j // len(spk), "text": " ".join(words)}


def _word_spans(syn: Any) -> list[tuple[str, float, float]]:
    """`(WORD, start_s, end_s)` from espeak's word events, each ending where the next begins
    (the last where its final non-pause phone ends)."""
    events = [(t, w) for t, w in syn.words if w.strip(".,;:!?")]
    last_end = syn.duration
    for _start, end, p in reversed(syn.phones):
        if p not in ("_", "_:", ""):
            last_end = end
            break
    spans = []
    for i, (t, w) in enumerate(events):
        end = events[i + 1][0] if i + 1 < len(events) else last_end
        spans.append((w.strip(".,;:!?").upper(), round(t, 3), round(max(end, t + 0.01), 3)))
    return spans


def _render(spec: CorpusSpec, job: dict[str, Any], syn: Any, f0: int, num: int) -> np.ndarray:
    """Frames `f0 .. f0 + num` of the job's talking face: uint8 `[num, size, size, 3]`."""
    from avjax.data.video import faces, visemes

    s = job["speaker"]
    t0 = f0 / FPS
    phones = [(p, a - t0, b - t0) for a, b, p in syn.phones]
    traj = visemes.viseme_trajectory(phones, FPS, num)
    ident = faces.make_identity(s["index"], spec.seed)
    view_id = 0 if job["view"] == "lrw" else 1
    nu = faces.sample_nuisance(
        spec.seed * 1_000_003 + s["index"] * 1009 + job["clip"] * 2 + view_id, num
    )
    return faces.render_talking_face(ident, traj, nu, size=spec.size)


def _audio(wav: np.ndarray, f0: int, num: int) -> np.ndarray:
    """Samples of frames `f0 .. f0 + num` (zeros outside the speech): float32 `[num * 640]`."""
    out = np.zeros(num * SAMPLES_PER_FRAME, np.float32)
    a = f0 * SAMPLES_PER_FRAME
    lo, hi = max(a, 0), min(a + len(out), len(wav))
    if hi > lo:
        out[lo - a : hi - a] = wav[lo:hi]
    return out


def _make_clip(args: tuple[CorpusSpec, dict[str, Any], str]) -> dict[str, Any]:
    """Synthesises, renders and writes one job; returns what was written."""
    from avjax.data.speech.espeak import synthesize
    from avjax.data.video import faces
    from avjax.data.video.io import write_video

    spec, job, root = args
    s = job["speaker"]
    rng = np.random.default_rng([spec.seed, s["index"], job["clip"], len(job["view"])])
    syn = synthesize(
        job["text"],
        voice=s["voice"],
        pitch=s["pitch"],
        rate_wpm=s["rate"] + int(rng.integers(-12, 13)),
    )
    spans = _word_spans(syn)
    crf = faces.make_identity(s["index"], spec.seed).crf + int(rng.integers(-2, 3))
    if job["view"] == "lrw":
        target = [x for x in spans if x[0] == job["word"]]
        if not target:
            raise RuntimeError(f"espeak gave no word event for {job['word']} in {job['text']!r}")
        _, ws, we = target[0]
        f0 = int(round((ws + we) / 2 * FPS)) - LRW_FRAMES // 2
        num = LRW_FRAMES
        split = s["split"]
        rel = f"lrw/{job['word']}/{split}/{job['word']}_{s['index']:03d}{job['clip']:02d}"
        txt = (
            f"Text: {job['word']}\nConf: 10\nSpeaker: {s['id']}\n\n"
            f"Duration: {we - ws:.6f} seconds\n"
        )
    else:
        f0, num = 0, int(math.ceil(syn.duration * FPS)) + 2
        split = "test" if s["split"] == "test" else "trainval"
        rel = f"lrs3/{split}/{s['id']}/{job['clip']:05d}"
        table = "".join(f"{w} {a:.2f} {b:.2f} 5.0\n" for w, a, b in spans)
        txt = f"Text:  {job['text'].upper()}\nConf:  4\n\nWORD START END ASDSCORE\n{table}"
    frames = _render(spec, job, syn, f0, num)
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_video(path + ".mp4", frames, _audio(syn.wav, f0, num), crf=crf, preset="veryfast")
    with open(path + ".txt", "w") as f:
        f.write(txt)
    return {"view": job["view"], "frames": num, "bytes": os.path.getsize(path + ".mp4")}


def _results(spec: CorpusSpec, root: str, num_workers: int) -> Iterator[dict[str, Any]]:
    args = [(spec, job, root) for job in _jobs(spec)]
    if num_workers <= 1:
        yield from map(_make_clip, args)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(num_workers) as pool:  # no forking JAX / espeak state
        yield from pool.imap_unordered(_make_clip, args, chunksize=4)


def _build(spec: CorpusSpec, root: str, num_workers: int, progress: bool) -> dict[str, Any]:
    t0 = time.time()
    total = spec.num_speakers * spec.clips_per_speaker + spec.num_sentences
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="AV corpus", unit="clip", mininterval=1.0)
    counts = {"lrw": 0, "lrs3": 0}
    frames = size = 0
    for res in _results(spec, root, num_workers):
        counts[res["view"]] += 1
        frames += res["frames"]
        size += res["bytes"]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    with open(os.path.join(root, "speakers.json"), "w") as f:
        json.dump(speakers(spec), f, indent=1)
    info = {
        "lrw_clips": counts["lrw"],
        "lrs3_sentences": counts["lrs3"],
        "frames": frames,
        "hours": round(frames / FPS / 3600, 3),
        "video_bytes": size,
        "build_seconds": round(time.time() - t0, 1),
        "num_workers": num_workers,
    }
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def corpus_dir(cache: str | os.PathLike, spec: CorpusSpec = CorpusSpec()) -> str:
    """Where `spec`'s corpus lives under a cache root: `<cache>/av_corpus/<key>`."""
    from avjax.data import artifacts

    return os.path.join(os.fspath(cache), "av_corpus", artifacts.fingerprint(spec.fields()))


def build_av_corpus(
    root: str | os.PathLike,
    spec: CorpusSpec = CorpusSpec(),
    *,
    num_workers: int | None = None,
    progress: bool = True,
    **artifact_options: Any,
) -> dict[str, Any]:
    """Builds (or finds in the cache) the embedded AV corpus of `spec` at `root`.

    Args:
      root: a local folder; a prepared artifact keyed by `spec.fields()`, rebuilt when made
        with another spec.
      spec: sizes and seed.
      num_workers: render processes (default: up to 2, the CPUs there are); the result does
        not depend on it.
      progress: a tqdm bar.
      artifact_options: for `artifacts.prepare_artifact` (group, read_only, frozen_by, ...).

    Returns:
      The build info: clip counts, frames, hours, bytes, build seconds.
    """
    from avjax.data import artifacts

    if spec.num_speakers < spec.val_speakers + spec.test_speakers + 1:
        raise ValueError(f"{spec}: needs more speakers than val_speakers + test_speakers")
    if not 1 <= spec.vocab_size <= len(VOCABULARY):
        raise ValueError(f"vocab_size must be in 1..{len(VOCABULARY)}, got {spec.vocab_size}")
    workers = num_workers if num_workers is not None else min(2, os.cpu_count() or 1)
    art = artifacts.prepare_artifact(
        root,
        spec.fields(),
        lambda tmp: _build(spec, os.fspath(tmp), workers, progress),
        what="the embedded AV corpus",
        **artifact_options,
    )
    return art.info


def scan_view(
    root: str | os.PathLike, view: str, splits: tuple[str, ...] | None = None
) -> list[layouts.AVItem]:
    """The corpus's `lrw` or `lrs3` view read through the real layout readers."""
    return layouts.scan(view, os.path.join(os.fspath(root), view), splits)
