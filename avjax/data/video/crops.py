"""Face and mouth crops of real video: 68-point landmarks, smoothing, alignment, ROI videos.

The preprocessing of the lip-reading and talking-face papers, done offline once per video
(`tools/preprocess_video.py` runs it over files or folders, resumably, in a process pool):

  1. **Landmarks.** dlib's HOG face detector finds faces (the largest one per frame is kept;
     small videos are searched again upsampled) and dlib's 68-point shape predictor
     (`shape_predictor_68_face_landmarks.dat`, from the `face_recognition_models` package;
     nothing is downloaded at run time) places the iBUG-68 points: jaw 0-16, brows 17-26,
     nose 27-35, eyes 36-47, mouth 48-67.
  2. **Gaps and jitter.** Frames where no face was found get landmarks interpolated linearly
     from the nearest frames with one (held constant before the first / after the last);
     a video without any face raises `NoFaceError`. The landmarks used for cropping are
     smoothed over time with a centred moving average (`smooth_window` frames).
  3. **Alignment.** Per frame, the least-squares similarity transform (rotation, uniform
     scale, translation; Umeyama) maps the smoothed stable points — nose tip 33 and the eye
     corners 36, 39, 42, 45, which do not move with speech — onto `mean_face()` in a
     256 x 256 reference frame (the LRS3 / AV-HuBERT recipe).
  4. **Crops.** (a) mouth: in the aligned frame, a 96 x 96 grey patch centred on the mean of
     the transformed mouth points 48-67 (AV-HuBERT's LRS3 ROI; the 88 x 88 centre or random
     crop happens at training time, not here). (b) face: a 128 x 128 RGB crop of the aligned
     face from the brows to below the chin (Wav2Lip / SyncTalkFace; its lower half is what
     a sync expert sees). Both are cut straight from the source frame with one bilinear
     affine warp each, outside pixels are black.

`process_video` writes one folder per video (see `OUTPUT_FILES`) through a temporary
folder renamed into place, with `info.json` written last, so a folder holding `info.json` is
complete. Two streaming passes over the file (landmarks, then crops) keep long videos out of
memory; only the landmarks (`[frames, 68, 2]`) are held whole.

The mean face (`MEAN_FACE`) was derived here, not copied: dlib landmarks of the 90 faces
that dlib's detector finds among the 100 real faces of `skimage.data.lfw_subset()` (25 x 25
LFW crops, upsampled to 150 x 150) and of `skimage.data.astronaut()`, aligned by generalised
Procrustes analysis (similarity transforms, 10 iterations), made left-right symmetric
(averaged with its mirror image) and normalised (centroid at 0,
outer eye corners 36 and 45 on a horizontal line one unit apart). `derive_mean_face()`
recomputes it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import time

import numpy as np
from PIL import Image

from avjax import io as avio
from avjax.data.video import io as vio

NUM_LANDMARKS = 68
STABLE_POINTS = (33, 36, 39, 42, 45)  # nose tip, eye corners: alignment anchors
MOUTH_POINTS = tuple(range(48, 68))
# iBUG-68 index of each point's mirror image (left <-> right).
MIRROR = (
    *range(16, -1, -1),  # jaw
    *range(26, 16, -1),  # brows
    27,
    28,
    29,
    30,
    35,
    34,
    33,
    32,
    31,  # nose
    45,
    44,
    43,
    42,
    47,
    46,
    39,
    38,
    37,
    36,
    41,
    40,  # eyes
    54,
    53,
    52,
    51,
    50,
    49,
    48,
    59,
    58,
    57,
    56,
    55,  # outer lips
    64,
    63,
    62,
    61,
    60,
    67,
    66,
    65,  # inner lips
)
REFERENCE_SIZE = 256  # side of the frame the mean face lives in (LRS3 recipe)
PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
OUTPUT_FILES = ("mouth.mp4", "face.mp4", "landmarks.npy", "info.json")

# Where the mean face sits in the reference frame: outer-eye-corner distance in pixels and
# the position of the landmark centroid. Chosen so that the mouth corners (48, 54) are ~58 px
# apart, about 60% of the 96-pixel mouth crop, with the nostrils and the chin near its top and
# bottom edges, as in LRS3 / AV-HuBERT ROIs.
_REF_EYE_DISTANCE = 90.0
_REF_CENTRE = (128.0, 120.0)
# Face crop: a square in the reference frame, given as its centre and side in eye-distance
# units around the centroid; it spans the brows to just below the chin and the cheeks.
_FACE_BOX_CENTRE = (0.0, 0.15)
_FACE_BOX_SIDE = 2.3

# Unit mean face [68, 2] (x, y; y down): see the module docstring for its derivation.
MEAN_FACE = np.array(
    [
        (-0.8481, -0.4053),
        (-0.8416, -0.1903),
        (-0.8195, 0.0245),
        (-0.7778, 0.2374),
        (-0.6994, 0.4384),
        (-0.5754, 0.6187),
        (-0.4160, 0.7676),
        (-0.2252, 0.8806),
        (0.0000, 0.9087),
        (0.2252, 0.8806),
        (0.4160, 0.7676),
        (0.5754, 0.6187),
        (0.6994, 0.4384),
        (0.7778, 0.2374),
        (0.8195, 0.0245),
        (0.8416, -0.1903),
        (0.8481, -0.4053),
        (-0.6682, -0.5838),
        (-0.5705, -0.6762),
        (-0.4291, -0.7097),
        (-0.2793, -0.6966),
        (-0.1407, -0.6438),
        (0.1407, -0.6438),
        (0.2793, -0.6966),
        (0.4291, -0.7097),
        (0.5705, -0.6762),
        (0.6682, -0.5838),
        (0.0000, -0.4748),
        (0.0000, -0.3376),
        (0.0000, -0.2011),
        (0.0000, -0.0595),
        (-0.1655, 0.0446),
        (-0.0862, 0.0744),
        (0.0000, 0.0992),
        (0.0862, 0.0744),
        (0.1655, 0.0446),
        (-0.5000, -0.4425),
        (-0.4130, -0.4932),
        (-0.3084, -0.4938),
        (-0.2171, -0.4325),
        (-0.3146, -0.4132),
        (-0.4171, -0.4130),
        (0.2171, -0.4325),
        (0.3084, -0.4938),
        (0.4130, -0.4932),
        (0.5000, -0.4425),
        (0.4171, -0.4130),
        (0.3146, -0.4132),
        (-0.3213, 0.3312),
        (-0.2100, 0.2638),
        (-0.0883, 0.2376),
        (0.0000, 0.2556),
        (0.0883, 0.2376),
        (0.2100, 0.2638),
        (0.3213, 0.3312),
        (0.2150, 0.4447),
        (0.0949, 0.4936),
        (0.0000, 0.5017),
        (-0.0949, 0.4936),
        (-0.2150, 0.4447),
        (-0.2717, 0.3341),
        (-0.0884, 0.3056),
        (0.0000, 0.3133),
        (0.0884, 0.3056),
        (0.2717, 0.3341),
        (0.0908, 0.3929),
        (0.0000, 0.4027),
        (-0.0908, 0.3929),
    ],
    np.float32,
)


class NoFaceError(ValueError):
    """No face was found in any frame of a video."""

    def __init__(self, path: avio.PathLike, frames: int):
        self.path = os.fspath(path)
        self.frames = frames
        super().__init__(f"{self.path}: no face found in any of its {frames} frames")


@dataclasses.dataclass(frozen=True)
class CropConfig:
    """How crops are made (its fields are recorded in each video's `info.json`).

    Attributes:
      mouth_size: side of the grey mouth ROI (96, as LRS3 / AV-HuBERT).
      face_size: side of the RGB face crop (128, as SyncTalkFace; Wav2Lip used 96).
      smooth_window: frames of the centred moving average over landmarks (1: none).
      chunk_frames: frames decoded, cropped and encoded at a time.
      crf: x264 quality of the written crops (18 looks lossless).
    """

    mouth_size: int = 96
    face_size: int = 128
    smooth_window: int = 5
    chunk_frames: int = 250
    crf: int = 18


# --- the predictor and the detector ---------------------------------------------------------------


def default_predictor_path() -> str | None:
    """The 68-point predictor inside the installed `face_recognition_models`, or None.

    The package is located without importing it (its `__init__` needs `pkg_resources`, which
    current setuptools no longer provides)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "models", PREDICTOR_FILE)
        if os.path.exists(path):
            return path
    return None


def find_predictor(path: str | None = None) -> str:
    """`path` if given and present, else the installed predictor; a clear error otherwise."""
    how = (
        f"the 68-point dlib predictor {PREDICTOR_FILE} ships in the face_recognition_models "
        "sdist: `pip install face_recognition_models` (about 100 MB; or `pip install "
        "avjax[video]`), or pass --predictor=PATH to a copy of the file"
    )
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: predictor file not found; {how}")
        return path
    found = default_predictor_path()
    if found is None:
        raise FileNotFoundError(f"no face landmark predictor found; {how}")
    return found


class LandmarkDetector:
    """dlib face detection + 68-point landmarks on single frames.

    Args:
      predictor_path: the `.dat` file (default: `find_predictor()`).
      max_upsample: a frame where no face is found is searched again upsampled 2x, up to
        this many times (faces under ~80 px need it; each level costs ~4x the time). The level
        that last found a face is tried first on the next frame.
      detect_max_side: larger frames are searched for faces downscaled to this longest side
        (HOG on HD frames is slow); the landmarks are always placed at full resolution.
    """

    def __init__(
        self, predictor_path: str | None = None, max_upsample: int = 2, detect_max_side: int = 640
    ):
        try:
            import dlib
        except ImportError as e:
            raise ImportError(
                "face landmarks need dlib: `pip install dlib-bin face_recognition_models` "
                "(or `pip install avjax[video]`)"
            ) from e
        self.predictor_path = find_predictor(predictor_path)
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(self.predictor_path)
        self.max_upsample = max_upsample
        self.detect_max_side = detect_max_side
        self._upsample = 0

    def _faces(self, frame: np.ndarray, upsample: int) -> list:
        """dlib rectangles of the faces in `frame [H, W, 3]`, in its pixel coordinates."""
        h, w = frame.shape[:2]
        k = self.detect_max_side / max(h, w)
        if k >= 1:
            return list(self._detector(frame, upsample))
        small = np.asarray(Image.fromarray(frame).resize((round(w * k), round(h * k))))
        return [
            self._dlib.rectangle(
                *(round(v / k) for v in (r.left(), r.top(), r.right(), r.bottom()))
            )
            for r in self._detector(small, upsample)
        ]

    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        """Landmarks `[68, 2]` float32 (x, y pixels) of the largest face in `frame [H, W, 3]`
        uint8 RGB, or None if there is no face."""
        levels = [self._upsample] + [u for u in range(self.max_upsample + 1) if u != self._upsample]
        for up in levels:
            rects = self._faces(frame, up)
            if rects:
                self._upsample = up
                rect = max(rects, key=lambda r: r.width() * r.height())
                shape = self._predictor(frame, rect)
                return np.array([(p.x, p.y) for p in shape.parts()], np.float32)
        return None


# --- landmarks over time --------------------------------------------------------------------------


def interpolate_missing(landmarks: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Fills frames without a face from their neighbours.

    Args:
      landmarks: `[T, 68, 2]`; rows where `found` is False are ignored.
      found: `[T]` bool, at least one True.

    Returns:
      `[T, 68, 2]` float32: linear interpolation between the nearest frames with a face,
      the first / last detection held before / after them.
    """
    found = np.asarray(found, bool)
    if not found.any():
        raise ValueError("no frame has landmarks to interpolate from")
    t = np.arange(len(found))
    known = t[found]
    flat = landmarks.reshape(len(found), -1)
    out = np.stack([np.interp(t, known, flat[found, j]) for j in range(flat.shape[1])], 1)
    return out.reshape(landmarks.shape).astype(np.float32)


def smooth_landmarks(landmarks: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over time of `[T, 68, 2]` landmarks (edges: the window is cut
    to the frames that exist). `window <= 1` returns them unchanged."""
    if window <= 1 or len(landmarks) < 2:
        return np.asarray(landmarks, np.float32)
    lo, hi = (window - 1) // 2, window // 2
    c = np.concatenate([np.zeros((1, *landmarks.shape[1:])), np.cumsum(landmarks, 0)], 0)
    t = np.arange(len(landmarks))
    start = np.maximum(t - lo, 0)
    stop = np.minimum(t + hi + 1, len(landmarks))
    return ((c[stop] - c[start]) / (stop - start)[:, None, None]).astype(np.float32)


# --- alignment ------------------------------------------------------------------------------------


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama, no reflection) with `dst ~ src @ A.T + b`.

    Args:
      src, dst: `[n, 2]` corresponding points (n >= 2).

    Returns:
      `[2, 3]` float64 matrix `[A | b]`.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / (s**2).sum(1).mean()
    a = scale * rot
    return np.concatenate([a, (md - a @ ms)[:, None]], 1)


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """`points [..., 2]` mapped by a `[2, 3]` affine matrix."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def _compose_translation(matrix: np.ndarray, shift: np.ndarray) -> np.ndarray:
    out = np.array(matrix, np.float64)
    out[:, 2] += shift
    return out


def warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The `size x size` output whose pixel centres map back through `matrix` (source ->
    output, `[2, 3]`) into `image [H, W, C]` uint8; bilinear, black outside."""
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    # PIL maps output pixel corners to input pixel corners; our matrix maps pixel centres.
    inv = np.linalg.inv(full)
    half = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1.0]])
    inv = half @ inv @ np.linalg.inv(half)
    coeffs = tuple(inv[:2].reshape(-1))
    out = Image.fromarray(image).transform(
        (size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR
    )
    return np.asarray(out)


def mean_face(size: int = REFERENCE_SIZE) -> np.ndarray:
    """The mean face `[68, 2]` in a `size x size` reference frame (256: the LRS3 recipe)."""
    k = size / REFERENCE_SIZE
    centre = np.array(_REF_CENTRE) * k
    return (MEAN_FACE * _REF_EYE_DISTANCE * k + centre).astype(np.float32)


def align_matrix(landmarks: np.ndarray) -> np.ndarray:
    """`[2, 3]` similarity from a frame to the reference frame, fitted on `STABLE_POINTS`."""
    idx = list(STABLE_POINTS)
    return similarity_transform(landmarks[idx], mean_face()[idx])


def mouth_matrix(landmarks: np.ndarray, size: int = 96) -> np.ndarray:
    """`[2, 3]` map from a frame to its `size x size` mouth ROI: the alignment, then a shift
    putting the mean of the aligned mouth points 48-67 at the crop's centre."""
    m = align_matrix(landmarks)
    centre = apply_transform(m, landmarks[list(MOUTH_POINTS)]).mean(0)
    return _compose_translation(m, (size - 1) / 2 - centre)


def face_matrix(landmarks: np.ndarray, size: int = 128) -> np.ndarray:
    """`[2, 3]` map from a frame to its `size x size` face crop: the alignment, then the
    fixed face box of the reference frame scaled to `size`."""
    m = align_matrix(landmarks)
    side = _FACE_BOX_SIDE * _REF_EYE_DISTANCE
    box_centre = np.array(_REF_CENTRE) + np.array(_FACE_BOX_CENTRE) * _REF_EYE_DISTANCE
    k = size / side
    out = m * k
    out[:, 2] += (size - 1) / 2 - k * box_centre
    return out


def crop_frames(
    frames: np.ndarray, landmarks: np.ndarray, config: CropConfig = CropConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Mouth and face crops of `frames [t, H, W, 3]` uint8 given smoothed `landmarks [t, 68,
    2]`: `(mouth [t, mouth_size, mouth_size] uint8 grey, face [t, face_size, face_size, 3]
    uint8 RGB)`."""
    mouths, faces = [], []
    for img, pts in zip(frames, landmarks, strict=True):
        faces.append(warp(img, face_matrix(pts, config.face_size), config.face_size))
        m = warp(img, mouth_matrix(pts, config.mouth_size), config.mouth_size)
        mouths.append(_grey(m))
    return np.stack(mouths), np.stack(faces)


def _grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of `[..., 3]` uint8 as uint8."""
    y = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


# --- the mean face --------------------------------------------------------------------------------


def normalize_shape(points: np.ndarray) -> np.ndarray:
    """`[68, 2]` landmarks moved to centroid 0, rotated and scaled so that the outer eye
    corners 36 and 45 lie on a horizontal line one unit apart (36 on the left)."""
    p = np.asarray(points, np.float64) - np.mean(points, 0)
    d = p[45] - p[36]
    c, s = d / np.hypot(*d) ** 2
    return p @ np.array([[c, s], [-s, c]]).T


def generalized_procrustes(shapes: np.ndarray, iterations: int = 10) -> np.ndarray:
    """Mean shape `[68, 2]` (normalised, see `normalize_shape`) of `shapes [n, 68, 2]`,
    each aligned to the running mean by a similarity over all points."""
    mean = normalize_shape(shapes[0])
    for _ in range(iterations):
        aligned = [apply_transform(similarity_transform(s, mean), s) for s in shapes]
        mean = normalize_shape(np.mean(aligned, 0))
    return mean


def derive_mean_face(predictor_path: str | None = None) -> tuple[np.ndarray, int]:
    """Recomputes `MEAN_FACE` from the real faces in scikit-image (module docstring).

    Returns:
      `(mean [68, 2] float32, number of faces used)`.
    """
    import skimage.data

    det = LandmarkDetector(predictor_path, max_upsample=1)
    shapes = []
    faces = skimage.data.lfw_subset()[:100]  # the first 100 are faces, the rest are not
    for f in faces:
        img = Image.fromarray(np.round(f * 255).astype(np.uint8)).resize((150, 150), Image.BICUBIC)
        pts = det(np.repeat(np.asarray(img)[..., None], 3, -1))
        if pts is not None:
            shapes.append(pts)
    pts = det(skimage.data.astronaut())
    if pts is not None:
        shapes.append(pts)
    mean = generalized_procrustes(np.stack(shapes))
    mirrored = mean[list(MIRROR)] * np.array([-1.0, 1.0])
    return normalize_shape((mean + mirrored) / 2).astype(np.float32), len(shapes)


# --- whole videos ---------------------------------------------------------------------------------


def detect_landmarks(
    path: avio.PathLike, detector: LandmarkDetector, chunk_frames: int = 250
) -> tuple[np.ndarray, np.ndarray, vio.VideoInfo]:
    """Landmarks of every frame of a video at 25 fps, streamed chunk by chunk.

    Returns:
      `(landmarks [T, 68, 2] float32 (zeros where no face), found [T] bool, VideoInfo)`.
    """
    pts, found, info = [], [], None
    for chunk in vio.iter_video(path, chunk_frames=chunk_frames, require_audio=False):
        info = chunk.info
        for frame in chunk.frames:
            p = detector(frame)
            found.append(p is not None)
            pts.append(np.zeros((NUM_LANDMARKS, 2), np.float32) if p is None else p)
    return np.stack(pts), np.array(found, bool), info


def is_complete(out_dir: avio.PathLike) -> bool:
    """True if `out_dir` holds a finished video (its `info.json` is written last)."""
    return (avio.as_path(out_dir) / "info.json").exists()


def process_video(
    path: avio.PathLike,
    out_dir: avio.PathLike,
    detector: LandmarkDetector,
    config: CropConfig = CropConfig(),
) -> dict:
    """Writes the crops of one video to `out_dir` (which must not exist yet).

    Files: `mouth.mp4` (`[T, 96, 96]` grey at 25 fps), `face.mp4` (`[T, 128, 128, 3]`), both
    with the source's audio at 16 kHz if it has any; `landmarks.npy` (`[T, 68, 2]` float32,
    x, y in source pixels, gaps interpolated, not smoothed); `info.json` (the source, frame
    counts, the frames without a face, `config`, timings). Everything is written into a
    temporary sibling folder renamed to `out_dir` at the end (locally atomic); on an object
    store (`gs://`), which cannot rename folders, straight into `out_dir`. `info.json` is
    written last either way, so its presence marks a complete folder (`is_complete`).

    Raises:
      NoFaceError: no frame has a face (nothing is written).
      VideoError: the file cannot be read.
    """
    t0 = time.perf_counter()
    raw, found, info = detect_landmarks(path, detector, config.chunk_frames)
    if not found.any():
        raise NoFaceError(path, len(found))
    t1 = time.perf_counter()
    landmarks = interpolate_missing(raw, found)
    smooth = smooth_landmarks(landmarks, config.smooth_window)
    out = avio.as_path(out_dir)
    # Object stores cannot rename folders: there the files go straight to `out_dir`.
    tmp = out if avio.is_remote(out) else avio.unique_tmp(out)
    tmp.mkdir(parents=True, exist_ok=avio.is_remote(out))
    try:
        _write_crops(path, tmp, smooth, info, config)
        with avio.local_then_copy(tmp / "landmarks.npy") as f:
            np.save(f, landmarks)
        summary = {
            "source": os.fspath(path),
            "frames": len(found),
            "frames_with_face": int(found.sum()),
            "frames_without_face": np.flatnonzero(~found).tolist(),
            "fps": info.fps,
            "size": [info.height, info.width],
            "has_audio": info.has_audio,
            "config": dataclasses.asdict(config),
            "predictor": os.path.basename(detector.predictor_path),
            "seconds": {"landmarks": t1 - t0, "crops": time.perf_counter() - t1},
        }
        avio.write_text_atomic(tmp / "info.json", json.dumps(summary, indent=1))
        if tmp != out:
            tmp.rename(out)
    except BaseException:
        _remove_tree(tmp)
        raise
    return summary


def _write_crops(
    path: avio.PathLike,
    out: avio.PathLike,
    landmarks: np.ndarray,
    info: vio.VideoInfo,
    config: CropConfig,
) -> None:
    """Second pass: streams the frames again and writes `mouth.mp4` and `face.mp4`."""
    out = avio.as_path(out)
    rate = info.sample_rate if info.has_audio else None
    kw = {"fps": info.fps, "sample_rate": rate, "crf": config.crf}
    with (
        vio.VideoWriter(out / "mouth.mp4", **kw) as wm,
        vio.VideoWriter(out / "face.mp4", **kw) as wf,
    ):
        for chunk in vio.iter_video(path, chunk_frames=config.chunk_frames, require_audio=False):
            s = chunk.start_frame
            mouth, face = crop_frames(chunk.frames, landmarks[s : s + len(chunk.frames)], config)
            audio = chunk.audio if info.has_audio else None
            wm.write(mouth, audio)
            wf.write(face, audio)


def _remove_tree(path: avio.PathLike) -> None:
    p = avio.as_path(path)
    if not p.exists():
        return
    if avio.is_remote(p):
        p.rmtree()
    else:
        shutil.rmtree(p, ignore_errors=True)


def remove_stale(out_dir: avio.PathLike) -> list[str]:
    """Removes what killed runs left for `out_dir`: temporary folders `<out_dir>.tmp-*`, and
    `out_dir` itself if it lacks `info.json` (remote outputs are written in place). Returns
    the removed paths."""
    out = avio.as_path(out_dir)
    if not out.parent.exists():
        return []
    stale = [p for p in out.parent.glob(f"{out.name}.tmp-*") if p.is_dir()]
    if out.exists() and not is_complete(out):
        stale.append(out)
    for p in stale:
        _remove_tree(p)
    return [os.fspath(p) for p in stale]


# --- process-pool workers (tools/preprocess_video.py) ---------------------------------------------

_WORKER: dict = {}


def init_worker(predictor_path: str | None, config: CropConfig) -> None:
    """Pool initializer: one detector per process (dlib objects do not pickle)."""
    _WORKER["detector"] = LandmarkDetector(predictor_path)
    _WORKER["config"] = config


def run_one(path: str, out_dir: str) -> tuple[str, str, dict]:
    """Processes one video in a pool worker; never raises.

    Returns:
      `(path, status, details)`: status `ok` (details: `process_video`'s summary),
      `no_face` (details: frames) or `error` (details: the message).
    """
    remove_stale(out_dir)
    try:
        info = process_video(path, out_dir, _WORKER["detector"], _WORKER["config"])
        return path, "ok", info
    except NoFaceError as e:
        return path, "no_face", {"frames": e.frames, "message": str(e)}
    except Exception as e:  # reported by the tool, which goes on with the other videos
        return path, "error", {"message": f"{type(e).__name__}: {e}"}
