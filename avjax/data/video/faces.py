"""A 2D talking-face renderer: parametric identities, mouths driven by viseme trajectories.

`make_identity(i)` draws identity `i` deterministically: face shape (width, height, chin),
skin tone, eye spacing / size / iris colour, brows, nose, lip colour and mouth size, hair
colour and style (short, cap, long, fringe, bald), background (two colours, gradient /
stripes / blobs), lighting direction and strength, sensor noise and compression level.

`render_talking_face(identity, trajectory, nuisance)` renders `[T, size, size, 3]` uint8 frames:

  * the static face (head, hair, eyes, brows, nose) is drawn once per clip at twice the output
    resolution (PIL), so every frame only copies it and draws what moves;
  * the mouth comes ONLY from the trajectory (`avjax.data.video.visemes`: jaw opening, lip width,
    rounding, teeth and tongue visibility), drawn inside `mouth_box(identity)`; the chin does
    not move, so nothing outside that box depends on what is said;
  * `Nuisance` (from `sample_nuisance(seed, T)`, independent of the words) gives head-pose
    drift (roll, translation, a horizontal squeeze standing in for yaw), small zoom, blinks,
    a brightness flicker and per-frame sensor noise; compression comes from the H.264
    encoder at the identity's CRF (`Identity.crf`).

Everything is numpy + PIL; about 2-4 ms per 128x128 frame on one (shared) CPU core.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

_SS = 2  # the static face is drawn at this multiple of the output size, then box-filtered

HAIR_STYLES = ("short", "cap", "long", "fringe", "bald")
BACKGROUNDS = ("gradient", "stripes", "blobs")


@dataclasses.dataclass(frozen=True)
class Identity:
    """A face's appearance; lengths are fractions of the frame size, colours RGB 0..255."""

    index: int
    face_w: float
    face_h: float
    chin: float  # 0 round ... 1 pointed
    face_y: float
    skin: tuple[int, int, int]
    eye_dx: float
    eye_y: float
    eye_w: float
    eye_h: float
    iris: tuple[int, int, int]
    brow: float  # brow thickness
    nose_len: float
    lip: tuple[int, int, int]
    mouth_w: float
    mouth_y: float
    hair: tuple[int, int, int]
    hair_style: str
    bg_a: tuple[int, int, int]
    bg_b: tuple[int, int, int]
    background: str
    light_angle: float
    light: float
    noise: float  # sensor noise std (uint8 levels)
    crf: int  # H.264 quality when written


def _color(rng: np.random.Generator, lo: float, hi: float) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.uniform(lo, hi, 3))


def make_identity(index: int, seed: int = 0) -> Identity:
    """Identity number `index` (deterministic in `(index, seed)`)."""
    rng = np.random.default_rng([seed, index, 0x1D])
    tone = rng.uniform(0.0, 1.0)  # dark ... light skin
    skin = np.array([95, 60, 40]) + tone * np.array([150, 150, 140]) + rng.uniform(-12, 12, 3)
    lip_base = skin * np.array([0.80, 0.55, 0.55]) + np.array([25, 0, 5])
    hair_kind = rng.integers(4)
    hair = [(30, 25, 20), (90, 60, 35), (200, 170, 110), (150, 70, 35)][hair_kind]
    return Identity(
        index=index,
        face_w=float(rng.uniform(0.46, 0.60)),
        face_h=float(rng.uniform(0.62, 0.76)),
        chin=float(rng.uniform(0.0, 1.0)),
        face_y=float(rng.uniform(0.50, 0.56)),
        skin=tuple(int(v) for v in np.clip(skin, 0, 255)),
        eye_dx=float(rng.uniform(0.09, 0.13)),
        eye_y=float(rng.uniform(-0.11, -0.06)),
        eye_w=float(rng.uniform(0.065, 0.09)),
        eye_h=float(rng.uniform(0.030, 0.045)),
        iris=_color(rng, 30, 160),
        brow=float(rng.uniform(0.008, 0.022)),
        nose_len=float(rng.uniform(0.07, 0.11)),
        lip=tuple(int(v) for v in np.clip(lip_base + rng.uniform(-15, 15, 3), 0, 255)),
        mouth_w=float(rng.uniform(0.19, 0.24)),
        mouth_y=float(rng.uniform(0.15, 0.18)),
        hair=tuple(int(np.clip(c + rng.uniform(-15, 15), 0, 255)) for c in hair),
        hair_style=HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))],
        bg_a=_color(rng, 20, 235),
        bg_b=_color(rng, 20, 235),
        background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        light_angle=float(rng.uniform(0, 2 * math.pi)),
        light=float(rng.uniform(0.0, 0.35)),
        noise=float(rng.uniform(0.5, 4.0)),
        crf=int(rng.integers(20, 31)),
    )


@dataclasses.dataclass(frozen=True)
class Nuisance:
    """Per-frame nuisance of one clip (independent of what is said).

    Attributes (all `[T]` float32): roll (radians), tx / ty (fractions of the frame), zoom
    (scale factor), squeeze (horizontal scale, a yaw stand-in), blink (0 open .. 1 shut),
    gain (brightness factor); seed: for the per-frame noise.
    """

    roll: np.ndarray
    tx: np.ndarray
    ty: np.ndarray
    zoom: np.ndarray
    squeeze: np.ndarray
    blink: np.ndarray
    gain: np.ndarray
    seed: int


def _drift(rng: np.random.Generator, t: np.ndarray, amplitude: float) -> np.ndarray:
    """A smooth random wobble: a sum of three slow sinusoids. `t` [T] seconds -> [T]."""
    out = np.zeros_like(t)
    for _ in range(3):
        f = rng.uniform(0.05, 0.6)
        out += rng.normal() * np.sin(2 * math.pi * f * t + rng.uniform(0, 2 * math.pi))
    return (amplitude / math.sqrt(3)) * out


def sample_nuisance(
    seed: int, num_frames: int, fps: float = 25.0, strength: float = 1.0
) -> Nuisance:
    """Head-pose drift, zoom, blinks and flicker for `num_frames` frames (`strength` 0: none)."""
    rng = np.random.default_rng([seed, 0x5EED])
    t = np.arange(num_frames) / fps
    s = float(strength)
    blink = np.zeros(num_frames, np.float32)
    time = rng.uniform(0.0, 2.5)
    profile = np.array([0.5, 1.0, 1.0, 0.6, 0.2], np.float32)
    while s > 0 and time * fps < num_frames:
        k = int(time * fps)
        n = min(len(profile), num_frames - k)
        blink[k : k + n] = np.maximum(blink[k : k + n], profile[:n])
        time += rng.uniform(1.5, 5.0)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return Nuisance(
        roll=f32(s * (_drift(rng, t, 0.06) + rng.normal(0, 0.03))),
        tx=f32(s * (_drift(rng, t, 0.025) + rng.normal(0, 0.02))),
        ty=f32(s * (_drift(rng, t, 0.02) + rng.normal(0, 0.02))),
        zoom=f32(1.0 + s * (_drift(rng, t, 0.03) + rng.uniform(-0.06, 0.06))),
        squeeze=f32(1.0 + s * _drift(rng, t, 0.04)),
        blink=blink,
        gain=f32(1.0 + s * (_drift(rng, t, 0.03) + rng.uniform(-0.1, 0.1))),
        seed=int(rng.integers(2**31)),
    )


def still_nuisance(num_frames: int) -> Nuisance:
    """No motion, no blinks, no flicker (noise still comes from `seed`)."""
    z = np.zeros(num_frames, np.float32)
    return Nuisance(z, z, z, z + 1, z + 1, z, z + 1, seed=0)


def _background(ident: Identity, size: int) -> np.ndarray:
    """float32 `[size, size, 3]`."""
    rng = np.random.default_rng([ident.index, 0xB6])
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = np.array(ident.bg_a, np.float32), np.array(ident.bg_b, np.float32)
    if ident.background == "gradient":
        w = (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)) * 0.5 + 0.5
    elif ident.background == "stripes":
        w = 0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(3, 9) * (x * rng.uniform(-1, 1) + y))
    else:
        w = np.zeros_like(x)
        for _ in range(5):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
            w = np.maximum(w, np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / r**2))
    w = np.clip(w, 0, 1)[..., None]
    return a * (1 - w) + b * w


def _box(cx: float, cy: float, rx: float, ry: float) -> tuple[float, float, float, float]:
    return (cx - rx, cy - ry, cx + rx, cy + ry)


def _draw_head(draw: ImageDraw.ImageDraw, ident: Identity, n: int) -> None:
    """Neck, ears, head (chin shape), hair; `n` is the layer size in pixels."""
    cx, cy = n / 2, ident.face_y * n
    rx, ry = ident.face_w * n / 2, ident.face_h * n / 2
    skin, hair = ident.skin, ident.hair
    if ident.hair_style == "long":
        draw.rectangle((cx - rx * 1.15, cy - ry * 0.6, cx + rx * 1.15, cy + ry * 0.9), fill=hair)
    if ident.hair_style != "bald":
        draw.ellipse(_box(cx, cy - ry * 0.12, rx * 1.06, ry * 0.95), fill=hair)
    neck = tuple(int(c * 0.85) for c in skin)
    draw.rectangle((cx - rx * 0.45, cy + ry * 0.5, cx + rx * 0.45, n), fill=neck)
    for side in (-1, 1):
        draw.ellipse(_box(cx + side * rx * 0.97, cy, rx * 0.14, ry * 0.16), fill=skin)
    draw.ellipse(_box(cx, cy, rx, ry), fill=skin)
    # Chin: a triangle-ish lower jaw from round (0) to pointed (1).
    jaw_y = cy + ry * (0.35 + 0.15 * ident.chin)
    draw.polygon(
        [(cx - rx * 0.93, cy + ry * 0.2), (cx + rx * 0.93, cy + ry * 0.2), (cx, jaw_y + ry * 0.7)],
        fill=skin,
    )
    top = cy - ry
    if ident.hair_style != "bald":
        depth = {"short": 0.3, "cap": 0.45, "long": 0.45, "fringe": 0.62}[ident.hair_style]
        draw.chord(_box(cx, top + ry * depth, rx * 0.99, ry * depth * 1.05), 180, 360, fill=hair)


def _draw_features(draw: ImageDraw.ImageDraw, ident: Identity, n: int) -> None:
    """Eyes (open), brows and nose."""
    cx, cy = n / 2, ident.face_y * n
    ey = cy + ident.eye_y * n
    ew, eh = ident.eye_w * n / 2, ident.eye_h * n / 2
    dark = tuple(int(c * 0.55) for c in ident.hair)
    for side in (-1, 1):
        ex = cx + side * ident.eye_dx * n
        draw.ellipse(_box(ex, ey, ew, eh), fill=(240, 238, 232))
        draw.ellipse(_box(ex, ey, eh * 0.95, eh * 0.95), fill=ident.iris)
        draw.ellipse(_box(ex, ey, eh * 0.45, eh * 0.45), fill=(15, 12, 12))
        by = ey - eh * 2.2
        draw.line(
            (ex - ew, by + eh * 0.3, ex, by, ex + ew, by + eh * 0.3),
            fill=dark,
            width=max(1, int(ident.brow * n)),
        )
    shade = tuple(int(c * 0.78) for c in ident.skin)
    ny = ey + ident.nose_len * n
    draw.line((cx, ey + eh, cx + n * 0.012, ny), fill=shade, width=max(1, n // 120))
    draw.ellipse(_box(cx, ny, n * 0.03, n * 0.012), fill=shade)


def mouth_box(ident: Identity, size: int) -> tuple[int, int, int, int]:
    """`(x0, y0, x1, y1)` in an output frame (no pose) that holds everything the mouth draws.

    The mouth is drawn only inside this box (its widest, most open shape fits with a margin),
    so with a still head every pixel outside it is independent of the trajectory."""
    cx, cy, w = size / 2, (ident.face_y + ident.mouth_y) * size, ident.mouth_w * size
    return (
        max(int(cx - 0.75 * w - 1), 0),
        max(int(cy - 0.56 * w - 1), 0),
        min(int(math.ceil(cx + 0.75 * w + 1)), size),
        min(int(math.ceil(cy + 0.42 * w + 1)), size),
    )


class _Mouth:
    """Draws the mouth into the face layer's patch from the 5 articulatory parameters."""

    def __init__(self, ident: Identity, n: int):
        self.cx, self.cy = n / 2, (ident.face_y + ident.mouth_y) * n
        self.w = ident.mouth_w * n
        x0, y0, x1, y1 = mouth_box(ident, n)
        self.sl = (slice(y0, y1), slice(x0, x1))
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        self.dx, self.dy = xx + 0.5 - self.cx, yy + 0.5 - self.cy
        self.lip = np.array(ident.lip, np.float32)
        self.skin = np.array(ident.skin, np.float32)

    @staticmethod
    def _inside(dx: np.ndarray, dy: np.ndarray, rx: float, ry: float, ex: float) -> np.ndarray:
        """Soft (anti-aliased) coverage 0..1 of the superellipse `|x/rx|^ex + (y/ry)^2 <= 1`."""
        f = (dx / max(rx, 1e-3)) ** ex + (dy / max(ry, 1e-3)) ** 2
        return np.clip((1.0 - f) * min(rx, ry) * 0.5 + 0.5, 0.0, 1.0)[..., None]

    def draw(self, layer: np.ndarray, p: np.ndarray) -> None:
        """`layer` `[n, n, 4]` uint8 (modified); `p` `[5]`: jaw, width, round, teeth, tongue."""
        jaw, width, rnd, teeth, tongue = (float(v) for v in p)
        half_w = self.w * 0.5 * (0.75 + 0.5 * width - 0.3 * rnd)
        open_h = self.w * 0.45 * jaw + self.w * 0.04 * rnd
        lip_t = self.w * (0.09 + 0.06 * rnd)  # lip thickness grows with protrusion
        ex = 2.0 + 1.5 * (1 - rnd)  # rounded lips are more circular
        dx, dy = np.abs(self.dx), self.dy + open_h * 0.15
        outer = self._inside(dx, dy, half_w, open_h / 2 + lip_t, ex)
        inner_w = half_w * (0.82 - 0.1 * rnd)
        inner = self._inside(dx, dy, inner_w, open_h / 2, ex)
        cavity = np.array([50, 14, 18], np.float32)
        teeth_y = -open_h / 2 + open_h * (0.12 + 0.38 * teeth)
        is_tooth = np.clip((teeth_y - dy) * 1.0 + 0.5, 0, 1)[..., None] * min(1.0, teeth * 4)
        tongue_r = open_h * (0.2 + 0.5 * tongue) + 0.5
        is_tongue = self._inside(dx, dy - open_h / 2, inner_w * 0.55, tongue_r, 2.0) * min(
            1.0, tongue * 4
        )
        inside = cavity * (1 - is_tooth) + np.array([236, 234, 222], np.float32) * is_tooth
        inside = inside * (1 - is_tongue) + np.array([190, 80, 90], np.float32) * is_tongue
        lip_col = self.lip * (1 - 0.15 * rnd)
        lips = lip_col * (1 - inner) + inside * inner
        # Where the lips meet, a dark seam (visible when the mouth is nearly closed).
        seam = np.clip(1.0 - np.abs(dy) / 0.8, 0, 1)[..., None] * (dx < half_w * 0.85)[..., None]
        lips = lips * (1 - seam * 0.55 * (open_h < 1.5))
        patch = layer[self.sl]
        rgb = patch[..., :3].astype(np.float32)
        patch[..., :3] = np.clip(rgb * (1 - outer) + lips * outer, 0, 255).astype(np.uint8)


class _Eyelids:
    """Skin over the upper part of each eye, `blink` 0 (open) .. 1 (shut)."""

    def __init__(self, ident: Identity, n: int):
        cx, cy = n / 2, ident.face_y * n
        ey, ew, eh = cy + ident.eye_y * n, ident.eye_w * n / 2, ident.eye_h * n / 2
        y0, y1 = int(ey - eh - 2), int(math.ceil(ey + eh + 2))
        x0, x1 = int(cx - ident.eye_dx * n - ew - 2), int(math.ceil(cx + ident.eye_dx * n + ew + 2))
        self.sl = (slice(y0, y1), slice(x0, x1))
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        self.eye = np.zeros(yy.shape, bool)
        for side in (-1, 1):
            ex = cx + side * ident.eye_dx * n
            self.eye |= ((xx - ex) / (ew + 1)) ** 2 + ((yy - ey) / (eh + 1)) ** 2 <= 1
        self.rel = (yy - (ey - eh - 1)) / (2 * eh + 2)  # 0 at the eye's top, 1 at its bottom
        self.skin = np.array(ident.skin, np.float32) * 0.92

    def draw(self, layer: np.ndarray, blink: float) -> None:
        if blink <= 0.02:
            return
        patch = layer[self.sl]
        lid = self.eye & (self.rel <= blink)
        patch[..., :3][lid] = self.skin.astype(np.uint8)


def _face_layer(ident: Identity, n: int) -> np.ndarray:
    """The static face, uint8 RGBA `[n, n, 4]` (alpha 0 off the head), anti-aliased."""
    big = n * _SS
    img = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    _draw_head(draw, ident, big)
    _draw_features(draw, ident, big)
    return np.array(img.resize((n, n), Image.Resampling.BOX))


def _affine(nu: Nuisance, k: int, size: int) -> tuple[float, ...]:
    """PIL AFFINE data mapping output pixels to face-layer pixels for frame `k`."""
    c = size / 2
    cos, sin = math.cos(nu.roll[k]), math.sin(nu.roll[k])
    sx = 1.0 / (nu.zoom[k] * nu.squeeze[k])
    sy = 1.0 / nu.zoom[k]
    ox, oy = c + nu.tx[k] * size, c + nu.ty[k] * size
    # in = C_in + S R^T (out - o)
    a, b = sx * cos, sx * sin
    d, e = -sy * sin, sy * cos
    cin = c
    return (a, b, cin - a * ox - b * oy, d, e, cin - d * ox - e * oy)


def _lighting(ident: Identity, size: int) -> np.ndarray:
    """Multiplicative light field `[size, size, 1]`."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    g = x * math.cos(ident.light_angle) + y * math.sin(ident.light_angle)
    return (1.0 + ident.light * 2 * g)[..., None]


def render_talking_face(
    ident: Identity,
    trajectory: np.ndarray,
    nuisance: Nuisance | None = None,
    *,
    size: int = 128,
) -> np.ndarray:
    """Renders a talking face.

    Args:
      ident: who (`make_identity`).
      trajectory: `[T, 5]` articulatory parameters per frame (`visemes.viseme_trajectory`).
      nuisance: per-frame pose, blinks, flicker and noise seed (`sample_nuisance`);
        None: `still_nuisance` (still head, no blinks; noise remains).
      size: output frame size in pixels (square).

    Returns:
      uint8 `[T, size, size, 3]` RGB frames.
    """
    num = len(trajectory)
    nu = still_nuisance(num) if nuisance is None else nuisance
    if len(nu.roll) < num:
        raise ValueError(f"nuisance has {len(nu.roll)} frames, trajectory {num}")
    n = size
    base = _face_layer(ident, n)
    mouth, lids = _Mouth(ident, n), _Eyelids(ident, n)
    bg = _background(ident, size)
    light = _lighting(ident, size)
    rng = np.random.default_rng(nu.seed)
    pad = 16
    bank = rng.standard_normal((2, size + pad, size + pad, 3), dtype=np.float32) * ident.noise
    out = np.empty((num, size, size, 3), np.uint8)
    for k in range(num):
        layer = base.copy()
        mouth.draw(layer, trajectory[k])
        lids.draw(layer, float(nu.blink[k]))
        img = Image.fromarray(layer, "RGBA").transform(
            (size, size), Image.Transform.AFFINE, _affine(nu, k, size), Image.Resampling.BILINEAR
        )
        fg = np.asarray(img, np.float32)
        alpha = fg[..., 3:] / 255.0
        frame = (bg * (1 - alpha) + fg[..., :3] * alpha) * light * nu.gain[k]
        oy, ox = rng.integers(pad, size=2)
        frame += bank[k % 2, oy : oy + size, ox : ox + size]
        out[k] = np.clip(frame, 0, 255).astype(np.uint8)
    return out
