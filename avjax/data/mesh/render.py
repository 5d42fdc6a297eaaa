"""A small shaded rasteriser for face meshes (numpy), OBJ frames and MP4 grids with audio.

`render` draws `[T, V, 3]` meshes (axes as in `head.py`: y up, the camera on +z looking down -z)
with an orthographic camera fitted to the first frame, Lambert shading per triangle (one key
light, ambient) and a depth buffer: each front-facing triangle is splatted as a fixed set of
barycentric points (2 x 2 pixels each), nearest drawn last. It is meant for looking at
samples, not for metrics.
"""

from __future__ import annotations

import numpy as np

from avjax.data.video.io import write_video
from avjax.io import PathLike, as_path

_LIGHT = np.array([0.35, 0.45, 1.0]) / np.linalg.norm([0.35, 0.45, 1.0])
_SKIN = np.array([0.86, 0.72, 0.62])


def _barycentric(k: int) -> np.ndarray:
    """`[P, 3]` barycentric points of a triangle subdivided k times per edge."""
    pts = [(i, j, k - i - j) for i in range(k + 1) for j in range(k + 1 - i)]
    return np.array(pts, np.float32) / k


def _camera(verts0: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    lo, hi = verts0[:, :2].min(0), verts0[:, :2].max(0)
    return (lo + hi) / 2, 0.85 * size / float(max(hi - lo))


def render(verts: np.ndarray, faces: np.ndarray, size: int = 160, subdiv: int = 3) -> np.ndarray:
    """Meshes `[T, V, 3]` + triangles `[F, 3]` -> frames `[T, size, size, 3]` uint8."""
    centre, scale = _camera(verts[0], size)
    bary = _barycentric(subdiv)
    out = np.full((len(verts), size, size, 3), 28, np.uint8)
    for t, v in enumerate(np.asarray(verts, np.float32)):
        tri = v[faces]  # [F, 3, 3]
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-12
        front = n[:, 2] > 0
        tri, n = tri[front], n[front]
        shade = 0.25 + 0.75 * np.clip(n @ _LIGHT, 0.0, 1.0)
        pts = np.einsum("pk,fkd->fpd", bary, tri).reshape(-1, 3)
        col = np.repeat(shade, len(bary))[:, None] * _SKIN
        px = ((pts[:, 0] - centre[0]) * scale + size / 2).astype(int)
        py = (size / 2 - (pts[:, 1] - centre[1]) * scale).astype(int)
        # each point covers 2 x 2 pixels, so neighbouring splats leave no holes
        px = np.concatenate([px, px + 1, px, px + 1])
        py = np.concatenate([py, py, py + 1, py + 1])
        pts, col = np.tile(pts, (4, 1)), np.tile(col, (4, 1))
        ok = (px >= 0) & (px < size) & (py >= 0) & (py < size)
        order = np.argsort(pts[ok, 2], kind="stable")  # far first, near last (wins)
        out[t, py[ok][order], px[ok][order]] = (col[ok][order] * 255).astype(np.uint8)
    return out


def grid(videos: list[np.ndarray], cols: int | None = None) -> np.ndarray:
    """Equal-shaped `[T, H, W, 3]` videos side by side in a grid -> `[T, rows*H, cols*W, 3]`."""
    cols = cols or min(len(videos), 4)
    rows = -(-len(videos) // cols)
    t, h, w, _ = videos[0].shape
    out = np.zeros((t, rows * h, cols * w, 3), np.uint8)
    for i, v in enumerate(videos):
        r, c = divmod(i, cols)
        out[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = v
    return out


def write_grid_video(
    path: PathLike,
    samples: np.ndarray,
    faces: np.ndarray,
    audio: np.ndarray | None,
    fps: float,
    size: int = 160,
) -> None:
    """Renders `samples [N, T, V, 3]` as a grid MP4 at `path` with `audio` (16 kHz) muxed in."""
    frames = grid([render(s, faces, size) for s in samples])
    write_video(path, frames, audio, fps=fps)


def write_obj_frames(folder: PathLike, verts: np.ndarray, faces: np.ndarray) -> int:
    """One Wavefront OBJ per frame of `verts [T, V, 3]` in `folder` (frame_00000.obj, ...)."""
    folder = as_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    face_lines = "\n".join(f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces)
    for t, v in enumerate(verts):
        vs = "\n".join(f"v {x:.5f} {y:.5f} {z:.5f}" for x, y, z in v)
        (folder / f"frame_{t:05d}.obj").write_text(vs + "\n" + face_lines + "\n")
    return len(verts)
