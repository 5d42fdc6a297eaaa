"""Corpus -> unit sequences in ArrayRecord: sharded over processes, resumable, timed.

Input: any random-access source of examples (a TFDS `data_source` from `avjax.data.tfds`,
or `dir_source(path)` for a folder of audio) whose examples hold `audio` (int16 or float32
`[samples]` at 16 kHz) and optionally `speaker`, `document`, `id`, `index`, `text`.

Output, per split, in `out_dir/<split>/`:

  units-00003-of-00016.array_record   one record per example (see `encode_record`)
  units-00003-of-00016.done           json: examples, audio seconds, tokens, seconds taken

Shard `s` holds examples `[s * n // S, (s + 1) * n // S)` in source order, so reading the
shards in order gives the corpus in order. Process `p` of `P` writes the shards with
`s % P == p`. A shard with its `.done` marker is skipped: rerunning after a crash or
preemption redoes only unfinished shards (a shard is written to a temp file and renamed
before its marker). `out_dir/tokenize.json` records the tokenizer and source the shards were
made with; another tokenizer or source in the same `out_dir` is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from avjax import io as io_lib
from avjax.data import audio as audio_lib
from avjax.data.speech.units import UNIT_RATE, UnitTokenizer

MANIFEST = "tokenize.json"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<I")


# --- records ---------------------------------------------------------------------------------


def encode_record(units: np.ndarray, meta: dict[str, Any]) -> bytes:
    """One example as bytes: a 4-byte header length, a JSON header, the units as uint16/int32.

    `units`: `[tokens]` int; `meta`: JSON-able fields (speaker, document, id, index, text,
    duration).
    """
    units = np.asarray(units)
    dtype = "<u2" if units.size == 0 or int(units.max()) < 65536 else "<i4"
    header = json.dumps({**meta, "dtype": dtype, "num_tokens": int(units.size)}).encode()
    return _HEADER.pack(len(header)) + header + units.astype(dtype).tobytes()


def decode_header(data: bytes) -> tuple[dict[str, Any], np.ndarray]:
    """`(meta, units)` of a record without copying: `units` `[tokens]` is a read-only view in
    the stored dtype (uint16 or int32)."""
    (n,) = _HEADER.unpack_from(data)
    meta = json.loads(data[_HEADER.size : _HEADER.size + n])
    units = np.frombuffer(data, dtype=meta.pop("dtype"), offset=_HEADER.size + n)
    if len(units) != meta["num_tokens"]:
        raise ValueError(f"record holds {len(units)} tokens, header says {meta['num_tokens']}")
    return meta, units


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of `encode_record`: the meta fields plus `units` int32 `[tokens]`."""
    meta, units = decode_header(data)
    meta["units"] = units.astype(np.int32)
    return meta


# --- sources ---------------------------------------------------------------------------------


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def to_float(audio: np.ndarray) -> np.ndarray:
    """Stored audio (int16 or float) -> float32 `[samples]` in [-1, 1]."""
    audio = np.asarray(audio)
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 32768.0
    return audio.astype(np.float32)


class DirSource:
    """A folder of audio as a random-access source (`corpus.scan_audio_dir` listing)."""

    def __init__(self, root: str | os.PathLike, progress: bool = False):
        from avjax.data.speech import corpus as corpus_lib

        self.root = os.path.abspath(os.fspath(root))
        self._utts = corpus_lib.scan_audio_dir(self.root, heldout_fraction=0.0, progress=progress)

    def __len__(self) -> int:
        return len(self._utts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        u = self._utts[i]
        return {
            "audio": audio_lib.load_audio(u.audio_path),
            "speaker": u.speaker,
            "document": u.doc_id,
            "id": u.id,
            "index": u.index,
            "text": u.text,
        }

    def __repr__(self) -> str:
        return f"DirSource({self.root!r}, {len(self)} files)"


# --- tokenising -------------------------------------------------------------------------------


def tokenizer_fingerprint(tok: UnitTokenizer) -> str:
    """A hash of the centroids, normalisation and (other than log-mel) feature extractor."""
    h = hashlib.sha256()
    for a in (tok.centroids, tok.mean, tok.std):
        h.update(np.ascontiguousarray(a).tobytes())
    if tok.features != "logmel":  # log-mel fingerprints stay as they were
        h.update(json.dumps(tok.extractor, sort_keys=True).encode())
    return h.hexdigest()[:16]


def shard_bounds(num_examples: int, num_shards: int) -> list[tuple[int, int]]:
    """`[start, stop)` example ranges of `num_shards` near-equal contiguous shards."""
    return [
        (s * num_examples // num_shards, (s + 1) * num_examples // num_shards)
        for s in range(num_shards)
    ]


def shard_path(out_dir: str, split: str, shard: int, num_shards: int) -> str:
    return os.path.join(out_dir, split, f"units-{shard:05d}-of-{num_shards:05d}.array_record")


def _check_manifest(out_dir: str, key: dict[str, Any]) -> None:
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != key:
            diff = {k: (old.get(k), v) for k, v in key.items() if old.get(k) != v}
            raise ValueError(
                f"{out_dir} holds units made with other settings {diff} (old, new): "
                "use another output folder or delete it"
            )
        return
    os.makedirs(out_dir, exist_ok=True)
    io_lib.write_text_atomic(path, json.dumps(key, indent=2))


@dataclasses.dataclass
class TokenizeStats:
    """What one `tokenize_split` call did (this process only)."""

    shards_done: int = 0
    shards_skipped: int = 0
    examples: int = 0
    audio_seconds: float = 0.0
    tokens: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def hours_per_minute(self) -> float:
        """Hours of audio per wall-clock minute (this process)."""
        return self.audio_seconds / 3600 / max(self.wall_seconds / 60, 1e-9)

    @property
    def hours_per_cpu_minute(self) -> float:
        """Hours of audio per CPU minute (all threads of this process): per core."""
        return self.audio_seconds / 3600 / max(self.cpu_seconds / 60, 1e-9)

    def summary(self) -> str:
        return (
            f"{self.shards_done} shards written, {self.shards_skipped} already done; "
            f"{self.examples} examples, {self.audio_seconds / 3600:.3f} h of audio, "
            f"{self.tokens} tokens in {self.wall_seconds:.1f} s: "
            f"{self.hours_per_minute:.3f} h audio/min/process, "
            f"{self.hours_per_cpu_minute:.3f} h audio/CPU-min"
        )


def tfds_source_id(builder: Any, data_dir: str | os.PathLike, split: str = "") -> str:
    """The id a TFDS corpus' token shards are keyed with (`tokenize.json`'s "source"):
    `<full_name>@<data_dir>[:<split>]`, the same for training, `tools/tokenize_corpus.py` and
    the Beam stage, so shards written by one are reused by the others."""
    base = f"{builder.info.full_name}@{os.fspath(data_dir)}"
    return f"{base}:{split}" if split else base


def tokenize_split(
    source: Sequence[dict[str, Any]],
    tokenizer: UnitTokenizer,
    out_dir: str | os.PathLike,
    split: str,
    *,
    num_shards: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    source_id: str = "",
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> TokenizeStats:
    """Tokenises this process's shards of `source` into `out_dir/<split>/` (skips done ones).

    Args:
      source: random-access examples (`len`, `[i]`), see the module docstring.
      tokenizer: a fitted `UnitTokenizer` (25 Hz units).
      out_dir: output root; `split` names the sub-folder.
      num_shards: 0 = about one shard per 2,000 examples (at least 1).
      process_index, process_count: this process's share (shard % count == index).
      source_id: a name for the source, kept in `tokenize.json` (a changed source is refused).
      on_shard: called with each shard number after it is finished (tests, progress hooks).
    """
    out_dir = os.fspath(out_dir)
    n = len(source)
    if num_shards <= 0:
        num_shards = max(1, -(-n // 2000))
    num_shards = min(num_shards, max(n, 1))
    _check_manifest(
        out_dir,
        {"version": FORMAT_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer)},
    )
    split_key = {"source": source_id, "num_examples": n, "num_shards": num_shards}
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    _check_manifest(os.path.join(out_dir, split), split_key)
    mine = [s for s in range(num_shards) if s % process_count == process_index]
    bounds = shard_bounds(n, num_shards)
    stats = TokenizeStats()
    t0, c0 = time.time(), time.process_time()
    todo = [
        s for s in mine if not os.path.exists(done_path(shard_path(out_dir, split, s, num_shards)))
    ]
    stats.shards_skipped = len(mine) - len(todo)
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(bounds[s][1] - bounds[s][0] for s in todo)
        bar = tqdm(total=total, desc=f"tokenise {split}", unit="utt", mininterval=2.0)
    for s in todo:
        shard = _write_shard(
            source, tokenizer, range(*bounds[s]), shard_path(out_dir, split, s, num_shards), bar
        )
        stats.shards_done += 1
        stats.examples += shard.examples
        stats.audio_seconds += shard.audio_seconds
        stats.tokens += shard.tokens
        if on_shard is not None:
            on_shard(s)
    if bar is not None:
        bar.close()
    stats.wall_seconds = time.time() - t0
    stats.cpu_seconds = time.process_time() - c0
    if stats.shards_done:
        logging.info("Tokenised %s: %s", split, stats.summary())
    return stats


def _example_meta(ex: dict[str, Any], i: int, num_samples: int) -> dict[str, Any]:
    """The metadata stored beside example `i`'s units (speaker, document, id, text, ...)."""
    return {
        "speaker": _text(ex.get("speaker", "")),
        "document": _text(ex.get("document", ex.get("id", str(i)))),
        "id": _text(ex.get("id", str(i))),
        "index": int(ex.get("index", 0)),
        "text": _text(ex.get("text", "")),
        "duration": num_samples / audio_lib.SAMPLE_RATE,
        "source_index": i,
    }


def _write_shard(
    source: Sequence[dict[str, Any]],
    tokenizer: UnitTokenizer,
    rows: range,
    path: str,
    bar: Any = None,
) -> TokenizeStats:
    """Tokenises `source[rows]` into the ArrayRecord shard `path` (written to a temporary
    file, renamed when complete, then its done marker); returns the shard's counts."""
    from array_record.python.array_record_module import ArrayRecordWriter

    _remove_leftovers(path)
    tmp = os.fspath(io_lib.unique_tmp(path))
    ts = time.time()
    shard = TokenizeStats()
    writer = ArrayRecordWriter(tmp, "group_size:1")
    try:
        for i in rows:
            ex = source[i]
            wav = to_float(ex["audio"])
            units = tokenizer.encode(wav)
            meta = _example_meta(ex, i, len(wav))
            writer.write(encode_record(units, meta))
            shard.examples += 1
            shard.audio_seconds += meta["duration"]
            shard.tokens += len(units)
            if bar is not None:
                bar.update(1)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    writer.close()
    os.replace(tmp, path)
    done = dataclasses.asdict(shard) | {"wall_seconds": time.time() - ts}
    io_lib.write_text_atomic(done_path(path), json.dumps(done))
    return shard


def _remove_leftovers(path: str) -> None:
    """Removes temporary files of `path` (and its marker) left by a killed writer: only this
    process writes this shard, so any such file is stale."""
    import glob

    for p in (path, done_path(path)):
        for stale in glob.glob(glob.escape(p) + ".tmp*"):
            logging.info("Removing %s (left by a killed run)", stale)
            os.remove(stale)


def done_path(path: str) -> str:
    """The `.done` marker (json: examples, audio seconds, tokens, seconds) of a shard path."""
    return path[: -len(".array_record")] + ".done"


def split_status(out_dir: str | os.PathLike, split: str) -> tuple[list[str], list[str]]:
    """(finished shard paths, unfinished shard paths) of a tokenised split, in order."""
    folder = os.path.join(os.fspath(out_dir), split)
    key_path = os.path.join(folder, MANIFEST)
    if not os.path.exists(key_path):
        raise FileNotFoundError(f"{folder}: no tokenised split here (no {MANIFEST})")
    with open(key_path) as f:
        num_shards = json.load(f)["num_shards"]
    paths = [shard_path(os.fspath(out_dir), split, s, num_shards) for s in range(num_shards)]
    done = [p for p in paths if os.path.exists(done_path(p))]
    return done, [p for p in paths if not os.path.exists(done_path(p))]


def wait_for_split(out_dir: str, split: str, timeout_s: float = 3600.0) -> None:
    """Blocks until every shard of the split is done (other processes tokenise theirs)."""
    t0 = time.time()
    while True:
        _, missing = split_status(out_dir, split)
        if not missing:
            return
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"{len(missing)} shards still unfinished, e.g. {missing[0]}")
        time.sleep(2.0)


def read_split(out_dir: str | os.PathLike, split: str) -> Iterator[dict[str, Any]]:
    """The records of a finished split in corpus order (`decode_record` dicts)."""
    from array_record.python.array_record_module import ArrayRecordReader

    done, missing = split_status(out_dir, split)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} shard(s) of {split} are not tokenised yet, e.g. {missing[0]}: "
            "rerun the tokeniser (it resumes)"
        )
    for path in done:
        reader = ArrayRecordReader(path)
        try:
            for data in reader.read_all():
                yield decode_record(data)
        finally:
            reader.close()


def documents(records: Iterator[dict[str, Any]]) -> list[tuple[str, str, np.ndarray]]:
    """Joins consecutive records of one document: `[(document, speaker, int32 units)]`."""
    out: list[tuple[str, str, list[np.ndarray]]] = []
    for r in records:
        if out and out[-1][0] == r["document"]:
            out[-1][2].append(r["units"])
        else:
            out.append((r["document"], r["speaker"], [r["units"]]))
    return [(d, s, np.concatenate(parts).astype(np.int32)) for d, s, parts in out]


# --- fitting units on a source -------------------------------------------------------------


def fit_units(
    sources: Sequence[Sequence[dict[str, Any]]],
    out_dir: str | os.PathLike,
    *,
    num_units: int,
    seed: int = 0,
    kmeans_iters: int = 30,
    vocoder_steps: int = 300,
    max_minutes: float = 60.0,
    source_id: str = "",
    progress: bool = True,
    features: str = "logmel",
    hubert_dir: str = "",
    hubert_layer: int = 6,
    context: dict[str, Any] | None = None,
    min_vectors_per_unit: int = 30,
    **artifact_options: Any,
) -> tuple[UnitTokenizer, Any]:
    """Fits the k-means tokenizer and the unit vocoder on up to `max_minutes` of audio.

    Refuses (ValueError naming `data.fit_minutes` / `data.num_units`) when the audio taken
    gives fewer than `min_vectors_per_unit` 25 Hz vectors per unit (see `avjax.data.speech.kmeans`);
    above `STREAM_ABOVE_UNITS` units the features are streamed from disk into mini-batch
    k-means, and the vocoder sees the first `VOCODER_MAX_MINUTES` of the audio.

    Examples are taken evenly spread over `sources` (train splits). `features`: "logmel",
    "mfcc" or "hubert" (layer `hubert_layer` of the local HF checkpoint `hubert_dir`), see
    `avjax.data.speech.features`; all give 25 Hz units, recorded in the tokenizer. HuBERT features
    are clustered unnormalised (`features.normalize_by_default`). The vocoder always maps
    units to log-mel. `out_dir` is a prepared artifact (`avjax.data.artifacts`: `tokenizer/`,
    `vocoder/`, `fit_info.json`, `manifest.json`); a second call with the same settings
    loads it. `context` and `artifact_options` (group, processes, read_only, frozen_by,
    force) go to `artifacts.prepare_artifact`. Returns `(UnitTokenizer, UnitVocoder)`.
    """
    from avjax.data import artifacts
    from avjax.data.speech import features as features_lib
    from avjax.data.speech import units as units_lib
    from avjax.data.speech import vocoder as vocoder_lib

    extractor = None  # log-mel: reuse the vocoder's mel below
    if features != "logmel":
        extractor = features_lib.get_extractor(
            features, hubert_dir=hubert_dir or None, layer=int(hubert_layer)
        )
    key = {
        "source": source_id,
        "num_units": int(num_units),
        "seed": int(seed),
        "kmeans_iters": int(kmeans_iters),
        "vocoder_steps": int(vocoder_steps),
        "max_minutes": float(max_minutes),
        "features": units_lib.feature_config(),
    }
    if extractor is not None:  # (log-mel keys stay as before: existing caches still load)
        key["extractor"] = extractor.spec

    def adopt(path):  # fitted before manifests: fit_info.json with the same key
        try:
            info = json.loads((path / "fit_info.json").read_text())
        except (OSError, ValueError):
            return None
        return info if info.get("key") == key else None

    def build(tmp) -> dict[str, Any]:
        return _fit(sources, tmp, key, extractor, progress, int(min_vectors_per_unit))

    art = artifacts.prepare_artifact(
        out_dir,
        {"fit": key},
        build,
        what="the unit tokenizer and vocoder",
        context=context,
        adopt=adopt,
        **artifact_options,
    )
    return (
        UnitTokenizer.load(art.path / "tokenizer"),
        vocoder_lib.UnitVocoder.load(art.path / "vocoder"),
    )


# Above this many units, k-means is mini-batch and streamed from feature shards on local disk
# (a full Lloyd step over every vector per iteration, in memory, no longer fits the job).
STREAM_ABOVE_UNITS = 4096
# The vocoder is fitted on at most this much of the audio (its mels stay in memory).
VOCODER_MAX_MINUTES = 60.0


def _fit_examples(
    sources: Sequence[Sequence[dict[str, Any]]],
    key: dict[str, Any],
    extractor: Any,
    writer: Any = None,
    min_per_unit: int = 0,
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """(unit-length log-mels, features, samples taken) of up to `max_minutes` of audio.

    With a `writer` (`kmeans.ShardWriter`) every file's features `[units, dim]` go to disk
    and only the first `VOCODER_MAX_MINUTES` of mels and features are returned (for the
    vocoder). Refuses (`kmeans.check_enough_vectors`) under `min_per_unit` vectors per unit.
    """
    from avjax.data.speech import kmeans as kmeans_lib
    from avjax.data.speech import units as units_lib

    index = [(k, i) for k, src in enumerate(sources) for i in range(len(src))]
    if not index:
        raise ValueError("fit_units: the sources hold no examples")
    order = np.random.default_rng(key["seed"]).permutation(len(index))
    budget = key["max_minutes"] * 60 * audio_lib.SAMPLE_RATE
    keep = budget if writer is None else VOCODER_MAX_MINUTES * 60 * audio_lib.SAMPLE_RATE
    mels, feats, taken, vectors = [], [], 0, 0
    for j in order:
        k, i = index[j]
        wav = to_float(sources[k][i]["audio"])
        n = units_lib.num_units_for(len(wav))
        if n == 0:
            continue
        mel = units_lib.unit_mel(units_lib.log_mel(wav), n)
        f = units_lib.mel_to_unit_features(mel) if extractor is None else extractor(wav)
        if len(f) != n:
            raise AssertionError(f"{extractor.name} gave {len(f)} units for {n}")
        if writer is not None:
            writer.append(f)
        if taken < keep:
            mels.append(mel)
            feats.append(f)
        taken += len(wav)
        vectors += n
        if taken >= budget:
            break
    if vectors < key["num_units"]:
        raise ValueError(
            f"fit_units: {taken / audio_lib.SAMPLE_RATE:.1f} s of audio give fewer unit frames "
            f"than num_units={key['num_units']}"
        )
    kmeans_lib.check_enough_vectors(
        vectors,
        key["num_units"],
        minimum=min_per_unit,
        rate=UNIT_RATE,
        audio_minutes=taken / audio_lib.SAMPLE_RATE / 60,
    )
    return mels, feats, taken


def _fit_streamed(
    sources: Sequence[Sequence[dict[str, Any]]],
    key: dict[str, Any],
    extractor: Any,
    normalize: bool,
    min_per_unit: int,
    progress: bool,
) -> tuple[UnitTokenizer, list[np.ndarray], list[np.ndarray], int]:
    """The feature pass writes shards to a local temp folder; mini-batch k-means streams them
    (`kmeans.fit_minibatch_kmeans`, `kmeans_iters` epochs at most, early stopping).
    Returns (tokenizer, vocoder mels, their features, samples taken)."""
    import tempfile

    from avjax.data.speech import kmeans as kmeans_lib

    with tempfile.TemporaryDirectory(prefix="avjax-unit-features-") as tmp:
        writer = kmeans_lib.ShardWriter(tmp)
        mels, feats, taken = _fit_examples(sources, key, extractor, writer, min_per_unit)
        shards = writer.close()
        mean, std = kmeans_lib.source_stats(shards, normalize)
        k = key["num_units"]
        res = kmeans_lib.fit_minibatch_kmeans(
            shards,
            k,
            batch_size=max(8192, 2 * k),
            epochs=float(key["kmeans_iters"]),
            seed=key["seed"],
            mean=mean,
            std=std,
            progress=progress,
        )
    logging.info(
        "mini-batch k-means: %d units on %d streamed vectors, %d steps of %d in %.1f s",
        k,
        len(shards),
        res.steps,
        res.batch_size,
        res.seconds,
    )
    spec = None if extractor is None else extractor.spec
    return UnitTokenizer(res.centroids, mean, std, spec), mels, feats, taken


def _fit(
    sources: Sequence[Sequence[dict[str, Any]]],
    out_dir: Any,
    key: dict[str, Any],
    extractor: Any,
    progress: bool,
    min_per_unit: int = 0,
) -> dict[str, Any]:
    """Fits tokenizer + vocoder (see `fit_units`) into `out_dir`; returns the fit info."""
    from avjax.data.speech import features as features_lib
    from avjax.data.speech import vocoder as vocoder_lib

    t0 = time.time()
    name = "logmel" if extractor is None else extractor.name
    normalize = features_lib.normalize_by_default(name)
    if key["num_units"] > STREAM_ABOVE_UNITS:
        tok, mels, feats, taken = _fit_streamed(
            sources, key, extractor, normalize, min_per_unit, progress
        )
    else:
        mels, feats, taken = _fit_examples(sources, key, extractor, None, min_per_unit)
        tok = UnitTokenizer.fit(
            feats,
            num_units=key["num_units"],
            seed=key["seed"],
            iters=key["kmeans_iters"],
            extractor=None if extractor is None else extractor.spec,
            normalize=normalize,
        )
    voc = vocoder_lib.UnitVocoder.fit(
        [tok.encode_features(f) for f in feats],
        mels,
        steps=key["vocoder_steps"],
        seed=key["seed"],
        num_units=tok.num_units,
        progress=progress,
    )
    out_dir = io_lib.as_path(out_dir)
    tok.save(out_dir / "tokenizer")
    voc.save(out_dir / "vocoder")
    info = {
        "key": key,
        "fit_seconds_of_audio": taken / audio_lib.SAMPLE_RATE,
        "seconds": time.time() - t0,
    }
    io_lib.write_text_atomic(out_dir / "fit_info.json", json.dumps(info, indent=2))
    logging.info(
        "Fitted %d %s units + vocoder on %.1f min of audio in %.1f s",
        tok.num_units,
        tok.features,
        taken / audio_lib.SAMPLE_RATE / 60,
        time.time() - t0,
    )
    return info


def hours(tokens: int) -> float:
    """Hours of audio in `tokens` 25 Hz units."""
    return tokens / UNIT_RATE / 3600
