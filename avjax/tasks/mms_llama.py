"""MMS-LLaMA task: AV speech recognition with an LLM on few multimodal speech tokens.

Data: `avjax.data.video.av_data.AVData` (the embedded AV corpus' LRS3 view by default;
training babble, `train_babble`: another utterance of the batch at an SNR from the paper's
discrete set, `model.babble`) + the text tokenizer (`avjax.data.text.tokenizer`: a
BPE or, `model.tokenizer="word"`, a word-level vocabulary trained on the train transcripts,
or `model.llama_dir`'s tokenizer.json). Each batch gets
`tokens / targets / weights [B, L]` laid out as

    [bos, instruction] [max_queries speech slots] [transcript, eos] [pad ...]

with weights 1 exactly on the positions that predict the transcript and its eos, and
`rate [B]`, the utterance's text tokens per second over the training mean (the speech-rate
predictor's target). The speech slots an utterance does not use are masked in the LLM
(`avjax.models.mms_llama.padded_lm`) and carry no loss weight. `train.param_groups` is
derived here from `model.llm_train` / `model.train_encoders` (`param_groups`), so overrides
of those reach the optimizer. `model.whisper_dir` / `model.avhubert_ckpt` weights replace
the random encoders at init (`init_variables`). Evaluator `mms_wer` (`--mode=eval`): beam
search, WER clean and with babble at each SNR, speech tokens per second of audio;
`<workdir>/eval/step_N/wer.json`.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avjax.data.text import tokenizer as text_tok
from avjax.data.video import av_data
from avjax.eval import evaluators
from avjax.io import write_text_atomic
from avjax.models import mms_llama as mm
from avjax.nn import quant
from avjax.nn.lora import LoraConfig, lora_param_groups, lora_scope
from avjax.nn.transformer import DecoderConfig, Llama3RopeScaling
from avjax.nn.whisper import WhisperEncoder
from avjax.tasks.base import Batch, LossContext, Metrics, Task
from avjax.train.optim import frozen_leaves

FROZEN_ENCODERS = {
    "none": "audio_encoder|video_encoder|llm",
    "audio": "video_encoder|llm",
    "all": "llm",
}


def param_groups(model_cfg: Any) -> list[dict[str, Any]]:
    """`config.train.param_groups` from `model.llm_train` ("lora": adapters only, the paper;
    "lora+embed": also the LLM's embedding and head; "all": the whole LLM) and
    `model.train_encoders` ("none": both frozen, the paper; "audio": the audio encoder
    trains; "all"; the log-mel front-end always trains): the LoRA adapters and the new
    modules (fusion, Q-Former, projector, rate predictor) train; the LLM base and the frozen
    encoders get no gradient and no optimizer state."""
    groups = [lora_param_groups()[0]]
    if model_cfg.llm_train == "lora+embed":
        groups.append({"regex": r"^llm/(embedding|lm_head)$", "optimizer": "adamw"})
    elif model_cfg.llm_train not in ("lora", "all"):
        raise ValueError(
            f"model.llm_train={model_cfg.llm_train!r}: expected 'lora', 'lora+embed' or 'all'"
        )
    frozen = FROZEN_ENCODERS.get(str(model_cfg.train_encoders))
    if frozen is None:
        raise ValueError(
            f"model.train_encoders={model_cfg.train_encoders!r}: expected {list(FROZEN_ENCODERS)}"
        )
    if model_cfg.llm_train == "all":  # the whole (random, tiny) LLM trains, adapters too
        frozen = frozen.removesuffix("llm").rstrip("|")
        if not frozen:
            return groups
    groups.append({"regex": rf"^({frozen})/", "optimizer": "frozen"})
    return groups


class MMSLLaMATask(Task):
    """See the module docstring; `config.model` is described in configs/mms_llama.py."""

    name = "mms_llama"
    rng_streams = ("dropout",)

    def __init__(self, config, workdir):
        super().__init__(config, workdir)
        derived = param_groups(config.model)
        given = [dict(g) for g in (config.train.get("param_groups") or ())]
        if given and given != derived:
            raise ValueError(
                "config.train.param_groups disagrees with model.llm_train="
                f"{config.model.llm_train!r} / model.train_encoders="
                f"{config.model.train_encoders!r} (it is derived from them): leave it empty; "
                f"given {given}, derived {derived}"
            )
        config.train.param_groups = derived  # what the optimizer (train/optim.py) reads
        self.data = av_data.AVData.from_config(config, workdir)
        self._text: dict[str, Any] | None = None

    # --- text -------------------------------------------------------------------------------
    def text(self) -> dict[str, Any]:
        """Tokenizer, prompt ids, sequence layout and the mean train speech rate (cached)."""
        if self._text is not None:
            return self._text
        if self.config.model.get("shape_only"):  # no corpus, no tokenizer (AOT fit checks)
            return self._shape_only_text()
        self.data.prepare()
        mc, meta = self.config.model, self.data._get("meta")
        train = [meta[i] for i in self.data._get("train")]
        if mc.llama_dir:
            tok, info = text_tok.load_tokenizer(mc.llama_dir), {"path": mc.llama_dir}
        else:
            texts = [m[3] for m in train] + [mc.instruction] * 20
            root = av_data.cache_root(self.config.data)
            kind = str(mc.get("tokenizer", "bpe"))  # bpe | word (one id per corpus word)
            tok, info = text_tok.prepared_text_tokenizer(
                texts, kind, mc.vocab_size, root, self.read_only
            )
        rates = [len(tok.encode(m[3])) / (m[5] / mm.FPS) for m in train]
        self._text = self._layout(tok, info, float(np.mean(rates)))
        return self._text

    def _layout(self, tok: Any, info: dict[str, Any], mean_rate: float) -> dict[str, Any]:
        """`text()`'s dict: the tokenizer, the prompt ids ([bos, instruction]), the speech
        slots, the sequence length (prompt + slots + max_text_tokens + eos), the mean rate."""
        mc = self.config.model
        prompt = [tok.bos_id] + tok.encode(mc.instruction)
        nq = int(mc.max_queries) if mc.speech_tokens else 0
        return {
            "tok": tok,
            "info": info,
            "prompt": prompt,
            "max_queries": nq,
            "seq_len": len(prompt) + nq + int(mc.max_text_tokens) + 1,
            "mean_rate": mean_rate,
        }

    def _shape_only_text(self) -> dict[str, Any]:
        """`model.shape_only`: the sequence layout with `model.vocab_size` ids and one id per
        instruction word (a stand-in for a tokenizer.json that is not at hand): shapes for a
        paper-scale build (`tools/aot_compile.py`) without the corpus; nothing trains on it."""
        tok = _ShapeOnlyTokenizer(int(self.config.model.vocab_size))
        self._text = self._layout(tok, {"path": "shape_only"}, 1.0)
        return self._text

    def _add_tokens(self, batch: Batch) -> dict[str, np.ndarray]:
        t = self.text()
        tok, n = t["tok"], t["seq_len"]
        start = len(t["prompt"]) + t["max_queries"]  # first transcript position (as input)
        b = batch["text"].shape[0]
        tokens = np.full((b, n), tok.pad_id, np.int32)
        targets = np.full((b, n), tok.pad_id, np.int32)
        weights = np.zeros((b, n), np.float32)
        rate = np.zeros((b,), np.float32)
        tokens[:, : len(t["prompt"])] = t["prompt"]
        for i, raw in enumerate(batch["text"]):
            ids = tok.encode(bytes(raw).rstrip(b"\0").decode("utf-8"))
            ids = ids[: int(self.config.model.max_text_tokens)] + [tok.eos_id]
            tokens[i, start : start + len(ids) - 1] = ids[:-1]
            targets[i, start - 1 : start - 1 + len(ids)] = ids  # the last slot predicts ids[0]
            weights[i, start - 1 : start - 1 + len(ids)] = 1.0
            secs = max(int(batch["length"][i]), 1) / mm.FPS
            rate[i] = (len(ids) - 1) / secs / t["mean_rate"]
        return {**batch, "tokens": tokens, "targets": targets, "weights": weights, "rate": rate}

    def prepare(self, read_only: bool | None = None) -> dict[str, Any]:
        facts = dict(self.data.prepare(read_only))
        t = self.text()
        facts.update(
            text_vocab=t["tok"].vocab_size,
            prompt_tokens=len(t["prompt"]),
            seq_len=t["seq_len"],
            mean_text_tokens_per_s=t["mean_rate"],
        )
        return facts

    def train_dataset(self, process_index: int, process_count: int):
        bc = self.config.model.babble
        talkers = int(bc.get("talkers", 1))
        noisy = lambda b: train_babble(b, float(bc.prob), tuple(bc.snrs), talkers)  # noqa: E731
        ds = self.data.train_dataset(process_index, process_count)
        return ds.map(noisy).map(self._add_tokens)

    def eval_batches(self, process_index: int, process_count: int) -> list[Batch]:
        return [self._add_tokens(b) for b in self.data.eval_batches(process_index, process_count)]

    def dummy_batch(self) -> Batch:
        return self._add_tokens(self.data.dummy_batch())

    # --- model ------------------------------------------------------------------------------
    def lora(self) -> LoraConfig:
        lc = self.config.model.lora
        return LoraConfig(int(lc.rank), float(lc.alpha), float(lc.dropout), str(lc.target))

    def build_model(self) -> nn.Module:
        mc, t = self.config.model, self.text()
        lm = dict(mc.llm)
        scaling = lm.pop("rope_scaling", None)
        llm_cfg = DecoderConfig.llama(
            vocab_size=t["tok"].vocab_size,
            rope_scaling=Llama3RopeScaling(*scaling) if scaling else None,
            **lm,
        )
        self._pretrained = {}
        video = self._video_encoder()
        return mm.MMSLLaMA(
            audio_encoder=self._audio_encoder(),
            video_encoder=video,
            mel_width=int(mc.get("mel_width", 64)),
            llm=llm_cfg.make(max_len=t["seq_len"], **_with_dtype(mc.get("llm_make", {}))),
            fusion=mc.fusion,
            queries_per_second=float(mc.queries_per_second),
            max_queries=t["max_queries"],
            rate_predictor=bool(mc.rate_predictor),
            prompt_len=len(t["prompt"]),
            qformer_width=int(mc.qformer_width),
            rate_width=int(mc.rate_width),
        )

    def _audio_encoder(self) -> nn.Module | None:
        """`model.audio_frontend`: "whisper" (`model.whisper_dir`'s encoder, loaded, or a
        random `model.whisper`) | "mel" (None: the model's `MelFrontend`) | "auto" (whisper
        when `model.whisper_dir` is given, else mel)."""
        mc = self.config.model
        kind = str(mc.get("audio_frontend", "whisper"))
        if kind == "auto":
            kind = "whisper" if mc.whisper_dir else "mel"
        if kind == "mel":
            if mc.whisper_dir:
                raise ValueError("model.whisper_dir is set but model.audio_frontend='mel'")
            return None
        if kind != "whisper":
            raise ValueError(f"model.audio_frontend={kind!r}: expected auto | mel | whisper")
        if mc.whisper_dir:  # a HF Whisper (or WhisperModel) directory: its encoder, frozen
            from avjax.convert.whisper import load_hf_whisper_encoder

            audio, wv = load_hf_whisper_encoder(mc.whisper_dir)
            self._pretrained["audio_encoder"] = {"params": wv["params"]}
            return audio
        return WhisperEncoder(max_source_positions=1500, **_with_dtype(mc.whisper))

    def _video_encoder(self) -> nn.Module | None:
        """`model.video_encoder`: tiny (random, CPU scale) | avhubert (`model.avhubert_ckpt`,
        an official fairseq checkpoint; video only, frozen) | none (audio only)."""
        mc = self.config.model
        if mc.video_encoder == "tiny":
            return mm.TinyVideoEncoder(**dict(mc.video))
        if mc.video_encoder == "avhubert":
            if not mc.avhubert_ckpt and mc.get("shape_only"):  # random Large, shapes only
                from avjax.nn.avhubert import AVHubertConfig

                dtype = _with_dtype(mc.get("llm_make", {})).get("dtype")
                return mm.AVHubertVideoEncoder(AVHubertConfig.large(), dtype=dtype)
            if not mc.avhubert_ckpt:
                raise ValueError("model.video_encoder='avhubert' needs model.avhubert_ckpt")
            from avjax.convert.avhubert import load_avhubert

            enc, variables, _ = load_avhubert(mc.avhubert_ckpt)
            self._pretrained["video_encoder"] = {
                k: {"avhubert": v} for k, v in nn.meta.unbox(variables).items()
            }
            return mm.AVHubertVideoEncoder(enc.config)
        if mc.video_encoder == "none":
            return None
        raise ValueError(f"model.video_encoder={mc.video_encoder!r}: tiny | avhubert | none")

    def model_inputs(self, batch: Batch) -> dict[str, Any]:
        return {k: batch[k] for k in ("audio", "video", "length", "tokens")}

    def init_variables(self, model: nn.Module, rng: jax.Array, batch: Batch) -> Any:
        """Random init, then the loaded encoders' weights (`model.whisper_dir`,
        `model.avhubert_ckpt`) in place of the random ones (shapes checked)."""
        with lora_scope(self.lora()):
            variables = dict(super().init_variables(model, rng, batch))
        for part, loaded in getattr(self, "_pretrained", {}).items():
            for col, tree in loaded.items():
                variables[col] = {**variables[col], part: _place(variables[col][part], tree, part)}
        return self._store_base(variables)

    BASE_DTYPES = ("float32", "bfloat16", "nf4", "int8")

    def _store_base(self, variables: dict[str, Any]) -> dict[str, Any]:
        """`model.llm_base_dtype`: the frozen LLM leaves (those `param_groups` freeze) as
        stored in the train state. "bfloat16": cast. "nf4" / "int8": the frozen projection
        kernels (`quant.BASE_WEIGHTS`) quantised (blocks of `model.llm_quant_block`) into the
        `quant.BASE_COLLECTION` collection (no gradient, no optimizer state; `_join_base` puts
        them back for `apply`), the other frozen LLM leaves (embedding, norms) cast to bfloat16.
        Adapters and whatever trains stay float32."""
        fmt = str(self.config.model.get("llm_base_dtype", "float32"))
        if fmt not in self.BASE_DTYPES:
            raise ValueError(f"model.llm_base_dtype={fmt!r}: expected one of {self.BASE_DTYPES}")
        if fmt == "float32":
            return variables
        frozen = frozen_leaves(self.config.train)
        params = dict(variables["params"])
        if fmt in ("nf4", "int8"):
            block = int(self.config.model.get("llm_quant_block", 64))
            llm, stored = quant.split_quantized(
                params["llm"], fmt, block, select=frozen(params)["llm"], prefix="llm/"
            )
            params["llm"], variables[quant.BASE_COLLECTION] = llm, {"llm": stored}
        boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731

        def cast(x: Any, is_frozen: bool) -> Any:
            v = x.unbox() if boxed(x) else x
            if not is_frozen or not jnp.issubdtype(v.dtype, jnp.floating):
                return x
            return x.replace_boxed(v.astype(jnp.bfloat16)) if boxed(x) else v.astype(jnp.bfloat16)

        is_frozen = frozen({"llm": params["llm"]})["llm"]
        params["llm"] = jax.tree.map(cast, params["llm"], is_frozen, is_leaf=boxed)
        return {**variables, "params": params}

    def _join_base(self, params: Any, model_state: Any) -> tuple[Any, dict[str, Any], Any]:
        """`(params with the quantised base as QTensors, the other model state, the stored
        base or None)` (see `_store_base`)."""
        rest = dict(model_state or {})
        stored = rest.pop(quant.BASE_COLLECTION, None)
        if stored is None:
            return params, rest, None
        fmt = str(self.config.model.llm_base_dtype)
        block = int(self.config.model.get("llm_quant_block", 64))
        return quant.join_quantized(params, stored, fmt, block), rest, stored

    def apply_loss(
        self, model: nn.Module, params: Any, batch: Batch, ctx: LossContext
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        params, rest, stored = self._join_base(params, ctx.model_state)
        if stored is not None:
            ctx = dataclasses.replace(ctx, model_state=rest)
        with lora_scope(self.lora(), ctx.train):
            (logits, rate), state = ctx.apply(
                model, params, **self.model_inputs(batch), train=ctx.train
            )
        if stored is not None:
            state = {**state, quant.BASE_COLLECTION: stored}
        w = batch["weights"]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        ce = jnp.sum(nll * w)
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * w)
        weight = jnp.sum(w)
        mse = jnp.mean((rate - batch["rate"]) ** 2)
        use_rate = bool(self.config.model.rate_predictor) and self.text()["max_queries"] > 0
        loss = ce + (float(self.config.model.rate_loss_weight) * weight * mse if use_rate else 0.0)
        metrics = {"weight": weight, "nll": ce, "accuracy": correct, "rate_mse": mse * weight}
        return loss, metrics, state

    def tokens_per_batch(self, batch: Batch) -> int:
        return int(np.sum(batch["weights"]))

    def compatibility(self) -> dict[str, Any]:
        t = self.text()
        return {**super().compatibility(), "tokenizer": t["info"].get("key", t["info"]["path"])}

    # --- inference --------------------------------------------------------------------------
    def transcribe(self, model: Any, params: Any, batch: Batch, num_beams: int = 5) -> dict:
        """Beam search on one batch -> {"hyps": [str], "n_q": [B], "rate": [B]}."""
        from avjax.sample.decode import beam_search

        t, mc = self.text(), self.config.model
        tok, p = t["tok"], len(t["prompt"]) + t["max_queries"]
        b = batch["text"].shape[0]
        params = self._join_base(params, self.model_state)[0]
        variables = self.variables(params)
        if t["max_queries"]:
            with lora_scope(self.lora()):
                speech, n_q, rate = self._prefix_lm(model).encode(
                    variables, batch["audio"], batch["video"], batch["length"]
                )
        else:
            speech = jnp.zeros((b, 0, model.llm.width))
            n_q, rate = np.zeros((b,), np.int32), np.ones((b,), np.float32)
        embeds, mask, n_pad = mm.splice(speech, jnp.asarray(n_q), len(t["prompt"]), p)
        prompt = jnp.asarray(batch["tokens"][:, :p])
        lm = self._prefix_lm(model)
        out = beam_search(
            lm,
            {"params": params["llm"], "embeds": embeds, "embeds_mask": mask, "n_pad": n_pad},
            prompt,
            int(mc.max_text_tokens) + 1,
            num_beams=num_beams,
            length_penalty=float(self.config.eval_decode.length_penalty),
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
        )
        hyps = [
            tok.decode(row[: int(n)])
            for row, n in zip(np.asarray(out.tokens), out.lengths, strict=True)
        ]
        return {"hyps": hyps, "n_q": np.asarray(n_q), "rate": np.asarray(rate)}

    def _prefix_lm(self, model: Any) -> mm.PrefixLM:
        key = id(model)
        if getattr(self, "_lm_key", None) != key:  # one wrapper per model: decode caches jit
            prompt_len = len(self.text()["prompt"])
            self._lm, self._lm_key = mm.PrefixLM(model.llm, self.lora(), prompt_len), key
            self._lm.encode = jax.jit(
                lambda v, a, vid, ln: model.apply(v, a, vid, ln, method="speech_tokens")
            )
        return self._lm


class _ShapeOnlyTokenizer:
    """`model.shape_only`'s stand-in tokenizer: one id per word, `vocab_size` entries."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [3] * len(text.split())

    def decode(self, ids: Any) -> str:
        return " ".join("?" for _ in ids)


def _with_dtype(options: Any) -> dict[str, Any]:
    """Module options from a config dict, a "dtype" name ("bfloat16") as a jnp dtype."""
    out = dict(options)
    if isinstance(out.get("dtype"), str):
        out["dtype"] = jnp.dtype(out["dtype"])
    return out


def _place(init: Any, loaded: Any, where: str) -> Any:
    """`loaded` (plain arrays) in the structure of `init` (possibly boxed with logical axes),
    shapes checked: a missing or mismatched parameter is named."""
    boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    flat_i, tree = jax.tree_util.tree_flatten_with_path(init, is_leaf=boxed)
    flat_l = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    missing = sorted(jax.tree_util.keystr(p) for p, _ in flat_i if p not in flat_l)
    if missing:  # (extra loaded ones, e.g. AV-HuBERT's unused audio front-end, are dropped)
        raise ValueError(f"loaded {where}: no weights for the model's {missing}")
    out = []
    for path, x in flat_i:
        new = jnp.asarray(flat_l[path], jnp.float32)
        ref = x.unbox() if boxed(x) else x
        if new.shape != ref.shape:
            name = where + jax.tree_util.keystr(path)
            raise ValueError(f"loaded {name}: shape {new.shape}, the model expects {ref.shape}")
        out.append(x.replace_boxed(new.astype(ref.dtype)) if boxed(x) else new.astype(ref.dtype))
    return jax.tree_util.tree_unflatten(tree, out)


def babble_noise(audio: np.ndarray, i: int, talkers: int, rng: np.random.Generator) -> np.ndarray:
    """Babble for row `i` of `audio [B, samples]`: the sum of `talkers` other rows (distinct,
    drawn by `rng`; at most B - 1) -> `[samples]`."""
    others = [j for j in range(len(audio)) if j != i]
    pick = rng.permutation(len(others))[: max(1, min(talkers, len(others)))]
    return np.sum(audio[[others[k] for k in pick]], axis=0)


def _babble(audio: np.ndarray, snr_db: float, seed: int, talkers: int = 1) -> np.ndarray:
    """Each row mixed with babble of `talkers` other rows of the batch (other held-out
    utterances) at `snr_db`."""
    rng = np.random.default_rng(seed)
    rows = [babble_noise(audio, i, talkers, rng) for i in range(len(audio))]
    return np.stack([av_data.mix_babble(a, n, snr_db) for a, n in zip(audio, rows, strict=True)])


def train_babble(batch: Batch, prob: float, snrs: tuple[float, ...], talkers: int = 1) -> Batch:
    """Training babble as the paper's: each row of `audio [B, samples]`, with probability
    `prob`, gets babble (the sum of `talkers` other utterances of the batch) mixed in at an
    SNR drawn from the discrete set `snrs` (dB). Seeded by the batch's content:
    deterministic on resume."""
    audio = np.asarray(batch["audio"])
    if prob <= 0 or not snrs or len(audio) < 2:
        return batch
    rng = np.random.default_rng(zlib.crc32(np.ascontiguousarray(audio[:, :256]).tobytes()))
    out = audio.copy()
    for i in range(len(audio)):
        noise = babble_noise(audio, i, talkers, rng)
        snr = float(snrs[int(rng.integers(len(snrs)))])
        if rng.random() < prob:
            out[i] = av_data.mix_babble(audio[i], noise, snr)
    return {**batch, "audio": out}


@evaluators.register("mms_wer")
def mms_wer(ctx: evaluators.EvalContext, options: Any) -> dict[str, Any]:
    """WER (jiwer) of beam-search transcripts of the held-out utterances, clean and with babble
    at each SNR of `options["snrs"]`; speech tokens per second of audio. Writes wer.json."""
    import jiwer

    task: MMSLLaMATask = ctx.task
    n_items = int(task.data.facts["eval_items"])
    batches = task.eval_batches(jax.process_index(), jax.process_count())
    beams = int(options.get("num_beams", 5))
    talkers = int(task.config.model.babble.get("talkers", 1))
    report: dict[str, Any] = {"step": ctx.step, "num_beams": beams, "utterances": 0}
    conds = [("clean", None)] + [(f"snr{s:g}", float(s)) for s in options.get("snrs", ())]
    examples = []
    for name, snr in conds:
        refs, hyps, nq, secs = [], [], [], []
        for bi, batch in enumerate(batches):
            if snr is not None:
                seed = 1000 * bi + int(snr) + 100
                batch = {**batch, "audio": _babble(batch["audio"], snr, seed, talkers)}
            out = task.transcribe(ctx.model, ctx.params, batch, beams)
            for i, h in enumerate(out["hyps"]):
                if len(refs) >= n_items:
                    break
                refs.append(bytes(batch["text"][i]).rstrip(b"\0").decode().lower())
                hyps.append(h.lower())
                nq.append(int(out["n_q"][i]))
                secs.append(int(batch["length"][i]) / mm.FPS)
        report[f"wer_{name}"] = float(jiwer.wer(refs, [h if h.strip() else "-" for h in hyps]))
        if name == "clean":
            report["speech_tokens_per_s"] = float(np.sum(nq) / np.sum(secs))
            report["utterances"] = len(refs)
            examples = [{"ref": r, "hyp": h} for r, h in zip(refs[:5], hyps[:5], strict=True)]
    report["examples"] = examples
    path = ctx.out_dir("wer.json")
    write_text_atomic(path, json.dumps(report, indent=2))
    return {k: v for k, v in report.items() if isinstance(v, float)} | {"report": str(path)}
