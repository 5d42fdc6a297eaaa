"""Pre-norm Transformer decoder LM with a full-length KV cache: SpeechTransformer, Gemma, Llama.

    x = embed(tokens) * sqrt(width)            # the scale only with `embed_scale`
    for each of num_layers identical blocks:
        x = x + CausalAttention(RMSNorm(x))    # MHA / GQA / MQA, RoPE, causal within documents
        x = x + MLP(RMSNorm(x))                # act(W_up0 x) * (W_up1 x) -> W_down
    logits = softcap(RMSNorm(x) @ embed^T)     # or @ lm_head when untied; softcap optional

One core covers three architectures through its options (`DecoderConfig` holds them, with
presets `speechtransformer`, `gemma_2b`, `llama3_8b`, `llama3_2_1b`, `llama3_2_3b` and tiny
test ones):
  * RoPE on the first `rope_fraction` of each head's dims (0.5: Griffin/SpeechTransformer; 1.0:
    Gemma, Llama) with base `rope_theta` and optionally Llama-3's frequency scaling
    (`rope_scaling = Llama3RopeScaling(...)`);
  * MLP activation "gelu" (tanh approximation: GeGLU, Gemma) or "silu" (SwiGLU, Llama);
  * tied or untied (`lm_head [width, vocab]`) output embedding; `embed_scale` sqrt(width) or
    none; `logit_softcap` or None; RMSNorm scale as (1 + w) (Gemma) or w (Llama) with
    `norm_eps`; `head_dim` independent of width / num_heads (Gemma-7B); biases on the
    attention output and MLP (`use_bias`, SpeechTransformer's) or none (Gemma, Llama).
The defaults are SpeechTransformer's, so its parameter tree is unchanged.

The calling convention is GriffinLM's (`avjax.nn.griffin`), so `avjax.sample` drives either:
`__call__(tokens, segment_pos, cache=None, return_cache=False) -> (logits, cache)`. The full
call trains (and with `return_cache` also prefills); with a `cache` the call appends the new
tokens to the cache and attends over everything before them.

Unlike Griffin's ring buffers, the cache here holds every key and value of the stream:
`KVCache` is preallocated at `max_len` tokens per block, so decoding memory grows linearly with
the length to generate, and the attention work of one decode step grows with the position.
Decoding attends either over the whole buffer with a mask (`decode_block=0`) or, by default,
block by block over only the filled prefix with an online softmax (`decode_block` keys per
block, a `lax.fori_loop` whose trip count is the number of filled blocks), so the cost of the
step at position p is ~p, not `max_len` (the causal half on average over a run).

RoPE and the attention kernel are `avjax.nn.attention`'s (`apply_rope`, `attend`,
`sequence_mask`). `scan_layers` runs the identical blocks with `nn.scan` over stacked params
(leading logical axis "layers") and a stacked cache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes
from avjax.nn.attention import NEG_INF, AttentionLayer, apply_rope, attend, sequence_mask
from avjax.nn.griffin import REMAT_POLICIES
from avjax.nn.layers import dense
from avjax.nn.norms import RMSNorm
from avjax.nn.quant import QTensor, dequantize

ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=True), "silu": jax.nn.silu}


class Llama3RopeScaling(NamedTuple):
    """Llama-3.1's RoPE frequency scaling (HF `rope_type: "llama3"`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192


def rope_inv_freq(
    rotary_dim: int, theta: float, scaling: Llama3RopeScaling | None = None
) -> jax.Array:
    """`[rotary_dim // 2]` float32 inverse frequencies `theta ** (-2i / rotary_dim)`.

    With Llama-3 `scaling`: wavelengths longer than `original_max_len / low_freq_factor` are
    divided by `factor`, those shorter than `original_max_len / high_freq_factor` are kept, and
    those between interpolate smoothly.
    """
    inv = theta ** (-(jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    if scaling is None:
        return inv
    factor, low, high, old_len = scaling
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


class KVCache(NamedTuple):
    """Full-length cache of one attention block.

    `keys`/`values [batch, max_len, kv_heads, head_dim]`: slot i holds the i-th token of the
    stream; `index [batch]` int32: tokens written so far (the next slot).
    """

    keys: jax.Array
    values: jax.Array
    index: jax.Array


def init_kv_cache(
    batch_size: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32
) -> KVCache:
    """An empty cache of `max_len` slots."""
    shape = (batch_size, max_len, num_kv_heads, head_dim)
    return KVCache(
        jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch_size,), jnp.int32)
    )


def _blocked_attend(
    q: jax.Array, keys: jax.Array, values: jax.Array, q_slot: jax.Array, block: int
) -> jax.Array:
    """Attention of queries at cache slots `q_slot [b, t]` over slots `<= q_slot`, by blocks.

    q `[b, t, h, d]`, keys/values `[b, L, kv, d]` with `L % block == 0` -> `[b, t, h, d]`.
    Only the blocks up to the furthest query are visited (online softmax in float32).
    """
    b, t, h, d = q.shape
    kv = keys.shape[2]
    qg = q.reshape(b, t, kv, h // kv, d)
    n_blocks = (jnp.max(q_slot) + block) // block  # blocks holding slots 0 .. max(q_slot)
    m0 = jnp.full((b, kv, h // kv, t), NEG_INF, jnp.float32)
    d0 = jnp.zeros((b, kv, h // kv, t), jnp.float32)
    acc0 = jnp.zeros((b, kv, h // kv, t, d), jnp.float32)

    def body(i, carry):
        m, denom, acc = carry
        start = i * block
        k = jax.lax.dynamic_slice_in_dim(keys, start, block, axis=1).astype(q.dtype)
        v = jax.lax.dynamic_slice_in_dim(values, start, block, axis=1).astype(q.dtype)
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) * d**-0.5
        slots = start + jnp.arange(block)
        mask = slots[None, None, :] <= q_slot[:, :, None]  # [b, t, s]
        logits = jnp.where(mask[:, None, None], logits, NEG_INF)
        m_new = jnp.maximum(m, logits.max(-1))
        p = jnp.exp(logits - m_new[..., None])
        corr = jnp.exp(m - m_new)
        denom = denom * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p, v.astype(jnp.float32))
        return m_new, denom, acc

    _, denom, acc = jax.lax.fori_loop(0, n_blocks, body, (m0, d0, acc0))
    out = (acc / denom[..., None]).astype(q.dtype)  # [b, kv, g, t, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


class CausalAttention(AttentionLayer):
    """Causal multi-head / grouped-query / multi-query attention with RoPE.

    `[batch, time, width] -> [batch, time, width]`. `num_kv_heads` = `num_heads` is MHA, 1 is
    MQA, anything dividing `num_heads` is GQA. Parameter names follow `LocalAttention`
    ("q", "k", "v" without bias, "out" with a bias when `use_bias`); `head_size` (None:
    width // num_heads) sets the head dim independently of the width.
    """

    width: int
    num_heads: int
    num_kv_heads: int = 1
    max_len: int = 2048
    decode_block: int = 256
    dtype: jnp.dtype | None = None
    head_size: int | None = None
    rope_fraction: float = 0.5
    rope_theta: float = 10_000.0
    rope_scaling: Llama3RopeScaling | None = None
    use_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.head_size or self.width // self.num_heads

    def _project_qkv(
        self, x: jax.Array, segment_pos: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x `[b, t, width]` -> q `[b, t, heads, hd]`, k/v `[b, t, kv_heads, hd]` (RoPE on q, k)."""
        b, t, _ = x.shape
        hd, h, kv = self.head_dim, self.num_heads, self.num_kv_heads
        q = dense(h * hd, (axes.EMBED, axes.HEADS), use_bias=False, dtype=self.dtype, name="q")(x)
        k = dense(kv * hd, (axes.EMBED, axes.KV), use_bias=False, dtype=self.dtype, name="k")(x)
        v = dense(kv * hd, (axes.EMBED, axes.KV), use_bias=False, dtype=self.dtype, name="v")(x)
        inv_freq = None
        if self.rope_scaling is not None:
            rot = int(hd * self.rope_fraction)
            inv_freq = rope_inv_freq(rot, self.rope_theta, Llama3RopeScaling(*self.rope_scaling))
        rope = dict(
            max_wavelength=self.rope_theta, rotary_fraction=self.rope_fraction, inv_freq=inv_freq
        )
        q = apply_rope(q.reshape(b, t, h, hd), segment_pos, **rope)
        k = apply_rope(k.reshape(b, t, kv, hd), segment_pos, **rope)
        return q, k, v.reshape(b, t, kv, hd)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        segment_pos: jax.Array,
        cache: KVCache | None = None,
        return_cache: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """`x [batch, time, width]` -> (`[batch, time, width]`, the new cache or None)."""
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}"
            )
        q, k, v = self._project_qkv(x, segment_pos)
        if cache is not None:
            out, new_cache = self._decode(q, k, v, cache)
        else:
            out, new_cache = self._sequence(q, k, v, segment_pos, return_cache)
        b, t, h, d = out.shape
        out = nn.with_logical_constraint(
            out.reshape(b, t, h * d), (axes.BATCH, axes.LENGTH, axes.HEADS)
        )
        proj = dense(
            self.width,
            (axes.HEADS, axes.EMBED),
            use_bias=self.use_bias,
            dtype=self.dtype,
            name="out",
        )
        return proj(out), new_cache

    def _decode(
        self, q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Appends the new tokens (one or more) and attends over the filled prefix."""
        new_cache = _append(cache, k, v)
        q_slot = cache.index[:, None] + jnp.arange(q.shape[1])[None]  # [b, t]
        length = cache.keys.shape[1]
        if self.decode_block and length % self.decode_block == 0:
            out = _blocked_attend(q, new_cache.keys, new_cache.values, q_slot, self.decode_block)
        else:
            mask = jnp.arange(length)[None, None, :] <= q_slot[:, :, None]
            out = attend(q, new_cache.keys.astype(q.dtype), new_cache.values.astype(q.dtype), mask)
        return out, new_cache

    def _sequence(
        self, q: jax.Array, k: jax.Array, v: jax.Array, segment_pos: jax.Array, return_cache: bool
    ) -> tuple[jax.Array, KVCache | None]:
        out = attend(q, k, v, sequence_mask(segment_pos))
        if not return_cache:
            return out, None
        b, t = k.shape[:2]
        if t > self.max_len:
            raise ValueError(f"prefill of {t} tokens > cache max_len={self.max_len}")
        empty = init_kv_cache(b, self.max_len, self.num_kv_heads, self.head_dim, k.dtype)
        return out, _append(empty, k, v)


def _append(cache: KVCache, k: jax.Array, v: jax.Array) -> KVCache:
    """Writes `k`/`v [b, t, kv, d]` at slots `index .. index + t - 1` of each sequence."""

    def write(buf, new, i):  # one sequence: buf [L, kv, d], new [t, kv, d]
        return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), i, axis=0)

    return KVCache(
        jax.vmap(write)(cache.keys, k, cache.index),
        jax.vmap(write)(cache.values, v, cache.index),
        cache.index + k.shape[1],
    )


class GatedMLP(nn.Module):
    """Gated MLP: `act(x W_up0 + b0) * (x W_up1 + b1) -> W_down`. `[b, t, width] -> same`.

    "gelu" (tanh approximation) is GeGLU (Gemma, Griffin's `MLPBlock`: same parameter names
    and initialisers), "silu" SwiGLU (Llama); `use_bias=False` drops the biases.
    """

    width: int
    mlp_width: int
    activation: str = "gelu"
    use_bias: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; expected one of {list(ACTIVATIONS)}")
        dtype = self.dtype or x.dtype
        stored = self.get_variable("params", "ffw_up_w")
        if isinstance(stored, QTensor):  # a quantised frozen base (QLoRA): dequantised here
            w = dequantize(stored, dtype)
        else:
            w = self.param(
                "ffw_up_w",
                nn.with_logical_partitioning(
                    nn.initializers.variance_scaling(1.0, "fan_in", "normal", 1, 2),
                    (None, axes.EMBED, axes.MLP),
                ),
                (2, self.width, self.mlp_width),
                jnp.float32,
            )
        up = jnp.einsum("btd,cdf->cbtf", x.astype(dtype), w.astype(dtype))
        if self.use_bias:
            b = self.param(
                "ffw_up_b",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, axes.MLP)),
                (2, self.mlp_width),
                jnp.float32,
            )
            up = up + b.astype(dtype)[:, None, None]
        h = ACTIVATIONS[self.activation](up[0]) * up[1]
        h = nn.with_logical_constraint(h, (axes.BATCH, axes.LENGTH, axes.MLP))
        down = dense(
            self.width,
            (axes.MLP, axes.EMBED),
            use_bias=self.use_bias,
            dtype=self.dtype,
            name="ffw_down",
        )
        return down(h)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The architecture of a `TransformerLM` (everything but decoding and compute options).

    Defaults are SpeechTransformer's (Griffin-style RoPE on half the head dims, GeGLU with
    biases, tied and sqrt(width)-scaled embeddings, soft-capped logits, (1 + w) RMSNorm).
    `make(**options)` builds the module (options: max_len, decode_block, remat, scan_layers,
    dtype).
    """

    vocab_size: int
    width: int
    mlp_width: int
    num_heads: int
    num_layers: int
    num_kv_heads: int = 1
    head_dim: int | None = None  # None: width // num_heads
    rope_fraction: float = 0.5
    rope_theta: float = 10_000.0
    rope_scaling: Llama3RopeScaling | None = None
    mlp_activation: str = "gelu"
    use_bias: bool = True
    tie_embeddings: bool = True
    embed_scale: bool = True
    logit_softcap: float | None = 30.0
    norm_eps: float = 1e-6
    norm_offset: bool = True

    def make(self, **options: Any) -> TransformerLM:
        """The module with this architecture and `options` (max_len, decode_block, ...)."""
        return TransformerLM(**self.module_fields(), **options)

    def module_fields(self) -> dict[str, Any]:
        """`TransformerLM` keyword arguments for this architecture (JSON-friendly values)."""
        return dataclasses.asdict(self)

    def num_params(self) -> int:
        """Parameter count of the model."""
        return num_params(
            self.vocab_size,
            self.width,
            self.mlp_width,
            self.num_heads,
            self.num_kv_heads,
            self.num_layers,
            head_dim=self.head_dim,
            use_bias=self.use_bias,
            tie_embeddings=self.tie_embeddings,
        )

    @classmethod
    def gemma(cls, **kw: Any) -> DecoderConfig:
        """Gemma-1's layout (full RoPE, GeGLU, no biases, sqrt(width) embedding scale, tied,
        no soft-cap, (1 + w) RMSNorm, eps 1e-6); shapes from `kw`."""
        return cls(
            **{
                "rope_fraction": 1.0,
                "use_bias": False,
                "logit_softcap": None,
                "mlp_activation": "gelu",
                "embed_scale": True,
                "tie_embeddings": True,
                **kw,
            }
        )

    @classmethod
    def llama(cls, **kw: Any) -> DecoderConfig:
        """Llama's layout (full RoPE, SwiGLU, no biases, no embedding scale, no soft-cap,
        w RMSNorm, eps 1e-5, untied unless `tie_embeddings`); shapes from `kw`."""
        return cls(
            **{
                "rope_fraction": 1.0,
                "use_bias": False,
                "logit_softcap": None,
                "mlp_activation": "silu",
                "embed_scale": False,
                "tie_embeddings": False,
                "norm_offset": False,
                "norm_eps": 1e-5,
                **kw,
            }
        )

    @classmethod
    def gemma_2b(cls, vocab_size: int = 256_000) -> DecoderConfig:
        """Gemma-2B: 18 layers, width 2048, 8 query heads, 1 KV head of 256, GeGLU 16,384."""
        return cls.gemma(
            vocab_size=vocab_size,
            width=2048,
            mlp_width=16_384,
            num_heads=8,
            num_layers=18,
            num_kv_heads=1,
            head_dim=256,
        )

    @classmethod
    def llama3_8b(cls, vocab_size: int = 128_256) -> DecoderConfig:
        """Llama-3.1-8B: 32 layers, width 4096, 32 heads, 8 KV heads, SwiGLU 14,336."""
        return cls.llama(
            vocab_size=vocab_size,
            width=4096,
            mlp_width=14_336,
            num_heads=32,
            num_layers=32,
            num_kv_heads=8,
            rope_theta=500_000.0,
            rope_scaling=Llama3RopeScaling(8.0),
        )

    @classmethod
    def llama3_2_1b(cls, vocab_size: int = 128_256) -> DecoderConfig:
        """Llama-3.2-1B: 16 layers, width 2048, 32 heads, 8 KV heads, 8,192 MLP, tied."""
        return cls.llama(
            vocab_size=vocab_size,
            width=2048,
            mlp_width=8192,
            num_heads=32,
            num_layers=16,
            num_kv_heads=8,
            rope_theta=500_000.0,
            rope_scaling=Llama3RopeScaling(32.0),
            tie_embeddings=True,
        )

    @classmethod
    def llama3_2_3b(cls, vocab_size: int = 128_256) -> DecoderConfig:
        """Llama-3.2-3B: 28 layers, width 3072, 24 heads, 8 KV heads, 8,192 MLP, tied."""
        return cls.llama(
            vocab_size=vocab_size,
            width=3072,
            mlp_width=8192,
            num_heads=24,
            num_layers=28,
            num_kv_heads=8,
            rope_theta=500_000.0,
            rope_scaling=Llama3RopeScaling(32.0),
            tie_embeddings=True,
        )

    @classmethod
    def tiny_gemma(cls, vocab_size: int = 97) -> DecoderConfig:
        """A 2-layer Gemma for tests (width 32, 4 heads of 16, 1 KV head)."""
        return cls.gemma(
            vocab_size=vocab_size, width=32, mlp_width=64, num_heads=4, num_layers=2, head_dim=16
        )

    @classmethod
    def tiny_llama(cls, vocab_size: int = 97) -> DecoderConfig:
        """A 2-layer Llama-3 for tests (width 32, 4 heads, 2 KV heads, scaled RoPE)."""
        return cls.llama(
            vocab_size=vocab_size,
            width=32,
            mlp_width=64,
            num_heads=4,
            num_layers=2,
            num_kv_heads=2,
            rope_theta=500_000.0,
            rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 32),
        )


class DecoderBlock(nn.Module):
    """Pre-norm residual block: causal attention then gated MLP.

    `(x [batch, time, width], segment_pos [batch, time], cache) -> (x, new_cache)`; the
    signature `nn.scan` needs (the cache is the scanned input/output). `arch` holds the
    `DecoderConfig` fields the block uses.
    """

    width: int
    mlp_width: int
    num_heads: int
    num_kv_heads: int = 1
    max_len: int = 2048
    decode_block: int = 256
    want_cache: bool = False
    dtype: jnp.dtype | None = None
    arch: tuple[tuple[str, Any], ...] = ()

    @nn.compact
    def __call__(
        self, x: jax.Array, segment_pos: jax.Array, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        a = dict(self.arch)
        norm = dict(eps=a.get("norm_eps", 1e-6), scale_offset=a.get("norm_offset", True))
        attn = CausalAttention(
            self.width,
            self.num_heads,
            self.num_kv_heads,
            self.max_len,
            self.decode_block,
            self.dtype,
            head_size=a.get("head_dim"),
            rope_fraction=a.get("rope_fraction", 0.5),
            rope_theta=a.get("rope_theta", 10_000.0),
            rope_scaling=a.get("rope_scaling"),
            use_bias=a.get("use_bias", True),
            name="attention",
        )
        h, new_cache = attn(
            RMSNorm(dtype=self.dtype, name="pre_attention_norm", **norm)(x),
            segment_pos,
            cache,
            self.want_cache,
        )
        x = x + h
        mlp = GatedMLP(
            self.width,
            self.mlp_width,
            a.get("mlp_activation", "gelu"),
            a.get("use_bias", True),
            self.dtype,
            name="mlp",
        )
        x = x + mlp(RMSNorm(dtype=self.dtype, name="pre_mlp_norm", **norm)(x))
        return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED)), new_cache


def _block_class(remat: str) -> type[DecoderBlock]:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; expected one of {list(REMAT_POLICIES)}")
    if remat == "none":
        return DecoderBlock
    return nn.remat(DecoderBlock, policy=REMAT_POLICIES[remat])


_BLOCK_ARCH = (
    "head_dim",
    "rope_fraction",
    "rope_theta",
    "rope_scaling",
    "mlp_activation",
    "use_bias",
    "norm_eps",
    "norm_offset",
)


class TransformerLM(nn.Module):
    """Decoder-only Transformer LM. tokens `[batch, time]` int32 -> logits `[b, t, vocab]` f32.

    The architecture fields are `DecoderConfig`'s (see there and the module docstring); the
    others:
      max_len: KV-cache length in tokens (prompt + generated) for decoding.
      decode_block: keys per block of the decode attention loop (0: attend over the whole
        buffer every step; also used when it does not divide `max_len`).
      remat: activation checkpointing per block: "none", "full" or "dots".
      scan_layers: `nn.scan` over the identical blocks (params and cache stacked on a leading
        "layers" axis).
      dtype: activation dtype (params float32; softmax in float32).
    """

    vocab_size: int
    width: int
    mlp_width: int
    num_heads: int
    num_layers: int
    num_kv_heads: int = 1
    max_len: int = 2048
    decode_block: int = 256
    logit_softcap: float | None = 30.0
    embed_scale: bool = True
    remat: str = "none"
    scan_layers: bool = False
    dtype: jnp.dtype = jnp.float32
    head_dim: int | None = None
    rope_fraction: float = 0.5
    rope_theta: float = 10_000.0
    rope_scaling: Llama3RopeScaling | None = None
    mlp_activation: str = "gelu"
    use_bias: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    norm_offset: bool = True

    @property
    def config(self) -> DecoderConfig:
        """This module's architecture."""
        names = [f.name for f in dataclasses.fields(DecoderConfig)]
        return DecoderConfig(**{n: getattr(self, n) for n in names})

    def _block_kwargs(self, want_cache: bool) -> dict:
        arch = tuple((n, getattr(self, n)) for n in _BLOCK_ARCH)
        if self.rope_scaling is not None:
            arch = tuple((n, tuple(v) if n == "rope_scaling" else v) for n, v in arch)
        return dict(
            width=self.width,
            mlp_width=self.mlp_width,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            max_len=self.max_len,
            decode_block=self.decode_block,
            want_cache=want_cache,
            dtype=self.dtype,
            arch=arch,
        )

    def _layers(self, x, segment_pos, cache, want_cache):
        block_cls = _block_class(self.remat)
        if not self.scan_layers:
            new = []
            for i in range(self.num_layers):
                x, c = block_cls(**self._block_kwargs(want_cache), name=f"blocks_{i}")(
                    x, segment_pos, None if cache is None else cache[i]
                )
                new.append(c)
            return x, (tuple(new) if want_cache else None)
        scanned = nn.scan(
            block_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},  # LoRA dropout per layer
            in_axes=(nn.broadcast, 0),
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: axes.LAYERS},
        )
        return scanned(**self._block_kwargs(want_cache), name="layers")(x, segment_pos, cache)

    def _logits(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
        """Final hidden `[b, t, width]` -> logits `[b, t, vocab]` float32."""
        if self.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x.astype(jnp.float32), embedding)
        else:
            head = self.param(
                "lm_head",
                nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=1.0 / math.sqrt(self.width)),
                    (axes.EMBED, axes.VOCAB),
                ),
                (self.width, self.vocab_size),
                jnp.float32,
            )
            logits = jnp.einsum("btd,dv->btv", x.astype(jnp.float32), head)
        if self.logit_softcap:
            logits = jnp.tanh(logits / self.logit_softcap) * self.logit_softcap
        return nn.with_logical_constraint(logits, (axes.BATCH, axes.LENGTH, axes.VOCAB))

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        segment_pos: jax.Array | None = None,
        cache: tuple[KVCache, ...] | KVCache | None = None,
        return_cache: bool = False,
        embeds: jax.Array | None = None,
        embeds_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[KVCache, ...] | KVCache | None]:
        """Returns `(logits [batch, time, vocab] float32, cache or None)`.

        `segment_pos [batch, time]` defaults to 0, 1, ... (one document per row).
        `embeds [batch, time, width]` with `embeds_mask [batch, time]` bool (HF's
        `inputs_embeds`, LLaVA-style): where the mask is True the input vector is `embeds`
        instead of the token's embedding (e.g. speech tokens spliced between prompt tokens);
        `embed_scale` applies to both alike.
        """
        if segment_pos is None:
            segment_pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0 / math.sqrt(self.width)), (axes.VOCAB, axes.EMBED)
            ),
            (self.vocab_size, self.width),
            jnp.float32,
        )
        x = jnp.take(embedding, tokens, axis=0).astype(self.dtype)
        if embeds is not None:
            x = jnp.where(embeds_mask[..., None], embeds.astype(self.dtype), x)
        if self.embed_scale:
            x = x * jnp.sqrt(jnp.float32(self.width)).astype(self.dtype)
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        want_cache = return_cache or cache is not None
        x, new_cache = self._layers(x, segment_pos, cache, want_cache)
        x = RMSNorm(
            eps=self.norm_eps, dtype=self.dtype, scale_offset=self.norm_offset, name="final_norm"
        )(x)
        return self._logits(x, embedding), new_cache

    def init_cache(self, batch_size: int) -> tuple[KVCache, ...] | KVCache:
        """An empty cache: a tuple over layers, or with `scan_layers` one `KVCache` whose
        leaves have a leading `num_layers` axis."""

        def one() -> KVCache:  # fresh buffers per layer, so the cache can be donated
            return init_kv_cache(
                batch_size,
                self.max_len,
                self.num_kv_heads,
                self.head_dim or self.width // self.num_heads,
                self.dtype,
            )

        if self.scan_layers:
            return jax.tree.map(lambda x: jnp.zeros((self.num_layers,) + x.shape, x.dtype), one())
        return tuple(one() for _ in range(self.num_layers))


def stack_layers(params: dict, num_layers: int) -> dict:
    """Unrolled params (`blocks_0` .. `blocks_{L-1}`) -> the `scan_layers` layout."""
    out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    out["layers"] = jax.tree.map(
        lambda *xs: jnp.stack(xs), *[params[f"blocks_{i}"] for i in range(num_layers)]
    )
    return out


def num_params(
    vocab_size: int,
    width: int,
    mlp_width: int,
    num_heads: int,
    num_kv_heads: int,
    num_layers: int,
    head_dim: int | None = None,
    use_bias: bool = True,
    tie_embeddings: bool = True,
) -> int:
    """Parameter count of `TransformerLM` (defaults: SpeechTransformer's layout)."""
    hd = head_dim or width // num_heads
    attn = 2 * width * num_heads * hd + 2 * width * num_kv_heads * hd  # q, out, k, v
    mlp = 3 * width * mlp_width
    if use_bias:
        attn += width  # out bias
        mlp += 2 * mlp_width + width  # up (2), down biases
    head = 0 if tie_embeddings else vocab_size * width
    return vocab_size * width + head + num_layers * (attn + mlp + 2 * width) + width
