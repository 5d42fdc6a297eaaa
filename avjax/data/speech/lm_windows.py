"""Grain pipelines of fixed-length token windows cut from long documents (spoken LMs).

A document (one story, one audiobook chapter) is a long unit sequence. Training examples are
windows of `seq_len + 1` tokens taken every `seq_len` tokens. As in SpeechSSM, the last window
of a document is not padded with silence or an end token: it wraps around to the document's
start, so the model never learns "how much is left" and never learns to stop. The wrap point
starts a new segment (`segment_pos` back to 0, which resets recurrent state and masks
attention) and the target across it is masked out.

Packing (`train_windows(..., pack=True)`): a document shorter than a window (a LibriSpeech
utterance) or the tail of a longer one does not get a window of its own. Tails are packed,
first-fit in a seeded order, into shared windows; each starts a new segment (`segment_pos`
0, which resets the recurrence), and the space left after the last one is filled from that
last document's start, as above. Every token is still seen once per epoch; fewer are repeated.
Training windows of up to 6,000 tokens (4 minutes at 25 Hz, the paper's length) are cut on
the fly.

Documents (`docs`): a list of `[tokens]` int arrays (copied to int32 once, as always), or any
lazy random-access sequence of them (`__len__`, `__getitem__`; ideally `lengths`
`[num_docs]`), e.g. `avjax.data.speech.token_store.TokenStore`, whose documents are views into a
memory map: then nothing is copied up front, the window plans are built from `lengths` and
each window reads only its own tokens.

Example fields (per window, `[seq_len]` each):
  inputs: int32 tokens; targets: int32 next tokens; segment_pos: int32 position in segment;
  mask: float32 1 where the target counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

Docs = Sequence[np.ndarray]


def _doc_source(docs: Docs) -> tuple[Docs, np.ndarray]:
    """`(documents, lengths [num_docs] int64)`: a list or tuple becomes int32 arrays (in
    memory, as before); any other sequence is kept lazy, lengths from its `lengths` if any."""
    if isinstance(docs, list | tuple):
        arrays = [np.asarray(d, np.int32) for d in docs]
        return arrays, np.array([len(d) for d in arrays], np.int64)
    lengths = getattr(docs, "lengths", None)
    if lengths is None:
        lengths = [len(docs[i]) for i in range(len(docs))]
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    if len(lengths) != len(docs):
        raise ValueError(f"docs.lengths has {len(lengths)} entries for {len(docs)} documents")
    return docs, lengths


def _starts_per_doc(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """`[num_docs]` windows per document: starts 0, seq_len, ... below `n - 1` (0 if n < 2)."""
    return np.where(lengths >= 2, -(-(lengths - 1) // seq_len), 0)


def _expand(counts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`(doc, start)` of `counts[d]` windows per document at starts 0, seq_len, ..."""
    d = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return d, (np.arange(len(d), dtype=np.int64) - first) * seq_len


def window_index(doc_lengths: Sequence[int] | np.ndarray, seq_len: int) -> np.ndarray:
    """All `(doc, start)` window origins, `[num_windows, 2]` int64, in document order."""
    lengths = np.asarray(doc_lengths, np.int64).reshape(-1)
    d, starts = _expand(_starts_per_doc(lengths, seq_len), seq_len)
    if not len(d):
        raise ValueError(f"no document has 2 or more tokens (lengths {lengths[:10].tolist()}...)")
    return np.stack([d, starts], axis=1)


def cut_window(doc: np.ndarray, start: int, seq_len: int) -> dict[str, np.ndarray]:
    """One training example from `doc[start:]`, wrapping to the document start at its end."""
    n = len(doc)
    idx = start + np.arange(seq_len + 1)
    tokens = doc[idx % n]
    # Positions count from the window start, and from 0 again after each wrap.
    return _example(tokens, np.where(idx < n, idx - start, idx % n))


def _example(tokens: np.ndarray, seg_pos: np.ndarray) -> dict[str, np.ndarray]:
    """The example fields from `seq_len + 1` tokens and their segment positions."""
    # A token whose successor starts a new segment has no valid target.
    new_seg = np.zeros(len(tokens), bool)
    new_seg[1:] = seg_pos[1:] == 0
    return {
        "inputs": tokens[:-1].astype(np.int32),
        "targets": tokens[1:].astype(np.int32),
        "segment_pos": seg_pos[:-1].astype(np.int32),
        "mask": (~new_seg[1:]).astype(np.float32),
    }


class _Windows:
    """Random access over window origins of a list of documents."""

    def __init__(self, docs: Docs, seq_len: int):
        self._docs, lengths = _doc_source(docs)
        self._seq_len = seq_len
        self._index = window_index(lengths, seq_len)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        d, start = self._index[i]
        return cut_window(self._docs[d], int(start), self._seq_len)


def pack_plan(
    doc_lengths: Sequence[int] | np.ndarray, seq_len: int, seed: int = 0, open_bins: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Which document pieces make up each window when short pieces are packed.

    A document of `n` tokens gives full windows `(d, start, seq_len + 1)` at starts 0,
    seq_len, ... and one tail piece `(d, start, n - start)` shorter than a window. Tails are
    placed first-fit (over the last `open_bins` open windows) in a seeded random order.

    Returns:
      pieces `[num_pieces, 3]` int64 rows `(doc, start, length)`, windows in order;
      offsets `[num_windows + 1]` int64: window `w` is `pieces[offsets[w]:offsets[w + 1]]`.
    """
    span = seq_len + 1
    lengths = np.asarray(doc_lengths, np.int64).reshape(-1)
    k = _starts_per_doc(lengths, seq_len)
    # Only a document's last start can fall short of a full window (when n - 1 is not a
    # multiple of seq_len): that piece is its tail.
    last = np.maximum(k - 1, 0) * seq_len
    has_tail = (k > 0) & (last + span > lengths)
    full_d, full_start = _expand(k - has_tail, seq_len)
    tail_d = np.flatnonzero(has_tail)
    tails = list(
        zip(
            tail_d.tolist(),
            last[tail_d].tolist(),
            (lengths[tail_d] - last[tail_d]).tolist(),
            strict=True,
        )
    )
    order = np.random.default_rng(seed).permutation(len(tails))
    bins: list[list[tuple[int, int, int]]] = []
    room: list[int] = []
    first_open = 0
    for i in order:
        piece = tails[i]
        for b in range(first_open, len(bins)):
            if room[b] >= piece[2]:
                bins[b].append(piece)
                room[b] -= piece[2]
                break
        else:
            bins.append([piece])
            room.append(span - piece[2])
            first_open = max(first_open, len(bins) - open_bins)
    if not len(full_d) and not bins:
        raise ValueError(f"no document has 2 or more tokens (lengths {lengths[:10].tolist()}...)")
    full = np.stack([full_d, full_start, np.full_like(full_d, span)], axis=1)
    packed = np.array([p for b in bins for p in b], np.int64).reshape(-1, 3)
    sizes = np.concatenate(
        [np.ones(len(full), np.int64), np.array([len(b) for b in bins], np.int64)]
    )
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return np.concatenate([full, packed]), offsets


def cut_packed(docs: Docs, pieces: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """One example from pieces `[k, 3]` `(doc, start, length)`, filled from the last doc's start.

    Each piece is a segment (`segment_pos` from 0); targets across segment starts are masked.
    """
    toks, pos = [], []
    for d, start, length in pieces:
        toks.append(docs[d][start : start + length])
        pos.append(np.arange(length))
    left = seq_len + 1 - int(pieces[:, 2].sum())
    if left > 0:  # the paper's fix: continue from the audio's start, not with padding
        last = docs[pieces[-1, 0]]
        idx = np.arange(left) % len(last)
        toks.append(last[idx])
        pos.append(idx)
    return _example(np.concatenate(toks), np.concatenate(pos))


class _Packed:
    """Random access over packed windows (see `pack_plan`)."""

    def __init__(self, docs: Docs, seq_len: int, seed: int):
        self._docs, lengths = _doc_source(docs)
        self._seq_len = seq_len
        self._pieces, self._offsets = pack_plan(lengths, seq_len, seed)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        p = self._pieces[self._offsets[i] : self._offsets[i + 1]]
        return cut_packed(self._docs, p, self._seq_len)


def train_windows(
    docs: Docs,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    pack: bool = False,
) -> grain.IterDataset:
    """Endless shuffled batches `{field: [batch_size, seq_len]}` of this process's share.

    Reshuffled every epoch (grain's per-epoch seeds); deterministic given `seed`;
    checkpointable through `grain.checkpoint`. `pack`: pack short documents and tails
    (see the module docstring) instead of giving each its own wrapped window.
    """
    source = _Packed(docs, seq_len, seed) if pack else _Windows(docs, seq_len)
    ds = grain.MapDataset.source(source)
    if len(ds) < process_count:
        raise ValueError(f"{len(ds)} windows cannot be split over {process_count} processes")
    ds = ds.shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count]
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset()


def eval_windows(
    docs: Docs,
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
