r"""Fit k-means speech units on features of a folder of audio.

  python tools/fit_units.py --audio_dir=/data/LibriSpeech/train-clean-100 --features=hubert \
      --hubert_dir=/models/hubert-base-ls960 --layer=6 --num_units=500 --out=/units/hb500 \
      [--max_hours=100] [--batch_size=8192] [--epochs=10] [--seed=0]

`--audio_dir` is any folder of .wav/.flac files (searched recursively, see
`avjax.data.speech.corpus.scan_audio_dir`; files are decoded and resampled to 16 kHz). `--features`
picks the extractor (`avjax.data.speech.features`), all at 25 Hz (one vector per unit, what the
vocoder and training windows expect): `logmel` (320-dim), `mfcc` (156-dim) or `hubert` (layer
`--layer` of the HF HuBERT checkpoint in the local directory `--hubert_dir`, its 50 Hz frames
stacked 2 per unit: 1536-dim for HuBERT base; nothing is downloaded). Files are taken in a
seeded random order until `--max_hours` of audio (default: all); `--splits` picks which of
scan_audio_dir's splits to use. `--layer` is `config.data.hubert_layer` of the training config.

Features are written to `.npy` shards in a temporary folder as they are computed (never all
in memory), normalised per dimension for logmel/mfcc (`--normalize=auto`; HuBERT features are
clustered as they are, as GSLM does), then clustered with mini-batch k-means in JAX over all
devices, streamed from the shards (`avjax.data.speech.kmeans`). Fewer than `--min_vectors_per_unit`
(default 30, as `data.min_vectors_per_unit`) vectors per unit are refused before k-means: a
centroid from m points is off by ~1/sqrt(m) of its cluster's spread. Writes to `--out`:

  tokenizer.npz, tokenizer.json   `avjax.data.speech.units.UnitTokenizer.save` format (centroids
                                  in the normalised space, mean, std, and under "extractor" the
                                  features: name, layer, hubert_dir, ...); `UnitTokenizer.load`
                                  + `encode` (and tools/tokenize_corpus.py) use the same ones
  fit_info.json                   files, hours, frames, timings, throughput, inertia

and prints the throughput: hours of audio per minute for feature extraction and for k-means.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_TOOLS = os.path.dirname(os.path.abspath(__file__))
# Run as a script, tools/ is sys.path[0], where a tools/tokenize.py would shadow the standard
# library's `tokenize` (imported later by jax): drop it, add the repository root instead.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _TOOLS]
sys.path.insert(0, os.path.dirname(_TOOLS))


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--audio_dir", required=True, help="folder of .wav/.flac files (recursive)")
    ap.add_argument("--features", default="logmel", help="logmel | mfcc | hubert")
    ap.add_argument("--hubert_dir", default="", help="local HF HuBERT dir (--features=hubert)")
    ap.add_argument("--layer", type=int, default=6, help="HuBERT layer (--features=hubert)")
    ap.add_argument("--num_units", type=int, default=500, help="k")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--max_hours", type=float, default=None, help="audio to use (default: all)")
    ap.add_argument("--splits", default="train", help="comma list of splits, or 'all'")
    ap.add_argument("--normalize", default="auto", choices=("auto", "true", "false"))
    ap.add_argument("--batch_size", type=int, default=8192, help="k-means mini-batch")
    ap.add_argument("--epochs", type=float, default=10.0, help="k-means passes over the frames")
    ap.add_argument(
        "--min_vectors_per_unit",
        type=int,
        default=30,
        help="refuse fewer 25 Hz vectors per unit (0: no check), as data.min_vectors_per_unit",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.num_units < 2:
        raise ValueError(f"--num_units must be >= 2, got {args.num_units}")
    if args.max_hours is not None and args.max_hours <= 0:
        raise ValueError(f"--max_hours must be positive, got {args.max_hours}")
    return args


def _choose_files(args: argparse.Namespace, progress: bool) -> tuple[list, float]:
    """The files taken (seeded order, up to --max_hours) and their seconds of audio."""
    import numpy as np

    from avjax.data.speech.corpus import scan_audio_dir

    utts = scan_audio_dir(args.audio_dir, progress=progress)
    if args.splits != "all":
        splits = {s.strip() for s in args.splits.split(",") if s.strip()}
        utts = [u for u in utts if u.split in splits]
        if not utts:
            raise ValueError(f"{args.audio_dir}: no files in splits {sorted(splits)}")
    order = np.random.default_rng(args.seed).permutation(len(utts))
    chosen, seconds = [], 0.0
    for i in order:
        if args.max_hours is not None and seconds >= args.max_hours * 3600:
            break
        chosen.append(utts[i])
        seconds += utts[i].duration
    return chosen, seconds


def _extract(extractor, chosen: list, seconds: float, shard_dir: str, progress: bool):
    """Every chosen file's features `[units, dim]` appended to `.npy` shards in `shard_dir`
    (never all in memory); returns the shards (`kmeans.NpyShards`)."""
    from tqdm import tqdm

    from avjax.data import audio as audio_lib
    from avjax.data.speech import kmeans as kmeans_lib

    writer = kmeans_lib.ShardWriter(shard_dir)
    bar = tqdm(
        total=round(seconds, 1), unit="s", desc=f"{extractor.name} features", disable=not progress
    )
    for u in chosen:
        f = extractor(audio_lib.load_audio(u.audio_path))
        if len(f):
            writer.append(f)
        bar.update(round(u.duration, 1))
    bar.close()
    if writer.rows == 0:
        raise ValueError(f"the {len(chosen)} chosen files gave no {extractor.name} frames")
    return writer.close()


def _streamed_inertia(shards, centroids, mean, std, rows: int = 65_536) -> float:
    """Mean squared distance of every (normalised) vector to its nearest centroid, read from
    the shards a chunk at a time."""
    from avjax.data.speech import kmeans as kmeans_lib

    total, n = 0.0, len(shards)
    for a in range(0, n, rows):
        x = (shards.read(a, min(a + rows, n)) - mean) / std
        total += kmeans_lib.mean_sq_distance(x, centroids) * len(x)
    return total / max(n, 1)


def main(argv: list[str] | None = None) -> dict:
    args = _args(argv)
    import tempfile

    from avjax.data.speech import features as features_lib
    from avjax.data.speech import kmeans as kmeans_lib
    from avjax.data.speech.units import UnitTokenizer

    progress = not args.no_progress
    extractor = features_lib.get_extractor(
        args.features, hubert_dir=args.hubert_dir or None, layer=args.layer
    )
    chosen, seconds = _choose_files(args, progress)
    normalize = args.normalize == "true" or (
        args.normalize == "auto" and features_lib.normalize_by_default(extractor.name)
    )
    with tempfile.TemporaryDirectory(prefix="avjax-fit-units-") as tmp:
        t0 = time.time()
        shards = _extract(extractor, chosen, seconds, tmp, progress)
        t_feat = time.time() - t0
        if len(shards) < args.num_units:
            raise ValueError(
                f"{len(shards)} {extractor.name} frames from {len(chosen)} files are fewer than "
                f"--num_units={args.num_units}; give more audio"
            )
        kmeans_lib.check_enough_vectors(
            len(shards),
            args.num_units,
            minimum=args.min_vectors_per_unit,
            rate=extractor.frame_rate,
            audio_minutes=seconds / 60,
        )
        mean, std = kmeans_lib.source_stats(shards, normalize)
        result = kmeans_lib.fit_minibatch_kmeans(
            shards,
            args.num_units,
            batch_size=args.batch_size,
            epochs=args.epochs,
            seed=args.seed,
            progress=progress,
            mean=mean,
            std=std,
        )
        full_inertia = _streamed_inertia(shards, result.centroids, mean, std)
        frames = len(shards)
    tok = UnitTokenizer(result.centroids, mean, std, extractor=extractor.spec)
    tok.save(args.out)
    info = _report(args, extractor, chosen, seconds, frames, normalize, result, t_feat)
    info["inertia"] = full_inertia
    with open(os.path.join(args.out, "fit_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    _print_summary(args, extractor, info)
    return info


def _report(args, extractor, chosen, seconds, frames, normalize, result, t_feat) -> dict:
    """`fit_info.json`'s fields: what was fitted on, and the throughput."""
    from avjax.data.speech import kmeans as kmeans_lib

    hours = seconds / 3600
    return {
        "audio_dir": os.path.abspath(args.audio_dir),
        "features": extractor.spec,
        "feature_dim": extractor.dim,
        "frame_rate": extractor.frame_rate,
        "files": len(chosen),
        "hours": hours,
        "frames": frames,
        "num_units": args.num_units,
        "normalized": normalize,
        "kmeans_steps": result.steps,
        "kmeans_devices": len(kmeans_lib.data_mesh().devices.flat),
        "batch_inertia_first_last": [result.inertia[0], result.inertia[-1]],
        "used_units": int((result.counts > 0).sum()),
        "seconds": {"features": t_feat, "kmeans": result.seconds},
        "hours_per_minute": {
            "features": hours / max(t_feat / 60, 1e-9),
            "kmeans": hours / max(result.seconds / 60, 1e-9),
        },
        "kmeans_points_per_second": result.steps * result.batch_size / max(result.seconds, 1e-9),
    }


def _print_summary(args, extractor, info: dict) -> None:
    print(
        f"{extractor.name}: {info['files']} files, {info['hours']:.3f} h, {info['frames']} "
        f"frames x {extractor.dim} in {info['seconds']['features']:.1f} s "
        f"({info['hours_per_minute']['features']:.2f} h of audio / min)"
    )
    print(
        f"k-means: {args.num_units} units, {info['kmeans_steps']} steps on "
        f"{info['kmeans_devices']} devices in {info['seconds']['kmeans']:.1f} s "
        f"({info['hours_per_minute']['kmeans']:.2f} h of audio / min), inertia "
        f"{info['inertia']:.4g}; wrote {os.path.abspath(args.out)}"
    )


if __name__ == "__main__":
    main()
