r"""Long-form evaluation as in SpeechSSM (Park et al., 2025): continue held-out prompts to a
target length and measure, per time slice, how each model holds up.

  from avjax.eval import longform
  longform.evaluate_longform(
      [longform.ModelEntry("speechssm", model, params),
       longform.ModelEntry("speechtransformer", tf_model, tf_params)],
      heldout_docs, vocoder, "out/", longform.LongformConfig(seconds=240.0))

For each of `num_prompts` held-out documents (the longest first), the first `prompt_seconds`
are the prompt; every model continues it for `seconds` with the shared sampler
(`avjax.sample.autoregressive.generate`, all prompts in one batch), and the held-out
continuation itself (`ground_truth`) is evaluated beside them as the reference row. The
continuation is cut into slices of `slice_seconds`; per slice (see `avjax.eval.metrics`):

  ppl                unit perplexity of the held-out continuation under teacher forcing (models
                     only; as far as the held-out document reaches)
  distinct_1..4      distinct-n of the generated units in the slice
  repeat_4           fraction of the slice's 4-grams already seen (prompt or earlier)
  longest_repeat_s   longest span repeated within the slice, seconds
  speaker_sim        cosine similarity of GE2E speaker-verification d-vectors (resemblyzer's
                     pretrained encoder, ported to JAX: `avjax.eval.speaker`) to the prompt's
  dnsmos_sig / dnsmos_bak / dnsmos_ovrl
                     DNSMOS P.835 (1-5): speech signal, background, overall quality; a
                     naturalness proxy (`avjax.eval.dnsmos`); both need the `eval` extra
  mfcc_sim           cosine similarity of MFCC mean/std statistics to the prompt's: a spectral
                     similarity, not a speaker model (near 1 for any speech-like audio)
  continuity_boundary / continuity_within
                     log-mel distance (dB) across the slice's start boundary / at its middle
  sc_l               SC-L: similarity of the slice transcript's MiniLM embedding to the prompt
                     transcript's (pocketsphinx ASR); needs the `eval` extra

Audio: units -> WAV with the task's unit vocoder (`decode_units_to_wav`, windowed, flat memory),
prompt and continuation decoded together (so the join is the vocoder's, as a listener hears
it); the prompt alone is decoded once more as the reference for speaker similarity and SC-L.

Writes into `out_dir`: `report.md` (settings, timing, one table per metric: slice x model, and
the first prompt's transcripts), `plots/<metric>.png` (every model on one plot, value over
time), `eval.json` (everything, per prompt too), `tensorboard/<model>/` (scalars
`longform/<metric>` with step = slice end in seconds, so TensorBoard overlays the models), and
`audio/<model>_<prompt>.wav` (optional).

Still proxies (said in the report): `ppl` is unit perplexity (the paper also uses transcript
perplexity under a text LM), SC-L uses pocketsphinx + MiniLM (the paper: a large ASR model),
DNSMOS stands in for human MOS, and there is no LLM judge offline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from avjax.data.speech import units as units_lib
from avjax.data.speech.units import SAMPLES_PER_UNIT, UNIT_RATE
from avjax.eval import evaluators, metrics
from avjax.io import PathLike, as_path, local_then_copy, write_text_atomic

GROUND_TRUTH = "ground_truth"
FRAMES_PER_SECOND = 100  # log-mel frame rate (units_lib.HOP_LENGTH at 16 kHz)

# Metric name -> (title, unit / direction) for reports and plots; in display order.
METRICS: dict[str, tuple[str, str]] = {
    "ppl": ("Unit perplexity of the held-out continuation", "lower is better"),
    "sc_l": ("SC-L: transcript similarity to the prompt", "higher is better"),
    "speaker_sim": ("Speaker similarity to the prompt (GE2E d-vectors)", "higher is better"),
    "dnsmos_ovrl": ("DNSMOS P.835 OVRL: overall quality (1-5)", "higher is better"),
    "dnsmos_sig": ("DNSMOS P.835 SIG: speech signal (1-5)", "higher is better"),
    "dnsmos_bak": ("DNSMOS P.835 BAK: background noise (1-5)", "higher is better"),
    "mfcc_sim": ("MFCC-statistics similarity to the prompt (not a speaker model)", "saturates"),
    "distinct_1": ("distinct-1 of generated units", "ground truth is the reference"),
    "distinct_2": ("distinct-2 of generated units", "ground truth is the reference"),
    "distinct_3": ("distinct-3 of generated units", "ground truth is the reference"),
    "distinct_4": ("distinct-4 of generated units", "ground truth is the reference"),
    "repeat_4": ("Fraction of 4-grams seen before", "ground truth is the reference"),
    "longest_repeat_s": ("Longest repeated span in slice (s)", "lower is better"),
    "continuity_boundary": ("Log-mel jump across slice start (dB)", "near 'within' is good"),
    "continuity_within": ("Log-mel change at slice middle (dB)", "reference for the jump"),
}


@dataclasses.dataclass
class ModelEntry:
    """One model to evaluate: a display name, the Flax module and its params.

    `model.apply({"params": params}, tokens [b, t], segment_pos [b, t], cache=None,
    return_cache=False)` must return `(logits [b, t, vocab], cache)` (the sampler's contract).
    A Transformer's KV cache must hold `prompt + seconds` of tokens.
    """

    name: str
    model: Any
    params: Any


@dataclasses.dataclass
class LongformConfig:
    """Settings of `evaluate_longform`.

    Attributes:
      prompt_seconds: prompt length (the paper: 10 s).
      seconds: continuation length (the paper: 4 and 16 minutes).
      slice_seconds: slice length; 0 picks the smallest of 1, 2, 5, 10, 15, 30, 60, 120,
        300 s giving at most 16 slices.
      num_prompts: held-out documents used (the longest ones).
      temperature, top_k, top_p, seed, chunk_tokens: the sampler's settings.
      transcripts: SC-L with pocketsphinx + MiniLM: True (error naming the `eval` extra if
        missing), False (skip), "auto" (use when installed, else skip with a warning and a
        note in the report).
      ground_truth: also evaluate the held-out continuation (the reference row).
      save_audio: keep the decoded WAVs under `out_dir/audio/`.
      vocoder_iters: Griffin-Lim iterations when decoding units to audio.
      asr_seconds: transcribe (for SC-L) only the first this many seconds of each slice (and
        of the prompt); 0 = all of it. pocketsphinx runs at about real time on clean speech
        and several times slower on noisy audio (2 CPU cores), so 16-minute evaluations
        want a bound: e.g. 10 s of every 60 s slice.
      quality: GE2E speaker similarity and DNSMOS (resemblyzer, speechmos, onnxruntime):
        True, False or "auto" (as `transcripts`).
      dnsmos_windows: DNSMOS 9 s windows scored per slice, spread evenly (0 = one every
        second, as the reference; ~1 s of CPU each).
    """

    prompt_seconds: float = 10.0
    seconds: float = 60.0
    slice_seconds: float = 0.0
    num_prompts: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    chunk_tokens: int = 250
    transcripts: bool | str = "auto"
    ground_truth: bool = True
    save_audio: bool = True
    vocoder_iters: int = 16
    asr_seconds: float = 0.0
    quality: bool | str = "auto"
    dnsmos_windows: int = 4

    @classmethod
    def from_config(cls, config: Any) -> LongformConfig:
        """From a task config: `config.sample` (prompt_seconds, seconds, temperature, top_k,
        seed, chunk_tokens, batch_size -> num_prompts), then any key of `config.eval` (if the
        config has that section) that names a field here."""
        kw: dict[str, Any] = {}
        sc = config.get("sample")
        if sc is not None:
            for k in ("prompt_seconds", "seconds", "temperature", "top_k", "seed", "chunk_tokens"):
                if k in sc:
                    kw[k] = sc[k]
            if "batch_size" in sc:
                kw["num_prompts"] = sc["batch_size"]
        ec = config.get("eval")
        if ec is not None:
            names = {f.name for f in dataclasses.fields(cls)}
            kw.update({k: v for k, v in ec.items() if k in names})
        return cls(**kw)

    def resolved_slice_seconds(self) -> float:
        if self.slice_seconds > 0:
            return float(self.slice_seconds)
        for s in (1, 2, 5, 10, 15, 30, 60, 120, 300):
            if self.seconds / s <= 16:
                return float(s)
        return float(math.ceil(self.seconds / 16 / 60) * 60)


def task_eval_data(task: Any) -> tuple[Sequence[np.ndarray], Any]:
    """`(held-out unit documents, unit vocoder)` of a prepared SpeechSSM-family task.

    The documents are the task's held-out split (`[units]` int32 arrays, document order): a
    list for the embedded corpus, a lazy memory-mapped `TokenStore` for real corpora (not
    copied: a LibriLight held-out fraction is gigabytes).
    """
    task.prepare()
    return task.data.docs["heldout"], task.data.vocoder


# --- pieces ---------------------------------------------------------------------------------


def _pick_prompts(
    docs: Sequence[np.ndarray], prompt_len: int, num_tokens: int, n: int
) -> list[tuple[int, int]]:
    """`n` prompt positions `(document index, start unit)`.

    Each document is cut into consecutive windows of `prompt_len + num_tokens` units; a
    window counts if its prompt fits. Windows are taken first-window-of-each-document first
    (longest documents first), so prompts come from distinct documents while there are enough
    and from later parts of the longest documents otherwise (small corpora).
    """
    span = prompt_len + num_tokens
    lengths = getattr(docs, "lengths", None)  # a TokenStore knows them without reading
    lengths = [len(d) for d in docs] if lengths is None else [int(n) for n in lengths]
    windows = [
        (k, -n, i, k * span)
        for i, n in enumerate(lengths)
        for k in range(max(0, -(-(n - prompt_len) // span)))
    ]
    if not windows:
        longest = max(lengths, default=0) / UNIT_RATE
        raise ValueError(
            f"no held-out document is longer than the {prompt_len / UNIT_RATE:g} s prompt "
            f"(the longest has {longest:.1f} s): lower prompt_seconds"
        )
    windows.sort()
    if len(windows) < n:
        logging.warning(
            "only %d prompt windows fit the held-out documents; asked for %d", len(windows), n
        )
    return [(i, start) for _, _, i, start in windows[:n]]


def _generate(entry: ModelEntry, prompts: np.ndarray, num_tokens: int, cfg: LongformConfig):
    """`([batch, num_tokens] int32, seconds taken)` continuing `prompts` `[batch, P]`."""
    from avjax.sample import autoregressive

    t0 = time.time()
    chunks = list(
        autoregressive.generate(
            entry.model,
            entry.params,
            prompts,
            num_tokens,
            seed=cfg.seed,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            chunk_tokens=cfg.chunk_tokens,
        )
    )
    tokens = np.concatenate(chunks, axis=1) if chunks else np.zeros((len(prompts), 0), np.int32)
    return tokens.astype(np.int32), time.time() - t0


def _teacher_forced_logprobs(
    entry: ModelEntry,
    prompts: np.ndarray,
    refs: Sequence[np.ndarray],
    num_tokens: int,
    chunk_tokens: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities of each held-out continuation `refs[i]` after `prompts[i]`.

    Returns `(logprobs [n_docs, num_tokens], mask [n_docs, num_tokens])`; the mask is 0 past
    a document's end. All documents are scored in one batch with the sampler's step
    (`autoregressive.score`: prefill, then chunks of teacher-forced decoding), so memory is
    constant in the length and the work stops where the longest reference does (a
    full-length parallel pass of 16 minutes would build 24k x 24k attention scores).
    """
    from avjax.sample import autoregressive

    reach = max((len(r) for r in refs), default=0)
    lps = np.zeros((len(refs), num_tokens))
    mask = np.zeros((len(refs), num_tokens))
    for i, r in enumerate(refs):
        mask[i, : len(r)] = 1.0
    if reach:
        targets = np.stack([np.pad(r, (0, reach - len(r))) for r in refs]).astype(np.int32)
        lp = autoregressive.score(
            entry.model, entry.params, prompts, targets, chunk_tokens=chunk_tokens
        )
        lps[:, :reach] = np.where(mask[:, :reach] > 0, lp, 0.0)
    return lps, mask


def _vocode(vocoder: Any, units: np.ndarray, path: PathLike | None, n_iter: int) -> np.ndarray:
    """Decodes `units` `[t]` (16 kHz, windowed) and returns `[640 t]` float32; the WAV is kept
    at `path` (a path or URL) unless it is None."""
    import soundfile as sf

    from avjax.data.speech import vocoder as vocoder_lib

    def decode(f: str) -> np.ndarray:
        vocoder_lib.decode_units_to_wav(vocoder, units, f, n_iter=n_iter, progress=False)
        return sf.read(f, dtype="float32")[0]

    if path is None:
        with tempfile.TemporaryDirectory(prefix="avjax-eval-") as d:
            return decode(os.path.join(d, "audio.wav"))
    with local_then_copy(path) as f:
        return decode(f)


def _slice_metrics(
    units: np.ndarray,
    prompt_units: np.ndarray,
    full_wav: np.ndarray,
    prompt_wav: np.ndarray,
    slice_units: int,
) -> dict[str, np.ndarray]:
    """Per-slice metrics `{metric: [slices]}` of one continuation `units` `[t]` (its audio:
    `full_wav`, prompt included), transcripts aside."""
    p = len(prompt_units)
    out = dict(metrics.ngram_stats(units, slice_units, context=prompt_units))
    cont_wav = full_wav[p * SAMPLES_PER_UNIT :]
    slice_samples = slice_units * SAMPLES_PER_UNIT
    out["mfcc_sim"] = metrics.speaker_similarity_by_slice(prompt_wav, cont_wav, slice_samples)
    fpu = units_lib.FRAMES_PER_UNIT
    c = metrics.continuity(
        units_lib.log_mel(full_wav), p * fpu, slice_units * fpu, FRAMES_PER_SECOND // 2
    )
    out["continuity_boundary"], out["continuity_within"] = c["boundary"], c["within"]
    return out


def _transcribe_slices(
    asr: Any, wav: np.ndarray, slice_samples: int, max_seconds: float = 0.0
) -> list[str]:
    """The transcript of each slice of `slice_samples` of the continuation audio `wav`
    `[samples]`; only its first `max_seconds` when that is positive."""
    cap = int(max_seconds * units_lib.SAMPLE_RATE) if max_seconds > 0 else None
    return [
        asr.transcribe(wav[s : e if cap is None else min(e, s + cap)])
        for s, e in metrics.slice_bounds(len(wav), slice_samples)
    ]


def _load_text_tools(mode: bool | str) -> tuple[Any, Any, str]:
    """`(asr, embedder, note)` for `LongformConfig.transcripts`."""
    if mode is False or mode == "off":
        return None, None, "SC-L not computed (transcripts=False)."
    from avjax.eval._deps import MissingEvalDependency
    from avjax.eval.asr import PocketSphinxASR
    from avjax.eval.text_embed import TextEmbedder

    try:
        return PocketSphinxASR(), TextEmbedder(), ""
    except MissingEvalDependency as e:
        if mode != "auto":
            raise
        logging.warning("SC-L skipped: %s", e)
        return None, None, f"SC-L not computed: {e}"


def _load_quality_tools(mode: bool | str, dnsmos_windows: int) -> tuple[Any, Any, str]:
    """`(GE2E encoder, DNSMOS scorer, note)` for `LongformConfig.quality`."""
    if mode is False or mode == "off":
        return None, None, "GE2E speaker similarity and DNSMOS not computed (quality=False)."
    from avjax.eval import dnsmos, speaker
    from avjax.eval._deps import MissingEvalDependency

    try:
        return speaker.default_encoder(), dnsmos.default_dnsmos(int(dnsmos_windows)), ""
    except MissingEvalDependency as e:
        if mode != "auto":
            raise
        logging.warning("GE2E / DNSMOS skipped: %s", e)
        return None, None, f"GE2E speaker similarity and DNSMOS not computed: {e}"


def _quality_metrics(
    speaker: Any, mos: Any, prompt_wav: np.ndarray, cont_wav: np.ndarray, slice_samples: int
) -> dict[str, np.ndarray]:
    """GE2E similarity to the prompt and DNSMOS SIG/BAK/OVRL per slice of `cont_wav`."""
    if speaker is None:
        return {}
    out = {"speaker_sim": speaker.similarity_by_slice(prompt_wav, cont_wav, slice_samples)}
    for k, v in mos.score_by_slice(cont_wav, slice_samples).items():
        out[f"dnsmos_{k}"] = v
    return out


def _nanmean(x: np.ndarray, axis: int | None = None) -> Any:
    x = np.asarray(x, np.float64)
    with np.errstate(all="ignore"):
        cnt = np.sum(~np.isnan(x), axis=axis)
        s = np.nansum(x, axis=axis)
        return np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)


def _pad_to(rows: list[np.ndarray], n: int) -> np.ndarray:
    """Stacks 1-D rows into `[len(rows), n]`, NaN-padded."""
    out = np.full((len(rows), n), np.nan)
    for i, r in enumerate(rows):
        out[i, : min(len(r), n)] = r[:n]
    return out


def _json_float(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_float(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_json_float(v) for v in np.asarray(x, dtype=object).tolist()] if len(x) else []
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


# --- the steps of evaluate_longform ------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    """Lengths in units (25 Hz) and the slices of one evaluation."""

    slice_seconds: float
    prompt_len: int
    num_tokens: int
    slice_units: int
    bounds: list[tuple[int, int]]


@dataclasses.dataclass
class _Prompts:
    """The held-out prompts and their references.

    Attributes:
      doc_ids: `(document index, start unit)` per prompt.
      prompts: `[n, prompt_len]` int32.
      refs: the held-out continuations `[<= num_tokens]` int32 (as far as each document goes).
      wavs: each prompt decoded alone `[640 prompt_len]` float32 (speaker reference).
      texts: each prompt's transcript ("" without ASR).
    """

    doc_ids: list[tuple[int, int]]
    prompts: np.ndarray
    refs: list[np.ndarray]
    wavs: list[np.ndarray] = dataclasses.field(default_factory=list)
    texts: list[str] = dataclasses.field(default_factory=list)


def _plan(entries: Sequence[ModelEntry], cfg: LongformConfig) -> _Plan:
    """Checks the model names and turns the settings' seconds into units and slices."""
    names = [e.name for e in entries]
    if not entries or len(set(names)) != len(names) or GROUND_TRUTH in names:
        raise ValueError(f"need unique model names other than {GROUND_TRUTH!r}, got {names}")
    slice_s = cfg.resolved_slice_seconds()
    prompt_len = max(1, int(round(cfg.prompt_seconds * UNIT_RATE)))
    num_tokens = int(round(cfg.seconds * UNIT_RATE))
    slice_units = int(round(slice_s * UNIT_RATE))
    if num_tokens <= 0 or slice_units <= 0:
        raise ValueError(f"seconds={cfg.seconds} and slice_seconds={slice_s} must be positive")
    bounds = metrics.slice_bounds(num_tokens, slice_units)
    return _Plan(slice_s, prompt_len, num_tokens, slice_units, bounds)


def _select_prompts(heldout_docs: Sequence[np.ndarray], plan: _Plan, n: int) -> _Prompts:
    """Step 1: `n` prompts and their held-out continuations (see `_pick_prompts`)."""
    doc_ids = _pick_prompts(heldout_docs, plan.prompt_len, plan.num_tokens, n)
    docs = [np.asarray(heldout_docs[i][start:], np.int32) for i, start in doc_ids]
    prompts = np.stack([d[: plan.prompt_len] for d in docs])
    refs = [d[plan.prompt_len : plan.prompt_len + plan.num_tokens] for d in docs]
    return _Prompts(doc_ids, prompts, refs)


def _text_tools(cfg: LongformConfig, asr: Any, embedder: Any) -> tuple[Any, Any, str]:
    """`(asr, embedder, note)`: the given pair, else built per `cfg.transcripts`; SC-L needs
    both (one alone is dropped, with a note)."""
    if asr is None and embedder is None:
        return _load_text_tools(cfg.transcripts)
    if asr is None or embedder is None:
        return None, None, "SC-L needs asr+embedder."
    return asr, embedder, ""


def _reference_audio(
    p: _Prompts, vocoder: Any, audio_dir: Any, cfg: LongformConfig, asr: Any, bar: Any
) -> None:
    """Step 2a: every prompt decoded alone (kept as `audio/prompt_<j>.wav`) and transcribed;
    fills `p.wavs` and `p.texts`."""
    for j, prompt in enumerate(p.prompts):
        wav = _vocode(vocoder, prompt, audio_dir / f"prompt_{j}.wav", cfg.vocoder_iters)
        p.wavs.append(wav)
        p.texts.append(
            _transcribe_slices(asr, wav, len(wav), cfg.asr_seconds)[0] if asr is not None else ""
        )
        bar.update(1)


def _continue_prompts(
    entry: ModelEntry | None, p: _Prompts, plan: _Plan, cfg: LongformConfig
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Step 1b: `(continuations [num_tokens] per prompt, row)` of one model, or the held-out
    continuations for the ground truth (`entry` None). The row starts the model's result:
    timing, per-prompt and pooled perplexity of the held-out continuation."""
    r: dict[str, Any] = {"per_prompt": {}, "timing": {}, "transcripts": []}
    if entry is None:
        return list(p.refs), r
    tokens, gen_s = _generate(entry, p.prompts, plan.num_tokens, cfg)
    r["timing"]["generate_s"] = gen_s
    r["timing"]["ms_per_token"] = 1e3 * gen_s / max(plan.num_tokens, 1)
    t0 = time.time()
    lp, mask = _teacher_forced_logprobs(entry, p.prompts, p.refs, plan.num_tokens, cfg.chunk_tokens)
    r["timing"]["teacher_forcing_s"] = time.time() - t0
    r["per_prompt"]["ppl"] = np.stack(
        [metrics.perplexity_by_slice(lp[i], plan.slice_units, mask[i]) for i in range(len(lp))]
    )
    r["ppl_by_slice_pooled"] = metrics.perplexity_by_slice(lp, plan.slice_units, mask)
    return list(tokens), r


@dataclasses.dataclass
class _Scorer:
    """Step 2b-3: vocodes, transcribes and measures continuations against the prompts."""

    vocoder: Any
    audio_dir: Any
    cfg: LongformConfig
    plan: _Plan
    prompts: _Prompts
    asr: Any
    embedder: Any
    speaker: Any = None
    mos: Any = None

    def score(self, name: str, gens: list[np.ndarray], r: dict[str, Any], bar: Any) -> None:
        """Per-slice metrics `r["per_prompt"][metric]` `[prompts, slices]` (NaN-padded),
        transcripts and timing of the continuations `gens` of the row `name`."""
        per: dict[str, list[np.ndarray]] = {}
        scl_rows = []
        clock = {"vocoder_s": 0.0, "asr_s": 0.0, "metrics_s": 0.0, "quality_s": 0.0}
        for j, units in enumerate(gens):
            t0 = time.time()
            wav = self._vocode(name, j, units)
            t1 = time.time()
            m = _slice_metrics(
                units, self.prompts.prompts[j], wav, self.prompts.wavs[j], self.plan.slice_units
            )
            tq = time.time()
            cont = wav[len(self.prompts.prompts[j]) * SAMPLES_PER_UNIT :]
            m |= _quality_metrics(
                self.speaker,
                self.mos,
                self.prompts.wavs[j],
                cont,
                self.plan.slice_units * SAMPLES_PER_UNIT,
            )
            quality_s = time.time() - tq
            for k, v in m.items():
                per.setdefault(k, []).append(v)
            t2 = time.time()
            texts = self._transcribe(j, wav)
            if texts is not None:
                scl_rows.append(
                    metrics.semantic_coherence(self.prompts.texts[j], texts, self.embedder.encode)
                )
            r["transcripts"].append(texts or [])
            clock["vocoder_s"] += t1 - t0
            clock["metrics_s"] += t2 - t1 - quality_s
            clock["quality_s"] += quality_s
            clock["asr_s"] += time.time() - t2
            bar.update(1)
        n_slices = len(self.plan.bounds)
        for k, v in per.items():
            r["per_prompt"][k] = _pad_to(v, n_slices)
        if scl_rows:
            r["per_prompt"]["sc_l"] = _pad_to(scl_rows, n_slices)
        r["timing"].update(clock)

    def _vocode(self, name: str, j: int, units: np.ndarray) -> np.ndarray:
        """Prompt `j` and its continuation `units` decoded together (the join is the
        vocoder's); kept as `audio/<name>_<j>.wav` with `save_audio`."""
        full = np.concatenate([self.prompts.prompts[j], units]).astype(np.int32)
        path = self.audio_dir / f"{name}_{j}.wav" if self.cfg.save_audio else None
        return _vocode(self.vocoder, full, path, self.cfg.vocoder_iters)

    def _transcribe(self, j: int, wav: np.ndarray) -> list[str] | None:
        """Transcripts of the continuation's slices (None without ASR)."""
        if self.asr is None:
            return None
        cont = wav[len(self.prompts.prompts[j]) * SAMPLES_PER_UNIT :]
        return _transcribe_slices(
            self.asr, cont, self.plan.slice_units * SAMPLES_PER_UNIT, self.cfg.asr_seconds
        )


def _summarise_row(name: str, r: dict[str, Any]) -> None:
    """Step 3b: `r["per_slice"]` (means over prompts; perplexity pools the tokens of all
    prompts instead) and `r["mean"]` (over slices)."""
    r["per_slice"] = {k: _nanmean(v, axis=0) for k, v in r["per_prompt"].items()}
    if "ppl" in r["per_slice"]:  # ppl pools tokens across prompts (not a mean of ppls)
        r["per_slice"]["ppl"] = r.pop("ppl_by_slice_pooled")
    r["mean"] = {k: float(_nanmean(v)) for k, v in r["per_slice"].items()}
    logging.info(
        "%s: %s", name, ", ".join(f"{k}={v:.3g}" for k, v in r["mean"].items() if k in METRICS)
    )


def _build_report(
    cfg: LongformConfig,
    plan: _Plan,
    p: _Prompts,
    results: dict[str, dict[str, Any]],
    step: int,
    scl_note: str,
    wall_s: float,
) -> dict[str, Any]:
    """Step 4a: the report (what `eval.json` holds)."""
    settings = {
        **dataclasses.asdict(cfg),
        "slice_seconds": plan.slice_seconds,
        "step": int(step),
        "prompts": [{"doc": i, "start_s": start / UNIT_RATE} for i, start in p.doc_ids],
        "reference_seconds": [len(r) / UNIT_RATE for r in p.refs],
        "sc_l_note": scl_note,
        "wall_s": wall_s,
    }
    keep = ("per_slice", "mean", "per_prompt", "timing", "transcripts")
    return {
        "settings": settings,
        "slices": [(s / UNIT_RATE, e / UNIT_RATE) for s, e in plan.bounds],
        "metrics": [k for k in METRICS if any(k in r["per_slice"] for r in results.values())],
        "prompt_transcripts": p.texts,
        "models": {n: {k: r[k] for k in keep} for n, r in results.items()},
    }


def write_outputs(report: dict[str, Any], out_dir: PathLike) -> Any:
    """Step 4b: `eval.json`, `plots/*.png`, `tensorboard/<model>/` and `report.md` into
    `out_dir`; returns the report's path."""
    out_dir = as_path(out_dir)
    write_text_atomic(out_dir / "eval.json", json.dumps(_json_float(report), indent=1))
    plot_paths = write_plots(report, out_dir / "plots")
    write_tensorboard(report, out_dir / "tensorboard")
    report_path = out_dir / "report.md"
    links = {k: f"plots/{as_path(p).name}" for k, p in plot_paths.items()}
    write_text_atomic(report_path, render_markdown(report, links))
    return report_path


# --- main entry -----------------------------------------------------------------------------


def evaluate_longform(
    entries: Sequence[ModelEntry],
    heldout_docs: Sequence[np.ndarray],
    vocoder: Any,
    out_dir: str,
    config: LongformConfig | None = None,
    *,
    step: int = 0,
    asr: Any = None,
    embedder: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Continues held-out prompts with every entry; metrics per slice; report, plots, JSON, TB.

    The steps: prompts (`_select_prompts`) -> reference audio and transcripts
    (`_reference_audio`) -> per row: generation and teacher forcing (`_continue_prompts`),
    vocoding, ASR and per-slice metrics (`_Scorer.score`), means (`_summarise_row`) -> report
    (`_build_report`) and its files (`write_outputs`).

    Args:
      entries: the models to compare (one or more; names must be unique and not
        "ground_truth").
      heldout_docs: held-out unit documents `[units]` (25 Hz); prompts come from the longest.
      vocoder: the units' `UnitVocoder` (units -> audio).
      out_dir: output folder (created; a path or a URL such as `gs://bucket/run/eval`).
      config: settings (`LongformConfig()` by default).
      step: the training step evaluated (recorded in the report and JSON).
      asr / embedder: override the pocketsphinx ASR (`transcribe(wav) -> str`) and the text
        embedder (`encode(texts) -> [n, d]`); default: built per `config.transcripts`.

    Returns:
      A flat summary `{"longform/<model>/<metric>": mean over slices}` plus
      `"longform/report": path`; `eval.json` holds everything.
    """
    cfg = config or LongformConfig()
    plan = _plan(entries, cfg)
    out_dir = as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    p = _select_prompts(heldout_docs, plan, int(cfg.num_prompts))
    asr, embedder, scl_note = _text_tools(cfg, asr, embedder)
    spk, mos, quality_note = _load_quality_tools(cfg.quality, cfg.dnsmos_windows)
    rows = [(e.name, e) for e in entries] + ([(GROUND_TRUTH, None)] if cfg.ground_truth else [])
    from tqdm import tqdm

    n = len(p.prompts)
    bar = tqdm(total=(len(rows) + 1) * n, desc="long-form eval", unit="run", disable=not progress)
    logging.info(
        "Long-form eval: %d prompt(s) of %.1f s continued by %.1f s (%d tokens), slices of %g s,"
        " models %s -> %s",
        n,
        plan.prompt_len / UNIT_RATE,
        cfg.seconds,
        plan.num_tokens,
        plan.slice_seconds,
        [e.name for e in entries],
        out_dir,
    )
    _reference_audio(p, vocoder, out_dir / "audio", cfg, asr, bar)
    scorer = _Scorer(vocoder, out_dir / "audio", cfg, plan, p, asr, embedder, spk, mos)
    results: dict[str, Any] = {}
    for name, entry in rows:
        gens, r = _continue_prompts(entry, p, plan, cfg)
        scorer.score(name, gens, r, bar)
        _summarise_row(name, r)
        results[name] = r
    bar.close()
    report = _build_report(cfg, plan, p, results, step, scl_note, time.time() - t_start)
    report["settings"]["quality_note"] = quality_note
    report_path = write_outputs(report, out_dir)
    logging.info("Long-form report: %s (%.0f s)", report_path, time.time() - t_start)
    summary: dict[str, Any] = {"longform/report": os.fspath(report_path)}
    for name, r in results.items():
        for k, v in r["mean"].items():
            summary[f"longform/{name}/{k}"] = v
    return summary


# --- outputs --------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    v = float(v)
    return f"{v:.3g}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"


def _time_label(seconds: float, minutes: bool) -> str:
    return f"{seconds / 60:g}" if minutes else f"{seconds:g}"


def render_markdown(report: dict[str, Any], plots: dict[str, str]) -> str:
    """The markdown report: settings, timing, one slice x model table per metric."""
    slices = report["slices"]
    minutes = slices[-1][1] > 300
    lines = _md_header(report["settings"]) + _md_timing(report["models"])
    lines += _md_metric_tables(report, plots, minutes)
    lines += _md_transcripts(report, minutes)
    return "\n".join(lines) + "\n"


def _md_header(st: dict[str, Any]) -> list[str]:
    """Title, settings and the SC-L note."""
    lines = [
        f"# Long-form evaluation (step {st['step']})",
        "",
        f"{len(st['prompts'])} held-out prompt(s) of {st['prompt_seconds']:g} s continued by "
        f"{st['seconds']:g} s; slices of {st['slice_seconds']:g} s (time from the end of the "
        f"prompt); sampling temperature {st['temperature']:g}, top-k {st['top_k']}, top-p "
        f"{st['top_p']:g}, seed {st['seed']}. Held-out continuation available: "
        + ", ".join(f"{s:.1f} s" for s in st["reference_seconds"])
        + f". Wall time {st['wall_s']:.0f} s.",
        "",
        "Values are means over prompts (perplexity pools the tokens of all prompts). "
        f"`{GROUND_TRUTH}` is the held-out continuation through the same vocoder and metrics.",
        "",
    ]
    if st.get("sc_l_note"):
        lines += [f"> {st['sc_l_note']}", ""]
    elif st.get("asr_seconds"):
        lines += [f"SC-L transcribes the first {st['asr_seconds']:g} s of every slice.", ""]
    if st.get("quality_note"):
        lines += [f"> {st['quality_note']}", ""]
    return lines + _md_what_is_measured(st)


def _md_what_is_measured(st: dict[str, Any]) -> list[str]:
    """What each audio metric is, and which are still proxies."""
    windows = st.get("dnsmos_windows", 0)
    where = f"{windows} evenly spread 9 s windows per slice" if windows else "every 1 s"
    return [
        "What is measured: `speaker_sim` is the cosine similarity of GE2E speaker-verification "
        "d-vectors (resemblyzer's pretrained encoder, in JAX; volume-normalised, no VAD "
        "trimming) of each slice and of the prompt. `dnsmos_*` are DNSMOS P.835 scores "
        f"(1-5; {where}, short slices looped to 9 s). `mfcc_sim` compares MFCC mean/std "
        "statistics: a spectral similarity, not a speaker model (near 1 for any speech-like "
        "audio).",
        "",
        "Still proxies: unit perplexity instead of transcript perplexity under a text LM; "
        "SC-L from pocketsphinx + MiniLM instead of a large ASR model; DNSMOS (trained on real "
        "recordings, not vocoded units) instead of human MOS; no LLM judge offline.",
        "",
    ]


def _md_timing(models: dict[str, Any]) -> list[str]:
    """The timing table (one row per model)."""
    lines = [
        "## Timing",
        "",
        "| model | ms/token (decode) | generate s | teacher forcing s | vocoder s | metrics s "
        "| ASR + SC-L s | GE2E + DNSMOS s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cols = (
        "ms_per_token",
        "generate_s",
        "teacher_forcing_s",
        "vocoder_s",
        "metrics_s",
        "asr_s",
        "quality_s",
    )
    for n, r in models.items():
        lines.append(f"| {n} | " + " | ".join(_fmt(r["timing"].get(c)) for c in cols) + " |")
    return lines


def _md_metric_tables(report: dict[str, Any], plots: dict[str, str], minutes: bool) -> list[str]:
    """Means over slices (metric x model), then per metric its plot and slice x model table."""
    slices, models = report["slices"], report["models"]
    unit = "min" if minutes else "s"
    names = list(models)
    lines = [
        "",
        "## Means over slices",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for k in report["metrics"]:
        lines.append(f"| {k} | " + " | ".join(_fmt(models[n]["mean"].get(k)) for n in names) + " |")
    for k in report["metrics"]:
        title, direction = METRICS[k]
        lines += ["", f"## {k}: {title}", "", f"({direction})", ""]
        if k in plots:
            lines += [f"![{k}]({plots[k]})", ""]
        lines += [f"| slice ({unit}) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for i, (s, e) in enumerate(slices):
            vals = []
            for n in names:
                v = models[n]["per_slice"].get(k)
                vals.append(_fmt(v[i]) if v is not None else "–")
            lines.append(
                f"| {_time_label(s, minutes)}–{_time_label(e, minutes)} | "
                + " | ".join(vals)
                + " |"
            )
    return lines


def _md_transcripts(report: dict[str, Any], minutes: bool) -> list[str]:
    """The first prompt's transcripts per model and slice (nothing without ASR)."""
    slices, models = report["slices"], report["models"]
    unit = "min" if minutes else "s"
    if not any(r["transcripts"] and r["transcripts"][0] for r in models.values()):
        return []
    lines = ["", "## Transcripts (prompt 0, pocketsphinx)", ""]
    lines += [f"- prompt: {report['prompt_transcripts'][0] or '(nothing recognised)'}", ""]
    for n, r in models.items():
        lines.append(f"**{n}**")
        lines.append("")
        for (s, e), text in zip(slices, r["transcripts"][0], strict=False):
            text = text if len(text) <= 200 else text[:200] + "…"
            lines.append(
                f"- {_time_label(s, minutes)}–{_time_label(e, minutes)} {unit}: "
                f"{text or '(nothing recognised)'}"
            )
        lines.append("")
    return lines


def write_plots(report: dict[str, Any], plot_dir: PathLike) -> dict[str, str]:
    """One PNG per metric (every model on one plot, value over time); returns {metric: path}.

    `plot_dir` may be a URL (`gs://...`): each PNG is rendered locally and copied there.

    `continuity_boundary` and `continuity_within` share one plot (`continuity.png`: solid =
    across the boundary, dotted = within the slice).
    """
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global state

    plot_dir = as_path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    slices, models = report["slices"], report["models"]
    minutes = slices[-1][1] > 300
    mids = np.asarray([(s + e) / 2 for s, e in slices]) / (60.0 if minutes else 1.0)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    style = {}
    for i, n in enumerate(models):
        style[n] = (
            {"color": "0.45", "linestyle": "--"}
            if n == GROUND_TRUTH
            else {"color": colors[i % len(colors)], "linestyle": "-"}
        )
    paths: dict[str, str] = {}
    groups: list[tuple[str, list[str]]] = []
    for k in report["metrics"]:
        if k == "continuity_within":
            continue
        if k == "continuity_boundary":
            groups.append(("continuity", ["continuity_boundary", "continuity_within"]))
        else:
            groups.append((k, [k]))
    for fname, keys in groups:
        fig = Figure(figsize=(7, 3.6), dpi=100)
        ax = fig.add_subplot()
        for n, r in models.items():
            for j, k in enumerate(keys):
                v = r["per_slice"].get(k)
                if v is None:
                    continue
                y = np.asarray([np.nan if x is None else x for x in v], np.float64)
                if np.all(np.isnan(y)):
                    continue
                kw = dict(style[n])
                if j == 1:
                    kw["linestyle"] = ":"
                label = n if len(keys) == 1 else f"{n} ({k.split('_')[-1]})"
                ax.plot(mids, y, marker="o", markersize=3, label=label, **kw)
        ax.set_xlabel(f"time into the continuation ({'min' if minutes else 's'})")
        title = "Acoustic continuity (dB)" if fname == "continuity" else METRICS[keys[0]][0]
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.fspath(plot_dir / f"{fname}.png")
        with local_then_copy(path) as f:
            fig.savefig(f, format="png")
        for k in keys:
            paths[k] = path
    return paths


def write_tensorboard(report: dict[str, Any], tb_dir: PathLike) -> None:
    """Scalars `longform/<metric>` per slice into `tb_dir/<model>/` (step = slice end, s)."""
    from avjax.eval.writers import summary_writer

    for n, r in report["models"].items():
        w = summary_writer(as_path(tb_dir) / n)
        for i, (_, e) in enumerate(report["slices"]):
            scalars = {}
            for k, v in r["per_slice"].items():
                x = v[i] if i < len(v) else None
                if x is not None and np.isfinite(x):
                    scalars[f"longform/{k}"] = float(x)
            if scalars:
                w.write_scalars(int(round(e)), scalars)
        w.flush()
        w.close()


# --- as an evaluator of config.evals ---------------------------------------------------------


def heldout_data(task: Any) -> tuple[Sequence[np.ndarray], Any]:
    """`(held-out unit documents, unit vocoder)` of a task: its `longform_data()` hook when it
    has one, else its data module's (`task.data`: `prepare()`, `docs["heldout"]`,
    `vocoder`), else `task_eval_data` (a SpeechSSM-family task's own)."""
    hook = getattr(task, "longform_data", None)
    if callable(hook):
        return hook()
    data = getattr(task, "data", None)
    if data is not None and hasattr(data, "docs") and hasattr(data, "vocoder"):
        data.prepare()
        return data.docs["heldout"], data.vocoder
    return task_eval_data(task)


@evaluators.register("longform")
class LongformEvaluator(evaluators.Evaluator):
    """`evaluate_longform` of the task's model against the ground truth, as `config.evals`
    entry. Settings: `LongformConfig.from_config` (config.sample, config.eval), then any of
    this entry's options naming a `LongformConfig` field. `out_dir` (option): a folder
    relative to the workdir (or absolute, or a URL), `{step}` filled in; default
    `eval/step_{step}`. Summary keys: `<model>/<metric>` (means over slices) and `report`.
    """

    def run(self, ctx: evaluators.EvalContext) -> dict[str, Any]:
        cfg = LongformConfig.from_config(ctx.task.config)
        fields = {f.name for f in dataclasses.fields(LongformConfig)}
        unknown = sorted(set(self.options) - fields - {"out_dir"})
        if unknown:
            raise ValueError(
                f"config.evals.{self.name}: unknown options {unknown}; known: "
                f"{sorted(fields | {'out_dir'})}"
            )
        cfg = dataclasses.replace(cfg, **{k: v for k, v in self.options.items() if k in fields})
        sub = str(self.options.get("out_dir", "") or "eval/step_{step}").format(step=ctx.step)
        out_dir = as_path(sub) if "://" in sub else as_path(ctx.workdir) / sub
        docs, vocoder = heldout_data(ctx.task)
        entry = ModelEntry(ctx.task.name, ctx.model, ctx.params)
        summary = evaluate_longform([entry], docs, vocoder, out_dir, cfg, step=ctx.step)
        return {k.removeprefix("longform/"): v for k, v in summary.items()}
