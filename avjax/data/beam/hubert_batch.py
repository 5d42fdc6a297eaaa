"""HuBERT features for many utterances at once, in padded batches on the worker's device.

`avjax.data.speech.features.HubertFeatures.unit_features` encodes one chunk (<= 30 s) at a time. A
Beam worker with an accelerator (or many cores) is used far better by batches: its
`batched_unit_features` pools the chunks of several utterances, sorts them by length, pads
each batch of `batch_size` chunks to a common length (whole seconds, so few shapes compile)
and runs the masked encoder once per batch (`lengths` mask the padding: every row's valid
frames equal the unbatched ones to float tolerance). JAX runs it on the default device:
GPU / TPU when the worker has one.

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


def _hubert_of(tokenizer: Any) -> Any:
    """The (cached) `HubertFeatures` instance a HuBERT `UnitTokenizer` encodes with."""
    from avjax.data.speech import features as features_lib

    spec = tokenizer.extractor
    return features_lib.hubert_features(
        spec["hubert_dir"], int(spec["layer"]), float(spec["max_chunk_seconds"])
    )


class BatchedTokenizer:
    """A `UnitTokenizer` stand-in for `tokenize.tokenize_split` over one shard of `source`.

    `encode(wav)` must be called with the examples `indices` of `source`, in order (as
    `tokenize_split` does); every other attribute is the wrapped tokenizer's.
    """

    def __init__(
        self, tokenizer: Any, source: Any, indices: Sequence[int], batch_size: int
    ) -> None:
        from avjax.data.speech import tokenize

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
        feats = _hubert_of(self._tok).batched_unit_features(wavs, self._batch)
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
