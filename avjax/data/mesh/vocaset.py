"""Real 3D talking-face corpora from `manual_dir`, in their published layouts.

VOCASET (Cudeiro et al., 2019), as released (https://voca.is.tue.mpg.de), in `manual_dir`:

  data_verts.npy          [frames, 5023, 3] float32 FLAME-topology vertices, 60 fps
  raw_audio_fixed.pkl     {subject: {sentence: {"audio": int16 [samples], "sample_rate": int}}}
  templates.pkl           {subject: [5023, 3] neutral mesh}
  subj_seq_to_idx.pkl     {subject: {sentence: {frame_number: row of data_verts}}}

Splits are the subjects FaceFormer / CodeTalker use (`VOCASET_SPLITS`: 8 train, 2 val, 2
test); frames are taken every `stride` (2: 60 -> 30 fps). Its pickles are read with
`safe_load_pickle`, a restricted unpickler that admits only numpy arrays / scalars / dtypes
and plain containers and refuses anything else with an error naming the file.

BIWI (Fanelli et al., 2010) in the layout FaceFormer / CodeTalker train from (the tracked
`faces/*.vl` converted to arrays once), in `manual_dir`:

  vertices_npy/<subject>_e<NN>.npy   [T, 23370 * 3] float vertices at 25 fps
  wav/<subject>_e<NN>.wav            its audio (44.1 kHz as released; resampled to 16 kHz)
  templates.pkl                      {subject: [23370, 3] neutral mesh}

Splits as FaceFormer: subjects F2 F3 F4 M3 M4 M5 give train (sentences 1-32) and val
(33-36); the unseen subjects F1 F5 F6 F7 F8 M1 M2 M6 give test (sentences 37-40, BIWI-Test-B).
A sentence without its audio is an error naming both files.

A folder of sequences (the form 3D-HDTF takes when its meshes are reconstructed):

  manual_dir/<subject>/<name>.npy   [T, V, 3] vertices (or [T, V*3]) at `fps`
  manual_dir/<subject>/<name>.wav   its audio (any rate; resampled to 16 kHz)

with the last `heldout_subjects` subjects (sorted by name) as the test split.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
from etils import epath

from avjax.data.audio import SAMPLE_RATE, load_audio, resample
from avjax.data.mesh.corpus import MeshSequence

VOCASET_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "FaceTalk_170728_03272_TA",
        "FaceTalk_170904_00128_TA",
        "FaceTalk_170725_00137_TA",
        "FaceTalk_170915_00223_TA",
        "FaceTalk_170811_03274_TA",
        "FaceTalk_170913_03279_TA",
        "FaceTalk_170904_03276_TA",
        "FaceTalk_170912_03278_TA",
    ),
    "val": ("FaceTalk_170811_03275_TA", "FaceTalk_170908_03277_TA"),
    "test": ("FaceTalk_170809_00138_TA", "FaceTalk_170731_00024_TA"),
}
BIWI_SUBJECTS: dict[str, tuple[str, ...]] = {
    "seen": ("F2", "F3", "F4", "M3", "M4", "M5"),
    "unseen": ("F1", "F5", "F6", "F7", "F8", "M1", "M2", "M6"),
}
BIWI_SENTENCES: dict[str, range] = {
    "train": range(1, 33),
    "val": range(33, 37),
    "test": range(37, 41),
}
BIWI_FPS = 25.0
VOCASET_FILES = ("data_verts.npy", "raw_audio_fixed.pkl", "templates.pkl", "subj_seq_to_idx.pkl")

# (module, name) pairs a VOCASET pickle may reference: numpy's array reconstruction.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes inside protocol-2 pickles written by Python 3
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle references something other than numpy arrays and plain containers."""


class _Restricted(pickle.Unpickler):
    def __init__(self, f: Any, name: str):
        super().__init__(f, encoding="latin1")
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(
                f"{self._name}: refusing to unpickle {module}.{name}; only numpy arrays and "
                "plain containers (dict, list, tuple, str, numbers) are admitted"
            )
        return super().find_class(module, name)


def safe_load_pickle(path: str | epath.Path) -> Any:
    """Unpickles `path` admitting only numpy arrays and plain containers (latin-1 strings of
    Python-2 pickles decoded). Anything else is an `UnsafePickleError` naming the file."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return _Restricted(io.BytesIO(path.read_bytes()), str(path)).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # a truncated or corrupt file
        raise ValueError(f"{path}: not a readable pickle ({e})") from e


def _split_of(subject: str) -> str | None:
    for split, subjects in VOCASET_SPLITS.items():
        if subject in subjects:
            return split
    return None


def _audio_16k(entry: Any, where: str) -> np.ndarray:
    if not isinstance(entry, dict) or "audio" not in entry or "sample_rate" not in entry:
        raise ValueError(f"{where}: expected {{'audio': array, 'sample_rate': int}}")
    wav = np.asarray(entry["audio"])
    if wav.ndim == 2:
        wav = wav.mean(axis=-1)
    wav = wav.astype(np.float32) / (32768.0 if wav.dtype == np.int16 else 1.0)
    return resample(wav, int(entry["sample_rate"]), SAMPLE_RATE)


def load_vocaset(manual_dir: str | epath.Path, stride: int = 2) -> list[MeshSequence]:
    """VOCASET's sequences (subjects outside `VOCASET_SPLITS` are skipped), 60 / stride fps."""
    root = epath.Path(manual_dir)
    missing = [f for f in VOCASET_FILES if not (root / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"VOCASET in {root}: missing {missing}; expected {list(VOCASET_FILES)}"
        )
    verts = np.load(root / "data_verts.npy", mmap_mode="r")
    audio = safe_load_pickle(root / "raw_audio_fixed.pkl")
    safe_load_pickle(root / "templates.pkl")  # checked; identities are generated, not given
    index = safe_load_pickle(root / "subj_seq_to_idx.pkl")
    out = []
    for subject in sorted(index):
        split = _split_of(subject)
        if split is None:
            continue
        for seq in sorted(index[subject]):
            frames = index[subject][seq]
            rows = np.array([frames[k] for k in sorted(frames)][::stride], np.int64)
            if seq not in audio.get(subject, {}):
                raise ValueError(f"{root}/raw_audio_fixed.pkl has no audio for {subject}/{seq}")
            wav = _audio_16k(audio[subject][seq], f"raw_audio_fixed.pkl[{subject}][{seq}]")
            out.append(
                MeshSequence(
                    lambda rows=rows: verts[rows],
                    wav,
                    subject,
                    split,
                    f"{subject}/{seq}",
                    fps=60.0 / stride,
                )
            )
    if not out:
        raise ValueError(f"VOCASET in {root}: no sequence of the subjects {VOCASET_SPLITS}")
    return out


def _biwi_split(subject: str, sentence: int) -> str | None:
    """FaceFormer's BIWI split of (subject, sentence number), or None if outside every split."""
    group = "train" if subject in BIWI_SUBJECTS["seen"] else None
    if subject in BIWI_SUBJECTS["unseen"]:
        group = "test"
    if group == "train" and sentence in BIWI_SENTENCES["val"]:
        return "val"
    return group if group and sentence in BIWI_SENTENCES[group] else None


def _vertex_array(path: epath.Path) -> np.ndarray:
    """`[T, V, 3]` from a `[T, V, 3]` or `[T, V*3]` .npy (memory-mapped); error naming it."""
    arr = np.load(path, mmap_mode="r")
    if arr.ndim == 2 and arr.shape[1] % 3 == 0:
        arr = arr.reshape(arr.shape[0], -1, 3)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{path}: shape {arr.shape}; expected [T, V, 3] or [T, V*3]")
    return arr


def load_biwi(manual_dir: str | epath.Path) -> list[MeshSequence]:
    """BIWI's sequences in FaceFormer's layout and splits (see the module docstring)."""
    root = epath.Path(manual_dir)
    verts_dir, wav_dir = root / "vertices_npy", root / "wav"
    if not verts_dir.is_dir() or not (root / "templates.pkl").exists():
        raise FileNotFoundError(
            f"BIWI in {root}: expected vertices_npy/<subject>_e<NN>.npy, wav/<same>.wav and "
            "templates.pkl"
        )
    safe_load_pickle(root / "templates.pkl")  # checked; identities are generated, not given
    out = []
    for npy in sorted(verts_dir.glob("*.npy")):
        subject, _, number = npy.stem.rpartition("_e")
        if not number.isdigit():
            raise ValueError(f"{npy}: expected a name <subject>_e<NN>.npy")
        split = _biwi_split(subject, int(number))
        if split is None:
            continue
        wav_path = wav_dir / f"{npy.stem}.wav"
        if not wav_path.exists():
            raise FileNotFoundError(f"{npy} has no audio {wav_path}")
        arr = _vertex_array(npy)
        wav = load_audio(str(wav_path), SAMPLE_RATE)
        out.append(MeshSequence(lambda a=arr: a, wav, subject, split, npy.stem, BIWI_FPS))
    if not out:
        raise ValueError(f"BIWI in {root}: no sequence of the subjects {BIWI_SUBJECTS}")
    return out


def load_folder(
    manual_dir: str | epath.Path, fps: float = 30.0, heldout_subjects: int = 1
) -> list[MeshSequence]:
    """`<subject>/<name>.npy` vertex sequences with `<name>.wav` beside them."""
    root = epath.Path(manual_dir)
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
    if len(subjects) <= heldout_subjects:
        raise FileNotFoundError(
            f"{root}: expected <subject>/<name>.npy + <name>.wav for more than "
            f"{heldout_subjects} subjects; found {subjects}"
        )
    out = []
    for i, subject in enumerate(subjects):
        split = "test" if i >= len(subjects) - heldout_subjects else "train"
        for npy in sorted((root / subject).glob("*.npy")):
            wav_path = npy.with_suffix(".wav")
            if not wav_path.exists():
                raise FileNotFoundError(f"{npy} has no audio {wav_path}")
            arr = _vertex_array(npy)
            wav = load_audio(str(wav_path), SAMPLE_RATE)
            out.append(
                MeshSequence(lambda a=arr: a, wav, subject, split, f"{subject}/{npy.stem}", fps)
            )
    return out


def _fixture_face(rng: np.random.Generator, num_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """A random base mesh `[V, 3]` and its lowest 1/30 of vertices (the "lips") for fixtures."""
    base = rng.normal(0, 0.05, (num_vertices, 3)).astype(np.float32)
    return base, np.argsort(base[:, 1])[: num_vertices // 30]


def _speaking(
    template: np.ndarray, lips: np.ndarray, k: int, frames: int, fps: float, rate: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fixture sentence `k`: vertices `[frames, V, 3]` whose lips open and close, and a 220 Hz
    tone `[samples]` at `rate` whose loudness (0..1) follows the opening."""
    t = np.arange(frames) / fps
    opening = 0.5 + 0.5 * np.sin(2 * np.pi * (1.5 + k) * t)
    v = np.repeat(template[None], frames, 0)
    v[:, lips, 1] -= 0.01 * opening[:, None]
    n = int(frames / fps * rate)
    env = np.interp(np.arange(n) / rate, t, opening)
    return v, env * np.sin(2 * np.pi * 220 * np.arange(n) / rate)


def write_vocaset_fixture(
    root: str | epath.Path,
    subjects: tuple[str, ...] = (VOCASET_SPLITS["train"][0], VOCASET_SPLITS["test"][0]),
    sentences: int = 2,
    frames: int = 40,
    num_vertices: int = 5023,
    seed: int = 0,
) -> epath.Path:
    """A small VOCASET in the real layout (60 fps vertices, 22 kHz int16 audio in Python-2
    style pickles) with moving lips and a tone whose loudness follows them (tests, examples)."""
    root = epath.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base, lips = _fixture_face(rng, num_vertices)
    verts, audio, templates, index = [], {}, {}, {}
    row = 0
    for subject in subjects:
        templates[subject] = base + rng.normal(0, 0.005, base.shape).astype(np.float32)
        audio[subject], index[subject] = {}, {}
        for k in range(sentences):
            v, tone = _speaking(templates[subject], lips, k, frames, 60.0, 22000)
            verts.append(v)
            name = f"sentence{k + 1:02d}"
            index[subject][name] = {f + 1: row + f for f in range(frames)}
            row += frames
            audio[subject][name] = {
                "audio": (tone * 20000).astype(np.int16),
                "sample_rate": 22000,
            }
    np.save(root / "data_verts.npy", np.concatenate(verts))
    for name, obj in (
        ("raw_audio_fixed.pkl", audio),
        ("templates.pkl", templates),
        ("subj_seq_to_idx.pkl", index),
    ):
        (root / name).write_bytes(pickle.dumps(obj, protocol=2))
    return root


def write_biwi_fixture(
    root: str | epath.Path,
    names: tuple[str, ...] = ("F2_e01", "F2_e33", "M1_e37", "F2_e40"),
    frames: int = 30,
    num_vertices: int = 300,
    seed: int = 0,
) -> epath.Path:
    """A small BIWI in FaceFormer's layout (25 fps `[T, V*3]` vertices, 44.1 kHz WAVs,
    templates.pkl) with moving lips and a tone that follows them (tests, examples)."""
    import soundfile as sf

    root = epath.Path(root)
    (root / "vertices_npy").mkdir(parents=True, exist_ok=True)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base, lips = _fixture_face(rng, num_vertices)
    templates = {}
    for k, name in enumerate(names):
        subject = name.rpartition("_e")[0]
        templates.setdefault(subject, base + rng.normal(0, 0.005, base.shape).astype(np.float32))
        v, tone = _speaking(templates[subject], lips, k, frames, BIWI_FPS, 44100)
        np.save(root / "vertices_npy" / f"{name}.npy", v.reshape(frames, -1))
        sf.write(root / "wav" / f"{name}.wav", tone * 0.5, 44100)
    (root / "templates.pkl").write_bytes(pickle.dumps(templates, protocol=2))
    return root
