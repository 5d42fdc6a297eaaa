"""Naturalness proxy: DNSMOS P.835 (Reddy et al., 2022) SIG / BAK / OVRL, offline.

DNSMOS is a CNN trained to predict the ITU-T P.835 listening-test scores of noisy and
enhanced speech, each on a 1-5 MOS scale: SIG (the speech signal itself: distortion),
BAK (background noise: intrusiveness), OVRL (overall quality). The ONNX model
`dnsmos_models/sig_bak_ovr.onnx` comes in the PyPI wheel `speechmos` (nothing downloaded) and
runs with `onnxruntime`; both are in avjax's `eval` extra.

How a clip is scored (as Microsoft's reference script and `speechmos.dnsmos.run`):
16 kHz audio, repeated end to end until it is at least 9.01 s long; windows of 9.01 s every
1 s; each window's raw (sig, bak, ovrl) mapped by DNSMOS' fixed cubic/quadratic polynomials
(non-personalised model); the clip's scores are the means over windows.

DNSMOS was trained on real recordings, not on vocoded units: it is a proxy for naturalness
(it rewards clean, undistorted speech-like audio), not a listening test and not the paper's
human MOS; short clips are looped, so a slice under ~9 s is scored on repeats of itself.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

from avjax.eval._deps import require

SAMPLE_RATE = 16000
WINDOW_SECONDS = 9.01
HOP_SECONDS = 1.0
# Raw model outputs -> P.835 MOS (DNSMOS' non-personalised mapping), highest power first.
_POLY = {
    "sig": (-0.08397278, 1.22083953, 0.0052439),
    "bak": (-0.13166888, 1.60915514, -0.39604546),
    "ovrl": (-0.06766283, 1.11546468, 0.04602535),
}


def model_path() -> str:
    """`dnsmos_models/sig_bak_ovr.onnx` inside the installed `speechmos` wheel."""
    spec = importlib.util.find_spec("speechmos")
    if spec is None or not spec.submodule_search_locations:
        require("speechmos", "speechmos", "DNSMOS scores (avjax.eval.dnsmos)")
    path = os.path.join(
        list(spec.submodule_search_locations)[0], "dnsmos_models", "sig_bak_ovr.onnx"
    )
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the DNSMOS P.835 model is missing from speechmos")
    return path


class DNSMOS:
    """`score(wav)` -> {"sig", "bak", "ovrl"} MOS of a 16 kHz clip `[samples]` in [-1, 1].

    Args:
      path: the P.835 ONNX model (default: speechmos' copy).
      max_windows: score at most this many 9.01 s windows per clip, spread evenly over it
        (0: every 1 s hop, as the reference); bounds the cost of long slices.
    """

    def __init__(self, path: str | None = None, max_windows: int = 0):
        ort = require("onnxruntime", "onnxruntime", "DNSMOS scores (avjax.eval.dnsmos)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            path or model_path(), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        self.max_windows = int(max_windows)

    def windows(self, wav: np.ndarray) -> np.ndarray:
        """The clip looped to >= 9.01 s and cut into windows `[n, 144160]` float32."""
        wav = np.clip(np.asarray(wav, np.float32), -1.0, 1.0)
        if len(wav) == 0:
            return np.zeros((0, int(WINDOW_SECONDS * SAMPLE_RATE)), np.float32)
        size = int(WINDOW_SECONDS * SAMPLE_RATE)
        while len(wav) < size:
            wav = np.concatenate([wav, wav])
        n = int(np.floor(len(wav) / SAMPLE_RATE) - WINDOW_SECONDS) + 1
        starts = np.arange(n) * int(HOP_SECONDS * SAMPLE_RATE)
        if self.max_windows and n > self.max_windows:
            starts = starts[np.linspace(0, n - 1, self.max_windows).round().astype(int)]
        out = [wav[s : s + size] for s in starts]
        return np.stack([w for w in out if len(w) == size])

    def score(self, wav: np.ndarray) -> dict[str, float]:
        """Mean P.835 MOS over the clip's windows (NaN for an empty clip)."""
        wins = self.windows(wav)
        if len(wins) == 0:
            return {k: float("nan") for k in _POLY}
        raw = np.stack([self._session.run(None, {self._input: w[None]})[0][0] for w in wins])
        return {k: float(np.mean(np.polyval(_POLY[k], raw[:, i]))) for i, k in enumerate(_POLY)}

    def score_by_slice(self, wav: np.ndarray, slice_samples: int) -> dict[str, np.ndarray]:
        """{"sig", "bak", "ovrl"}: `[num_slices]` MOS of each `slice_samples` slice of `wav`."""
        from avjax.eval import metrics

        rows = [self.score(wav[s:e]) for s, e in metrics.slice_bounds(len(wav), slice_samples)]
        return {k: np.asarray([r[k] for r in rows], np.float64) for k in _POLY}


@functools.cache
def default_dnsmos(max_windows: int = 0) -> DNSMOS:
    """One shared scorer per `max_windows`."""
    return DNSMOS(max_windows=max_windows)
