"""Grain pipelines of fixed-length token windows cut from long documents (spoken LMs).

A document (one story, one audiobook chapter) is a long unit sequence. Training examples are
windows of `seq_len + 1` tokens taken every `seq_len` tokens. As in SpeechSSM, the last window
of a document is not padded with silence or an end token: it wraps around to the document's
start, so the model never learns "how much is left" and never learns to stop. The wrap point
starts a new segment (`segment_pos` back to 0, which resets recurrent state and masks
attention) and the target across it is masked out.

Example fields (per window, `[seq_len]` each):
  inputs: int32 tokens; targets: int32 next tokens; segment_pos: int32 position in segment;
  mask: float32 1 where the target counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np


def window_index(doc_lengths: Sequence[int], seq_len: int) -> np.ndarray:
    """All `(doc, start)` window origins, `[num_windows, 2]` int64, in document order."""
    rows = []
    for d, n in enumerate(doc_lengths):
        if n < 2:
            continue
        starts = np.arange(0, max(n - 1, 1), seq_len)
        rows.append(np.stack([np.full_like(starts, d), starts], axis=1))
    if not rows:
        raise ValueError(f"no document has 2 or more tokens (lengths {list(doc_lengths)[:10]}...)")
    return np.concatenate(rows).astype(np.int64)


def cut_window(doc: np.ndarray, start: int, seq_len: int) -> dict[str, np.ndarray]:
    """One training example from `doc[start:]`, wrapping to the document start at its end."""
    n = len(doc)
    idx = start + np.arange(seq_len + 1)
    tokens = doc[idx % n]
    # Positions count from the window start, and from 0 again after each wrap.
    seg_pos = np.where(idx < n, idx - start, idx % n)
    # A token whose successor starts a new segment has no valid target.
    new_seg = np.zeros(seq_len + 1, bool)
    new_seg[1:] = seg_pos[1:] == 0
    return {
        "inputs": tokens[:-1].astype(np.int32),
        "targets": tokens[1:].astype(np.int32),
        "segment_pos": seg_pos[:-1].astype(np.int32),
        "mask": (~new_seg[1:]).astype(np.float32),
    }


class _Windows:
    """Random access over window origins of a list of documents."""

    def __init__(self, docs: Sequence[np.ndarray], seq_len: int):
        self._docs = [np.asarray(d, np.int32) for d in docs]
        self._seq_len = seq_len
        self._index = window_index([len(d) for d in self._docs], seq_len)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        d, start = self._index[i]
        return cut_window(self._docs[d], int(start), self._seq_len)


def train_windows(
    docs: Sequence[np.ndarray],
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Endless shuffled batches `{field: [batch_size, seq_len]}` of this process's share.

    Reshuffled every epoch (grain's per-epoch seeds); deterministic given `seed`;
    checkpointable through `grain.checkpoint`.
    """
    ds = grain.MapDataset.source(_Windows(docs, seq_len))
    if len(ds) < process_count:
        raise ValueError(f"{len(ds)} windows cannot be split over {process_count} processes")
    ds = ds.shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count]
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset()


def eval_windows(
    docs: Sequence[np.ndarray],
    seq_len: int,
    batch_size: int,
    max_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """A fixed list of held-out batches (windows in document order, cycled to fill)."""
    ds = grain.MapDataset.source(_Windows(docs, seq_len))
    n = len(ds)
    total = batch_size * process_count * max_batches
    order = [i % n for i in range(min(total, max(n, batch_size * process_count)))]
    usable = len(order) // (batch_size * process_count) * batch_size * process_count
    order = order[:usable][process_index::process_count]
    out = []
    for b in range(0, len(order), batch_size):
        items = [ds[i] for i in order[b : b + batch_size]]
        out.append({k: np.stack([x[k] for x in items]) for k in items[0]})
    return out
