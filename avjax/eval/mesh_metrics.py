"""Metrics of speech-driven 3D face animation (numpy; meshes `[T, V, 3]`).

Generated faces have their own identity and head pose, so before comparing with the ground
truth each sequence is reduced to its *motion*: every frame rigidly aligned (Kabsch, on the
non-lip vertices) to a reference mesh, then the sequence's own mean shape subtracted
(`motion`). On that:

  - LVE (lip vertex error, CodeTalker's protocol): mean over frames of the max over lip
    vertices of the squared L2 error;
  - FDD (upper-face dynamics deviation): mean over upper-face vertices of the temporal std of
    the squared displacement norm, ground truth minus prediction;
  - diversity across samples of one speech: identity (mean pairwise distance of the samples'
    mean shapes), pose (mean pairwise rotation angle between their per-frame head rotations,
    in degrees), and the spread of lip vs upper-face motion (std across samples, mean over the
    region's vertices and frames);
  - lip sync: the Pearson correlation of mouth opening (upper-lip to lower-lip mid-line
    distance) with the speech envelope (RMS per frame).
"""

from __future__ import annotations

import itertools

import numpy as np


def rigid_fit(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame rotation `[T, 3, 3]` and translation `[T, 3]` taking src `[T, N, 3]` onto dst
    `[N, 3]` or `[T, N, 3]` in the least-squares sense (Kabsch, no reflection)."""
    dst = np.broadcast_to(dst, src.shape).astype(np.float64)
    src = src.astype(np.float64)
    cs, cd = src.mean(1, keepdims=True), dst.mean(1, keepdims=True)
    h = np.swapaxes(src - cs, 1, 2) @ (dst - cd)  # [T, 3, 3]
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(np.swapaxes(vt, 1, 2) @ np.swapaxes(u, 1, 2)))
    fix = np.ones((len(src), 3))
    fix[:, 2] = d
    rot = np.swapaxes(vt, 1, 2) @ (fix[:, :, None] * np.swapaxes(u, 1, 2))
    trans = cd[:, 0] - np.einsum("tij,tj->ti", rot, cs[:, 0])
    return rot, trans


def align(verts: np.ndarray, reference: np.ndarray, rigid: np.ndarray) -> np.ndarray:
    """`verts [T, V, 3]` with each frame rigidly aligned to `reference [V, 3]` on the vertices
    `rigid`."""
    rot, trans = rigid_fit(verts[:, rigid], reference[rigid])
    return (np.einsum("tij,tvj->tvi", rot, verts) + trans[:, None]).astype(np.float32)


def motion(verts: np.ndarray, reference: np.ndarray, rigid: np.ndarray) -> np.ndarray:
    """Pose- and identity-free motion `[T, V, 3]`: aligned frames minus their mean shape."""
    a = align(verts, reference, rigid)
    return a - a.mean(0, keepdims=True)


def lve(pred: np.ndarray, gt: np.ndarray, lip: np.ndarray) -> float:
    """Lip vertex error of motions `[T, V, 3]`: mean_t max_{v in lip} ||pred - gt||^2."""
    err = np.sum((pred[:, lip] - gt[:, lip]) ** 2, axis=-1)
    return float(err.max(axis=1).mean())


def fdd(pred: np.ndarray, gt: np.ndarray, upper: np.ndarray) -> float:
    """Upper-face dynamics deviation of motions `[T, V, 3]` (GT minus prediction)."""

    def dyn(m: np.ndarray) -> np.ndarray:
        return np.std(np.sum(m[:, upper] ** 2, axis=-1), axis=0)

    return float(np.mean(dyn(gt) - dyn(pred)))


def mouth_opening(verts: np.ndarray, upper_lip: int, lower_lip: int) -> np.ndarray:
    """`[T]` distance between the upper and lower lip mid-line vertices."""
    return np.linalg.norm(verts[:, upper_lip] - verts[:, lower_lip], axis=-1)


def lip_sync(opening: np.ndarray, envelope: np.ndarray) -> float:
    """Pearson correlation of mouth opening `[T]` with the speech envelope `[T]`."""
    o, e = opening - opening.mean(), envelope - envelope.mean()
    den = np.sqrt((o * o).sum() * (e * e).sum())
    return float((o * e).sum() / den) if den > 0 else 0.0


def _rotation_angle_deg(r: np.ndarray) -> np.ndarray:
    cos = np.clip((np.trace(r, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def diversity(
    samples: np.ndarray,
    reference: np.ndarray,
    rigid: np.ndarray,
    lip: np.ndarray,
    upper: np.ndarray,
) -> dict[str, float]:
    """Spread of `samples [N, T, V, 3]` generated for one speech (N >= 2): identity, pose
    (degrees), lip and upper-face motion spread (std across samples)."""
    aligned = np.stack([align(s, reference, rigid) for s in samples])
    shapes = aligned.mean(1)  # [N, V, 3]
    moves = aligned - shapes[:, None]
    rots = [rigid_fit(s[:, rigid], reference[rigid])[0] for s in samples]
    pairs = list(itertools.combinations(range(len(samples)), 2))
    ident = [np.linalg.norm(shapes[i] - shapes[j], axis=-1).mean() for i, j in pairs]
    pose = [_rotation_angle_deg(rots[i] @ np.swapaxes(rots[j], 1, 2)).mean() for i, j in pairs]
    spread = moves.std(0)  # [T, V, 3]
    return {
        "identity": float(np.mean(ident)),
        "pose_deg": float(np.mean(pose)),
        "lip_spread": float(np.linalg.norm(spread[:, lip], axis=-1).mean()),
        "upper_spread": float(np.linalg.norm(spread[:, upper], axis=-1).mean()),
    }
