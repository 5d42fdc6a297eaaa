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

from avjax.data import lm_windows
from avjax.data.units import UNIT_RATE
from avjax.models import speechssm as speechssm_lib
from avjax.sample import autoregressive
from avjax.tasks.base import Batch, Metrics, Task


def cache_root(data_cfg: Any) -> str:
    """Where corpora are cached: `config.data.cache_dir`, $AVJAX_CACHE or ~/.cache/avjax."""
    return (
        data_cfg.cache_dir or os.environ.get("AVJAX_CACHE") or os.path.expanduser("~/.cache/avjax")
    )


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
    def prepare(self) -> dict[str, Any]:
        """Builds the corpus and the unit tokenizer/decoder once; loads them afterwards."""
        if self._prepared is not None:
            return self._prepared["facts"]
        from avjax.data import corpus as corpus_lib
        from avjax.data import units as units_lib

        dc = self.config.data
        if dc.name == "default":
            root = os.path.join(cache_root(dc), f"default_corpus_{dc.minutes:g}min")
            utts = corpus_lib.build_default_corpus(
                root, minutes=float(dc.minutes), heldout_fraction=float(dc.heldout_fraction)
            )
        elif dc.name == "dir":
            if not dc.manual_dir:
                raise ValueError("config.data.name='dir' needs --config.data.manual_dir=DIR")
            utts = corpus_lib.scan_audio_dir(
                dc.manual_dir, heldout_fraction=float(dc.heldout_fraction)
            )
        else:
            raise ValueError(
                f"config.data.name={dc.name!r}: expected 'default' (embedded corpus) or 'dir' "
                "(your own audio directory in config.data.manual_dir)"
            )
        tokenizer, vocoder, units = units_lib.prepare_units(
            utts,
            os.path.join(self.workdir, "units"),
            num_units=int(dc.num_units),
            seed=int(self.config.seed),
            kmeans_iters=int(dc.kmeans_iters),
            vocoder_steps=int(dc.vocoder_steps),
        )
        docs: dict[str, dict[str, list]] = {"train": {}, "heldout": {}}
        for u in utts:  # utterances are listed in document order
            docs[u.split].setdefault(u.doc_id, []).append(units[u.id])
        self._docs = {
            split: [np.concatenate(parts).astype(np.int32) for parts in d.values()]
            for split, d in docs.items()
        }
        if not self._docs["heldout"]:
            raise ValueError(
                "the corpus has no held-out documents: raise config.data.heldout_fraction"
            )
        train_units = np.concatenate(self._docs["train"])
        counts = np.bincount(train_units, minlength=tokenizer.num_units)
        p = counts[counts > 0] / counts.sum()
        facts = {
            "num_units": tokenizer.num_units,
            "unigram_entropy_nats": float(-(p * np.log(p)).sum()),
            "train_tokens": int(len(train_units)),
            "train_hours": len(train_units) / UNIT_RATE / 3600,
            "heldout_tokens": int(sum(len(d) for d in self._docs["heldout"])),
            "train_docs": len(self._docs["train"]),
            "heldout_docs": len(self._docs["heldout"]),
        }
        self._prepared = {"facts": facts, "tokenizer": tokenizer, "vocoder": vocoder}
        if jax.process_index() == 0:
            with open(os.path.join(self.workdir, "data_facts.json"), "w") as f:
                json.dump(facts, f, indent=2)
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
        return {
            "task": self.name,
            "model": self.config.model.to_dict(),
            # What defines the unit vocabulary: other units would make the weights meaningless.
            "units": {
                k: self.config.data[k]
                for k in ("name", "minutes", "manual_dir", "num_units", "kmeans_iters")
            },
            "seed": int(self.config.seed),
        }

    # --- inference --------------------------------------------------------------------------
    def sample(self, model, params, step: int) -> dict[str, Any]:
        """Continues held-out prompts for `config.sample.seconds`; writes WAV, PNG, units."""
        from avjax.data import plots
        from avjax.data import vocoder as vocoder_lib

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
        out_dir = os.path.join(self.workdir, "samples", f"step_{step}")
        os.makedirs(out_dir, exist_ok=True)
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
        gen = autoregressive.generate(
            model,
            params,
            prompt,
            num_tokens,
            seed=int(sc.seed),
            temperature=float(sc.temperature),
            top_k=int(sc.top_k),
            chunk_tokens=int(sc.chunk_tokens),
        )
        from tqdm import tqdm

        with tqdm(total=num_tokens, unit="tok", desc="sampling", mininterval=2.0) as bar:
            for c in gen:
                chunks.append(c)
                bar.update(c.shape[1])
        gen_s = time.time() - t0
        tokens = np.concatenate(chunks, axis=1) if chunks else np.zeros((len(prompts), 0), np.int32)
        files = []
        for i in range(len(prompts)):
            units = np.concatenate([prompt[i], tokens[i]]).astype(np.int32)
            base = os.path.join(out_dir, f"sample_{i}")
            np.save(base + ".npy", units)
            n = vocoder_lib.decode_units_to_wav(vocoder, units, base + ".wav")
            mel, frame_rate = _overview_mel(vocoder, units)
            plots.save_spectrogram_png(
                mel,
                base + ".png",
                frame_rate=frame_rate,
                title=f"SpeechSSM step {step}: {sc.prompt_seconds:g} s prompt + {sc.seconds:g} s",
            )
            files.append(base + ".wav")
            logging.info("Wrote %s (%.1f s)", base + ".wav", n / vocoder.sample_rate)
        summary = {
            "files": files,
            "tokens": int(tokens.shape[1]),
            "seconds": tokens.shape[1] / UNIT_RATE,
            "decode_ms_per_token": 1e3 * gen_s / max(tokens.shape[1], 1),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "distinct_units": int(len(np.unique(tokens))) if tokens.size else 0,
        }
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        return summary

    def evaluate(self, model, params, step, eval_loss) -> dict[str, Any]:
        facts = self.prepare()
        return {
            "unigram_entropy_nats": facts["unigram_entropy_nats"],
            "eval_perplexity": math.exp(eval_loss) if eval_loss is not None else None,
        }
