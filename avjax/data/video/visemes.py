"""Phones (espeak-ng IPA) -> visemes -> smooth articulatory trajectories for face animation.

A viseme is a class of phones that look alike on the face. We use the 15-class set of the
Oculus/Meta lip-sync standard (silence, PP, FF, TH, DD, kk, CH, SS, nn, RR, aa, E, ih, oh, ou),
and describe each class by five articulatory parameters, all in [0, 1]:

  0 `jaw`     jaw / mouth opening (0 closed lips, 1 widest "aa")
  1 `width`   lip width (0 narrow, 0.5 rest, 1 spread as in "ee")
  2 `round`   lip rounding / protrusion ("oo", "w")
  3 `teeth`   how much of the upper teeth shows
  4 `tongue`  how much of the tongue shows (tip between or behind the teeth)

`viseme_trajectory` turns timed phones into a `[num_frames, 5]` trajectory with
coarticulation after Cohen & Massaro (1993): every phone pulls each parameter towards its
target with a dominance function `alpha * exp(-theta * |t - centre|)` that peaks at the
phone's centre and decays into its neighbours; the parameter at time `t` is the
dominance-weighted mean of all targets. Phones whose articulation is compulsory (lip closure
for p/b/m, lip-teeth contact for f/v) have high dominance so they reach their target even when
short; schwas and h have low dominance and take the shape of their neighbours. Diphthongs
("aʊ", "eɪ", ...) are split into two halves, each with its own vowel target.

Frame `k` is sampled at the centre of its display interval, `t_k = (k + 0.5) / fps`, so the
function serves any frame rate (25 fps video, 30 fps meshes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PARAMS = ("jaw", "width", "round", "teeth", "tongue")
NUM_PARAMS = len(PARAMS)

# class -> (jaw, width, round, teeth, tongue), dominance alpha
VISEMES: dict[str, tuple[tuple[float, float, float, float, float], float]] = {
    "sil": ((0.04, 0.45, 0.10, 0.00, 0.00), 0.6),
    "PP": ((0.00, 0.45, 0.15, 0.00, 0.00), 6.0),  # p b m: lips pressed
    "FF": ((0.12, 0.45, 0.05, 0.85, 0.00), 4.0),  # f v: lower lip under upper teeth
    "TH": ((0.25, 0.50, 0.00, 0.60, 0.90), 3.0),  # θ ð: tongue between the teeth
    "DD": ((0.22, 0.50, 0.05, 0.50, 0.35), 1.2),  # t d: tongue tip behind the teeth
    "kk": ((0.28, 0.50, 0.05, 0.35, 0.10), 0.8),  # k g ŋ: back of the tongue, mouth follows
    "CH": ((0.18, 0.30, 0.70, 0.60, 0.00), 2.5),  # tʃ dʒ ʃ ʒ: protruded, teeth together
    "SS": ((0.10, 0.62, 0.05, 0.80, 0.00), 2.5),  # s z: teeth nearly closed, spread
    "nn": ((0.20, 0.50, 0.05, 0.45, 0.40), 1.0),  # n l
    "RR": ((0.20, 0.35, 0.55, 0.30, 0.05), 1.5),  # ɹ ɚ
    "aa": ((0.85, 0.55, 0.05, 0.35, 0.15), 1.5),  # ɑ a æ ʌ
    "E": ((0.50, 0.65, 0.00, 0.45, 0.10), 1.2),  # ɛ e
    "ih": ((0.30, 0.82, 0.00, 0.60, 0.05), 1.2),  # i ɪ j
    "oh": ((0.60, 0.30, 0.75, 0.15, 0.05), 1.5),  # ɔ ɒ o
    "ou": ((0.22, 0.15, 1.00, 0.05, 0.00), 2.0),  # u ʊ w
    "schwa": ((0.32, 0.50, 0.10, 0.30, 0.05), 0.35),  # ə ɐ ᵻ: weak, coarticulated
    "hh": ((0.30, 0.50, 0.10, 0.25, 0.00), 0.3),  # h: takes the next vowel's shape
}
CLASSES = tuple(VISEMES)
TARGETS = np.array([VISEMES[c][0] for c in CLASSES], np.float32)  # [classes, 5]
DOMINANCE = np.array([VISEMES[c][1] for c in CLASSES], np.float32)  # [classes]

# IPA symbol (stress and length marks removed) -> class.
_PHONE_CLASS: dict[str, str] = {}
for _cls, _symbols in {
    "sil": "_ ʔ",
    "PP": "p b m m̩",
    "FF": "f v",
    "TH": "θ ð",
    "DD": "t d ɾ tʰ",
    "kk": "k g ɡ ŋ x",
    "CH": "tʃ dʒ ʃ ʒ",
    "SS": "s z",
    "nn": "n l n̩ l̩ ɫ əl",
    "RR": "ɹ r ɚ ɝ ɜ",
    "aa": "ɑ a æ ʌ ɐ̃ aː",
    "E": "ɛ e",
    "ih": "i ɪ j iː ɨ",
    "oh": "ɔ ɒ o",
    "ou": "u ʊ w ʉ ʍ",
    "schwa": "ə ɐ ᵻ ɘ ɵ",
    "hh": "h ɦ",
}.items():
    for _s in _symbols.split():
        _PHONE_CLASS[_s] = _cls
_MARKS = "ˈˌː'ˑ,%=-"


def _strip(phone: str) -> str:
    return "".join(ch for ch in phone if ch not in _MARKS)


def phone_classes(phone: str) -> list[str]:
    """Viseme classes of one espeak-ng IPA phone, in order (two for a diphthong).

    Stress and length marks are ignored; an unknown symbol is classified by its longest known
    prefix (then its first known character), falling back to "schwa".
    """
    s = _strip(phone)
    if not s:
        return ["sil"]
    if s in _PHONE_CLASS:
        return [_PHONE_CLASS[s]]
    out: list[str] = []
    i = 0
    while i < len(s):  # greedy longest match (diphthongs "aʊ" -> aa, ou; "eɪ" -> E, ih)
        for j in range(len(s), i, -1):
            if s[i:j] in _PHONE_CLASS:
                out.append(_PHONE_CLASS[s[i:j]])
                i = j
                break
        else:
            i += 1  # a diacritic or unknown character
    if not out:
        return ["schwa"]
    return out if len(out) <= 2 else [out[0], out[-1]]


def phone_viseme(phone: str) -> str:
    """The (first) viseme class of an IPA phone."""
    return phone_classes(phone)[0]


def _normalise(phones: Sequence[tuple]) -> list[tuple[float, float, str]]:
    """Accepts `(phone, start, end)` or espeak's `(start, end, phone)` tuples."""
    out = []
    for p in phones:
        if isinstance(p[0], str):
            out.append((float(p[1]), float(p[2]), p[0]))
        else:
            out.append((float(p[0]), float(p[1]), str(p[2])))
    return out


def _segments(phones: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits phones into viseme segments: `(centres [n], halfwidths [n], class ids [n])`."""
    centres, halves, ids = [], [], []
    for start, end, phone in _normalise(phones):
        if end <= start:
            continue
        classes = phone_classes(phone)
        step = (end - start) / len(classes)
        for i, c in enumerate(classes):
            s = start + i * step
            centres.append(s + step / 2)
            halves.append(step / 2)
            ids.append(CLASSES.index(c))
    return np.array(centres, np.float64), np.array(halves, np.float64), np.array(ids, np.int64)


def viseme_trajectory(
    phones: Sequence[tuple[str, float, float]],
    fps: float,
    num_frames: int,
    *,
    decay_s: float = 0.03,
) -> np.ndarray:
    """Articulatory parameters per frame, with coarticulation across neighbouring phones.

    Args:
      phones: `(ipa, start_s, end_s)` in time order (espeak's `(start_s, end_s, ipa)` from
        `espeak.synthesize(...).phones` is accepted too). Gaps and time outside the phones are
        silence.
      fps: frame rate; frame `k` is sampled at `(k + 0.5) / fps` seconds.
      num_frames: number of frames to return.
      decay_s: time constant of the dominance decay beyond a phone's own interval (seconds);
        larger means more coarticulation (smoother, less distinct shapes).

    Returns:
      float32 `[num_frames, 5]` in [0, 1]: jaw, width, round, teeth, tongue (see `PARAMS`).
    """
    t = (np.arange(num_frames, dtype=np.float64) + 0.5) / float(fps)  # [F]
    centres, halves, ids = _segments(phones)
    sil = CLASSES.index("sil")
    # A silence anchor before and after the utterance so the mouth rests outside it.
    first = centres[0] - halves[0] if len(centres) else 0.0
    last = centres[-1] + halves[-1] if len(centres) else 0.0
    centres = np.concatenate([[first - 0.1], centres, [last + 0.1]])
    halves = np.concatenate([[0.1], halves, [0.1]])
    ids = np.concatenate([[sil], ids, [sil]])
    # Dominance: flat (= alpha) inside the phone's own interval, exponential decay outside.
    outside = np.maximum(np.abs(t[:, None] - centres[None, :]) - halves[None, :], 0.0)  # [F, n]
    dom = DOMINANCE[ids][None, :] * np.exp(-outside / decay_s)  # [F, n]
    dom = dom + 1e-12
    traj = (dom @ TARGETS[ids].astype(np.float64)) / dom.sum(axis=1, keepdims=True)  # [F, 5]
    return np.clip(traj, 0.0, 1.0).astype(np.float32)


def viseme_sequence(phones: Sequence[tuple], fps: float, num_frames: int) -> np.ndarray:
    """Dominant viseme class id per frame (no coarticulation): int32 `[num_frames]`."""
    t = (np.arange(num_frames, dtype=np.float64) + 0.5) / float(fps)
    out = np.full(num_frames, CLASSES.index("sil"), np.int32)
    centres, halves, ids = _segments(phones)
    for c, h, i in zip(centres, halves, ids, strict=True):
        out[(t >= c - h) & (t < c + h)] = i
    return out
