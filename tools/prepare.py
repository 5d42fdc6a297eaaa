r"""Corpus-scale preparation with Apache Beam: one command per stage (`pip install avjax[beam]`).

  # 1. the TFDS dataset of a corpus (into the cache folder training looks in)
  python tools/prepare.py --stage=tfds --config=configs/speechssm.py \
      --config.data.name=librispeech --config.data.manual_dir=/data/librispeech
  # 2. units of an already fitted tokenizer -> ArrayRecord shards + token stores
  python tools/prepare.py --stage=tokens --config=configs/speechssm.py \
      --config.data.name=librispeech --config.data.manual_dir=/data/librispeech \
      --workdir=/runs/speechssm            # tokenizer: <workdir>/units/tokenizer
  python tools/prepare.py --stage=tokens --dir=/my/audio --tokenizer=T --out=/my/units
  # 3. face and mouth crops of a video folder
  python tools/prepare.py --stage=crops --input=/data/lrs3/pretrain --out=/data/lrs3_crops

Runner: `--runner=DirectRunner` (default; `--num_workers` local processes, default: all
cores), or `DataflowRunner | FlinkRunner | SparkRunner` with their Beam flags after ours
(`--project=... --region=... --temp_location=gs://...`, `--flink_master=...`, ...): any flag
this tool does not know goes to Beam. `launch/prepare_dataflow.py` prints a Dataflow recipe.

`--config` is a training config (`path[:arg]`) with `--config.data.<field>=value` overrides;
the stages read `data.name, manual_dir, builder_config, skip_bad, cache_dir, num_shards,
join_documents` from it (and `data.hubert_batch_size`, default 1: HuBERT chunks encoded per
device call in stage `tokens`, see `avjax/data/beam/hubert_batch.py`), so the outputs land
where that training run looks: the TFDS build in `<cache>/tfds/<name>-<fingerprint>` and
the tokens in `<workdir>/units/tokens-<tokenizer fingerprint>` (with `--workdir`). Every stage is
idempotent (a rerun redoes only missing outputs) and writes `prepare-<stage>.json` (the
artifact key and the run's report) into its output folder. Prints the report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Any

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _TOOLS]
sys.path.insert(0, os.path.dirname(_TOOLS))

DATA_DEFAULTS = {
    "name": "",
    "manual_dir": "",
    "builder_config": "",
    "skip_bad": False,
    "cache_dir": "",
    "num_shards": 0,
    "join_documents": True,
    "hubert_batch_size": 1,
}


def load_config(spec: str, overrides: list[str]) -> dict[str, Any]:
    """`data` fields of the config file `path[:arg]` with `--config.data.x=v` overrides."""
    data = dict(DATA_DEFAULTS)
    if spec:
        path, _, arg = spec.partition(":")
        mod_spec = importlib.util.spec_from_file_location("_prepare_config", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        config = module.get_config(arg) if arg else module.get_config()
        data.update({k: config.data[k] for k in DATA_DEFAULTS if k in config.data})
    for item in overrides:
        key, _, value = item[len("--config.") :].partition("=")
        field = key.removeprefix("data.")
        if field not in DATA_DEFAULTS or not key.startswith("data."):
            raise SystemExit(f"{item}: prepare.py reads only --config.data.{{{','.join(data)}}}")
        old = data[field]
        data[field] = value.lower() in ("1", "true") if isinstance(old, bool) else type(old)(value)
    return data


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stage", required=True, choices=["tfds", "tokens", "crops"])
    p.add_argument("--config", default="", help="training config path[:arg] (data.* fields)")
    p.add_argument("--runner", default="DirectRunner", help="Beam runner")
    p.add_argument("--num_workers", type=int, default=os.cpu_count() or 1, help="DirectRunner")
    p.add_argument("--data_dir", default="", help="TFDS data_dir (default: training's cache)")
    p.add_argument("--workdir", default="", help="tokens: the training workdir to fill")
    p.add_argument("--tokenizer", default="", help="tokens: fitted UnitTokenizer folder")
    p.add_argument("--dir", default="", help="tokens: a folder of audio instead of a corpus")
    p.add_argument("--splits", default="", help="tokens: comma-separated splits (default: all)")
    p.add_argument("--no_consolidate", action="store_true", help="tokens: no token stores")
    p.add_argument("--out", default="", help="tokens / crops output folder")
    p.add_argument("--input", action="append", default=[], help="crops: video file or folder")
    p.add_argument("--predictor", default=None, help="crops: 68-point dlib predictor")
    p.add_argument("--smooth_window", type=int, default=5, help="crops: landmark smoothing")
    p.add_argument("--crf", type=int, default=18, help="crops: x264 quality")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _parser()
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    beam_args = [a for a in rest if not a.startswith("--config.")]
    data = load_config(args.config, overrides)
    run = dict(runner=args.runner, num_workers=args.num_workers, beam_args=beam_args)
    if args.stage == "tfds":
        report = _tfds(p, data, args, run)
    elif args.stage == "tokens":
        report = _tokens(p, data, args, run)
    else:
        report = _crops(p, args, run)
    print(json.dumps(report, indent=1))
    return report


def _tfds(p: Any, data: dict[str, Any], args: Any, run: dict[str, Any]) -> dict[str, Any]:
    from avjax.data.beam import tfds_build

    if not data["name"] or not data["manual_dir"]:
        p.error("--stage=tfds needs --config.data.name and --config.data.manual_dir")
    return tfds_build.build_tfds(
        data["name"],
        data["manual_dir"],
        data_dir=args.data_dir,
        cache=data["cache_dir"],
        config=data["builder_config"],
        skip_bad=data["skip_bad"],
        **run,
    )


def _tokens(p: Any, data: dict[str, Any], args: Any, run: dict[str, Any]) -> dict[str, Any]:
    from avjax.data.beam import tfds_build
    from avjax.data.beam import tokens as beam_tokens
    from avjax.data.speech import tokenize
    from avjax.data.speech.units import UnitTokenizer

    tok_dir = args.tokenizer or (
        os.path.join(args.workdir, "units", "tokenizer") if args.workdir else ""
    )
    if not tok_dir:
        p.error("--stage=tokens needs --tokenizer (or --workdir holding units/tokenizer)")
    tok = UnitTokenizer.load(tok_dir)
    out = args.out or (
        os.path.join(args.workdir, "units", f"tokens-{tokenize.tokenizer_fingerprint(tok)}")
        if args.workdir
        else ""
    )
    if not out:
        p.error("--stage=tokens needs --out (or --workdir)")
    if args.dir:
        sources = {"audio": tokenize.DirSource(args.dir)}
        ids = {"audio": f"dir:{os.path.abspath(args.dir)}"}
    else:
        if not data["name"] or not data["manual_dir"]:
            p.error("--stage=tokens needs --dir, or --config.data.name and .manual_dir")
        data_dir = args.data_dir or tfds_build.default_data_dir(
            data["cache_dir"] or tfds_build.default_cache(),
            data["name"],
            os.path.abspath(os.path.expanduser(data["manual_dir"])),
            data["skip_bad"],
        )
        src = beam_tokens.TfdsSource(data["name"], data_dir, data["builder_config"])
        builder = src.builder()
        sources = {s: src for s in builder.info.splits}
        ids = {s: beam_tokens.source_id_for(builder, data_dir, s) for s in sources}
    wanted = [s for s in args.splits.split(",") if s] or list(sources)
    unknown = sorted(set(wanted) - set(sources))
    if unknown:
        p.error(f"unknown split(s) {unknown}: there are {sorted(sources)}")
    return beam_tokens.run_tokens(
        {s: sources[s] for s in wanted},
        tok_dir,
        out,
        source_ids={s: ids[s] for s in wanted},
        num_shards=int(data["num_shards"]),
        consolidate=not args.no_consolidate,
        join_documents=bool(data["join_documents"]),
        hubert_batch_size=int(data["hubert_batch_size"]),
        **run,
    )


def _crops(p: Any, args: Any, run: dict[str, Any]) -> dict[str, Any]:
    from avjax.data.beam import crops as beam_crops
    from avjax.data.video import crops

    if not args.input or not args.out:
        p.error("--stage=crops needs --input (repeatable) and --out")
    spec = importlib.util.spec_from_file_location(
        "_preprocess_video", os.path.join(_TOOLS, "preprocess_video.py")
    )
    listing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(listing)  # its find_videos: the same outputs for the same inputs
    jobs = listing.find_videos(args.input, args.out)
    config = crops.CropConfig(smooth_window=args.smooth_window, crf=args.crf)
    return beam_crops.run_crops(jobs, args.out, predictor=args.predictor, config=config, **run)


if __name__ == "__main__":
    report = main()
    sys.exit(1 if report.get("error") else 0)
