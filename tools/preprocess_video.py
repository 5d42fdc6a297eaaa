r"""Face and mouth crops of real videos (the LRS3 / AV-HuBERT and Wav2Lip preprocessing).

  python tools/preprocess_video.py --input=FILE_OR_DIR [--input=...] --out=DIR \
      [--workers=N] [--predictor=PATH] [--smooth_window=5]

Each video (a file, or every video under a folder, searched recursively) gets a folder
`DIR/<relative path without extension>/` holding `mouth.mp4` (96 x 96 grey mouth ROI at
25 fps), `face.mp4` (128 x 128 aligned face), both with the source audio at 16 kHz,
`landmarks.npy` (`[frames, 68, 2]`, source pixels) and `info.json`
(`avjax.data.video.crops.process_video` says how). Videos run in a pool of processes
(`--workers`, default: all cores), one detector each.

Resumable: a video's folder is written under a temporary name and renamed into place with
`info.json` last, so after a kill the next run skips the videos whose folder holds
`info.json`, deletes the half-written temporary folders of the others and redoes them. A
video with no face in any frame is reported and skipped; a marker `DIR/<rel>.no_face.json`
keeps later runs from searching it again (delete it to retry). Unreadable videos are
reported, not marked (retried next run), and make the exit status 1.

The 68-point predictor is `shape_predictor_68_face_landmarks.dat` from the installed
`face_recognition_models` package (`pip install avjax[video]`), or `--predictor=PATH`;
nothing is downloaded. Prints each video's result and the throughput (frames/s) and writes
`DIR/preprocess_report.json`.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _TOOLS]
sys.path.insert(0, os.path.dirname(_TOOLS))

from avjax import io as avio  # noqa: E402
from avjax.data.video import crops  # noqa: E402

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mpg", ".mpeg", ".mkv", ".mov", ".webm", ".m4v")


def _walk(root: avio.epath.Path) -> list[avio.epath.Path]:
    """Every file under `root` (recursive; works on `gs://` folders too)."""
    out = []
    for p in sorted(root.iterdir()):
        out += _walk(p) if p.is_dir() else [p]
    return out


def find_videos(inputs: list[str], out: str) -> list[tuple[str, str]]:
    """`(video path, output folder)` pairs for files and folders (searched recursively)."""
    jobs: list[tuple[str, str]] = []
    for item in inputs:
        root = avio.as_path(item)
        if not root.exists():
            raise FileNotFoundError(f"--input {item}: no such file or folder")
        if root.is_dir():
            files = [p for p in _walk(root) if p.suffix.lower() in VIDEO_EXTENSIONS]
            rels = [os.path.splitext(os.fspath(p.relative_to(root)))[0] for p in files]
        else:
            files, rels = [root], [root.stem]
        outs = [os.fspath(avio.as_path(out) / r) for r in rels]
        jobs += [(os.fspath(f), o) for f, o in zip(files, outs, strict=True)]
    dup = [o for o, n in collections.Counter(o for _, o in jobs).items() if n > 1]
    if dup:
        raise ValueError(f"several inputs map to the same output folder: {sorted(dup)[:5]}")
    return jobs


def _marker(out_dir: str) -> avio.epath.Path:
    return avio.as_path(out_dir + ".no_face.json")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--input", action="append", required=True, help="video file or folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    ap.add_argument("--predictor", default=None, help="shape_predictor_68_face_landmarks.dat")
    ap.add_argument("--smooth_window", type=int, default=crops.CropConfig.smooth_window)
    ap.add_argument("--crf", type=int, default=crops.CropConfig.crf, help="x264 quality")
    args = ap.parse_args(argv)

    predictor = crops.find_predictor(args.predictor)  # fail early, with how to get it
    config = crops.CropConfig(smooth_window=args.smooth_window, crf=args.crf)
    jobs = find_videos(args.input, args.out)
    todo = [(v, o) for v, o in jobs if not crops.is_complete(o) and not _marker(o).exists()]
    print(f"{len(jobs)} videos, {len(jobs) - len(todo)} already done, {len(todo)} to do")
    results = {"ok": [], "no_face": [], "error": []}
    frames, t0 = 0, time.perf_counter()
    if todo:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=max(1, min(args.workers, len(todo))),
            mp_context=ctx,
            initializer=crops.init_worker,
            initargs=(predictor, config),
        ) as pool:
            futures = [pool.submit(crops.run_one, v, o) for v, o in todo]
            for fut, (_, out_dir) in zip(futures, todo, strict=True):
                path, status, details = fut.result()
                results[status].append(path)
                if status == "ok":
                    frames += details["frames"]
                    print(
                        f"ok       {path}: {details['frames']} frames, "
                        f"{len(details['frames_without_face'])} without a face"
                    )
                else:
                    print(f"{status:8s} {path}: {details['message']}")
                if status == "no_face":
                    avio.write_text_atomic(_marker(out_dir), json.dumps(details))
    seconds = time.perf_counter() - t0
    report = {
        "videos": len(jobs),
        "skipped_done": len(jobs) - len(todo),
        **results,
        "frames": frames,
        "seconds": seconds,
        "frames_per_second": frames / seconds if seconds > 0 and frames else 0.0,
        "workers": args.workers,
    }
    avio.write_text_atomic(avio.as_path(args.out) / "preprocess_report.json", json.dumps(report))
    print(
        f"done: {len(results['ok'])} ok, {len(results['no_face'])} without a face, "
        f"{len(results['error'])} failed; {frames} frames in {seconds:.1f} s "
        f"({report['frames_per_second']:.1f} frames/s)"
    )
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["error"] else 0)
