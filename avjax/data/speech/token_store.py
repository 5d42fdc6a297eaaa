"""A tokenised split as one memory-mapped array: documents without holding them in RAM.

`tokenize.tokenize_split` leaves a split as ArrayRecord shards of per-utterance records.
Reading those back into Python lists of arrays holds every token in memory: LibriLight's
60k h are ~5.4e9 units at 25 Hz (11 GB as uint16, 22 GB as int32, plus an object per
document). `consolidate` rewrites a finished split once (process 0) into a flat layout that
`TokenStore` memory-maps, so only the pages a window touches are ever read:

  <tokens_dir>/<split>/store-documents/     (`store-utterances/` with join_documents=False)
    tokens.npy   [num_tokens] uint16 (int32 when num_units > 65536): documents back to back
    docs.npy     [num_docs + 1] int64 offsets: document i is tokens[docs[i]:docs[i + 1]]
    docs.json    {"ids": [num_docs] str, "speakers": [num_docs] str}
    counts.npy   [num_units] int64 unigram counts of tokens.npy (made while writing it)
    store.json   manifest, written last: what the store was made from, its sizes

Documents are joined as `tokenize.documents` joins them (consecutive records with the same
`document`; id = that document, speaker = its first record's), or one per record with
`join_documents=False` (id = the record's `id`). The store is written into a temporary folder
and renamed into place, so a crash never leaves a half store under the final name; a store
whose manifest matches the split's current shards (their `.done` markers) is reused, another
is rebuilt.

`TokenStore` is a read-only sequence of `[tokens]` arrays (views into the map) with
`lengths`, `subset` (held-out documents), `concat` (several train splits) and chunked
`unigram_counts`; `avjax.data.speech.lm_windows` cuts training windows from it lazily.

Measured (2 shared CPU cores, 50M random units in 10k records, 2,220 documents):
consolidation 40-47 M tokens/s (LibriLight's 5.4e9: ~2 min); 6,000-token windows, batch 8,
as fast as from int32 lists (~2-3k examples/s per core) with ~0.7 MB of anonymous memory for
the window plans instead of the lists' ~420 MB (peak RSS 404-457 MB vs 682-996 MB).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import operator
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from avjax import io as io_lib
from avjax.data.speech import tokenize

STORE_VERSION = 1
TOKENS = "tokens.npy"
OFFSETS = "docs.npy"
DOCS = "docs.json"
COUNTS = "counts.npy"
MANIFEST = "store.json"
_READ_BATCH = 256  # records read from an ArrayRecord shard at a time
_COUNT_CHUNK = 1 << 22  # tokens per bincount in `unigram_counts`


def store_dtype(num_units: int) -> np.dtype:
    """uint16 when every id fits (`num_units <= 65536`), else int32 (little-endian)."""
    if num_units < 1:
        raise ValueError(f"num_units must be >= 1, got {num_units}")
    return np.dtype("<u2") if num_units <= 65536 else np.dtype("<i4")


def store_path(tokens_dir: str | os.PathLike, split: str, join_documents: bool = True) -> str:
    """Where `consolidate` puts the store of `split` (see the module docstring)."""
    name = "store-documents" if join_documents else "store-utterances"
    return os.path.join(os.fspath(tokens_dir), split, name)


def source_key(
    tokens_dir: str | os.PathLike, split: str, num_units: int, join_documents: bool = True
) -> dict[str, Any]:
    """What a store of `split` is made from: the split's manifest and its shards' markers.

    Raises FileNotFoundError while a shard is unfinished.
    """
    tokens_dir = os.fspath(tokens_dir)
    done, missing = tokenize.split_status(tokens_dir, split)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} shard(s) of {split} are not tokenised yet, e.g. {missing[0]}: "
            "finish tokenising before consolidating"
        )
    with open(os.path.join(tokens_dir, split, tokenize.MANIFEST)) as f:
        split_key = json.load(f)
    shards = []
    for p in done:
        with open(tokenize.done_path(p)) as f:
            marker = json.load(f)
        shards.append({"file": os.path.basename(p), **marker})
    return {
        "version": STORE_VERSION,
        "join_documents": bool(join_documents),
        "num_units": int(num_units),
        "dtype": store_dtype(num_units).str,
        "split": split_key,
        "shards": shards,
    }


def is_current(
    tokens_dir: str | os.PathLike, split: str, num_units: int, join_documents: bool = True
) -> bool:
    """Whether the store of `split` exists, is complete and matches the split's shards."""
    path = store_path(tokens_dir, split, join_documents)
    try:
        key = source_key(tokens_dir, split, num_units, join_documents)
    except FileNotFoundError:
        return False
    return _manifest_key(path) == key


def _manifest_key(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return json.load(f).get("key")
    except (OSError, ValueError):
        return None


@dataclasses.dataclass
class ConsolidateStats:
    """What one `consolidate` call did."""

    path: str
    reused: bool
    num_docs: int = 0
    num_tokens: int = 0
    records: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)


def consolidate(
    tokens_dir: str | os.PathLike,
    split: str,
    *,
    num_units: int,
    join_documents: bool = True,
    progress: bool = False,
) -> ConsolidateStats:
    """Writes (once) the memory-mappable store of a finished split; see the module docstring.

    Args:
      tokens_dir: the `out_dir` of `tokenize.tokenize_split`.
      split: the split sub-folder.
      num_units: the tokenizer's vocabulary size (picks the dtype; ids are checked below it).
      join_documents: join consecutive records of one document (as `tokenize.documents`).

    Returns stats with the store's path; `reused` when a matching store was already there.
    Raises FileNotFoundError while shards are unfinished, ValueError on a record whose ids
    are out of range or whose count disagrees with its shard's marker (naming the shard).
    """
    tokens_dir = os.fspath(tokens_dir)
    path = store_path(tokens_dir, split, join_documents)
    key = source_key(tokens_dir, split, num_units, join_documents)
    if _manifest_key(path) == key:
        return ConsolidateStats(path, reused=True)
    for stale in glob.glob(glob.escape(path) + ".tmp-*") + glob.glob(glob.escape(path) + ".old-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run (one builder: ours)
    tmp = os.fspath(io_lib.unique_tmp(path))
    os.makedirs(tmp)
    t0 = time.time()
    try:
        stats = _write_store(tmp, tokens_dir, split, key, progress)
        stats.path = path
        if os.path.exists(path):
            old = f"{path}.old-{uuid.uuid4().hex[:12]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats.seconds = time.time() - t0
    logging.info(
        "Consolidated %s: %d documents, %d tokens in %.1f s (%.3g tokens/s) -> %s",
        split,
        stats.num_docs,
        stats.num_tokens,
        stats.seconds,
        stats.tokens_per_second,
        path,
    )
    return stats


def _write_store(
    out: str, tokens_dir: str, split: str, key: dict[str, Any], progress: bool
) -> ConsolidateStats:
    """Streams the split's records into `out` (see `consolidate`); store.json last."""
    from array_record.python.array_record_module import ArrayRecordReader

    num_units = key["num_units"]
    dtype = np.dtype(key["dtype"])
    join = key["join_documents"]
    total = sum(int(s["tokens"]) for s in key["shards"])
    offsets: list[int] = []
    ids: list[str] = []
    speakers: list[str] = []
    counts = np.zeros(num_units, np.int64)
    stats = ConsolidateStats(out, reused=False)
    pos = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"consolidate {split}", unit="tok", mininterval=2.0)
    folder = os.path.join(tokens_dir, split)
    with open(os.path.join(out, TOKENS), "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": dtype.str, "fortran_order": False, "shape": (total,)}
        )
        for shard in key["shards"]:
            shard_file = os.path.join(folder, shard["file"])
            reader = ArrayRecordReader(shard_file)
            try:
                n_rec = reader.num_records()
                shard_tokens = 0
                for a in range(0, n_rec, _READ_BATCH):
                    parts = []
                    for data in reader.read(a, min(a + _READ_BATCH, n_rec)):
                        meta, units = tokenize.decode_header(data)
                        name = meta["document"] if join else meta["id"]
                        if not (join and ids and ids[-1] == name):
                            offsets.append(pos)
                            ids.append(name)
                            speakers.append(meta["speaker"])
                        pos += len(units)
                        parts.append(units)
                        stats.records += 1
                    if not parts:
                        continue
                    chunk = np.concatenate(parts)
                    if chunk.size and int(chunk.max()) >= num_units:
                        raise ValueError(
                            f"{shard_file}: unit id {int(chunk.max())} >= num_units={num_units}"
                        )
                    counts += np.bincount(chunk, minlength=num_units)
                    f.write(chunk.astype(dtype, copy=False).tobytes())
                    shard_tokens += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                reader.close()
            if shard_tokens != int(shard["tokens"]):
                raise ValueError(
                    f"{shard_file}: holds {shard_tokens} tokens, its .done marker says "
                    f"{shard['tokens']}: re-tokenise it (delete the marker)"
                )
    if bar is not None:
        bar.close()
    offsets.append(pos)
    np.save(os.path.join(out, OFFSETS), np.asarray(offsets, np.int64))
    np.save(os.path.join(out, COUNTS), counts)
    with open(os.path.join(out, DOCS), "w") as f:
        json.dump({"ids": ids, "speakers": speakers}, f)
    stats.num_docs, stats.num_tokens = len(ids), pos
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(
            {"key": key, "num_docs": len(ids), "num_tokens": pos, "records": stats.records},
            f,
            indent=1,
        )
    return stats


# --- reading ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Part:
    """One consolidated store on disk, memory-mapped."""

    path: str
    tokens: np.ndarray  # [num_tokens], a plain view of `mmap` (cheaper to index than memmap)
    mmap: np.memmap
    offsets: np.ndarray  # [num_docs + 1] int64
    ids: list[str]
    speakers: list[str]
    counts: np.ndarray | None  # [num_units] int64 over the whole part
    num_units: int

    @classmethod
    def open(cls, path: str) -> _Part:
        path = os.path.abspath(os.fspath(path))
        manifest = os.path.join(path, MANIFEST)
        if not os.path.exists(manifest):
            raise FileNotFoundError(
                f"{manifest}: no token store here (not consolidated, or consolidation did not "
                "finish): run token_store.consolidate"
            )
        with open(manifest) as f:
            info = json.load(f)
        tokens = np.load(os.path.join(path, TOKENS), mmap_mode="r")
        offsets = np.asarray(np.load(os.path.join(path, OFFSETS)), np.int64)
        with open(os.path.join(path, DOCS)) as f:
            docs = json.load(f)
        num_docs, num_tokens = int(info["num_docs"]), int(info["num_tokens"])
        if (
            tokens.shape != (num_tokens,)
            or offsets.shape != (num_docs + 1,)
            or len(docs["ids"]) != num_docs
            or (num_docs and (offsets[0] != 0 or offsets[-1] != num_tokens))
        ):
            raise ValueError(
                f"{path}: store files disagree with {MANIFEST} ({num_docs} docs, {num_tokens} "
                f"tokens): tokens {tokens.shape}, offsets {offsets.shape}, "
                f"{len(docs['ids'])} ids; delete the folder to rebuild it"
            )
        counts_path = os.path.join(path, COUNTS)
        counts = np.load(counts_path) if os.path.exists(counts_path) else None
        return cls(
            path,
            tokens.view(np.ndarray),
            tokens,
            offsets,
            list(docs["ids"]),
            list(docs["speakers"]),
            counts,
            int(info["key"]["num_units"]),
        )


class TokenStore(Sequence):
    """Read-only documents `[tokens]` from memory-mapped stores (one or several, a subset).

    `store[i]` is a read-only view into the map in the stored dtype (uint16 for <= 65536
    units; a plain ndarray whose base is the `np.memmap`), or a copy in `dtype` when the store
    was opened with one (`open(path, dtype=np.int32)`): views cost no memory until read,
    copies are for consumers that need int32.
    Pickles by path (re-opens the maps), so it can go to grain worker processes.
    """

    def __init__(
        self,
        parts: Sequence[_Part],
        part_of: np.ndarray,
        local: np.ndarray,
        dtype: Any = None,
    ):
        self._parts = list(parts)
        self._part_of = np.asarray(part_of, np.int32)  # [num_docs]: which part
        self._local = np.asarray(local, np.int64)  # [num_docs]: document within the part
        if self._part_of.shape != self._local.shape:
            raise ValueError(f"part {self._part_of.shape} / local {self._local.shape} disagree")
        self._dtype = None if dtype is None else np.dtype(dtype)
        starts = np.zeros(len(self._local), np.int64)
        stops = np.zeros(len(self._local), np.int64)
        for k, p in enumerate(self._parts):
            sel = self._part_of == k
            starts[sel] = p.offsets[self._local[sel]]
            stops[sel] = p.offsets[self._local[sel] + 1]
        self._starts, self._stops = starts, stops

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, dtype: Any = None) -> TokenStore:
        """All documents of the store at `path` (a `consolidate` output folder)."""
        part = _Part.open(os.fspath(path))
        n = len(part.offsets) - 1
        return cls([part], np.zeros(n, np.int32), np.arange(n, dtype=np.int64), dtype)

    @classmethod
    def concat(cls, stores: Sequence[TokenStore], dtype: Any = None) -> TokenStore:
        """The documents of `stores` one after the other (e.g. several train splits)."""
        if not stores:
            raise ValueError("TokenStore.concat needs at least one store")
        parts: list[_Part] = []
        part_of, local = [], []
        for s in stores:
            part_of.append(s._part_of + len(parts))  # noqa: SLF001
            local.append(s._local)  # noqa: SLF001
            parts += s._parts  # noqa: SLF001
        return cls(
            parts,
            np.concatenate(part_of),
            np.concatenate(local),
            stores[0]._dtype if dtype is None else dtype,  # noqa: SLF001
        )

    def subset(self, indices: Sequence[int] | np.ndarray) -> TokenStore:
        """Documents `indices` (in that order) of this store: e.g. train / held-out."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset indices out of range for {len(self)} documents")
        idx = idx % max(len(self), 1)
        return TokenStore(self._parts, self._part_of[idx], self._local[idx], self._dtype)

    def with_dtype(self, dtype: Any) -> TokenStore:
        """The same documents, returned as copies in `dtype` (None: views)."""
        return TokenStore(self._parts, self._part_of, self._local, dtype)

    # --- sequence ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._local)

    def __getitem__(self, i):  # -> np.ndarray [tokens]
        if isinstance(i, slice):
            return self.subset(np.arange(len(self))[i])
        i = operator.index(i)
        n = len(self._local)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents")
        view = self._parts[self._part_of[i]].tokens[self._starts[i] : self._stops[i]]
        if self._dtype is None or view.dtype == self._dtype:
            return view
        return np.array(view, dtype=self._dtype)  # a plain ndarray copy

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    @property
    def lengths(self) -> np.ndarray:
        """`[num_docs]` int64 document lengths (no token is read)."""
        return self._stops - self._starts

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def doc_ids(self) -> list[str]:
        return [self._parts[k].ids[j] for k, j in zip(self._part_of, self._local, strict=True)]

    @property
    def speakers(self) -> list[str]:
        return [self._parts[k].speakers[j] for k, j in zip(self._part_of, self._local, strict=True)]

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self._parts]

    def unigram_counts(self, num_units: int) -> np.ndarray:
        """`[max(num_units, largest id + 1)]` int64 token counts, as `np.bincount` of all docs.

        A part used whole takes its counts made at consolidation; otherwise the selected
        documents are counted in runs of adjacent documents, `_COUNT_CHUNK` tokens at a time
        (memory stays flat).
        """
        total = np.zeros(num_units, np.int64)

        def add(c: np.ndarray) -> None:
            nonlocal total
            if len(c) > len(total):
                total = np.pad(total, (0, len(c) - len(total)))
            total[: len(c)] += c

        for k, p in enumerate(self._parts):
            sel = np.sort(self._local[self._part_of == k])
            num_docs = len(p.offsets) - 1
            if (
                p.counts is not None
                and len(sel) == num_docs
                and np.array_equal(sel, np.arange(num_docs))
            ):
                nz = np.flatnonzero(p.counts)
                add(p.counts[: (nz[-1] + 1) if nz.size else 0])
                continue
            if not len(sel):
                continue
            # Runs of consecutive documents are contiguous token ranges.
            breaks = np.flatnonzero(np.diff(sel) != 1) + 1
            run_first = np.concatenate([[0], breaks])
            run_last = np.concatenate([breaks - 1, [len(sel) - 1]])
            for a_doc, b_doc in zip(sel[run_first], sel[run_last], strict=True):
                a, b = int(p.offsets[a_doc]), int(p.offsets[b_doc + 1])
                for c in range(a, b, _COUNT_CHUNK):
                    add(np.bincount(p.tokens[c : min(c + _COUNT_CHUNK, b)], minlength=num_units))
        return total

    # --- pickling: by path ------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {
            "paths": self.paths,
            "part_of": self._part_of,
            "local": self._local,
            "dtype": None if self._dtype is None else self._dtype.str,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        parts = [_Part.open(p) for p in state["paths"]]
        self.__init__(parts, state["part_of"], state["local"], state["dtype"])

    def __repr__(self) -> str:
        return (
            f"TokenStore({len(self)} docs, {self.num_tokens} tokens, "
            f"{len(self._parts)} part(s): {', '.join(self.paths)})"
        )
