r"""Benchmark: the AV training pipeline (grain, `AVData`) vs a plain PyTorch `DataLoader`.

  python tools/bench/av_pipeline.py [--examples=64] [--batch=8] [--workers=2] [--json=PATH]

Builds a small embedded AV corpus (`av_corpus`, LRW view: real H.264 + AAC MP4 files of 29
frames at 128x128, 16 kHz audio, in LRW's on-disk layout) in a temporary folder, then runs,
each in a fresh process (so CPU time and memory are its own), the same work over the same
training files:

  * ours: `AVData.prepare()` decodes every utterance once (PyAV through `io.iter_video`, the
    mouth ROI `(0.25, 0.45, 0.75, 0.95)` resized to 96x96 grey) into memory-mapped arrays with
    `--workers` threads, then `AVData.train_dataset` (grain, `--workers` read threads) yields
    augmented batches: random 88x88 crop, flip, a time mask, random erasing, babble noise from
    another utterance, log-mel + SpecAugment. Reported twice: steady state (decoded cache
    warm: every later epoch) and including the one-off decode (the first epoch).
  * torch: a `torch.utils.data.Dataset` whose `__getitem__` opens the MP4 with PyAV, decodes
    the first 29 frames and their audio, cuts and resizes the same ROI with PIL and applies
    the same augmentations in numpy/torch (babble: decodes another file's audio), under a
    `DataLoader(num_workers=--workers)`; it decodes on every example, every epoch.

Neither side holds a whole video in memory: `io.iter_video` streams chunks of `num_frames`
frames and `decode_item` stops after `num_frames`; the torch reader stops decoding after 29
frames. Training then reads one memory-mapped row per example.

Ours is also reported in steady state, from the first batch on (the grain thread pool and
its prefetch started; a training run's every batch but the first), and so again with
`--workers` worker processes (`data.read_processes`, grain `mp_prefetch`; the same batches).
Printed side by side: examples/s (wall), CPU-s per example (the process and every
descendant, live or reaped, from /proc: the fair figure on a shared machine), cores kept
busy (CPU-s per wall-s: 2.0 = both cores of a 2-core machine; only meaningful on an otherwise
idle machine), peak RSS of the main process and of the largest child, and the load average;
`--json` gets the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

FRAMES = 29
SAMPLES_PER_FRAME = 640
ROI = (0.25, 0.45, 0.75, 0.95)
IMAGE, CROP = 96, 88
AUG = {
    "hflip": 0.5,
    "time_masks": 1,
    "time_mask_frames": 5,
    "erase_prob": 0.5,
    "babble_prob": 0.5,
    "babble_snr_db": (0.0, 20.0),
    "mel": True,
    "spec_freq_masks": 2,
    "spec_time_masks": 2,
    "spec_mask_width": 10,
}


def corpus_spec(clips_per_speaker: int) -> Any:
    """6 speakers (4 train, 1 val, 1 test), 128x128 frames."""
    from avjax.data.video import av_corpus

    return av_corpus.CorpusSpec(
        num_speakers=6,
        clips_per_speaker=clips_per_speaker,
        num_sentences=6,
        vocab_size=20,
        val_speakers=1,
        test_speakers=1,
        size=128,
    )


def data_config(cache: str, clips_per_speaker: int, workers: int) -> Any:
    """`config.data` of the embedded corpus's LRW view with the benchmark's augmentations."""
    import dataclasses

    from avjax.data.video import av_data

    dc = av_data.default_config()
    dc.cache_dir = cache
    dc.synthetic = dataclasses.asdict(corpus_spec(clips_per_speaker))
    dc.roi, dc.image_size, dc.crop_size, dc.num_frames = ROI, IMAGE, CROP, FRAMES
    dc.build_workers = dc.read_threads = workers
    dc.eval_splits = "train"  # decode the training files only (the same files torch reads)
    for k, v in AUG.items():
        dc[k] = v
    return dc


def _proc_cpu(pid: int | str) -> float:
    """CPU seconds of process `pid` and its reaped children, from `/proc/<pid>/stat`."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # u, s, cu, cs


def _children(pid: int | str) -> list[str]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += f.read().split()
    return out


def _cpu() -> float:
    """CPU seconds of this process and every descendant, live (grain's worker processes) or
    reaped (Linux `/proc`; elsewhere: this process and its reaped children only)."""
    if not os.path.exists("/proc/self/task"):
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
    total, todo = 0.0, [str(os.getpid())]
    while todo:
        pid = todo.pop()
        try:
            total += _proc_cpu(pid)
            todo += _children(pid)
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            pass
    return total


def _peaks() -> dict[str, float]:
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "child_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def run_ours(cache: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """`AVData`: decode once (timed), then `args.examples` augmented examples from grain."""
    from avjax.data.video import av_data

    dc = data_config(cache, args.clips_per_speaker, args.workers)
    dc.read_processes = args.processes
    data = av_data.AVData(dc, seed=0, batch_size=args.batch)
    t0, c0 = time.time(), _cpu()
    facts = data.prepare()
    decode_s, decode_cpu = time.time() - t0, _cpu() - c0
    it = iter(data.train_dataset(0, 1))
    t1, c1 = time.time(), _cpu()
    n, marks = 0, []
    while n < args.examples:
        batch = next(it)
        n += len(batch["label"])
        marks.append((n, time.time(), _cpu()))  # after each batch: steady state from the 1st
    assert batch["video"].shape[1:] == (FRAMES, CROP, CROP, 1), batch["video"].shape
    assert batch["mel"].shape[1:] == (4 * FRAMES, 80), batch["mel"].shape
    wall, cpu = time.time() - t1, _cpu() - c1
    common = {"files": facts["train_items"], "examples": n, **_peaks()}
    (n1, w1, u1), (n2, w2, u2) = marks[0], marks[-1]
    steady = {"wall_s": w2 - w1, "cpu_s": u2 - u1, **common, "examples": n2 - n1}
    if args.processes:  # the decode is the same as without processes: one row
        name = f"ours, {args.processes} processes (steady)"
        return [{"pipeline": name, **steady}]
    return [
        {"pipeline": "ours (steady, after 1st batch)", **steady},
        {"pipeline": "ours (decoded cache warm)", "wall_s": wall, "cpu_s": cpu, **common},
        {
            "pipeline": "ours (incl. one-off decode)",
            "wall_s": wall + decode_s,
            "cpu_s": cpu + decode_cpu,
            **common,
        },
    ]


def _decode(path: str, video: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """PyAV: `(frames [<=29, H, W, 3] uint8 or None, audio float32 [29 * 640])`, streamed."""
    import av

    frames: list[np.ndarray] = []
    with av.open(path) as c:
        if video:
            for f in c.decode(video=0):
                frames.append(f.to_ndarray(format="rgb24"))
                if len(frames) == FRAMES:
                    break
            c.seek(0)
        res = av.AudioResampler(format="flt", layout="mono", rate=16000)
        chunks = []
        for f in c.decode(audio=0):
            chunks.extend(r.to_ndarray().reshape(-1) for r in res.resample(f))
            if sum(map(len, chunks)) >= FRAMES * SAMPLES_PER_FRAME:
                break
    wav = np.zeros(FRAMES * SAMPLES_PER_FRAME, np.float32)
    a = np.concatenate(chunks)[: len(wav)] if chunks else wav[:0]
    wav[: len(a)] = a
    return (np.stack(frames) if video else None), wav


def _roi(frames: np.ndarray) -> np.ndarray:
    """`[t, H, W, 3]` -> `[29, 96, 96, 1]` uint8 grey (zero-padded in time)."""
    from PIL import Image

    h, w = frames.shape[1:3]
    x0, y0, x1, y1 = ROI
    box = (round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h))
    out = np.zeros((FRAMES, IMAGE, IMAGE, 1), np.uint8)
    for i, f in enumerate(frames[:FRAMES]):
        img = Image.fromarray(f).crop(box).resize((IMAGE, IMAGE), Image.Resampling.BILINEAR)
        out[i, ..., 0] = np.asarray(img.convert("L"))
    return out


def _augment_video(v: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """Random crop, flip, one time mask, random erasing on `[29, 96, 96, 1]`."""
    y, x = rng.integers(0, IMAGE - CROP + 1, 2)
    v = v[:, y : y + CROP, x : x + CROP]
    if rng.random() < AUG["hflip"]:
        v = v[:, :, ::-1]
    v = np.ascontiguousarray(v)
    w = int(rng.integers(0, AUG["time_mask_frames"] + 1))
    s = int(rng.integers(0, max(length - w, 0) + 1))
    v[s : s + w] = 0
    if rng.random() < AUG["erase_prob"]:
        area, aspect = rng.uniform(0.02, 0.2) * CROP * CROP, np.exp(rng.uniform(-1.2, 1.19))
        eh = int(min(CROP, round(np.sqrt(area * aspect))))
        ew = int(min(CROP, round(np.sqrt(area / aspect))))
        y, x = int(rng.integers(0, CROP - eh + 1)), int(rng.integers(0, CROP - ew + 1))
        v[:, y : y + eh, x : x + ew] = rng.integers(0, 256, (1, eh, ew, 1))
    return v


def _spec_augment(mel: Any, rng: np.random.Generator) -> Any:
    """Frequency and time masks on a torch `[frames, mels]`, filled with its mean."""
    mel = mel.clone()
    fill = float(mel.mean())
    for axis, count in ((1, AUG["spec_freq_masks"]), (0, AUG["spec_time_masks"])):
        for _ in range(count):
            w = int(rng.integers(0, AUG["spec_mask_width"] + 1))
            s = int(rng.integers(0, max(mel.shape[axis] - w, 0) + 1))
            mel.narrow(axis, s, w).fill_(fill)
    return mel


class TorchAV:
    """`torch.utils.data.Dataset`: decode + ROI + augment one MP4 per `__getitem__`."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        from avjax.data.speech import logmel

        rng = np.random.default_rng()  # fresh OS entropy: a new draw every epoch
        frames, wav = _decode(self.paths[i], video=True)
        video = _augment_video(_roi(frames), min(len(frames), FRAMES), rng)
        if rng.random() < AUG["babble_prob"] and len(self.paths) > 1:
            _, noise = _decode(self.paths[int(rng.integers(len(self.paths)))], video=False)
            p_s, p_n = float(np.mean(wav**2)), float(np.mean(noise**2))
            if p_s > 0 and p_n > 0:
                snr = rng.uniform(*AUG["babble_snr_db"])
                wav = (wav + noise * np.sqrt(p_s / (p_n * 10 ** (snr / 10)))).astype(np.float32)
        mel = torch.from_numpy(logmel.unit_mel(logmel.log_mel(wav), FRAMES).astype(np.float32))
        return {
            "video": torch.from_numpy(video),
            "audio": torch.from_numpy(wav),
            "mel": _spec_augment(mel, rng),
        }


def run_torch(cache: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The same files and work through `torch.utils.data.DataLoader`."""
    import torch

    from avjax.data.video import av_corpus

    torch.set_num_threads(1)
    spec = corpus_spec(args.clips_per_speaker)
    root = av_corpus.corpus_dir(cache, spec)
    paths = [it.path for it in av_corpus.scan_view(root, "lrw", ("train",))]
    sampler = torch.utils.data.RandomSampler(
        TorchAV(paths), replacement=True, num_samples=args.examples
    )
    loader = torch.utils.data.DataLoader(
        TorchAV(paths),
        batch_size=args.batch,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=True,
    )
    t0, c0 = time.time(), _cpu()
    n = 0
    for batch in loader:
        n += len(batch["video"])
    assert tuple(batch["video"].shape[1:]) == (FRAMES, CROP, CROP, 1)
    del loader  # workers joined, so their CPU time is counted
    wall, cpu = time.time() - t0, _cpu() - c0
    row = {"pipeline": "torch DataLoader", "wall_s": wall, "cpu_s": cpu, "files": len(paths)}
    return [{**row, "examples": n, **_peaks()}]


def _child(
    side: str, cache: str, args: argparse.Namespace, processes: int = 0
) -> list[dict[str, Any]]:
    cmd = [sys.executable, os.path.abspath(__file__), f"--_run={side}", f"--_cache={cache}"]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("examples", "batch", "workers")]
    cmd += [f"--processes={processes}"]
    cmd += [f"--clips_per_speaker={args.clips_per_speaker}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--examples", type=int, default=64, help="training examples per pipeline")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="grain threads / DataLoader workers")
    ap.add_argument("--processes", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--clips_per_speaker", type=int, default=12, help="corpus size (4 train spk)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_cache", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._run:
        fn = run_ours if args._run == "ours" else run_torch
        print(json.dumps(fn(args._cache, args)))
        return
    from avjax.data.video import av_corpus

    with tempfile.TemporaryDirectory() as cache:
        t0 = time.time()
        spec = corpus_spec(args.clips_per_speaker)
        av_corpus.build_av_corpus(
            av_corpus.corpus_dir(cache, spec), spec, num_workers=args.workers, progress=False
        )
        print(f"corpus built in {time.time() - t0:.1f} s", flush=True)
        load0 = os.getloadavg()[0]
        rows = _child("torch", cache, args) + _child("ours", cache, args)
        rows += _child("ours", cache, args, processes=args.workers)
        load1 = os.getloadavg()[0]
    print(f"load average {load0:.1f} -> {load1:.1f}; {os.cpu_count()} CPUs")
    print(
        f"{'pipeline':30s} {'files':>5s} {'ex/s':>7s} {'CPU-s/ex':>9s} {'cores':>5s} "
        f"{'RSS MB':>7s} {'child':>6s}"
    )
    for r in rows:
        r["examples_per_s"] = r["examples"] / r["wall_s"]
        r["cpu_s_per_example"] = r["cpu_s"] / r["examples"]
        r["cores_busy"] = r["cpu_s"] / r["wall_s"]  # CPU-s per wall-s: cores kept busy
        r["load_avg"] = [load0, load1]
        print(
            f"{r['pipeline']:30s} {r['files']:5d} {r['examples_per_s']:7.1f} "
            f"{r['cpu_s_per_example']:9.3f} {r['cores_busy']:5.2f} {r['peak_rss_mb']:7.0f} "
            f"{r['child_peak_rss_mb']:6.0f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
