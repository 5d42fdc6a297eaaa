r"""Tokenise a corpus into 25 Hz unit sequences (ArrayRecord), resumably, across processes.

A TFDS-built corpus (built here from --manual_dir if needed) or a plain audio folder:

  python tools/tokenize_corpus.py --corpus=librispeech --manual_dir=/data \
      --data_dir=~/.cache/avjax/tfds \
      --tokenizer=workdir/speechssm/units/tokenizer --out=/data/units --num_shards=64 \
      [--splits=train_clean_100,dev_clean] [--process_index=0 --process_count=8] [--skip_bad]
  python tools/tokenize_corpus.py --dir=/my/audio --tokenizer=... --out=/my/units

`--tokenizer` is a fitted `UnitTokenizer` folder (tokenizer.json + tokenizer.npz), e.g. the
`units/tokenizer` of a SpeechSSM workdir or a tools/fit_units.py output: units are computed on
the features it records (log-mel, MFCC or HuBERT; a HuBERT tokenizer needs its checkpoint
folder where it was when fitted). Process i of N writes shards s with s % N == i;
shards with a `.done` marker are skipped, so rerunning the same command resumes. Prints the
throughput in hours of audio per minute per process (one process per core) and per CPU
minute. Layout of the output: see `avjax/data/speech/tokenize.py`.

`--consolidate` (process 0, once every shard of a split is done) also writes each split's
memory-mapped token store (`avjax/data/speech/token_store.py`, what training reads; documents
joined per chapter / file unless `--no_join_documents`) and prints its speed; training
reuses a store that matches the shards.
"""

from __future__ import annotations

import argparse
import os
import sys

# This file's folder must not shadow the standard library's `tokenize` (imported by
# linecache, inspect, ...): replace it on sys.path by the repository root.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", default="", help="librispeech | librilight | librispeech_long")
    p.add_argument("--manual_dir", default="", help="the corpus on disk (real layout)")
    p.add_argument("--data_dir", default="", help="TFDS data dir (default ~/.cache/avjax/tfds)")
    p.add_argument("--builder_config", default="", help="e.g. cut4min | cut30s | full (LibriLight)")
    p.add_argument("--skip_bad", action="store_true", help="skip and count bad audio files")
    p.add_argument("--dir", default="", help="a folder of .wav/.flac instead of --corpus")
    p.add_argument("--tokenizer", required=True, help="fitted UnitTokenizer folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--splits", default="", help="comma-separated splits (default: all)")
    p.add_argument("--num_shards", type=int, default=0, help="0: ~2,000 examples per shard")
    p.add_argument("--process_index", type=int, default=0)
    p.add_argument("--process_count", type=int, default=1)
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--consolidate", action="store_true", help="also write the token stores")
    p.add_argument("--no_join_documents", action="store_true", help="stores: one doc per record")
    args = p.parse_args(argv)
    if bool(args.corpus) == bool(args.dir):
        p.error("give exactly one of --corpus (with --manual_dir) or --dir")
    if not 0 <= args.process_index < args.process_count:
        p.error(f"--process_index={args.process_index} not in [0, {args.process_count})")

    from avjax.data.speech import tokenize
    from avjax.data.speech.units import UnitTokenizer

    tok = UnitTokenizer.load(args.tokenizer)
    print(f"tokenizer: {tok.num_units} units on {tok.features} features ({args.tokenizer})")
    if args.dir:
        sources = {"audio": tokenize.DirSource(args.dir, progress=not args.no_progress)}
        source_ids = {"audio": f"dir:{os.path.abspath(args.dir)}"}
    else:
        from avjax.data import tfds as corpora

        data_dir = args.data_dir or os.path.join(
            os.environ.get("AVJAX_CACHE") or os.path.expanduser("~/.cache/avjax"), "tfds"
        )
        builder = corpora.build(
            args.corpus,
            args.manual_dir,
            data_dir,
            skip_bad=args.skip_bad,
            config=args.builder_config or None,
        )
        names = list(builder.info.splits)
        sources = {n: builder.as_data_source(split=n) for n in names}
        # Keyed as training keys them, so a workdir reuses these shards.
        source_ids = {n: tokenize.tfds_source_id(builder, data_dir, n) for n in names}
    wanted = [s for s in args.splits.split(",") if s] or list(sources)
    unknown = [s for s in wanted if s not in sources]
    if unknown:
        p.error(f"unknown split(s) {unknown}: this corpus has {sorted(sources)}")
    total = tokenize.TokenizeStats()
    for split in wanted:
        stats = tokenize.tokenize_split(
            sources[split],
            tok,
            args.out,
            split,
            num_shards=args.num_shards,
            process_index=args.process_index,
            process_count=args.process_count,
            source_id=source_ids[split],
            progress=not args.no_progress,
        )
        print(f"{split}: {stats.summary()}")
        for f in ("shards_done", "shards_skipped", "examples", "tokens"):
            setattr(total, f, getattr(total, f) + getattr(stats, f))
        for f in ("audio_seconds", "wall_seconds", "cpu_seconds"):
            setattr(total, f, getattr(total, f) + getattr(stats, f))
    print(f"total: {total.summary()}")
    if args.consolidate and args.process_index == 0:
        from avjax.data.speech import token_store

        for split in wanted:
            if tokenize.split_status(args.out, split)[1]:
                print(f"{split}: shards of other processes unfinished, not consolidated")
                continue
            st = token_store.consolidate(
                args.out,
                split,
                num_units=tok.num_units,
                join_documents=not args.no_join_documents,
                progress=not args.no_progress,
            )
            how = "reused" if st.reused else f"{st.tokens_per_second / 1e6:.1f} M tokens/s"
            print(f"{split}: token store {st.path} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
