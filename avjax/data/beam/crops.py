"""Beam stage `crops`: face and mouth crops of a video folder, one element per video.

Each worker holds one dlib detector (`avjax.data.video.crops.init_worker`) and runs
`crops.run_one(video, out_dir)`, the function `tools/preprocess_video.py` runs in its
process pool, so the outputs are the same files (`mouth.mp4`, `face.mp4`, `landmarks.npy`,
`info.json`, see `crops.process_video`). Idempotent per video: a folder holding `info.json`
is complete and skipped; a half-written one (a killed worker) is removed and redone. A video
without a face gets the marker `<out_dir>.no_face.json` (not searched again; delete it to
retry); an unreadable video is reported as `error` and skipped (retried by the next run).

`<out>/prepare-crops.json` holds the artifact key (crop config, predictor, the videos) and
the run's report: `ok`, `no_face`, `error` (with messages), `skipped_done`, frames/s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from avjax import io as io_lib
from avjax.data import artifacts
from avjax.data.beam import pipeline_options, require_beam
from avjax.data.video import crops as crops_lib

REPORT = "prepare-crops.json"


def no_face_marker(out_dir: str) -> io_lib.epath.Path:
    """The marker of a video without a face (the convention of tools/preprocess_video.py)."""
    return io_lib.as_path(out_dir + ".no_face.json")


class CropVideoFn:
    """Beam FlatMap body: `(video path, output folder)` -> one result row.

    Rows: `{"video", "status": ok | no_face | error | done, "frames", "message"}`.
    """

    def __init__(self, predictor: str, config: crops_lib.CropConfig):
        self.predictor = predictor
        self.config = config
        self._ready = False

    def process(self, job: tuple[str, str]) -> list[dict[str, Any]]:
        video, out_dir = job
        if crops_lib.is_complete(out_dir) or no_face_marker(out_dir).exists():
            return [{"video": video, "status": "done", "frames": 0, "message": ""}]
        if not self._ready:  # one detector per worker (dlib objects do not pickle)
            crops_lib.init_worker(self.predictor, self.config)
            self._ready = True
        path, status, details = crops_lib.run_one(video, out_dir)
        if status == "no_face":
            io_lib.write_text_atomic(no_face_marker(out_dir), json.dumps(details))
        frames = details.get("frames", 0) if status == "ok" else 0
        return [
            {
                "video": path,
                "status": status,
                "frames": frames,
                "message": details.get("message", ""),
            }
        ]


def _call(job: tuple[str, str], fn: CropVideoFn) -> list[dict[str, Any]]:
    return fn.process(job)


def _write_rows(rows: list[dict[str, Any]], path: str) -> None:
    io_lib.write_text_atomic(path, json.dumps(sorted(rows, key=lambda r: r["video"])))


def run_crops(
    jobs: list[tuple[str, str]],
    out: str,
    *,
    predictor: str | None = None,
    config: crops_lib.CropConfig | None = None,
    runner: str = "DirectRunner",
    num_workers: int = 1,
    beam_args: list[str] | None = None,
) -> dict[str, Any]:
    """Crops every `(video, output folder)` of `jobs` with Beam; returns the report.

    `jobs` as `tools/preprocess_video.find_videos` lists them (folders under `out`).
    The predictor is found up front (`crops.find_predictor`: a clear error naming how to get
    it); workers must see it at the same path.
    """
    beam = require_beam()
    config = config or crops_lib.CropConfig()
    predictor = crops_lib.find_predictor(predictor)
    fn = CropVideoFn(predictor, config)
    rows_path = os.fspath(io_lib.as_path(out) / ".prepare-crops-rows.json")
    io_lib.as_path(out).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with beam.Pipeline(options=pipeline_options(runner, num_workers, beam_args)) as p:
        _ = (
            p
            | "Videos" >> beam.Create(sorted(jobs))
            | "Spread" >> beam.Reshuffle()
            | "Crop" >> beam.FlatMap(_call, fn)
            | "Gather" >> beam.combiners.ToList()
            | "Write" >> beam.Map(_write_rows, rows_path)
        )
    seconds = time.time() - t0
    rows = json.loads(io_lib.as_path(rows_path).read_text())
    by = {s: [r for r in rows if r["status"] == s] for s in ("ok", "no_face", "error", "done")}
    frames = sum(r["frames"] for r in by["ok"])
    fields = {
        "config": dataclasses.asdict(config),
        "predictor": os.path.basename(predictor),
        "videos": sorted(os.path.relpath(o, os.fspath(out)) for _, o in jobs),
    }
    report = {
        "stage": "crops",
        "key": artifacts.fingerprint(fields),
        "fields": fields,
        "runner": runner,
        "num_workers": num_workers,
        "videos": len(jobs),
        "skipped_done": len(by["done"]),
        "ok": [r["video"] for r in by["ok"]],
        "no_face": [r["video"] for r in by["no_face"]],
        "error": {r["video"]: r["message"] for r in by["error"]},
        "frames": frames,
        "seconds": seconds,
        "frames_per_second": frames / seconds if frames else 0.0,
    }
    io_lib.write_text_atomic(io_lib.as_path(out) / REPORT, json.dumps(report, indent=1))
    return report
