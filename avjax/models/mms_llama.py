"""MMS-LLaMA (Yeo et al., 2025, arXiv 2503.11315): AVSR with few multimodal speech tokens.

    audio  = Conv1d_k2s2(Whisper(log_mel))[:, :T]      # frozen encoder, 50 Hz -> 25 Hz
          (or MelFrontend(log_mel): normalised log-mel, 4 frames stacked, a conv; no encoder)
    video  = VideoEncoder(mouth crops)                  # frozen, 25 Hz (tiny | avhubert)
    fused  = concat(audio, video)  (or add)            # early AV fusion, [B, T, Df]
    rate   = RatePredictor(sg(Whisper at 12.5 Hz))     # normalised speech rate (MSE)
    f      = clip(rate, 1, 2)                           # speech-rate factor
    n_q    = max(int(len / 25 * qps * f), qps)          # queries for this utterance
    ctx    = linear_resample(fused, to f * len frames)  # per utterance, masked
    tokens = Projector(QFormer(queries[:n_q], ctx))     # [B, n_q, llm_width]
    LLM([instruction, tokens, transcript + eos])        # LoRA on q/k/v/o, base frozen

The LLM sequence has `max_queries` speech slots (fixed shapes); an utterance's `n_q` tokens
sit in the last `n_q` of them and the unused slots are masked out of the LLM's attention
(`pad_first`: moved to the front as a separate document, positions restarting after them, so
the logits equal those of the unpadded sequence; the decoding cache drops them,
`drop_padding`); the loss never weights them. The Q-Former's own self-attention runs over all
`max_queries` queries. The speech-rate predictor is trained jointly here (stop-gradient
into its Whisper input; its prediction used for the factor is stop-gradient too) instead of
the paper's separate pre-training stage; `rate_predictor=False` uses factor 1.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.data.speech.whisper_features import log_mel_from_audio
from avjax.nn import axes
from avjax.nn.avhubert import AVHubertConfig, AVHubertEncoder
from avjax.nn.qformer import QFormer
from avjax.nn.resnet import VisualFrontend
from avjax.nn.transformer import TransformerLM
from avjax.nn.whisper import WhisperEncoder, WhisperEncoderLayer, sinusoids

FPS = 25  # video frames (and fused features) per second
SAMPLES_PER_FRAME = 640  # 16 kHz audio per video frame


class TinyVideoEncoder(nn.Module):
    """Mouth crops `[batch, time, H, W, 1]` uint8/float -> `[batch, time, width]` at 25 Hz:
    the 3D-stem ResNet of `avjax.nn.resnet` per frame, then Whisper-style transformer layers
    (sinusoidal positions). A stand-in for AV-HuBERT at CPU scale."""

    width: int = 64
    resnet_widths: tuple[int, ...] = (8, 16, 32, 64)
    num_layers: int = 1
    num_heads: int = 4
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, video: jax.Array, train: bool = False) -> jax.Array:
        x = (video.astype(jnp.float32) / 255.0 - 0.421) / 0.165  # LRS3 mouth-crop statistics
        x = VisualFrontend(
            stem_features=self.resnet_widths[0],
            widths=self.resnet_widths,
            blocks=(1,) * len(self.resnet_widths),
            dtype=self.dtype,
            name="frontend",
        )(x, train)
        x = nn.Dense(self.width, dtype=self.dtype, name="proj")(x)
        t = x.shape[1]
        x = x + jnp.asarray(sinusoids(t, self.width))[None].astype(x.dtype)
        for i in range(self.num_layers):
            x = WhisperEncoderLayer(self.width, self.num_heads, 4 * self.width, name=f"layers_{i}")(
                x
            )
        return nn.LayerNorm(name="norm")(x)


class AVHubertVideoEncoder(nn.Module):
    """AV-HuBERT on video only, as the paper uses it: mouth crops `[batch, time, H, W, 1]`
    uint8/float -> `last_hidden_state [batch, time, encoder_embed_dim]` at 25 Hz (frozen: no
    modality dropout, stored BatchNorm statistics). The official pipeline normalises the
    grey 88 x 88 crops with mean 0.421, std 0.165, as here."""

    config: AVHubertConfig
    dtype: jnp.dtype | None = None

    @property
    def width(self) -> int:
        return self.config.encoder_embed_dim

    @nn.compact
    def __call__(self, video: jax.Array, train: bool = False) -> jax.Array:
        del train  # frozen
        x = (video.astype(jnp.float32) / 255.0 - 0.421) / 0.165
        out = AVHubertEncoder(self.config, dtype=self.dtype, name="avhubert")(video=x)
        return out["last_hidden_state"]


class MelFrontend(nn.Module):
    """Log-mel `[batch, bins, 4T]` (100 Hz) -> `[batch, T, width]` at 25 Hz: each bin
    normalised per utterance over its first `4 * length [batch]` frames (mean 0, variance 1;
    zeros after), 4 frames stacked, a kernel-3 convolution + GELU, a linear map and
    sinusoidal positions. The audio path when no pretrained encoder is given: a tiny random
    encoder carries little, normalised spectra carry the words and little of the voice."""

    width: int = 64
    kernel: int = 3

    @nn.compact
    def __call__(self, mel: jax.Array, length: jax.Array) -> jax.Array:
        b, bins, n = mel.shape
        t = n // 4
        x = jnp.swapaxes(mel, 1, 2)[:, : 4 * t].astype(jnp.float32)  # [B, 4T, bins]
        valid = (jnp.arange(4 * t)[None] < 4 * length[:, None])[..., None]
        count = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1)
        mean = jnp.sum(jnp.where(valid, x, 0.0), axis=1, keepdims=True) / count
        var = jnp.sum(jnp.where(valid, (x - mean) ** 2, 0.0), axis=1, keepdims=True) / count
        x = jnp.where(valid, (x - mean) * jax.lax.rsqrt(var + 1e-4), 0.0)
        x = x.reshape(b, t, 4 * bins)
        x = nn.gelu(nn.Conv(self.width, (self.kernel,), padding="SAME", name="conv")(x))
        x = nn.Dense(self.width, name="proj")(x)
        return x + jnp.asarray(sinusoids(t, self.width))[None].astype(x.dtype)


class RatePredictor(nn.Module):
    """Whisper features `[batch, time, width]` (12.5 Hz) + a learned token -> pre-LN
    transformer -> ReLU(linear) on the token: the normalised speech rate `[batch]`."""

    width: int = 64
    num_layers: int = 2
    num_heads: int = 4

    @nn.compact
    def __call__(self, feats: jax.Array, mask: jax.Array) -> jax.Array:
        b = feats.shape[0]
        x = nn.Dense(self.width, name="in_proj")(feats)
        tok = self.param("token", nn.initializers.normal(0.02), (1, 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(tok, (b, 1, self.width)), x], axis=1)
        keep = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
        attn_mask = keep[:, None, None, :]
        for i in range(self.num_layers):
            h = nn.LayerNorm(name=f"ln1_{i}")(x)
            h = nn.MultiHeadDotProductAttention(self.num_heads, name=f"attn_{i}")(
                h, h, mask=attn_mask
            )
            x = x + h
            h = nn.LayerNorm(name=f"ln2_{i}")(x)
            h = nn.Dense(self.width, name=f"fc2_{i}")(nn.gelu(nn.Dense(4 * self.width)(h)))
            x = x + h
        return jax.nn.relu(nn.Dense(1, name="head")(x[:, 0]))[:, 0]


def resample_linear(x: jax.Array, src_len: jax.Array, dst_len: jax.Array, out: int) -> jax.Array:
    """Per row: the first `src_len` frames of `x [batch, time, dim]` linearly resampled to
    `dst_len` frames (end points kept), written into `[batch, out, dim]` (zeros after)."""

    def one(row: jax.Array, n: jax.Array, m: jax.Array) -> jax.Array:
        j = jnp.arange(out, dtype=jnp.float32)
        pos = j * (n - 1).astype(jnp.float32) / jnp.maximum(m - 1, 1).astype(jnp.float32)
        lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, row.shape[0] - 1)
        hi = jnp.clip(lo + 1, 0, jnp.maximum(n - 1, 0))
        w = (pos - lo)[:, None]
        y = row[lo] * (1 - w) + row[hi] * w
        return jnp.where((j < m)[:, None], y, 0.0)

    return jax.vmap(one)(x, src_len, dst_len)


def speech_slots(length: int, prompt_len: int, max_queries: int) -> jax.Array:
    """`[length]` bool: the speech-token slots `[prompt_len, prompt_len + max_queries)`."""
    i = jnp.arange(length)
    return (i >= prompt_len) & (i < prompt_len + max_queries)


def splice(
    speech: jax.Array, n_q: jax.Array, prompt_len: int, length: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Speech tokens `[B, M, W]` (the first `n_q [B]` used) -> (`embeds [B, length, W]`,
    `embeds_mask [B, length]`, `n_pad [B]` = M - n_q): the used tokens sit in the LAST `n_q`
    of the M slots after the prompt, so the unused slots are the first `n_pad`."""
    b, m, w = speech.shape
    n_pad = (m - n_q).astype(jnp.int32)
    src = (jnp.arange(m)[None] - n_pad[:, None]) % m  # rolled right by n_pad (zeros wrap in)
    speech = jnp.take_along_axis(speech, src[..., None], axis=1)
    embeds = jnp.zeros((b, length, w), speech.dtype)
    embeds = jax.lax.dynamic_update_slice_in_dim(embeds, speech, prompt_len, axis=1)
    mask = jnp.broadcast_to(speech_slots(length, prompt_len, m), (b, length))
    return embeds, mask, n_pad


def pad_first(n_pad: jax.Array, prompt_len: int, length: int) -> tuple[jax.Array, jax.Array]:
    """The padding mask for unused speech slots, as a reordering (TransformerLM masks by
    documents): per row, the unused slots `[prompt_len, prompt_len + n_pad)` move to the
    front as their own document and the rest keeps its order, positions from 0.

    -> (`order [B, length]`: source position of each new position, `segment_pos [B,
    length]`). Nothing after the padding attends to it, and RoPE sees the same positions as
    a sequence without padding, so the result equals the unpadded sequence's."""
    i = jnp.arange(length)[None]
    unused = (i >= prompt_len) & (i < prompt_len + n_pad[:, None])
    order = jnp.argsort(jnp.where(unused, i - length, i), axis=1)
    seg = jnp.where(i < n_pad[:, None], i, i - n_pad[:, None])
    return order, seg


def _rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """`x [B, T, ...]` gathered along time by `idx [B, T]`."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def padded_lm(
    llm: Any,
    tokens: jax.Array,
    embeds: jax.Array,
    mask: jax.Array,
    n_pad: jax.Array,
    prompt_len: int,
    **kw: Any,
) -> tuple[jax.Array, Any]:
    """`llm(tokens [B, T], segment_pos, embeds=[B, T, W], embeds_mask=[B, T])` with the
    `n_pad [B]` unused speech slots after `prompt_len` masked out (`pad_first`) -> (logits
    `[B, T, vocab]` in the original order (meaningless at the unused slots), cache or None:
    its slots in the reordered order). `llm` is a module or a bound apply; `kw` goes to it."""
    order, seg = pad_first(n_pad, prompt_len, tokens.shape[1])
    logits, cache = llm(
        _rows(tokens, order), seg, embeds=_rows(embeds, order), embeds_mask=_rows(mask, order), **kw
    )
    return _rows(logits, jnp.argsort(order, axis=1)), cache


def drop_padding(cache: Any, n_pad: jax.Array, scanned: bool) -> Any:
    """A prefill cache (`KVCache` per layer, or one with a leading layer axis when
    `scanned`) with each row's first `n_pad [B]` slots (the padding document) removed: slots
    shift left and `index` drops by `n_pad`, so decoding attends to the real tokens only."""

    def one(c: Any) -> Any:
        n = c.keys.shape[-3]
        src = (jnp.arange(n)[None] + n_pad[:, None]) % n  # [B, L]
        if scanned:
            shift = jax.vmap(lambda x: _rows(x, src))
            return type(c)(shift(c.keys), shift(c.values), c.index - n_pad[None])
        return type(c)(_rows(c.keys, src), _rows(c.values, src), c.index - n_pad)

    return one(cache) if scanned else tuple(one(c) for c in cache)


class MMSLLaMA(nn.Module):
    """`(audio [B, T*640], video [B, T, H, W, 1], length [B], tokens [B, L])` -> `(logits
    [B, L, vocab], rate [B])`. `tokens` hold the instruction at `[0, prompt_len)`, anything at
    the `max_queries` speech slots after it (replaced by the speech tokens), then the text.

    Fields: the encoders and the LLM as modules (`audio_encoder` None: `MelFrontend` of
    `mel_width` on `mel_bins`-bin log-mel instead), `fusion` ("concat" | "add"),
    `queries_per_second`, `max_queries` (0: no speech tokens, the text-only baseline),
    `rate_predictor`, `prompt_len`, `qformer_*` / `rate_width` (shapes).
    """

    audio_encoder: WhisperEncoder | None
    video_encoder: nn.Module | None
    llm: TransformerLM
    mel_width: int = 64
    mel_bins: int = 80
    fusion: str = "concat"
    queries_per_second: float = 3.0
    max_queries: int = 12
    rate_predictor: bool = True
    prompt_len: int = 8
    qformer_width: int = 64
    qformer_layers: int = 2
    qformer_heads: int = 4
    rate_width: int = 64

    def setup(self) -> None:
        if self.fusion not in ("concat", "add"):
            raise ValueError(f"model.fusion={self.fusion!r}: expected 'concat' or 'add'")
        if self.audio_encoder is None:
            aw = self.mel_width
            self.mel_frontend = MelFrontend(aw, name="mel_frontend")
        else:
            aw = self.audio_encoder.width
            self.audio_down = nn.Conv(aw, (2,), strides=(2,), padding="VALID", name="audio_down")
        vw = 0 if self.video_encoder is None else self.video_encoder.width
        if self.fusion == "add" and vw not in (0, aw):
            raise ValueError(f"model.fusion='add' needs equal widths: audio {aw}, video {vw}")
        fused = aw + vw if self.fusion == "concat" else aw
        if self.max_queries:  # (none for the text-only baseline: no zero-size params)
            self.queries = self.param(
                "queries", nn.initializers.normal(0.02), (self.max_queries, self.qformer_width)
            )
        self.qformer = QFormer(
            width=self.qformer_width,
            num_layers=self.qformer_layers,
            num_heads=self.qformer_heads,
            mlp_width=4 * self.qformer_width,
            encoder_width=fused,
            cross_attention_frequency=1,
        )
        self.proj_in = nn.Dense(2 * self.qformer_width, name="proj_in")
        self.proj_out = nn.Dense(self.llm.width, name="proj_out")
        if self.rate_predictor:
            self.rate = RatePredictor(self.rate_width, name="rate")

    def encode(
        self, audio: jax.Array, video: jax.Array, length: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """-> (fused `[B, T, Df]` at 25 Hz, the rate predictor's input `[B, T/2, Da]` at
        12.5 Hz: the audio features, stop-gradient)."""
        b, t = video.shape[:2]
        if self.audio_encoder is None:
            mel = log_mel_from_audio(audio.astype(jnp.float32), self.mel_bins)
            a = self.mel_frontend(mel, length)  # [B, T, Da]
            slow = a.reshape(b, t // 2, 2, a.shape[-1]).mean(axis=2)
        else:
            bins = int(getattr(self.audio_encoder, "num_mel_bins", 80))  # 128 for large-v3
            mel = log_mel_from_audio(audio.astype(jnp.float32), bins)  # [B, bins, 4T] 100 Hz
            whisper = self.audio_encoder(mel)  # [B, 2T, Da]
            a = self.audio_down(whisper)[:, :t]
            slow = whisper.reshape(b, -1, 4, whisper.shape[-1]).mean(axis=2)
        slow = jax.lax.stop_gradient(slow)
        if self.video_encoder is None:
            return a, slow
        v = self.video_encoder(video, train=False)  # frozen: stored statistics
        fused = jnp.concatenate([a, v], axis=-1) if self.fusion == "concat" else a + v
        fused = nn.with_logical_constraint(fused, (axes.BATCH, axes.LENGTH, axes.EMBED))
        return fused, slow

    def speech_tokens(
        self, audio: jax.Array, video: jax.Array, length: jax.Array, train: bool = False
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """-> (tokens `[B, max_queries, llm_width]` (zero beyond n_q), n_q `[B]` int32,
        predicted normalised rate `[B]` float32; 1 without the predictor)."""
        del train  # (the encoders are frozen or have no dropout)
        b, t = video.shape[:2]
        length = jnp.clip(length.astype(jnp.int32), 1, t)
        fused, slow = self.encode(audio, video, length)
        if self.rate_predictor:
            keep = jnp.arange(slow.shape[1])[None] < (length[:, None] + 1) // 2
            rate = self.rate(slow, keep)
        else:
            rate = jnp.ones((b,), jnp.float32)
        factor = jnp.clip(jax.lax.stop_gradient(rate), 1.0, 2.0)
        qps = self.queries_per_second
        base = length.astype(jnp.float32) / FPS * qps
        n_q = jnp.maximum(jnp.floor(base * factor).astype(jnp.int32), int(qps))
        n_q = jnp.minimum(n_q, self.max_queries)
        dst = jnp.ceil(factor * length).astype(jnp.int32)
        ctx = resample_linear(fused, length, dst, 2 * t)
        ctx_mask = jnp.arange(2 * t)[None] < dst[:, None]
        q = jnp.broadcast_to(self.queries[None], (b,) + self.queries.shape)
        h = self.qformer(q, ctx, ctx_mask)
        tokens = self.proj_out(self.proj_in(h))
        active = jnp.arange(self.max_queries)[None] < n_q[:, None]
        return jnp.where(active[..., None], tokens, 0.0), n_q, rate

    def __call__(
        self,
        audio: jax.Array,
        video: jax.Array,
        length: jax.Array,
        tokens: jax.Array,
        train: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        b, n = tokens.shape
        if self.max_queries == 0:
            logits, _ = self.llm(tokens)
            return logits, jnp.ones((b,), jnp.float32)
        speech, n_q, rate = self.speech_tokens(audio, video, length, train)
        logits = self.lm_logits(tokens, speech, n_q)
        return logits, rate

    def lm_logits(self, tokens: jax.Array, speech: jax.Array, n_q: jax.Array) -> jax.Array:
        """The LLM on `tokens [B, L]` with `speech [B, max_queries, W]` (first `n_q [B]`
        used) spliced in after the prompt, the unused slots masked -> logits `[B, L, V]`."""
        embeds, mask, n_pad = splice(speech, n_q, self.prompt_len, tokens.shape[1])
        return padded_lm(self.llm, tokens, embeds, mask, n_pad, self.prompt_len)[0]


class PrefixLM:
    """The LLM as `avjax.sample.decode` wants it (`apply(variables, tokens, pos, cache,
    return_cache)`), whose prefill splices the speech tokens in and masks the unused slots:
    `variables` is `{"params": llm params, "embeds": [B, P, width], "embeds_mask": [B, P],
    "n_pad": [B]}` (`splice`'s) and the prompt `[B, P]` the instruction with any ids at the
    speech slots. Decoding steps take their positions from the cache (the padding removed),
    not from `pos`. Runs under LoRA (`lora`)."""

    def __init__(self, llm: TransformerLM, lora: Any, prompt_len: int):
        from avjax.nn.lora import LoraModel

        self.model = LoraModel(llm, lora, train=False)
        self.max_len, self.scan_layers = llm.max_len, llm.scan_layers
        self.prompt_len = prompt_len

    def apply(
        self,
        variables: dict[str, Any],
        tokens: jax.Array,
        pos: jax.Array,
        cache: Any = None,
        return_cache: bool = False,
    ) -> tuple[jax.Array, Any]:
        v = {"params": variables["params"]}
        if cache is not None:
            index = cache.index[0] if self.scan_layers else cache[0].index
            pos = index[:, None] + jnp.arange(tokens.shape[1])[None]
            return self.model.apply(v, tokens, pos, cache=cache)
        n_pad = variables["n_pad"]
        run = lambda *a, **k: self.model.apply(v, *a, **k)  # noqa: E731
        logits, new = padded_lm(
            run,
            tokens,
            variables["embeds"],
            variables["embeds_mask"],
            n_pad,
            self.prompt_len,
            return_cache=return_cache,
        )
        if new is not None:
            new = drop_padding(new, n_pad, self.scan_layers)
        return logits, new
