"""The embedded mesh corpus: talking analytic heads (`head.py`) with espeak speech, 30 fps.

Each of `num_speakers` speakers is an espeak voice (`espeak.SPEAKERS`, cycled) with its own
identity vector, articulation gain and head-motion style. An utterance is one sentence of the
generated stories, spoken by espeak; its mouth follows the phone timings through
`avjax.data.video.visemes.viseme_trajectory` (coarticulated jaw / width / rounding / teeth /
tongue), and the face adds blinks (Poisson, ~0.3/s), brow raises (at some word starts, plus
slow drift) and natural head pose (an Ornstein-Uhlenbeck wander of pitch / yaw / roll and
translation, plus small nods following the speech envelope). The last `heldout_speakers`
speakers are held out (split "test").

Stored (a prepared artifact of `avjax.data.artifacts`, keyed by `corpus_fields`) as compact
parameters, not vertices: `identity.npy [S, 10]`, `expression.npy [N, 8]`, `pose.npy
[N, 6]` float32 (all utterances' frames concatenated), `audio.npy [samples]` int16 at 16 kHz
and `utterances.json` (speaker, split, text, frame and sample offsets). `MeshSequence`s with
vertices are made from these by `load_corpus` (`head.vertices`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from etils import epath

from avjax.data.artifacts import prepare_artifact
from avjax.data.audio import SAMPLE_RATE
from avjax.data.mesh import head as head_lib
from avjax.data.speech import espeak
from avjax.data.text import stories
from avjax.data.video import visemes

FPS = 30
VERSION = 1


@dataclasses.dataclass
class MeshSequence:
    """One utterance: `vertices` `[T, V, 3]` float32 at `fps` (made on access by `load`, so
    a corpus never holds all its vertices at once), its 16 kHz audio `[samples]` float32,
    speaker name, split ("train" | "val" | "test") and a name."""

    load: Callable[[], np.ndarray]
    audio: np.ndarray
    speaker: str
    split: str
    name: str
    fps: float = FPS
    num_frames: int = 0  # 0: len(vertices)

    def __post_init__(self) -> None:
        if not self.num_frames:
            self.num_frames = len(self.load())

    @property
    def vertices(self) -> np.ndarray:
        return np.asarray(self.load(), np.float32)


def corpus_fields(minutes: float, num_speakers: int, heldout_speakers: int, seed: int) -> dict:
    """What shapes the corpus (its artifact key)."""
    return {
        "version": VERSION,
        "minutes": float(minutes),
        "num_speakers": int(num_speakers),
        "heldout_speakers": int(heldout_speakers),
        "seed": int(seed),
        "fps": FPS,
        "head": [48, 64],
    }


def _sentences(seed: int) -> list[str]:
    """Sentences of the generated stories, endless in story order (seed, seed + 1, ...)."""
    out: list[str] = []
    for p in stories.generate_story(seed, 6).paragraphs:
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", p) if len(s.split()) >= 3]
    return out


def _ou(rng: np.random.Generator, n: int, dims: int, tau_frames: float, sigma: float):
    """An Ornstein-Uhlenbeck process `[n, dims]` with stationary std `sigma`."""
    a = np.exp(-1.0 / tau_frames)
    x = np.zeros((n, dims), np.float32)
    x[0] = rng.normal(0, sigma, dims)
    eps = rng.normal(0, sigma * np.sqrt(1 - a * a), (n, dims))
    for i in range(1, n):
        x[i] = a * x[i - 1] + eps[i]
    return x


def _envelope(wav: np.ndarray, num_frames: int, fps: float = FPS) -> np.ndarray:
    """RMS energy per frame `[num_frames]` (frame k spans [k/fps, (k+1)/fps))."""
    edges = (np.arange(num_frames + 1) * SAMPLE_RATE / fps).astype(int)
    sq = np.concatenate([[0.0], np.cumsum(wav.astype(np.float64) ** 2)])
    edges = np.minimum(edges, len(wav))
    n = np.maximum(np.diff(edges), 1)
    return np.sqrt((sq[edges[1:]] - sq[edges[:-1]]) / n).astype(np.float32)


def _face_motion(
    rng: np.random.Generator, syn: espeak.Synthesis, n: int, style: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Expression `[n, 8]` and pose `[n, 6]` of one utterance for a speaker `style` [3]
    (articulation gain, pose amplitude, nod gain)."""
    vis = visemes.viseme_trajectory(syn.phones, FPS, n)
    expr = np.zeros((n, len(head_lib.EXPRESSION_NAMES)), np.float32)
    expr[:, :5] = vis * style[0]
    expr[:, 1] = (vis[:, 1] - 0.5) * 2.0 * style[0]  # width: 0.5 is the rest
    t = np.arange(n)
    for start in rng.uniform(0, n, rng.poisson(0.3 * n / FPS)):  # blinks, ~150 ms
        shape = np.exp(-0.5 * ((t - start) / 1.5) ** 2)
        expr[:, 5] += shape
        expr[:, 6] += shape * rng.uniform(0.85, 1.0)
    for w_start, _ in syn.words:  # brow raises at some word starts
        if rng.random() < 0.12:
            expr[:, 7] += 0.8 * np.exp(-0.5 * ((t - w_start * FPS - 6) / 6.0) ** 2)
    expr[:, 7] += _ou(rng, n, 1, 40.0, 0.15)[:, 0]
    expr[:, 5:7] = np.clip(expr[:, 5:7], 0.0, 1.0)
    env = _envelope(syn.wav, n)
    env = np.convolve(env / (env.max() + 1e-6), np.ones(5) / 5, mode="same")
    pose = np.zeros((n, 6), np.float32)
    pose[:, :3] = _ou(rng, n, 3, 45.0, 0.06 * style[1])
    pose[:, 0] += style[2] * 0.05 * env  # nods with the speech
    pose[:, 3:] = _ou(rng, n, 3, 60.0, 0.03 * style[1])
    return expr, pose


def _speaker_draws(rng: np.random.Generator, ns: int) -> tuple[np.ndarray, np.ndarray]:
    """The speakers' identities `[ns, NUM_IDENTITY]` and styles `[ns, 3]` (articulation gain
    in [0.8, 1.2], pose amplitude, nod gain): the first draws of the corpus' generator."""
    identity = rng.normal(0, 1, (ns, head_lib.NUM_IDENTITY)).astype(np.float32)
    styles = np.stack(
        [rng.uniform(0.8, 1.2, ns), rng.uniform(0.6, 1.5, ns), rng.uniform(0.0, 1.0, ns)], -1
    )
    return identity, styles


def _build(folder: epath.Path, fields: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng(fields["seed"])
    ns = fields["num_speakers"]
    identity, styles = _speaker_draws(rng, ns)
    total = fields["minutes"] * 60 * SAMPLE_RATE
    utts, audio, expr, pose = [], [], [], []
    frames = samples = 0
    story = fields["seed"] * 1000
    while samples < total:
        for text in _sentences(story):
            s = len(utts) % ns
            voice, pitch, rate = espeak.SPEAKERS[s % len(espeak.SPEAKERS)]
            syn = espeak.synthesize(text, voice=voice, pitch=pitch, rate_wpm=rate)
            n = int(syn.duration * FPS)
            e, p = _face_motion(rng, syn, n, styles[s])
            split = "test" if s >= ns - fields["heldout_speakers"] else "train"
            utts.append(
                dict(
                    speaker=f"spk{s:02d}",
                    split=split,
                    text=text,
                    frame=frames,
                    frames=n,
                    sample=samples,
                    samples=len(syn.wav),
                )
            )
            audio.append(np.clip(syn.wav * 32767, -32768, 32767).astype(np.int16))
            expr.append(e)
            pose.append(p)
            frames, samples = frames + n, samples + len(syn.wav)
            if samples >= total:
                break
        story += 1
    np.save(folder / "identity.npy", identity)
    np.save(folder / "expression.npy", np.concatenate(expr))
    np.save(folder / "pose.npy", np.concatenate(pose))
    np.save(folder / "audio.npy", np.concatenate(audio))
    (folder / "utterances.json").write_text(json.dumps(utts))
    return {"utterances": len(utts), "frames": frames, "hours": samples / SAMPLE_RATE / 3600}


def build_corpus(
    root: epath.Path,
    minutes: float,
    num_speakers: int = 12,
    heldout_speakers: int = 2,
    seed: int = 0,
    read_only: bool = False,
) -> epath.Path:
    """The corpus folder under `root` (built once; `read_only`: must exist)."""
    if heldout_speakers >= num_speakers:
        raise ValueError(f"heldout_speakers={heldout_speakers} >= num_speakers={num_speakers}")
    fields = corpus_fields(minutes, num_speakers, heldout_speakers, seed)
    from avjax.data.artifacts import fingerprint

    path = epath.Path(root) / f"mesh_corpus-{fingerprint(fields)[:12]}"
    prepare_artifact(
        path,
        fields,
        lambda folder: _build(folder, fields),
        what="the embedded mesh corpus",
        read_only=read_only,
    )
    return path


def load_corpus(path: epath.Path) -> list[MeshSequence]:
    """Every utterance of a built corpus, with vertices posed by `head.vertices`."""
    path = epath.Path(path)
    head = head_lib.build_head()
    identity = np.load(path / "identity.npy")
    expr = np.load(path / "expression.npy", mmap_mode="r")
    pose = np.load(path / "pose.npy", mmap_mode="r")
    audio = np.load(path / "audio.npy", mmap_mode="r")
    out = []
    for i, u in enumerate(json.loads((path / "utterances.json").read_text())):
        f = slice(u["frame"], u["frame"] + u["frames"])
        s = slice(u["sample"], u["sample"] + u["samples"])
        spk = int(u["speaker"][3:])

        def verts(spk: int = spk, f: slice = f) -> np.ndarray:
            return head_lib.vertices(head, identity[spk], expr[f], pose[f])

        out.append(
            MeshSequence(
                verts,
                audio[s].astype(np.float32) / 32767,
                u["speaker"],
                u["split"],
                f"utt{i:05d}",
                num_frames=u["frames"],
            )
        )
    return out


def speaker_renditions(path: epath.Path, index: int, num: int, seed: int) -> np.ndarray:
    """Ground-truth one-to-many for one utterance: meshes `[num, T, V, 3]` of utterance
    `index`'s speech (its text re-synthesised with its own voice: the same phone timings and
    T) animated as `num` distinct corpus speakers (drawn with `seed`) would: each with its own
    identity, articulation gain and pose style, and fresh blinks, brows and head pose.

    Their spread across the `num` renditions is the corpus' own variation for fixed speech,
    the floor a sampler of the corpus distribution would show."""
    path = epath.Path(path)
    fields = json.loads((path / "manifest.json").read_text())["fields"]
    ns = int(fields["num_speakers"])
    identity, styles = _speaker_draws(np.random.default_rng(fields["seed"]), ns)
    if not np.allclose(identity, np.load(path / "identity.npy")):
        raise ValueError(f"{path}: speaker identities do not replay from its seed")
    u = json.loads((path / "utterances.json").read_text())[index]
    voice, pitch, rate = espeak.SPEAKERS[int(u["speaker"][3:]) % len(espeak.SPEAKERS)]
    syn = espeak.synthesize(u["text"], voice=voice, pitch=pitch, rate_wpm=rate)
    n = int(u["frames"])  # (espeak's timings vary by a few ms between runs: keep n)
    if abs(syn.duration * FPS - n) > 2:
        raise ValueError(
            f"{path}: utterance {index} re-synthesised to {syn.duration * FPS:.2f} frames, not {n}"
        )
    rng = np.random.default_rng(seed)
    head = head_lib.build_head()
    out = []
    for s in rng.choice(ns, size=min(num, ns), replace=False):
        expr, pose = _face_motion(rng, syn, n, styles[s])
        out.append(head_lib.vertices(head, identity[s], expr, pose))
    return np.stack(out)
