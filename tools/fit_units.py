r"""Fit k-means speech units on features of a folder of audio.

  python tools/fit_units.py --audio_dir=/data/LibriSpeech/train-clean-100 --features=hubert \
      --hubert_dir=/models/hubert-base-ls960 --layer=6 --num_units=500 --out=/units/hb500 \
      [--max_hours=100] [--batch_size=8192] [--epochs=10] [--seed=0]

`--audio_dir` is any folder of .wav/.flac files (searched recursively, see
`avjax.data.corpus.scan_audio_dir`; files are decoded and resampled to 16 kHz). `--features`
picks the extractor (`avjax.data.features`), all at 25 Hz (one vector per unit, what the
vocoder and training windows expect): `logmel` (320-dim), `mfcc` (156-dim) or `hubert` (layer
`--layer` of the HF HuBERT checkpoint in the local directory `--hubert_dir`, its 50 Hz frames
stacked 2 per unit: 1536-dim for HuBERT base; nothing is downloaded). Files are taken in a
seeded random order until `--max_hours` of audio (default: all); `--splits` picks which of
scan_audio_dir's splits to use. `--layer` is `config.data.hubert_layer` of the training config.

Features are normalised per dimension for logmel/mfcc (`--normalize=auto`; HuBERT features are
clustered as they are, as GSLM does), then clustered with mini-batch k-means in JAX over all
devices (`avjax.data.kmeans`). Writes to `--out`:

  tokenizer.npz, tokenizer.json   `avjax.data.units.UnitTokenizer.save` format (centroids in the
                                  normalised space, mean, std, and under "extractor" the
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


def main(argv: list[str] | None = None) -> dict:
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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    import numpy as np
    from tqdm import tqdm

    from avjax.data import audio as audio_lib
    from avjax.data import features as features_lib
    from avjax.data import kmeans as kmeans_lib
    from avjax.data.corpus import scan_audio_dir
    from avjax.data.units import UnitTokenizer, feature_stats

    if args.num_units < 2:
        raise ValueError(f"--num_units must be >= 2, got {args.num_units}")
    if args.max_hours is not None and args.max_hours <= 0:
        raise ValueError(f"--max_hours must be positive, got {args.max_hours}")
    progress = not args.no_progress
    extractor = features_lib.get_extractor(
        args.features, hubert_dir=args.hubert_dir or None, layer=args.layer
    )
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

    t0 = time.time()
    feats = []
    bar = tqdm(
        total=round(seconds, 1), unit="s", desc=f"{extractor.name} features", disable=not progress
    )
    for u in chosen:
        f = extractor(audio_lib.load_audio(u.audio_path))
        if len(f):
            feats.append(f)
        bar.update(round(u.duration, 1))
    bar.close()
    t_feat = time.time() - t0
    if not feats:
        raise ValueError(f"{args.audio_dir}: the chosen files gave no {extractor.name} frames")
    x = np.concatenate(feats)
    del feats
    if len(x) < args.num_units:
        raise ValueError(
            f"{len(x)} {extractor.name} frames from {len(chosen)} files are fewer than "
            f"--num_units={args.num_units}; give more audio"
        )
    normalize = args.normalize == "true" or (
        args.normalize == "auto" and features_lib.normalize_by_default(extractor.name)
    )
    mean, std = feature_stats(x, normalize)
    x = (x - mean) / std

    result = kmeans_lib.fit_minibatch_kmeans(
        x,
        args.num_units,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.seed,
        progress=progress,
    )
    full_inertia = kmeans_lib.mean_sq_distance(x, result.centroids)
    tok = UnitTokenizer(result.centroids, mean, std, extractor=extractor.spec)
    tok.save(args.out)

    hours = seconds / 3600
    info = {
        "audio_dir": os.path.abspath(args.audio_dir),
        "features": extractor.spec,
        "feature_dim": extractor.dim,
        "frame_rate": extractor.frame_rate,
        "files": len(chosen),
        "hours": hours,
        "frames": len(x),
        "num_units": args.num_units,
        "normalized": normalize,
        "kmeans_steps": result.steps,
        "kmeans_devices": len(kmeans_lib.data_mesh().devices.flat),
        "batch_inertia_first_last": [result.inertia[0], result.inertia[-1]],
        "inertia": full_inertia,
        "used_units": int((result.counts > 0).sum()),
        "seconds": {"features": t_feat, "kmeans": result.seconds},
        "hours_per_minute": {
            "features": hours / max(t_feat / 60, 1e-9),
            "kmeans": hours / max(result.seconds / 60, 1e-9),
        },
        "kmeans_points_per_second": result.steps * result.batch_size / max(result.seconds, 1e-9),
    }
    with open(os.path.join(args.out, "fit_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(
        f"{extractor.name}: {len(chosen)} files, {hours:.3f} h, {len(x)} frames x "
        f"{extractor.dim} in {t_feat:.1f} s ({info['hours_per_minute']['features']:.2f} h of "
        "audio / min)"
    )
    print(
        f"k-means: {args.num_units} units, {result.steps} steps of {result.batch_size} on "
        f"{info['kmeans_devices']} devices in {result.seconds:.1f} s "
        f"({info['hours_per_minute']['kmeans']:.2f} h of audio / min), inertia "
        f"{full_inertia:.4g}; wrote {os.path.abspath(args.out)}"
    )
    return info


if __name__ == "__main__":
    main()
