"""Speech LM data preparation, step by step: corpus -> units + vocoder -> token documents.

Used through the data module of spoken LMs (`avjax.data.speech.speech_lm.SpeechLMData`, which the
SpeechSSM and SpeechTransformer tasks compose): `prepare_speech(config.data, ctx)` returns
the unit tokenizer, the unit vocoder and the train / held-out documents (int32 unit sequences,
or memory-mapped `TokenStore`s for real corpora). Every step is a prepared artifact
(`avjax.data.artifacts`):

  artifact                          where                                   built by
  default corpus (espeak stories)   <cache>/default_corpus_<m>min           each filesystem's
  TFDS dataset of a real corpus     <cache>/tfds/<name>-<fingerprint>       group leader
  units: tokenizer, vocoder (+ the  <workdir>/units                         process 0
    corpus' units for default/dir)
  tokenised shards, token stores    <workdir>/units/tokens-<tokenizer>/     all / process 0
                                    (<cache>/tokens/... for a gs:// workdir)

Multi-process jobs: the workdir must be one filesystem shared by every process (checked up
front, `artifacts.require_shared`). The cache may be node-local: each host's group builds its
own copy; a shared cache is built once. The builds are deterministic up to a few samples
of espeak-ng output per utterance: the units key the default corpus by its parameters, and
every process reads the units that process 0 fitted (`units.npz`), so all train on the same
sequences.

Units never change under a checkpoint: once `<workdir>/checkpoints/<step>` exists, a units
artifact that this run's config or data would make differently is an error naming the fields
that differ (`data.refit_units=True` there is an error too: it asks for a new workdir; in a
workdir without checkpoints it refits). Read-only runs (sampling, evaluation) never write to
the workdir: missing units or token stores are errors naming the path. They may still build
the cache (a corpus is deterministic; the units' key checks it is the one trained on).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from avjax import io as io_lib
from avjax.data import artifacts

CORPUS_NAMES = ("default", "dir", "librispeech", "librilight", "librispeech_long")


def has_checkpoint(workdir: io_lib.PathLike) -> bool:
    """Whether `workdir/checkpoints` holds a finished checkpoint (a `<step>` folder)."""
    ckpt = io_lib.as_path(workdir) / "checkpoints"
    try:
        return any(p.name.isdigit() and p.is_dir() for p in ckpt.iterdir())
    except (OSError, FileNotFoundError, NotADirectoryError):
        return False


@dataclasses.dataclass
class Context:
    """Where and how one process prepares data.

    Attributes:
      workdir: the experiment folder (local or remote).
      cache: the corpus cache (local).
      seed: the config's seed (k-means, vocoder, held-out choice).
      read_only: never write to the workdir (sampling, evaluation).
      refit_units: rebuild the units even when current (refused under a checkpoint).
      processes: the job's processes (default: jax's).
    """

    workdir: epath.Path
    cache: epath.Path
    seed: int = 0
    read_only: bool = False
    refit_units: bool = False
    processes: artifacts.Processes | None = None
    _groups: dict[str, artifacts.Group] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir, self.cache = io_lib.as_path(self.workdir), io_lib.as_path(self.cache)
        if self.processes is None:
            self.processes = artifacts.JaxProcesses()

    def group(self, root: epath.Path, read_only: bool = False) -> artifacts.Group:
        """The processes sharing `root`'s filesystem (computed once per root; collective)."""
        if str(root) not in self._groups:
            self._groups[str(root)] = artifacts.filesystem_group(
                root, self.processes, read_only=read_only
            )
        return self._groups[str(root)]

    def workdir_group(self) -> artifacts.Group:
        """All processes; raises SharedFilesystemError when the workdir is not shared."""
        group = self.group(self.workdir, read_only=self.read_only)
        artifacts.require_shared(group, self.workdir, "--workdir")
        return group

    def units_options(self) -> dict[str, Any]:
        """`prepare_artifact` options of the workdir's units (frozen under a checkpoint)."""
        frozen_by = ""
        if has_checkpoint(self.workdir):
            frozen_by = f"the checkpoints in {self.workdir / 'checkpoints'}"
            if self.refit_units:
                raise artifacts.ArtifactMismatchError(
                    f"config.data.refit_units=True, but {frozen_by} were trained on the units "
                    f"in {self.workdir / 'units'}: refit them in a new --workdir"
                )
        return {
            "group": self.workdir_group(),
            "processes": self.processes,
            "read_only": self.read_only,
            "frozen_by": frozen_by,
            "force": self.refit_units and not self.read_only,
        }


@dataclasses.dataclass
class Prepared:
    """What `prepare_speech` returns: units, vocoder, documents, facts for the log."""

    tokenizer: Any
    vocoder: Any
    docs: dict[str, Any]  # "train" / "heldout": sequences of int `[tokens]` arrays
    extra: dict[str, Any]


def prepare_speech(dc: Any, ctx: Context) -> Prepared:
    """The corpus of `config.data` as units (see the module docstring)."""
    if dc.name not in CORPUS_NAMES:
        raise ValueError(
            f"config.data.name={dc.name!r}: expected one of {', '.join(CORPUS_NAMES)} "
            "('default' = embedded corpus, 'dir' = your audio folder in data.manual_dir, "
            "the others = that corpus in its own layout in data.manual_dir)"
        )
    if dc.name in ("default", "dir"):
        return prepare_local(dc, ctx)
    return prepare_tfds(dc, ctx)


# --- the default corpus and audio folders ----------------------------------------------------


def prepare_local(dc: Any, ctx: Context) -> Prepared:
    """The default corpus or a folder of audio: log-mel units of every file, in memory."""
    from avjax.data.speech import corpus as corpus_lib
    from avjax.data.speech import units as units_lib

    if str(dc.get("features", "logmel")) != "logmel":
        raise ValueError(
            f"config.data.features={dc.features!r} is for the real corpora (librispeech, "
            f"librilight, librispeech_long); data.name={dc.name!r} uses log-mel units"
        )
    if dc.name == "dir" and not dc.manual_dir:
        raise ValueError("config.data.name='dir' needs --config.data.manual_dir=DIR")
    units_options = ctx.units_options()  # (shared workdir and frozen units: checked first)
    if dc.name == "default":
        utts = corpus_lib.build_default_corpus(
            ctx.cache / f"default_corpus_{dc.minutes:g}min",
            minutes=float(dc.minutes),
            heldout_fraction=float(dc.heldout_fraction),
            group=ctx.group(ctx.cache),
        )
        chosen_by = {k: dc[k] for k in ("name", "minutes", "heldout_fraction")}
        corpus_key = corpus_lib.default_corpus_key(float(dc.minutes), float(dc.heldout_fraction))
    else:
        utts = corpus_lib.scan_audio_dir(dc.manual_dir, heldout_fraction=float(dc.heldout_fraction))
        chosen_by = {k: dc[k] for k in ("name", "manual_dir", "heldout_fraction")}
        chosen_by["files"] = len(utts)
        corpus_key = None  # (a hash of the files' names, splits and lengths)
    tokenizer, vocoder, units = units_lib.prepare_units(
        utts,
        ctx.workdir / "units",
        num_units=int(dc.num_units),
        seed=ctx.seed,
        kmeans_iters=int(dc.kmeans_iters),
        vocoder_steps=int(dc.vocoder_steps),
        corpus_key=corpus_key,
        context={"data": chosen_by},
        **units_options,
    )
    docs: dict[str, dict[str, list]] = {"train": {}, "heldout": {}}
    for u in utts:  # utterances are listed in document order
        docs[u.split].setdefault(u.doc_id, []).append(units[u.id])
    joined = {
        split: [np.concatenate(parts).astype(np.int32) for parts in d.values()]
        for split, d in docs.items()
    }
    return Prepared(tokenizer, vocoder, joined, {})


# --- real corpora through TFDS ---------------------------------------------------------------


def choose_splits(
    available: list[str], train_splits: str, eval_split: str
) -> tuple[list[str], str]:
    """(train splits, eval split or "") from config strings; "" picks automatically.

    Automatic: train = the `train*` splits (all but the eval split when there are none);
    eval = `dev_clean` if present, else the first `dev*` / `test*` split; "" when nothing
    is left (then whole train documents are held out by `data.heldout_fraction`).
    """
    wanted = [s for s in train_splits.split(",") if s]
    for s in [*wanted, *([eval_split] if eval_split else [])]:
        if s not in available:
            raise ValueError(f"split {s!r} not in this corpus: it has {sorted(available)}")
    if not eval_split:
        candidates = ["dev_clean"] + [s for s in available if s.startswith(("dev", "test"))]
        eval_split = next((s for s in candidates if s in available and s not in wanted), "")
    if not wanted:
        wanted = [s for s in available if s.startswith("train")] or [
            s for s in available if s != eval_split
        ]
    if not wanted:
        wanted, eval_split = [eval_split], ""
    return wanted, eval_split


def prepare_tfds(dc: Any, ctx: Context) -> Prepared:
    """A real corpus: TFDS build from manual_dir, unit fit, tokenising, token stores.

    The TFDS dataset goes to `<cache>/tfds/<name>-<fingerprint of manual_dir>`; the
    tokenizer and vocoder (fitted on up to `data.fit_minutes` of train audio) to
    `workdir/units/`; the unit sequences to `workdir/units/tokens-<tokenizer>/<split>/`
    (ArrayRecord shards, resumable, each process writes its share), then consolidated once
    into a memory-mapped `TokenStore` per split (`avjax.data.speech.token_store`): training reads
    windows from the map, so a 60k-hour corpus never sits in RAM. Documents are the corpus'
    chapters / files (utterances joined when `data.join_documents`). Units come from
    `data.features` (logmel | mfcc | hubert with `data.hubert_dir`, `data.hubert_layer`).
    """
    units_options = ctx.units_options()
    builder, data_dir, tag, skipped = tfds_dataset(dc, ctx)
    train_splits, eval_split = choose_splits(
        list(builder.info.splits), dc.train_splits, dc.eval_split
    )
    sources = {n: builder.as_data_source(split=n) for n in train_splits}
    if eval_split:
        sources[eval_split] = builder.as_data_source(split=eval_split)
    from avjax.data.speech.tokenize import tfds_source_id

    source_id = tfds_source_id(builder, data_dir)  # (as units were keyed before)
    tokenizer, vocoder = fit_tfds_units(
        dc,
        ctx,
        [sources[n] for n in train_splits],
        source_id + ":" + ",".join(train_splits),
        tag,
        units_options,
    )
    tokens_dir, group = tokens_location(ctx, tokenizer, tag)
    stats = tokenize_sources(dc, ctx, sources, tokenizer, tokens_dir, group, source_id)
    stores, consolidate_s = token_stores(dc, ctx, sources, tokenizer.num_units, tokens_dir, group)
    docs = split_documents(dc, ctx.seed, stores, train_splits, eval_split)
    num_skipped = sum(len(v) for v in skipped.values())
    extra = {
        "corpus": dc.name,
        "tfds_dir": builder.data_dir,
        "train_splits": train_splits,
        "eval_split": eval_split or f"heldout_fraction={dc.heldout_fraction:g} of train",
        "skipped_bad_files": num_skipped,
        "tokens_dir": str(tokens_dir),
        "token_stores": {n: stores[n].paths[0] for n in stores},
    }
    if consolidate_s:
        extra["consolidate_seconds"] = consolidate_s
    done = [s for s in stats.values() if s.shards_done]
    if done:
        audio = sum(s.audio_seconds for s in done)
        cpu = sum(s.cpu_seconds for s in done)
        wall = sum(s.wall_seconds for s in done)
        extra["tokenize_hours_per_cpu_minute"] = audio / 3600 / max(cpu / 60, 1e-9)
        extra["tokenize_hours_per_minute"] = audio / 3600 / max(wall / 60, 1e-9)
    return Prepared(tokenizer, vocoder, docs, extra)


def _tfds_manual_dir(dc: Any) -> str:
    """The corpus folder (local, absolute); LayoutError when missing."""
    from avjax.data import tfds as corpora

    cls = corpora.builder_class(dc.name)
    if not dc.manual_dir:
        raise corpora.LayoutError(
            dc.name,
            "",
            f"config.data.name={dc.name!r} needs --config.data.manual_dir=DIR",
            cls.LAYOUT,
        )
    manual_dir = os.path.abspath(os.path.expanduser(dc.manual_dir))
    if not os.path.isdir(manual_dir):
        raise corpora.LayoutError(cls.CORPUS, manual_dir, "the folder does not exist", cls.LAYOUT)
    return manual_dir


def tfds_dataset(dc: Any, ctx: Context) -> tuple[Any, epath.Path, str, dict[str, list[str]]]:
    """(TFDS builder, its data_dir, cache tag, {split: skipped bad files}) of the corpus,
    built once per filesystem group into `<cache>/tfds/<name>-<tag>`."""
    from avjax.data import tfds as corpora

    manual_dir = _tfds_manual_dir(dc)
    tag = corpora.manual_dir_fingerprint(manual_dir) + ("-skipbad" if dc.skip_bad else "")
    data_dir = ctx.cache / "tfds" / f"{dc.name}-{tag}"
    build = functools.partial(
        corpora.build,
        dc.name,
        manual_dir,
        skip_bad=bool(dc.skip_bad),
        config=dc.builder_config or None,
    )

    def build_into(tmp: epath.Path) -> dict[str, Any]:
        return {"skipped": build(os.fspath(tmp)).skipped}

    def adopt(path: epath.Path) -> dict[str, Any] | None:  # built before manifests
        try:
            return {"skipped": json.loads((path / "skipped.json").read_text())}
        except (OSError, ValueError):
            return None

    fields = {
        "corpus": dc.name,
        "manual_dir": manual_dir,
        "fingerprint": tag,
        "skip_bad": bool(dc.skip_bad),
        "builder_config": str(dc.builder_config or ""),
        "version": str(corpora.builder_class(dc.name).VERSION),
    }
    art = artifacts.prepare_artifact(
        data_dir,
        fields,
        build_into,
        what=f"the {dc.name} TFDS dataset",
        group=ctx.group(ctx.cache),
        adopt=adopt,
    )
    skipped = art.info.get("skipped", {})
    num_skipped = sum(len(v) for v in skipped.values())
    if num_skipped:
        logging.warning(
            "%s: %d bad files were skipped (data.skip_bad=True), e.g. %s",
            dc.name,
            num_skipped,
            next(v[0] for v in skipped.values() if v),
        )
    return build(os.fspath(data_dir)), data_dir, tag, skipped


def fit_tfds_units(
    dc: Any,
    ctx: Context,
    train_sources: list[Any],
    source_id: str,
    tag: str,
    units_options: dict[str, Any],
) -> tuple[Any, Any]:
    """The tokenizer and vocoder of `workdir/units`, fitted once by process 0."""
    from avjax.data.speech import tokenize

    return tokenize.fit_units(
        train_sources,
        ctx.workdir / "units",
        num_units=int(dc.num_units),
        seed=ctx.seed,
        kmeans_iters=int(dc.kmeans_iters),
        vocoder_steps=int(dc.vocoder_steps),
        max_minutes=float(dc.fit_minutes),
        min_vectors_per_unit=int(dc.get("min_vectors_per_unit", 30)),
        source_id=source_id,
        features=str(dc.get("features", "logmel")),
        hubert_dir=str(dc.get("hubert_dir", "")),
        hubert_layer=int(dc.get("hubert_layer", 6)),
        context={"data": {"name": dc.name, "manual_dir": dc.manual_dir, "fingerprint": tag}},
        **units_options,
    )


def tokens_location(ctx: Context, tokenizer: Any, tag: str) -> tuple[epath.Path, artifacts.Group]:
    """Where the tokenised shards and stores go, and the processes that share that place.

    Under `workdir/units` (shared by all) for a local workdir; in the local cache for a
    remote one (ArrayRecord and memory maps need local files), shared by each host's group.
    """
    from avjax.data.speech import tokenize

    fp = tokenize.tokenizer_fingerprint(tokenizer)
    if not io_lib.is_remote(ctx.workdir):
        return ctx.workdir / "units" / f"tokens-{fp}", ctx.workdir_group()
    return ctx.cache / "tokens" / f"{tag}-{fp}", ctx.group(ctx.cache)


def tokenize_sources(
    dc: Any,
    ctx: Context,
    sources: dict[str, Any],
    tokenizer: Any,
    tokens_dir: epath.Path,
    group: artifacts.Group,
    source_id: str,
) -> dict[str, Any]:
    """Tokenises this process's share of every split's shards (resumable); waits for all.

    Read-only runs tokenise nothing (their stores must already be there)."""
    from avjax.data.speech import tokenize

    if ctx.read_only:
        return {}
    stats = {}
    for split, source in sources.items():
        stats[split] = tokenize.tokenize_split(
            source,
            tokenizer,
            os.fspath(tokens_dir),
            split,
            num_shards=int(dc.num_shards),
            process_index=group.rank,
            process_count=group.size,
            source_id=f"{source_id}:{split}",
        )
    for split in sources:
        tokenize.wait_for_split(os.fspath(tokens_dir), split)
    return stats


def token_stores(
    dc: Any,
    ctx: Context,
    sources: dict[str, Any],
    num_units: int,
    tokens_dir: epath.Path,
    group: artifacts.Group,
) -> tuple[dict[str, Any], float]:
    """({split: TokenStore}, consolidation seconds): the group leader consolidates each
    split once, the others wait; read-only runs only open them (or fail naming the path)."""
    from avjax.data.speech import token_store

    join, stores, seconds = bool(dc.join_documents), {}, 0.0
    for split in sources:
        path = token_store.store_path(os.fspath(tokens_dir), split, join)
        ready = functools.partial(
            token_store.is_current, os.fspath(tokens_dir), split, num_units, join
        )
        if ctx.read_only and not ready():
            raise artifacts.ArtifactMissingError(
                f"the token store of {split} at {path} is missing or out of date; this run is "
                "read-only (sample/eval) and builds nothing: train first with the same settings"
            )
        if group.is_leader and not ctx.read_only:
            seconds += token_store.consolidate(
                os.fspath(tokens_dir),
                split,
                num_units=num_units,
                join_documents=join,
                progress=True,
            ).seconds
        artifacts.wait_for(ready, path, f"the token store of {split}", builder=group.leader)
        stores[split] = token_store.TokenStore.open(path)
    return stores, seconds


def split_documents(
    dc: Any, seed: int, stores: dict[str, Any], train_splits: list[str], eval_split: str
) -> dict[str, Any]:
    """{"train": uint16 store views, "heldout": int32 copies}: the eval split, or whole train
    documents held out by `data.heldout_fraction` when there is none."""
    from avjax.data.speech import corpus as corpus_lib
    from avjax.data.speech import token_store

    train = token_store.TokenStore.concat([stores[n] for n in train_splits])
    if eval_split:
        heldout = stores[eval_split]
    else:
        ids = train.doc_ids
        held = corpus_lib._pick_heldout(ids, float(dc.heldout_fraction), seed)  # noqa: SLF001
        heldout = train.subset([i for i, d in enumerate(ids) if d in held])
        train = train.subset([i for i, d in enumerate(ids) if d not in held])
    # Training windows read uint16 views of the map; held-out documents (prompts,
    # evaluation) come as int32 copies, one document at a time.
    return {"train": train, "heldout": heldout.with_dtype(np.int32)}
