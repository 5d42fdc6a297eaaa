"""HuBERT features for many utterances at once, in padded batches on the worker's device.

`avjax.data.features.HubertFeatures` encodes one chunk (<= 30 s) at a time. A Beam worker
with an accelerator (or many cores) is used far better by batches: `batched_unit_features`
pools the chunks of several utterances, sorts them by length, pads each batch of
`batch_size` chunks to a common length (whole seconds, so few shapes compile) and runs the
masked encoder once per batch (`lengths` mask the padding: every row's valid frames equal
the unbatched ones to float tolerance). JAX runs it on the default device: GPU / TPU when
the worker has one.

`BatchedTokenizer` makes `tokenize.tokenize_split` use it without a second tokenising loop:
it stands in for the `UnitTokenizer`, reads the shard's next `batch_size` examples ahead,
encodes their features in one go and hands out each example's units when
`tokenize_split` asks for them (checking it is given the same audio, in order). Units from
batched features can differ from the unbatched path's where a frame sits on a k-means
boundary (float rounding), so byte-equality with the single-process path holds for
`batch_size=1` (no batching), the default.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import numpy as np

from avjax.data import units as units_lib


def _hubert_of(tokenizer: Any) -> Any:
    """The (cached) `HubertFeatures` instance a HuBERT `UnitTokenizer` encodes with."""
    from avjax.data import features as features_lib

    spec = tokenizer.extractor
    return features_lib._hubert(  # noqa: SLF001  (the instance the tokenizer itself uses)
        spec["hubert_dir"], int(spec["layer"]), float(spec["max_chunk_seconds"])
    )


def _chunks(h: Any, wav: np.ndarray) -> list[np.ndarray]:
    """The chunks `HubertFeatures.unit_features` encodes (whole units, <= max_chunk)."""
    out = []
    for a in range(0, len(wav), h.max_chunk):
        chunk = wav[a : a + h.max_chunk]
        if units_lib.num_units_for(len(chunk)):
            out.append(chunk)
    return out


def _stack_units(h: Any, frames: np.ndarray, n_samples: int) -> np.ndarray:
    """A chunk's frames `[frames, hidden]` -> `[units, frames_per_unit * hidden]`."""
    n_units = units_lib.num_units_for(n_samples)
    if len(frames) == 0:
        frames = np.zeros((1, h.config.hidden_size), np.float32)
    need = h.frames_per_unit * n_units
    if len(frames) < need:
        frames = np.pad(frames, ((0, need - len(frames)), (0, 0)), mode="edge")
    return frames[:need].reshape(n_units, h.unit_dim)


def batched_unit_features(h: Any, wavs: Sequence[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """`HubertFeatures.unit_features` of each waveform, computed in batches of chunks.

    Args:
      h: a `HubertFeatures`.
      wavs: float32 16 kHz waveforms `[samples]`.
      batch_size: chunks per encoder call (rows of the padded batch `[batch, samples]`).

    Returns `[len(w) // 640, frames_per_unit * hidden]` float32 per waveform.
    """
    pieces = [(i, c) for i, w in enumerate(wavs) for c in _chunks(h, np.asarray(w, np.float32))]
    order = sorted(range(len(pieces)), key=lambda k: len(pieces[k][1]))
    feats: dict[int, np.ndarray] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        longest = max(len(pieces[k][1]) for k in rows)
        width = max(-(-longest // h.pad_to) * h.pad_to, h.min_samples)
        x = np.zeros((batch_size, width), np.float32)
        lengths = np.full(batch_size, width, np.int32)  # filler rows: full length, unused
        for r, k in enumerate(rows):
            x[r, : len(pieces[k][1])] = pieces[k][1]
            lengths[r] = len(pieces[k][1])
        out = np.asarray(h._run(h.params, x, lengths))  # noqa: SLF001
        for r, k in enumerate(rows):
            n = len(pieces[k][1])
            feats[k] = _stack_units(h, out[r, : h.config.num_frames(n)], n)
    per_wav: list[list[np.ndarray]] = [[] for _ in wavs]
    for k, (i, _) in enumerate(pieces):
        per_wav[i].append(feats[k])
    return [np.concatenate(p) if p else np.zeros((0, h.unit_dim), np.float32) for p in per_wav]


class BatchedTokenizer:
    """A `UnitTokenizer` stand-in for `tokenize.tokenize_split` over one shard of `source`.

    `encode(wav)` must be called with the examples `indices` of `source`, in order (as
    `tokenize_split` does); every other attribute is the wrapped tokenizer's.
    """

    def __init__(
        self, tokenizer: Any, source: Any, indices: Sequence[int], batch_size: int
    ) -> None:
        from avjax.data import tokenize

        self._tok = tokenizer
        self._source = source
        self._todo = collections.deque(indices)
        self._ready: collections.deque = collections.deque()
        self._batch = int(batch_size)
        self._to_float = tokenize.to_float
        self.calls = 0  # encoder batches run (for tests and reports)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def _fill(self) -> None:
        idx = [self._todo.popleft() for _ in range(min(self._batch, len(self._todo)))]
        wavs = [self._to_float(self._source[i]["audio"]) for i in idx]
        feats = batched_unit_features(_hubert_of(self._tok), wavs, self._batch)
        self.calls += 1
        self._ready.extend(zip(wavs, feats, strict=True))

    def encode(self, wav: np.ndarray) -> np.ndarray:
        """`[samples // 640]` int32 units of the next example (its features batched)."""
        if not self._ready:
            if not self._todo:
                raise RuntimeError("BatchedTokenizer: more examples asked for than its shard has")
            self._fill()
        want, feats = self._ready.popleft()
        if want.shape != np.shape(wav) or not np.array_equal(want, wav):
            raise RuntimeError("BatchedTokenizer: examples asked for out of the shard's order")
        return self._tok.encode_features(feats)
