"""SpeechSSM task: next-unit prediction over long speech documents; long-form sampling."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

from avjax.data import lm_windows, pipeline
from avjax.data.units import UNIT_RATE
from avjax.io import as_path, write_text_atomic
from avjax.models import speechssm as speechssm_lib
from avjax.tasks.base import Batch, Metrics, Task


def cache_root(data_cfg: Any) -> epath.Path:
    """Where corpora are cached: `config.data.cache_dir`, $AVJAX_CACHE or ~/.cache/avjax.

    A local folder (it may be node-local on a pod: each host then builds its own copy)."""
    return as_path(
        data_cfg.cache_dir or os.environ.get("AVJAX_CACHE") or os.path.expanduser("~/.cache/avjax")
    )


CORPUS_NAMES = pipeline.CORPUS_NAMES
_choose_splits = pipeline.choose_splits  # (moved to avjax.data.pipeline)


def _overview_mel(
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


class SpeechSSMTask(Task):
    """Spoken LM over 25 Hz speech units with the Griffin backbone."""

    name = "speechssm"

    def __init__(self, config, workdir):
        super().__init__(config, workdir)
        self._prepared: dict[str, Any] | None = None

    # --- data -------------------------------------------------------------------------------
    def prepare(self, read_only: bool | None = None) -> dict[str, Any]:
        """Builds the corpus and the unit tokenizer/decoder once; loads them afterwards.

        `read_only` (default: the task's `read_only` attribute, False unless set): sampling
        and evaluation never write to the workdir; units or token stores that are not there
        (or were made from other settings) are errors naming the path. Once the workdir has
        a checkpoint its units are frozen (`avjax.data.pipeline`). All processes call this
        together (process 0 builds the workdir's artifacts, the others wait).
        """
        if self._prepared is not None:
            return self._prepared["facts"]
        dc = self.config.data
        if read_only is None:
            read_only = bool(getattr(self, "read_only", False))
        ctx = pipeline.Context(
            as_path(self.workdir),
            cache_root(dc),
            seed=int(self.config.seed),
            read_only=read_only,
            refit_units=bool(dc.get("refit_units", False)),
        )
        prepared = pipeline.prepare_speech(dc, ctx)
        self._docs = prepared.docs
        return self._finish_prepare(prepared.tokenizer, prepared.vocoder, prepared.extra, ctx)

    def _finish_prepare(
        self, tokenizer: Any, vocoder: Any, extra: dict[str, Any], ctx: pipeline.Context
    ) -> dict:
        """Facts about `self._docs` (logged, written to data_facts.json unless read-only);
        caches the result."""
        if not self._docs["heldout"]:
            raise ValueError(
                "the corpus has no held-out documents: raise config.data.heldout_fraction"
            )
        dc = self.config.data
        want = str(dc.get("features", "logmel"))
        if getattr(tokenizer, "features", "logmel") != want:
            raise ValueError(
                f"config.data.features={want!r}, but the units of data.name={dc.name!r} are "
                f"{tokenizer.features}: other features are fitted for the real corpora only "
                "(librispeech, librilight, librispeech_long)"
            )
        train = self._docs["train"]
        if hasattr(train, "unigram_counts"):  # a memory-mapped TokenStore: counted in chunks
            counts = train.unigram_counts(tokenizer.num_units)
            train_tokens = int(train.lengths.sum())
        else:
            counts = np.bincount(np.concatenate(train), minlength=tokenizer.num_units)
            train_tokens = int(sum(len(d) for d in train))
        p = counts[counts > 0] / counts.sum()
        heldout = self._docs["heldout"]
        lengths = getattr(heldout, "lengths", None)
        facts = {
            "num_units": tokenizer.num_units,
            "unigram_entropy_nats": float(-(p * np.log(p)).sum()),
            "train_tokens": train_tokens,
            "train_hours": train_tokens / UNIT_RATE / 3600,
            "heldout_tokens": int(
                lengths.sum() if lengths is not None else sum(len(d) for d in heldout)
            ),
            "train_docs": len(self._docs["train"]),
            "heldout_docs": len(self._docs["heldout"]),
            **extra,
        }
        self._prepared = {"facts": facts, "tokenizer": tokenizer, "vocoder": vocoder}
        if jax.process_index() == 0 and not ctx.read_only:
            write_text_atomic(ctx.workdir / "data_facts.json", json.dumps(facts, indent=2))
        return facts

    def _global_batch(self) -> int:
        return int(self.config.train.batch_size)

    def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        self.prepare()
        return lm_windows.train_windows(
            self._docs["train"],
            int(self.config.data.seq_len),
            self._global_batch() // process_count,
            seed=int(self.config.seed),
            process_index=process_index,
            process_count=process_count,
            pack=bool(self.config.data.pack),
        )

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        self.prepare()
        return lm_windows.eval_windows(
            self._docs["heldout"],
            int(self.config.data.seq_len),
            self._global_batch() // process_count,
            int(self.config.train.eval_batches),
            process_index,
            process_count,
        )

    def dummy_batch(self) -> Batch:
        shape = (self._global_batch(), int(self.config.data.seq_len))
        return {
            "inputs": np.zeros(shape, np.int32),
            "targets": np.zeros(shape, np.int32),
            "segment_pos": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
            "mask": np.ones(shape, np.float32),
        }

    # --- model ------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return speechssm_lib.speechssm(self.config.model, int(self.config.data.num_units))

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        return {"tokens": batch["inputs"], "segment_pos": batch["segment_pos"]}

    def loss(self, model, params, batch, rng) -> tuple[jax.Array, Metrics]:
        logits, _ = model.apply({"params": params}, **self.model_inputs(batch))
        logits = logits.astype(jnp.float32)
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        mask = batch["mask"].astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
        return jnp.sum(xent * mask), {
            "weight": jnp.sum(mask),
            "accuracy": jnp.sum(correct * mask),
        }

    def flops_per_token(self) -> float:
        return speechssm_lib.flops_per_token(
            self.config.model, int(self.config.data.num_units), int(self.config.data.seq_len)
        )

    def compatibility(self) -> dict[str, Any]:
        dc = self.config.data
        # What defines the unit vocabulary: other units would make the weights meaningless.
        units = {k: dc[k] for k in ("name", "minutes", "manual_dir", "num_units", "kmeans_iters")}
        if str(dc.get("features", "logmel")) != "logmel":  # (log-mel workdirs keep their stamp)
            units.update({k: dc.get(k) for k in ("features", "hubert_dir", "hubert_layer")})
        return {
            "task": self.name,
            "model": self.config.model.to_dict(),
            "units": units,
            "seed": int(self.config.seed),
        }

    # --- inference --------------------------------------------------------------------------
    def sample(self, model, params, step: int) -> dict[str, Any]:
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
        Writes `sample_<i>.{wav,png,npy}` (prompt + continuation) and `summary.json`.
        """
        from avjax.data import plots
        from avjax.data import vocoder as vocoder_lib
        from avjax.io import as_path, local_then_copy, write_text_atomic
        from avjax.sample import resumable

        sc = self.config.sample
        self.prepare()
        vocoder = self._prepared["vocoder"]
        prompt_len = max(1, int(round(sc.prompt_seconds * UNIT_RATE)))
        num_tokens = int(round(sc.seconds * UNIT_RATE))
        heldout = self._docs["heldout"]
        prompts = []
        for i in range(int(sc.batch_size)):
            doc = heldout[i % len(heldout)]
            if len(doc) < prompt_len:
                raise ValueError(
                    f"held-out document {i} has {len(doc) / UNIT_RATE:.1f} s < "
                    f"config.sample.prompt_seconds={sc.prompt_seconds}"
                )
            prompts.append(doc[:prompt_len])
        prompt = np.stack(prompts)
        t0 = time.time()
        digest = resumable.params_digest(params)
        digest_s = time.time() - t0
        top_p = float(sc.get("top_p", 1.0))
        spec = resumable.job_spec(
            prompt,
            num_tokens,
            params_sha256=digest,
            seed=int(sc.seed),
            temperature=float(sc.temperature),
            top_k=int(sc.top_k),
            top_p=top_p,
            chunk_tokens=int(sc.chunk_tokens),
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
            out_dir = as_path(self.workdir) / "samples" / f"step_{step}" / f"{label}-{key[:8]}"
        writer = jax.process_index() == 0
        try:
            resumable.claim_job(out_dir, spec, write=writer)
        except resumable.ResumeMismatchError as e:
            if not named:
                raise
            raise resumable.ResumeMismatchError(
                f"config.sample.out_dir={named!r} was used for another request: {e}. Choose "
                "another out_dir, or leave it empty for a folder per request under "
                f"{as_path(self.workdir) / 'samples'}"
            ) from None
        summary_path = out_dir / "summary.json"
        if summary_path.exists():
            done = json.loads(summary_path.read_text())
            if done.get("job_key") == key and all(as_path(f).exists() for f in done["files"]):
                logging.info("This request was sampled before: %s", ", ".join(done["files"]))
                return {**done, "reused": True}
        logging.info(
            "Sampling %d x %.0f s (%d tokens) after a %.1f s prompt into %s",
            len(prompts),
            sc.seconds,
            num_tokens,
            sc.prompt_seconds,
            out_dir,
        )
        chunks = []
        t0 = time.time()
        # Resumable: the sampler state is saved under out_dir/sampler_state; re-running the
        # same command after a kill continues there with the same tokens. The batch is split
        # over the mesh the params live on (progress bar with ETA inside).
        mesh = getattr(jax.tree.leaves(params)[0].sharding, "mesh", None)
        gen = resumable.generate_resumable(
            model,
            params,
            prompt,
            num_tokens,
            out_dir / "sampler_state",
            seed=int(sc.seed),
            temperature=float(sc.temperature),
            top_k=int(sc.top_k),
            top_p=top_p,
            chunk_tokens=int(sc.chunk_tokens),
            save_every_chunks=int(sc.get("save_every_chunks", 6)),
            mesh=mesh if isinstance(mesh, jax.sharding.Mesh) else None,
            rules=self.config.sharding_rules,
            params_sha256=digest,
            extra_meta={"checkpoint_step": int(step)},
        )
        for c in gen:
            chunks.append(c)
        gen_s = time.time() - t0
        tokens = np.concatenate(chunks, axis=1) if chunks else np.zeros((len(prompts), 0), np.int32)
        files = []
        for i in range(len(prompts)):
            units = np.concatenate([prompt[i], tokens[i]]).astype(np.int32)
            base = out_dir / f"sample_{i}"
            files.append(os.fspath(base.with_suffix(".wav")))
            if not writer:
                continue
            with local_then_copy(base.with_suffix(".npy")) as f:
                np.save(f, units)
            with local_then_copy(base.with_suffix(".wav")) as f:
                n = vocoder_lib.decode_units_to_wav(vocoder, units, f)
            mel, frame_rate = _overview_mel(vocoder, units)
            with local_then_copy(base.with_suffix(".png")) as f:
                plots.save_spectrogram_png(
                    mel,
                    f,
                    frame_rate=frame_rate,
                    title=(
                        f"SpeechSSM step {step}: {sc.prompt_seconds:g} s prompt + "
                        f"{sc.seconds:g} s (T={float(sc.temperature):g}, top-k={int(sc.top_k)})"
                    ),
                )
            logging.info("Wrote %s (%.1f s)", files[-1], n / vocoder.sample_rate)
        summary = {
            "files": files,
            "out_dir": os.fspath(out_dir),
            "job_key": key,
            "request": {
                "checkpoint_step": int(step),
                "seconds": float(sc.seconds),
                "prompt_seconds": float(sc.prompt_seconds),
                "temperature": float(sc.temperature),
                "top_k": int(sc.top_k),
                "top_p": top_p,
                "seed": int(sc.seed),
                "batch_size": len(prompts),
                "chunk_tokens": int(sc.chunk_tokens),
            },
            "tokens": int(tokens.shape[1]),
            "seconds": tokens.shape[1] / UNIT_RATE,
            "decode_ms_per_token": 1e3 * gen_s / max(tokens.shape[1], 1),
            "params_digest_s": digest_s,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "distinct_units": int(len(np.unique(tokens))) if tokens.size else 0,
        }
        if writer:
            write_text_atomic(summary_path, json.dumps(summary, indent=2))
        return summary

    def evaluate(self, model, params, step, eval_loss) -> dict[str, Any]:
        from avjax.io import as_path

        facts = self.prepare()
        out = {
            "unigram_entropy_nats": facts["unigram_entropy_nats"],
            "eval_perplexity": math.exp(eval_loss) if eval_loss is not None else None,
        }
        ec = self.config.get("eval")
        if ec is None or ec.get("longform", True):
            from avjax.eval import longform

            out.update(
                longform.evaluate_longform(
                    [longform.ModelEntry(self.name, model, params)],
                    self._docs["heldout"],
                    self._prepared["vocoder"],
                    as_path(self.workdir) / "eval" / f"step_{step}",
                    longform.LongformConfig.from_config(self.config),
                    step=step,
                )
            )
        return out
