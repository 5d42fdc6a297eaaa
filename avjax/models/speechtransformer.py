"""SpeechTransformer: the Transformer spoken-LM baseline of SpeechSSM (Park et al., 2025).

The paper compares SpeechSSM with its own SpeechTransformer (Gemma-initialised) of matched
size, trained on the same semantic units and data. As built here:
1. The same 25 Hz speech units, training windows, loss and sampler as SpeechSSM
   (`avjax.tasks.speechtransformer` composes the same data module and LM functions).
2. A decoder-only Transformer in Gemma's layout (`avjax.nn.transformer.TransformerLM`):
   pre-norm blocks of global causal attention (multi-query by default, as Gemma-2B; RoPE on
   absolute positions) and gated-GeLU MLPs, RMSNorm, tied embeddings scaled by sqrt(width),
   soft-capped logits.
3. Size matched to SpeechSSM's config: same width, heads and depth; the MLP is widened so the
   parameter count matches the Griffin model's (`configs/speechtransformer.py`).
4. Decoding keeps every key and value (a KV cache of `max_len` tokens): memory grows with the
   generated length and each step's attention work with the position, where SpeechSSM's state
   is constant. Positions beyond the training windows are never seen in training (RoPE is
   applied to absolute positions), one reason such baselines drift on long continuations.
5. The paper's SpeechTransformer-2B (`configs/speechtransformer.py:2b`) has Gemma-2B's shapes
   and layout; the optional `config.model` keys below select it (absent keys keep the CPU
   baseline's layout): head_dim, rope_fraction, rope_theta, use_bias, embed_scale, norm_eps.
   `avjax.convert.gemma` imports HF Gemma weights into the same module.
"""

from __future__ import annotations

from typing import Any

from avjax.models.speechssm import DTYPES
from avjax.nn.transformer import DecoderConfig, TransformerLM

# Optional config.model keys (architecture options of `DecoderConfig`) and their defaults.
OPTIONAL_KEYS = {
    "head_dim": 0,  # 0: width // num_heads
    "rope_fraction": 0.5,
    "rope_theta": 10_000.0,
    "use_bias": True,
    "embed_scale": True,
    "norm_eps": 1e-6,
}


def decoder_config(model_cfg: Any, vocab_size: int) -> DecoderConfig:
    """The architecture `config.model` describes over `vocab_size` units."""
    opt = {k: model_cfg.get(k, v) for k, v in OPTIONAL_KEYS.items()}
    return DecoderConfig(
        vocab_size=int(vocab_size),
        width=int(model_cfg.width),
        mlp_width=int(model_cfg.mlp_width),
        num_heads=int(model_cfg.num_heads),
        num_layers=int(model_cfg.num_layers),
        num_kv_heads=int(model_cfg.num_kv_heads),
        head_dim=int(opt["head_dim"]) or None,
        rope_fraction=float(opt["rope_fraction"]),
        rope_theta=float(opt["rope_theta"]),
        use_bias=bool(opt["use_bias"]),
        embed_scale=bool(opt["embed_scale"]),
        logit_softcap=model_cfg.logit_softcap or None,
        norm_eps=float(opt["norm_eps"]),
    )


def speechtransformer(model_cfg: Any, vocab_size: int, max_len: int) -> TransformerLM:
    """The SpeechTransformer LM for `config.model` over `vocab_size` units.

    `max_len` is the decoding cache length (prompt + generated tokens); it does not change
    the parameters.
    """
    if model_cfg.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={model_cfg.dtype!r}; expected one of {list(DTYPES)}")
    if model_cfg.width % model_cfg.num_heads:
        raise ValueError(
            f"config.model.width={model_cfg.width} is not divisible by "
            f"config.model.num_heads={model_cfg.num_heads}"
        )
    return decoder_config(model_cfg, vocab_size).make(
        max_len=int(max_len),
        decode_block=int(model_cfg.decode_block),
        remat=model_cfg.get("remat", "none"),
        scan_layers=bool(model_cfg.get("scan_layers", False)),
        dtype=DTYPES[model_cfg.dtype],
    )


def parameter_count(model_cfg: Any, vocab_size: int) -> int:
    """Parameters of the model `config.model` describes."""
    return decoder_config(model_cfg, vocab_size).num_params()


def forward_flops_per_token(model_cfg: Any, vocab_size: int, context: float) -> float:
    """Forward FLOPs of one token that attends over `context` keys.

    2 FLOPs per weight of every matmul (q, k, v, out, the MLP's two up projections and down,
    the tied logits; the embedding lookup is free), plus per layer 2 × 2 × context ×
    num_heads × head_dim for QK^T and AV (whatever the kv heads).
    """
    w, m, h, kvh = model_cfg.width, model_cfg.mlp_width, model_cfg.num_heads, model_cfg.num_kv_heads
    hd = int(model_cfg.get("head_dim", 0)) or w // h
    per_layer = 2 * (2 * w * h * hd + 2 * w * kvh * hd) + 2 * 3 * w * m + 2 * 2 * context * h * hd
    return model_cfg.num_layers * per_layer + 2 * w * vocab_size


def flops_per_token(model_cfg: Any, vocab_size: int, seq_len: int) -> float:
    """Analytic training FLOPs per token: 3 × forward (backward = 2 × forward).

    With causal attention over a window of `seq_len` tokens, a token attends on average over
    `seq_len / 2` keys (the causal half).
    """
    return 3.0 * forward_flops_per_token(model_cfg, vocab_size, seq_len / 2)


def decode_flops_per_token(model_cfg: Any, vocab_size: int, position: int) -> float:
    """Forward FLOPs of the decode step at `position` (it attends over position + 1 keys)."""
    return forward_flops_per_token(model_cfg, vocab_size, position + 1)
