"""What spoken-LM tasks share, as functions a task calls (never as a base class).

SpeechSSM and SpeechTransformer are next-unit LMs over `avjax.data.speech.speech_lm.SpeechLMData`;
both use `next_token_loss` for the loss, `sample_continuations` for `--mode=sample` and
`evaluate_lm` for `--mode=eval`. Each function takes the model and its parameters as
arguments, so a task with another model (or another loss) swaps one piece and keeps the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

from avjax.data.speech.speech_lm import SpeechLMData
from avjax.data.speech.units import UNIT_RATE
from avjax.io import as_path, local_then_copy, write_text_atomic

Metrics = dict[str, jax.Array]


def next_token_loss(
    logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, Metrics]:
    """`(summed cross-entropy, {"weight", "accuracy"})` of `logits [batch, time, vocab]`
    against `targets [batch, time]` int, weighted by `mask [batch, time]` (in float32)."""
    logits = logits.astype(jnp.float32)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    mask = mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(xent * mask), {"weight": jnp.sum(mask), "accuracy": jnp.sum(correct * mask)}


def overview_mel(
    vocoder: Any, units: np.ndarray, max_columns: int = 2000, chunk_units: int = 1500
) -> tuple[np.ndarray, float]:
    """A time-averaged log-mel `[<= ~max_columns, n_mels]` of `units`, computed in chunks.

    Memory stays flat for any length (a 16-minute mel is never held at full resolution).
    Returns the mel and its frame rate (frames per second).
    """
    fpu = 4  # mel frames per unit (100 Hz mel, 25 Hz units)
    factor = max(1, math.ceil(len(units) * fpu / max_columns))
    parts = []
    for i in range(0, len(units), chunk_units):
        mel = vocoder.units_to_mel(units[i : i + chunk_units])
        n = len(mel) // factor * factor
        if n:
            parts.append(mel[:n].reshape(-1, factor, mel.shape[-1]).mean(1))
        if n < len(mel):
            parts.append(mel[n:].mean(0, keepdims=True))
    return np.concatenate(parts), 100.0 / factor


@dataclasses.dataclass(frozen=True)
class SampleJob:
    """One sampling request: its spec (`job.json`), key and output folder."""

    request: dict[str, Any]  # what the summary reports
    spec: dict[str, Any]
    key: str
    out_dir: epath.Path
    named: str  # config.sample.out_dir, "" for a folder per request
    digest: str  # sha256 of the parameters' values
    digest_s: float


def sample_job(sc: Any, prompt: np.ndarray, params: Any, step: int, workdir: str) -> SampleJob:
    """The request of `config.sample` (`sc`) for `prompt [batch, prompt_len]`: spec, key and
    folder `<workdir>/samples/step_<N>/<seconds>s_t<T>_k<K>[_p<P>]_seed<S>-<key8>` (or
    `sc.out_dir`)."""
    from avjax.sample import resumable

    t0 = time.time()
    digest = resumable.params_digest(params)
    digest_s = time.time() - t0
    top_p = float(sc.get("top_p", 1.0))
    request = {
        "checkpoint_step": int(step),
        "seconds": float(sc.seconds),
        "prompt_seconds": float(sc.prompt_seconds),
        "temperature": float(sc.temperature),
        "top_k": int(sc.top_k),
        "top_p": top_p,
        "seed": int(sc.seed),
        "batch_size": len(prompt),
        "chunk_tokens": int(sc.chunk_tokens),
    }
    spec = resumable.job_spec(
        prompt,
        int(round(sc.seconds * UNIT_RATE)),
        params_sha256=digest,
        seed=request["seed"],
        temperature=request["temperature"],
        top_k=request["top_k"],
        top_p=top_p,
        chunk_tokens=request["chunk_tokens"],
        extra={"checkpoint_step": int(step)},
    )
    key = resumable.job_key(spec)
    named = str(sc.get("out_dir", "") or "")
    if named:
        out_dir = as_path(named)
    else:
        label = (
            f"{float(sc.seconds):g}s_t{float(sc.temperature)}_k{int(sc.top_k)}"
            + (f"_p{top_p}" if top_p < 1 else "")
            + f"_seed{int(sc.seed)}"
        )
        out_dir = as_path(workdir) / "samples" / f"step_{step}" / f"{label}-{key[:8]}"
    return SampleJob(request, spec, key, out_dir, named, digest, digest_s)


def claim_or_reuse(job: SampleJob, workdir: str) -> dict[str, Any] | None:
    """Claims `job.out_dir` for this request (process 0 writes `job.json`); returns the
    finished summary when this request was sampled before (its files all there)."""
    from avjax.sample import resumable

    try:
        resumable.claim_job(job.out_dir, job.spec, write=jax.process_index() == 0)
    except resumable.ResumeMismatchError as e:
        if not job.named:
            raise
        raise resumable.ResumeMismatchError(
            f"config.sample.out_dir={job.named!r} was used for another request: {e}. Choose "
            "another out_dir, or leave it empty for a folder per request under "
            f"{as_path(workdir) / 'samples'}"
        ) from None
    summary_path = job.out_dir / "summary.json"
    if summary_path.exists():
        done = json.loads(summary_path.read_text())
        if done.get("job_key") == job.key and all(as_path(f).exists() for f in done["files"]):
            logging.info("This request was sampled before: %s", ", ".join(done["files"]))
            return {**done, "reused": True}
    return None


def generate(
    model: nn.Module, params: Any, prompt: np.ndarray, job: SampleJob, sc: Any, rules: Any
) -> np.ndarray:
    """`[batch, num_tokens]` int continuations of `prompt`, resumable under
    `<out_dir>/sampler_state` (the same request after a kill continues with the same
    tokens); the batch is split over the mesh the params live on."""
    from avjax.sample import resumable

    mesh = getattr(jax.tree.leaves(params)[0].sharding, "mesh", None)
    gen = resumable.generate_resumable(
        model,
        params,
        prompt,
        int(round(sc.seconds * UNIT_RATE)),
        job.out_dir / "sampler_state",
        seed=int(sc.seed),
        temperature=float(sc.temperature),
        top_k=int(sc.top_k),
        top_p=float(sc.get("top_p", 1.0)),
        chunk_tokens=int(sc.chunk_tokens),
        save_every_chunks=int(sc.get("save_every_chunks", 6)),
        mesh=mesh if isinstance(mesh, jax.sharding.Mesh) else None,
        rules=rules,
        params_sha256=job.digest,
        extra_meta={"checkpoint_step": int(job.request["checkpoint_step"])},
    )
    chunks = list(gen)
    return np.concatenate(chunks, axis=1) if chunks else np.zeros((len(prompt), 0), np.int32)


def write_sample(vocoder: Any, units: np.ndarray, base: epath.Path, title: str) -> float:
    """`base.{npy,wav,png}` of `units [tokens]`: the units, their audio and an overview
    spectrogram. Returns the audio's seconds."""
    from avjax.data import plots
    from avjax.data.speech import vocoder as vocoder_lib

    with local_then_copy(base.with_suffix(".npy")) as f:
        np.save(f, units)
    with local_then_copy(base.with_suffix(".wav")) as f:
        n = vocoder_lib.decode_units_to_wav(vocoder, units, f)
    mel, frame_rate = overview_mel(vocoder, units)
    with local_then_copy(base.with_suffix(".png")) as f:
        plots.save_spectrogram_png(mel, f, frame_rate=frame_rate, title=title)
    return n / vocoder.sample_rate


def sample_continuations(
    model: nn.Module,
    params: Any,
    step: int,
    data: SpeechLMData,
    config: Any,
    workdir: str,
    label: str,
) -> dict[str, Any]:
    """Continues held-out prompts for `config.sample.seconds`; writes WAV, PNG, units.

    Each request gets its own folder, so one workdir holds many samplings of its
    checkpoints: `<workdir>/samples/step_<N>/<seconds>s_t<temperature>_k<top_k>_seed<seed>
    -<key8>/` (`_p<top_p>` when top-p is on), e.g. `samples/step_400/60s_t1.0_k0_seed0-
    1a2b3c4d/sample_0.wav`, or `config.sample.out_dir` when set (a path or URL). `<key8>`
    starts the sha256 of everything that defines the tokens
    (`avjax.sample.resumable.job_spec`: checkpoint step, a digest of the parameters'
    values, prompt, length, temperature, top-k/p, seed, batch, chunk_tokens; saved as
    `job.json`). The same request again resumes its killed job (sampler state in
    `<folder>/sampler_state`) or returns the finished one without decoding; a named
    `out_dir` holding another request is refused, naming the fields that differ.
    Writes `sample_<i>.{wav,png,npy}` (prompt + continuation) and `summary.json`;
    `label` names the model in the spectrograms' titles.
    """
    sc = config.sample
    prompt = data.prompts(int(sc.batch_size), float(sc.prompt_seconds))
    job = sample_job(sc, prompt, params, step, workdir)
    done = claim_or_reuse(job, workdir)
    if done is not None:
        return done
    logging.info(
        "Sampling %d x %.0f s (%d tokens) after a %.1f s prompt into %s",
        len(prompt),
        sc.seconds,
        int(round(sc.seconds * UNIT_RATE)),
        sc.prompt_seconds,
        job.out_dir,
    )
    t0 = time.time()
    tokens = generate(model, params, prompt, job, sc, config.sharding_rules)
    gen_s = time.time() - t0
    writer = jax.process_index() == 0
    title = (
        f"{label} step {step}: {sc.prompt_seconds:g} s prompt + "
        f"{sc.seconds:g} s (T={float(sc.temperature):g}, top-k={int(sc.top_k)})"
    )
    files = []
    for i in range(len(prompt)):
        base = job.out_dir / f"sample_{i}"
        files.append(os.fspath(base.with_suffix(".wav")))
        if writer:
            units = np.concatenate([prompt[i], tokens[i]]).astype(np.int32)
            seconds = write_sample(data.vocoder, units, base, title)
            logging.info("Wrote %s (%.1f s)", files[-1], seconds)
    summary = {
        "files": files,
        "out_dir": os.fspath(job.out_dir),
        "job_key": job.key,
        "request": job.request,
        "tokens": int(tokens.shape[1]),
        "seconds": tokens.shape[1] / UNIT_RATE,
        "decode_ms_per_token": 1e3 * gen_s / max(tokens.shape[1], 1),
        "params_digest_s": job.digest_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "distinct_units": int(len(np.unique(tokens))) if tokens.size else 0,
    }
    if writer:
        write_text_atomic(job.out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def evaluate_lm(
    name: str,
    model: nn.Module,
    params: Any,
    step: int,
    eval_loss: float | None,
    data: SpeechLMData,
    config: Any,
    workdir: str,
) -> dict[str, Any]:
    """Perplexity and unigram entropy, then (unless `config.eval.longform=False`) the
    long-form metrics of `avjax.eval.longform` into `<workdir>/eval/step_<N>/`."""
    facts = data.prepare()
    out = {
        "unigram_entropy_nats": facts["unigram_entropy_nats"],
        "eval_perplexity": math.exp(eval_loss) if eval_loss is not None else None,
    }
    ec = config.get("eval")
    if ec is None or ec.get("longform", True):
        from avjax.eval import longform

        out.update(
            longform.evaluate_longform(
                [longform.ModelEntry(name, model, params)],
                data.docs["heldout"],
                data.vocoder,
                as_path(workdir) / "eval" / f"step_{step}",
                longform.LongformConfig.from_config(config),
                step=step,
            )
        )
    return out
