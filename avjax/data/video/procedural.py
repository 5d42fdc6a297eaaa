"""Procedural talking-face clips made in memory in seconds (the sync expert's quick data).

Each identity (face shape, skin, f0) speaks synthetic syllables: voiced harmonics shaped by a
vowel's formants, pauses and unvoiced bursts; the rendered mouth opens and spreads with the
vowel of each frame. Batches: `{"video": [batch, frames, size, size, 3] uint8, "audio":
[batch, frames * 640] float32 at 16 kHz, "length": [batch] int32}`; identities held out for
evaluation (`config.data.procedural`). Used by `configs/syncnet.py` with
`--config.data.name=procedural`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from avjax.data.module import Batch, DataModule

# Vowel classes: (F1, F2) in Hz, mouth opening and width factors (open "a", spread "i", round "u").
_VOWELS = ((750.0, 1200.0, 1.0, 1.0), (300.0, 2300.0, 0.35, 1.35), (320.0, 800.0, 0.55, 0.6))


def _syllable(rng: np.random.Generator, n: int, f0: float, vowel: int) -> np.ndarray:
    """`[n]` a voiced syllable: harmonics of a gliding `f0` shaped by the vowel's formants,
    under a raised-cosine envelope."""
    f1, f2 = _VOWELS[vowel][:2]
    t = np.arange(n) / 16000.0
    glide = f0 * (1.0 + rng.uniform(-0.15, 0.15) * t / max(t[-1], 1e-3))
    phase = 2 * np.pi * np.cumsum(glide) / 16000.0
    k = np.arange(1, int(4000 // f0) + 1, dtype=np.float64)
    h = k * f0
    amp = np.exp(-(((h - f1) / 150.0) ** 2)) + 0.7 * np.exp(-(((h - f2) / 200.0) ** 2)) + 0.02
    offsets = rng.uniform(0, 2 * np.pi, len(k))
    y = amp @ np.sin(k[:, None] * phase[None, :] + offsets[:, None])
    return y * np.sin(np.pi * np.arange(n) / n) ** 0.7


def synth_audio(rng: np.random.Generator, frames: int, f0: float) -> tuple[np.ndarray, ...]:
    """`(audio [frames * 640], open [frames], width [frames])`: syllables with pauses and
    unvoiced bursts (sound with a closed mouth), and the mouth shape each frame shows."""
    n = frames * 640
    audio, open_, width = np.zeros(n), np.zeros(n), np.ones(n)
    pos = int(rng.integers(0, 4000))
    while pos < n:
        if rng.random() < 0.2:  # an unvoiced burst: noise, mouth nearly closed
            m = int(rng.integers(600, 1600))
            seg = rng.standard_normal(min(m, n - pos)) * 0.15
            audio[pos : pos + len(seg)] += seg * np.hanning(len(seg))
        else:
            m = int(rng.integers(1300, 4800))
            vowel = int(rng.integers(0, 3))
            seg = _syllable(rng, m, f0 * rng.uniform(0.85, 1.2), vowel)[: n - pos]
            env = np.sin(np.pi * np.arange(m) / m)[: len(seg)]
            sl = slice(pos, pos + len(seg))
            audio[sl] += seg
            open_[sl] = np.maximum(open_[sl], env * _VOWELS[vowel][2])
            width[sl] += env * (_VOWELS[vowel][3] - 1.0)
        pos += m + int(rng.integers(300, 5000))
    audio = 0.5 * audio / max(np.abs(audio).max(), 1e-6) + 0.003 * rng.standard_normal(n)
    per_frame = lambda x: np.convolve(x.reshape(frames, 640).mean(1), [0.2, 0.6, 0.2], "same")  # noqa: E731
    return audio.astype(np.float32), per_frame(open_), per_frame(width)


def render_faces(
    rng: np.random.Generator, ident: dict[str, Any], open_: np.ndarray, width: np.ndarray, size: int
) -> np.ndarray:
    """`[frames, size, size, 3]` uint8: a face (identity colours and shape) with drifting
    pose, blinks and sensor noise, whose mouth opens `open_` and widens `width` per frame."""
    t = len(open_)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    drift = np.cumsum(rng.normal(0, 0.004, (t, 2)), axis=0)
    cy = (0.5 + drift[:, 0])[:, None, None]
    cx = (0.5 + drift[:, 1])[:, None, None]
    ry, rx = ident["face"]
    face = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0
    hair = face & (yy < cy - 0.6 * ry)
    eye_open = np.where(rng.random(t) < 0.06, 0.2, 1.0)[:, None, None]
    eyes = sum(
        ((yy - cy + 0.12) / (0.035 * eye_open)) ** 2 + ((xx - cx - dx) / 0.05) ** 2 < 1.0
        for dx in (-0.14, 0.14)
    )
    my, mh = cy + 0.22, (0.012 + 0.085 * open_)[:, None, None]
    mw = (0.11 * width)[:, None, None]
    lips = ((yy - my) / (mh + 0.025)) ** 2 + ((xx - cx) / (mw + 0.02)) ** 2 < 1.0
    mouth = ((yy - my) / mh) ** 2 + ((xx - cx) / mw) ** 2 < 1.0
    img = np.broadcast_to(ident["bg"], (t, size, size, 3)).copy()
    for mask, colour in ((face, "skin"), (hair, "hair"), (eyes > 0, "eye"), (lips, "lip")):
        img[mask] = ident[colour]
    img[mouth] = (40.0, 12.0, 15.0)
    img += rng.normal(0, 4.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def identity(seed: int, i: int) -> dict[str, Any]:
    """The look and voice of identity `i`."""
    r = np.random.default_rng([seed, 7, i])
    skin = r.uniform([90, 60, 40], [240, 200, 170])
    return {
        "bg": r.uniform(0, 255, 3),
        "skin": skin,
        "hair": r.uniform(0, 120, 3),
        "eye": r.uniform(0, 60, 3),
        "lip": np.clip(skin * r.uniform(0.5, 0.8) + [40, 0, 0], 0, 255),
        "face": (r.uniform(0.36, 0.46), r.uniform(0.28, 0.38)),
        "f0": float(r.uniform(90, 260)),
    }


def make_clip(seed: int, index: int, ident: int, frames: int, size: int) -> dict[str, np.ndarray]:
    """One clip `{"video": [frames, size, size, 3] uint8, "audio": [frames * 640] float32}`."""
    look = identity(seed, ident)
    rng = np.random.default_rng([seed, 11, index])
    audio, open_, width = synth_audio(rng, frames, look["f0"])
    return {"video": render_faces(rng, look, open_, width, size), "audio": audio}


class _Clips(grain.sources.RandomAccessDataSource):
    def __init__(self, clips: list[dict[str, np.ndarray]]):
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        clip = self.clips[i]
        return {**clip, "length": np.int32(len(clip["video"]))}


@dataclasses.dataclass
class ProceduralClips(DataModule):
    """Procedural talking-face clips, speakers held out (`config.data.procedural`:
    `identities`, `heldout_identities`, `train_clips`, `eval_clips`; `config.data`:
    `num_frames`, `crop_size` = the face size).

    Deterministic in `seed`: nothing is written, so read-only runs rebuild the same clips.
    """

    _clips: dict[str, list] = dataclasses.field(default_factory=dict, repr=False)

    def _split(self, split: str) -> list[dict[str, np.ndarray]]:
        """The clips of `train` (training identities) or `heldout` (the others), made once."""
        if split not in self._clips:
            dc = self.data.procedural
            n_id, n_held = int(dc.identities), int(dc.heldout_identities)
            t, s = int(self.data.num_frames), int(self.data.crop_size)
            if split == "train":
                ids = [i % (n_id - n_held) for i in range(int(dc.train_clips))]
            else:
                ids = [n_id - n_held + i % n_held for i in range(int(dc.eval_clips))]
            seed = self.seed + (split != "train")
            self._clips[split] = [make_clip(seed, i, d, t, s) for i, d in enumerate(ids)]
        return self._clips[split]

    def prepare(self, read_only: bool | None = None) -> dict[str, Any]:
        """Facts of the clips (made lazily: evaluation never synthesises the train split)."""
        dc = self.data.procedural
        if int(self.data.num_frames) < 2 * 15 + 6:
            raise ValueError(f"config.data.num_frames={self.data.num_frames}: use >= 36")
        return {
            "train_clips": int(dc.train_clips),
            "heldout_clips": int(dc.eval_clips),
            "train_identities": int(dc.identities) - int(dc.heldout_identities),
            "heldout_identities": int(dc.heldout_identities),
            "seconds_per_clip": int(self.data.num_frames) / 25.0,
        }

    def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        self.prepare()
        ds = grain.MapDataset.source(_Clips(self._split("train")))
        ds = ds.shuffle(seed=self.seed).repeat(None)[process_index::process_count]
        return ds.batch(
            self.per_process_batch(process_count), drop_remainder=True
        ).to_iter_dataset()

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        self.prepare()
        held = self._split("heldout")[process_index::process_count]
        b = self.per_process_batch(process_count)
        out = []
        for i in range(0, min(len(held), b * self.num_eval_batches) - b + 1, b):
            batch = {k: np.stack([c[k] for c in held[i : i + b]]) for k in ("video", "audio")}
            batch["length"] = np.full((b,), int(self.data.num_frames), np.int32)
            out.append(batch)
        return out

    def dummy_batch(self) -> Batch:
        t, s = int(self.data.num_frames), int(self.data.crop_size)
        return {
            "video": np.zeros((self.batch_size, t, s, s, 3), np.uint8),
            "audio": np.zeros((self.batch_size, t * 640), np.float32),
            "length": np.full((self.batch_size,), t, np.int32),
        }
