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
"""

from __future__ import annotations

from typing import Any

from avjax.models.speechssm import DTYPES
from avjax.nn.transformer import TransformerLM, num_params


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
    return TransformerLM(
        vocab_size=vocab_size,
        width=model_cfg.width,
        mlp_width=model_cfg.mlp_width,
        num_heads=model_cfg.num_heads,
        num_kv_heads=model_cfg.num_kv_heads,
        num_layers=model_cfg.num_layers,
        max_len=int(max_len),
        decode_block=int(model_cfg.decode_block),
        logit_softcap=model_cfg.logit_softcap or None,
        remat=model_cfg.get("remat", "none"),
        scan_layers=bool(model_cfg.get("scan_layers", False)),
        dtype=DTYPES[model_cfg.dtype],
    )


def parameter_count(model_cfg: Any, vocab_size: int) -> int:
    """Parameters of the model `config.model` describes."""
    return num_params(
        vocab_size,
        model_cfg.width,
        model_cfg.mlp_width,
        model_cfg.num_heads,
        model_cfg.num_kv_heads,
        model_cfg.num_layers,
    )


def forward_flops_per_token(model_cfg: Any, vocab_size: int, context: float) -> float:
    """Forward FLOPs of one token that attends over `context` keys.

    2 FLOPs per weight of every matmul (q, k, v, out, the MLP's two up projections and down,
    the tied logits; the embedding lookup is free), plus per layer 2 × 2 × context × width
    for QK^T and AV (num_heads × head_dim = width queries' worth, whatever the kv heads).
    """
    w, m, h, kvh = model_cfg.width, model_cfg.mlp_width, model_cfg.num_heads, model_cfg.num_kv_heads
    hd = w // h
    per_layer = 2 * (2 * w * w + 2 * w * kvh * hd) + 2 * 3 * w * m + 2 * 2 * context * w
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
