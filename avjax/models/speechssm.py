"""SpeechSSM: long-form spoken language modelling with a hybrid state-space LM.

Park et al., "Long-Form Speech Generation with Spoken Language Models" (ICML 2025).

Method, as built here:
1. Speech is tokenised into discrete semantic units at 25 Hz (the paper: USM-v2 units; here
   k-means over log-mel features, `avjax.data.speech.units`), over fixed windows.
2. A decoder-only LM with the Griffin / RecurrentGemma backbone predicts the next unit:
   residual blocks in the pattern (recurrent, recurrent, local attention); recurrent blocks are
   temporal conv1d (width 4) + RG-LRU with a GeLU gate branch; attention is local
   multi-query with RoPE within a fixed window, so no position ever exceeds what training
   saw; RMSNorm, gated-GeLU MLPs, tied embeddings, soft-capped logits.
3. Training windows are at most a few minutes (6,000 tokens in the paper); the last window
   of a recording wraps to its start instead of padding, so there is no learned end.
4. Generation runs the recurrence with a constant-size state (RG-LRU state, conv buffer,
   ring buffer of `window` keys/values), so 16 minutes cost the same per token as 1 minute.
5. Units become audio over overlapping windows stitched at the overlaps (the paper:
   SoundStorm + SoundStream; here a units->mel network + Griffin-Lim, `avjax.data.speech.vocoder`).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from avjax.nn.griffin import GriffinConfig, GriffinLM, griffin_pattern

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def architecture(model_cfg: Any, vocab_size: int) -> GriffinConfig:
    """The Griffin architecture `config.model` describes over `vocab_size` speech units."""
    return GriffinConfig(
        vocab_size=vocab_size,
        width=model_cfg.width,
        mlp_width=model_cfg.mlp_width,
        num_heads=model_cfg.num_heads,
        num_layers=model_cfg.num_layers,
        block_types=griffin_pattern(model_cfg.num_layers),
        lru_width=model_cfg.lru_width,
        window=model_cfg.window,
        conv1d_width=model_cfg.conv1d_width,
        logit_softcap=model_cfg.logit_softcap or None,
        out_init_scale=model_cfg.get("out_init_scale", "rg"),
    )


def speechssm(model_cfg: Any, vocab_size: int) -> GriffinLM:
    """The SpeechSSM LM for `config.model` over `vocab_size` speech units."""
    if model_cfg.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={model_cfg.dtype!r}; expected one of {list(DTYPES)}")
    options = {}
    if model_cfg.scan_impl and model_cfg.scan_impl != "auto":
        options["scan_impl"] = model_cfg.scan_impl
    return architecture(model_cfg, vocab_size).make(
        remat=model_cfg.get("remat", "none"),
        scan_layers=bool(model_cfg.get("scan_layers", False)),
        dtype=DTYPES[model_cfg.dtype],
        **options,
    )


def mean_local_context(window: int, seq_len: int) -> float:
    """Average number of keys a query attends to in a training window of `seq_len` tokens
    with local attention over `window` past tokens: query i sees min(i, window) + 1 keys
    (itself included), so the context is clipped at the start of every training window."""
    full = max(seq_len - window - 1, 0)  # queries that see the whole window
    ramp = seq_len - full  # queries 0 .. ramp - 1 see i + 1 keys
    return (ramp * (ramp + 1) / 2 + full * (window + 1)) / seq_len


def flops_per_token(model_cfg: Any, vocab_size: int, seq_len: int) -> float:
    """Analytic training FLOPs per token: 3 × (forward matmuls + attention).

    Forward per token: 2 FLOPs per weight in every matmul (embedding lookup excluded, logits
    included), plus for attention layers 2 × 2 × context × width (QK^T and AV) with the true
    average context `mean_local_context(window, seq_len)` (e.g. 1,699 keys at window 2,048
    and 6,000 tokens; the banded kernel computes window + block keys per query, the excess
    is not counted as useful work). The RG-LRU's elementwise work (~10 FLOPs × lru_width) is
    counted too. The backward pass costs twice the forward.
    """
    w, m, lru, h = model_cfg.width, model_cfg.mlp_width, model_cfg.lru_width, model_cfg.num_heads
    head_dim = w // h
    fwd = 0.0
    for kind in griffin_pattern(model_cfg.num_layers):
        fwd += 2 * 3 * w * m  # gated MLP: two up projections + down
        if kind == "recurrent":
            fwd += 2 * (2 * w * lru + lru * w)  # linear_x, linear_y, linear_out
            fwd += 2 * 2 * lru * (lru // h)  # block-diagonal gates (x and a)
            fwd += 2 * model_cfg.conv1d_width * lru + 10 * lru  # conv1d + recurrence
        else:
            fwd += 2 * (w * w + 2 * w * head_dim + w * w)  # q, k/v (one head), out
            context = mean_local_context(model_cfg.window, seq_len)
            fwd += 2 * 2 * context * w
    fwd += 2 * w * vocab_size  # tied logits
    return 3.0 * fwd
