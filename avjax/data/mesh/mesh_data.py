"""The data module of speech-driven 3D face animation (DF-3DFace): meshes + speech features.

    data = MeshData.from_config(config, workdir)
    facts = data.prepare()          # corpus -> representation -> codes + features per frame
    it = data.train_dataset(0, 1)   # endless batches {"x", "static", "audio", "mask"}
    held = data.eval_batches(0, 1)  # fixed windows of the held-out speakers

Sequences come from the embedded corpus (`corpus.py`, `data.name="default"`), VOCASET or a
folder of vertex sequences (`vocaset.py`). A sequence is represented as one static code (its
mean mesh: identity and mean head pose) plus per-frame motion codes (each frame minus that
mean: expression, jaw, lips and pose changes), so identity cannot drift within a sequence
(`MeshRepr`). Each part is (`data.representation`) either raw vertex offsets (`vertices`:
`V * 3` numbers) or a PCA code (`pca`: `data.identity_dim` components over the training
sequences' means, `data.pca_dim` over their frames' motion), each dimension scaled to unit
variance. The representation (mean mesh, bases, scales, audio feature statistics) is fitted
once and saved as `<workdir>/mesh_repr.npz`; sampling and evaluation load it (never refit).
No template is subtracted per speaker, so a model of these codes generates identity and head
pose too.

Speech features (`data.audio_features`) are log-mel by default (`avjax.data.speech.logmel`, 100 Hz):
for mesh frame k the four mel frames from k / fps on, stacked (`[frames, 320]`); or, as the
paper conditions, HuBERT (`"hubert"`: layer `data.hubert_layer` of the HF HuBERT checkpoint
in the local `data.hubert_dir`, 50 Hz frames linearly interpolated to the mesh frame times,
`[frames, hidden_size]`). Either is normalised by training statistics.

Batches: `x [batch, window, dim]` (motion codes), `static [batch, dim]` (the sequence's
static code), `audio [batch, window, feature_dim]` float32, `mask [batch, window]` float32
(0 = padding past a short sequence's end).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import numpy as np

from avjax.data.mesh import corpus as corpus_lib
from avjax.data.mesh import head as head_lib
from avjax.data.mesh import vocaset
from avjax.data.module import DataModule
from avjax.data.speech import logmel
from avjax.data.speech.speech_lm import cache_root
from avjax.io import as_path

Batch = dict[str, np.ndarray]
FEATURE_DIM = 4 * logmel.N_MELS
REPR_FILE = "mesh_repr.npz"


def audio_features(wav: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
    """`[num_frames, 320]` float32: four 100 Hz log-mel frames from each mesh frame's start."""
    mel = logmel.log_mel(np.asarray(wav, np.float32))
    start = np.round(np.arange(num_frames) * 100.0 / fps).astype(int)
    idx = np.clip(start[:, None] + np.arange(4)[None], 0, len(mel) - 1)
    return mel[idx].reshape(num_frames, FEATURE_DIM)


def interpolate_frames(feats: np.ndarray, rate: float, num_frames: int, fps: float) -> np.ndarray:
    """`feats [F, D]` at `rate` Hz -> `[num_frames, D]` at `fps`, linear in time (the ends
    are held)."""
    pos = np.clip(np.arange(num_frames) * rate / fps, 0, len(feats) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(feats) - 1)
    w = (pos - lo)[:, None]
    return ((1 - w) * feats[lo] + w * feats[hi]).astype(np.float32)


def utterance_normalise(feats: np.ndarray) -> np.ndarray:
    """`feats [T, D]` with each dimension's mean and std over the utterance removed (CMVN):
    a voice's spectral envelope and level are taken out, so unseen speakers' features lie
    where the training speakers' do."""
    f = np.asarray(feats, np.float32)
    return ((f - f.mean(0)) / (f.std(0) + 1e-3)).astype(np.float32)


def audio_envelope(wav: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
    """RMS energy `[num_frames]` per mesh frame."""
    return corpus_lib._envelope(np.asarray(wav), num_frames, fps)  # noqa: SLF001


@dataclasses.dataclass
class Regions:
    """Vertex index sets the metrics use: lip `[L]`, upper face `[U]`, and the mid-line
    vertices of the upper and lower lip (mouth opening)."""

    lip: np.ndarray
    upper_face: np.ndarray
    upper_lip: int
    lower_lip: int


def _heuristic_regions(mean: np.ndarray, sample: np.ndarray) -> Regions:
    """Regions of a mesh without annotations (y up, z out of the face): lip = the 3% most
    moving vertices (temporal std in `sample [T, V, 3]`) below the centre; upper face =
    front vertices in the top third."""
    y, z = mean[:, 1], mean[:, 2]
    motion = (sample - sample.mean(0)).std(0).sum(-1)
    motion = np.where(y < np.median(y), motion, -1.0)
    lip = np.argsort(-motion)[: max(4, len(y) * 3 // 100)]
    top = y > np.quantile(y, 0.66)
    upper = np.flatnonzero(top & (z > np.median(z)))
    x_mid = np.abs(mean[lip, 0] - np.median(mean[lip, 0]))
    centre = lip[x_mid <= np.quantile(x_mid, 0.3)]
    return Regions(
        lip.astype(np.int32),
        upper.astype(np.int32),
        int(centre[np.argmax(y[centre])]),
        int(centre[np.argmin(y[centre])]),
    )


@dataclasses.dataclass
class MeshRepr:
    """Sequences <-> model arrays: one static code per sequence (the sequence's mean mesh:
    identity and mean pose) plus per-frame motion codes (each frame minus that mean:
    expression, jaw, lips, pose changes), so identity cannot drift within a sequence.

    mean `[V, 3]`: the training mean mesh. basis `[km, V*3]` (PCA of frame motion) or None
    (`vertices`: the V*3 offsets); scale `[km]`. static_basis `[ki, V*3]` (PCA of sequence
    means) or None; static_scale `[ki]`. Audio feature mean / std `[feature_dim]`; regions.
    A sequence's model array is `[1 + T, dim]` with `dim = max(ki, km)`: row 0 the static code,
    rows 1.. the motion codes, each zero-padded to `dim`.
    """

    mean: np.ndarray
    basis: np.ndarray | None
    scale: np.ndarray
    static_basis: np.ndarray | None
    static_scale: np.ndarray
    feat_mean: np.ndarray
    feat_std: np.ndarray
    regions: Regions
    faces: np.ndarray | None = None

    @property
    def motion_dim(self) -> int:
        return int(self.scale.shape[0])

    @property
    def static_dim(self) -> int:
        return int(self.static_scale.shape[0])

    @property
    def dim(self) -> int:
        """Width of a packed row (static and motion codes zero-padded to it)."""
        return max(self.motion_dim, self.static_dim)

    def _pad(self, x: np.ndarray) -> np.ndarray:
        return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, self.dim - x.shape[-1])])

    def encode(self, verts: np.ndarray) -> np.ndarray:
        """`[T, V, 3]` -> `[1 + T, dim]` float32 (row 0: static code, rows 1..: motion)."""
        v = np.asarray(verts, np.float32).reshape(len(verts), -1)
        seq_mean = v.mean(0)
        static = seq_mean - self.mean.reshape(-1)
        if self.static_basis is not None:
            static = static @ self.static_basis.T
        motion = v - seq_mean
        if self.basis is not None:
            motion = motion @ self.basis.T
        rows = [self._pad((static / self.static_scale)[None]), self._pad(motion / self.scale)]
        return np.concatenate(rows).astype(np.float32)

    def decode(self, x: np.ndarray) -> np.ndarray:
        """`[..., 1 + T, dim]` -> `[..., T, V, 3]` float32."""
        x = np.asarray(x, np.float32)
        static = x[..., :1, : self.static_dim] * self.static_scale
        motion = x[..., 1:, : self.motion_dim] * self.scale
        if self.static_basis is not None:
            static = static @ self.static_basis
        if self.basis is not None:
            motion = motion @ self.basis
        off = static + motion
        return (off.reshape(*off.shape[:-1], -1, 3) + self.mean).astype(np.float32)

    def save(self, path: Any) -> None:
        r = self.regions
        arrays = dict(
            mean=self.mean,
            scale=self.scale,
            static_scale=self.static_scale,
            feat_mean=self.feat_mean,
            feat_std=self.feat_std,
            lip=r.lip,
            upper_face=r.upper_face,
            lips=np.array([r.upper_lip, r.lower_lip]),
        )
        for k in ("basis", "static_basis", "faces"):
            if getattr(self, k) is not None:
                arrays[k] = getattr(self, k)
        tmp = as_path(str(path) + ".tmp.npz")
        with tmp.open("wb") as f:
            np.savez(f, **arrays)
        tmp.rename(path)

    @classmethod
    def load(cls, path: Any) -> MeshRepr:
        with as_path(path).open("rb") as f:
            z = dict(np.load(f))
        if "static_scale" not in z:
            raise ValueError(
                f"{path} holds a per-frame representation without a static code (an older "
                "layout): train in a new workdir"
            )
        regions = Regions(z["lip"], z["upper_face"], int(z["lips"][0]), int(z["lips"][1]))
        return cls(
            z["mean"],
            z.get("basis"),
            z["scale"],
            z.get("static_basis"),
            z["static_scale"],
            z["feat_mean"],
            z["feat_std"],
            regions,
            z.get("faces"),
        )


def _top_components(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The top `k` right singular vectors `[k, n]` of `x [m, n]` (randomised SVD, Halko et
    al. 2011: a range of k + 10 columns, two power iterations)."""
    q = np.linalg.qr(x @ rng.normal(size=(x.shape[1], min(k + 10, x.shape[0]))).astype(x.dtype))[0]
    for _ in range(2):
        q = np.linalg.qr(x @ (x.T @ q))[0]
    return np.linalg.svd(q.T @ x, full_matrices=False)[2][:k].astype(np.float32)


def _fit_codes(
    x: np.ndarray, representation: str, k: int, rng: np.random.Generator
) -> tuple[np.ndarray | None, np.ndarray]:
    """Basis `[k, n]` (PCA; None for `vertices`) and per-dimension scales of the centred rows
    `x [m, n]`: unit variance per PCA component, one global std for raw vertex offsets."""
    if representation == "vertices":
        return None, np.full(x.shape[1], x.std() + 1e-6, np.float32)
    basis = _top_components(x, min(k, x.shape[0], x.shape[1]), rng)
    return basis, ((x @ basis.T).std(0) + 1e-6).astype(np.float32)


def fit_repr(
    seqs: list[corpus_lib.MeshSequence],
    feats: list[np.ndarray],
    representation: str,
    pca_dim: int,
    seed: int,
    regions: Regions | None = None,
    faces: np.ndarray | None = None,
    max_frames: int = 3000,
    identity_dim: int = 16,
) -> MeshRepr:
    """Fits the representation on training sequences `seqs` (with their raw speech features
    `feats`, each `[T, feature_dim]`): the mean mesh, the static codes (PCA of `identity_dim`
    over the sequences' mean meshes) and the motion codes (PCA of `pca_dim` over sampled
    frames minus their sequence's mean), or raw offsets for `representation="vertices"`."""
    if representation not in ("pca", "vertices"):
        raise ValueError(f"data.representation={representation!r}; expected pca | vertices")
    rng = np.random.default_rng(seed)
    per = max(1, max_frames // max(len(seqs), 1))
    frames, means = [], []
    for s in seqs:
        v = s.vertices
        means.append(v.mean(0))
        frames.append(v[rng.choice(len(v), min(per, len(v)), replace=False)] - means[-1])
    means_a = np.stack(means)
    mean = means_a.mean(0)
    moves = np.concatenate(frames)
    static = (means_a - mean).reshape(len(means_a), -1)
    static_basis, static_scale = _fit_codes(static, representation, identity_dim, rng)
    basis, scale = _fit_codes(moves.reshape(len(moves), -1), representation, pca_dim, rng)
    allf = np.concatenate(feats)
    return MeshRepr(
        mean.astype(np.float32),
        basis,
        scale,
        static_basis,
        static_scale,
        allf.mean(0).astype(np.float32),
        (allf.std(0) + 1e-3).astype(np.float32),
        regions or _heuristic_regions(mean, moves + mean),
        faces,
    )


class _Windows:
    """Windows `(sequence, start)` of per-frame arrays, padded to `window` frames, each with
    its sequence's static code."""

    def __init__(self, codes: list, statics: list, feats: list, window: int, stride: int):
        self.codes, self.statics, self.feats, self.window = codes, statics, feats, window
        self.index = [
            (i, s)
            for i, c in enumerate(codes)
            for s in range(0, max(len(c) - window, 0) + 1, stride)
        ]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> Batch:
        i, s = self.index[k]
        x, a = self.codes[i][s : s + self.window], self.feats[i][s : s + self.window]
        pad = self.window - len(x)
        mask = np.concatenate([np.ones(len(x), np.float32), np.zeros(pad, np.float32)])
        return {
            "x": np.pad(x, ((0, pad), (0, 0))),
            "static": self.statics[i],
            "audio": np.pad(a, ((0, pad), (0, 0))),
            "mask": mask,
        }


def _stack(items: list[Batch]) -> Batch:
    return {k: np.stack([it[k] for it in items]) for k in items[0]}


@dataclasses.dataclass
class MeshData(DataModule):
    """Mesh sequences with speech, as windows of representation codes; prepared lazily.

    Fields as `DataModule`: `data` is `config.data` (name, manual_dir, minutes,
    representation, pca_dim, window, ...); `workdir` receives `mesh_repr.npz` and
    `data_facts.json`.
    """

    _hubert_model: Any = dataclasses.field(default=None, repr=False)

    def _default_root(self, read_only: bool) -> Any:
        """The embedded corpus' folder (an epath.Path), built on first use unless read_only."""
        dc = self.data
        return corpus_lib.build_corpus(
            cache_root(dc),
            float(dc.minutes),
            int(dc.num_speakers),
            int(dc.heldout_speakers),
            self.seed,
            read_only=read_only,
        )

    def _sequences(self) -> tuple[list[corpus_lib.MeshSequence], Regions | None, Any]:
        dc = self.data
        if dc.name == "default":
            head = head_lib.build_head()
            root = self._default_root(read_only=False)
            regions = Regions(head.lip, head.upper_face, head.upper_lip, head.lower_lip)
            return corpus_lib.load_corpus(root), regions, head.faces
        if not dc.manual_dir:
            raise ValueError(f"config.data.name={dc.name!r} needs config.data.manual_dir")
        if dc.name == "vocaset":
            return vocaset.load_vocaset(dc.manual_dir, int(dc.vocaset_stride)), None, None
        if dc.name == "biwi":
            return vocaset.load_biwi(dc.manual_dir), None, None
        if dc.name == "folder":
            seqs = vocaset.load_folder(dc.manual_dir, float(dc.fps), int(dc.heldout_speakers))
            return seqs, None, None
        raise ValueError(
            f"config.data.name={dc.name!r}; expected default | vocaset | biwi | folder"
        )

    def prepare(self, read_only: bool | None = None) -> dict[str, Any]:
        """Loads (building the default corpus if needed) and encodes every sequence; fits the
        representation unless read-only (then `<workdir>/mesh_repr.npz` must exist)."""
        if self._prepared is not None:
            return self._prepared["facts"]
        dc = self.data
        read_only = self.read_only if read_only is None else bool(read_only)
        seqs, regions, faces = self._sequences()
        train = [s for s in seqs if s.split == "train"]
        held = [s for s in seqs if s.split == "test"] or [s for s in seqs if s.split == "val"]
        if not train or not held:
            raise ValueError(f"data.name={dc.name!r}: {len(train)} train, {len(held)} held out")
        raw = {
            split: [self._features(s.audio, s.num_frames, s.fps) for s in group]
            for split, group in (("train", train), ("test", held))
        }
        path = as_path(self.workdir) / REPR_FILE
        if path.exists():
            rep = MeshRepr.load(path)
        elif read_only:
            raise FileNotFoundError(f"{path} is missing: train first in this workdir")
        else:
            rep = fit_repr(
                train,
                raw["train"],
                str(dc.representation),
                int(dc.pca_dim),
                self.seed,
                regions,
                faces,
                identity_dim=int(dc.get("identity_dim", 16)),
            )
            if jax.process_index() == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                rep.save(path)
        self._check_declared(rep)
        codes = {"train": [], "test": []}
        statics = {"train": [], "test": []}
        feats = {"train": [], "test": []}
        for split, group in (("train", train), ("test", held)):
            for s, f in zip(group, raw[split], strict=True):
                packed = rep.encode(s.vertices)
                statics[split].append(packed[0])
                codes[split].append(packed[1:])
                feats[split].append(((f - rep.feat_mean) / rep.feat_std).astype(np.float32))
        facts = {
            "train_sequences": len(train),
            "heldout_sequences": len(held),
            "train_minutes": sum(len(c) for c in codes["train"]) / train[0].fps / 60,
            "heldout_speakers": sorted({s.speaker for s in held}),
            "vertices": int(rep.mean.shape[0]),
            "dim": rep.dim,
            "static_dim": rep.static_dim,
            "motion_dim": rep.motion_dim,
            "fps": train[0].fps,
        }
        self._prepared = dict(
            facts=facts, repr=rep, codes=codes, statics=statics, feats=feats, heldout=held
        )
        self._write_facts(facts, read_only)
        return facts

    def _get(self, name: str) -> Any:
        self.prepare()  # (prepared on first use)
        return self._prepared[name]

    @property
    def repr(self) -> MeshRepr:
        return self._get("repr")

    @property
    def heldout(self) -> list[corpus_lib.MeshSequence]:
        """The held-out sequences (vertices, audio)."""
        return self._get("heldout")

    def heldout_features(self, i: int) -> np.ndarray:
        """Normalised speech features `[T, feature_dim]` of held-out sequence i."""
        return self._get("feats")["test"][i]

    def heldout_renditions(self, i: int, num: int, seed: int) -> np.ndarray | None:
        """The corpus' own one-to-many for held-out sequence i: its speech animated as `num`
        corpus speakers would (`corpus.speaker_renditions`), meshes `[num, T, V, 3]`; None
        for real corpora (one recording per utterance)."""
        dc = self.data
        if dc.name != "default":
            return None
        root = self._default_root(read_only=True)
        index = int(self.heldout[i].name.removeprefix("utt"))
        return corpus_lib.speaker_renditions(root, index, num, seed)

    def features_of(self, wav: np.ndarray, fps: float) -> np.ndarray:
        """Normalised features `[T, feature_dim]` of any 16 kHz audio (T = its duration x fps)."""
        n = max(1, int(len(wav) / 16000 * fps))
        return (self._features(wav, n, fps) - self.repr.feat_mean) / self.repr.feat_std

    @property
    def feature_dim(self) -> int:
        """Speech feature width: 320 (log-mel) or the HuBERT hidden size; `data.feature_dim`
        when declared (> 0) and nothing is loaded yet (checked by `prepare`)."""
        declared = int(self.data.get("feature_dim", 0) or 0)
        if declared and self._prepared is None and self._hubert_model is None:
            return declared
        if self.data.get("audio_features", "logmel") == "hubert":
            return int(self._hubert().config.hidden_size)
        return FEATURE_DIM

    @property
    def code_dim(self) -> int:
        """Width of a frame's code `x [..., code_dim]`: the fitted representation's, or
        `data.code_dim` when declared (> 0) before any corpus is read (an AOT compile at
        paper size; `prepare` refuses a corpus that gives another width)."""
        declared = int(self.data.get("code_dim", 0) or 0)
        if declared and self._prepared is None:
            return declared
        return self.repr.dim

    def _check_declared(self, rep: MeshRepr) -> None:
        """`data.code_dim` / `data.feature_dim`, when declared, equal what the data gives."""
        for field, got in (("code_dim", rep.dim), ("feature_dim", len(rep.feat_mean))):
            want = int(self.data.get(field, 0) or 0)
            if want and want != got:
                raise ValueError(
                    f"config.data.{field}={want}, but data.name={self.data.name!r} with "
                    f"representation={self.data.representation!r} gives {got}: set it to "
                    f"{got} or 0 (taken from the data)"
                )

    def _hubert(self) -> Any:
        if self._hubert_model is None:
            from avjax.data.speech.features import HubertFeatures

            if not self.data.get("hubert_dir"):
                raise ValueError("data.audio_features='hubert' needs data.hubert_dir")
            self._hubert_model = HubertFeatures(
                self.data.hubert_dir, int(self.data.get("hubert_layer", 12))
            )
        return self._hubert_model

    def _features(self, wav: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
        """Raw speech features `[num_frames, feature_dim]` of 16 kHz audio."""
        kind = self.data.get("audio_features", "logmel")
        if kind == "logmel":
            feats = audio_features(wav, num_frames, fps)
        elif kind == "hubert":
            h = self._hubert()
            feats = interpolate_frames(
                h(np.asarray(wav, np.float32)), h.frame_rate, num_frames, fps
            )
        else:
            raise ValueError(f"data.audio_features={kind!r}; expected logmel | hubert")
        norm = self.data.get("feature_norm", "global")
        if norm == "utterance":
            return utterance_normalise(feats)
        if norm != "global":
            raise ValueError(f"data.feature_norm={norm!r}; expected global | utterance")
        return feats

    def compatibility(self) -> dict[str, Any]:
        keys = ("name", "manual_dir", "minutes", "representation", "pca_dim", "num_speakers")
        out = {k: self.data.get(k) for k in keys}
        if self.data.get("audio_features", "logmel") != "logmel":  # old stamps stay valid
            out.update(
                {k: self.data.get(k) for k in ("audio_features", "hubert_dir", "hubert_layer")}
            )
        if self.data.get("feature_norm", "global") != "global":
            out["feature_norm"] = self.data.get("feature_norm")
        out["layout"] = "static+motion"  # one static code per sequence (older: per frame)
        out["identity_dim"] = int(self.data.get("identity_dim", 16))
        return {"mesh_data": out}

    def _windows(self, split: str) -> _Windows:
        w = int(self.data.window)
        got = self._get
        return _Windows(got("codes")[split], got("statics")[split], got("feats")[split], w, w // 2)

    def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        """Endless shuffled batches of `batch_size // process_count` windows."""
        ds = grain.MapDataset.source(self._windows("train"))
        ds = ds.shuffle(seed=self.seed).repeat(None)[process_index::process_count]
        return ds.batch(
            self.per_process_batch(process_count), drop_remainder=True, batch_fn=_stack
        ).to_iter_dataset()

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        """`num_eval_batches` fixed batches of held-out windows (cycled to fill)."""
        src = self._windows("test")
        per = self.per_process_batch(process_count)
        out = []
        for b in range(self.num_eval_batches):
            base = (b * process_count + process_index) * per
            out.append(_stack([src[(base + j) % len(src)] for j in range(per)]))
        return out

    def dummy_batch(self) -> Batch:
        """A global batch of zeros (initialisation)."""
        w, d = int(self.data.window), self.code_dim
        return {
            "x": np.zeros((self.batch_size, w, d), np.float32),
            "static": np.zeros((self.batch_size, d), np.float32),
            "audio": np.zeros((self.batch_size, w, self.feature_dim), np.float32),
            "mask": np.ones((self.batch_size, w), np.float32),
        }
