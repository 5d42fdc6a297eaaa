"""Autoregressive sampling with a constant-size decoding state, in jitted chunks.

Works with any LM whose `apply(variables, tokens, segment_pos, cache=None, return_cache=False)`
returns `(logits [batch, time, vocab], cache)` (e.g. `avjax.nn.griffin.GriffinLM`):

  state = prefill(prompt)                 # one parallel pass over the prompt
  for chunk in range(...):                # host loop: progress, streaming output
      state, tokens = decode_chunk(state) # lax.scan over `chunk_tokens` steps

The state (model cache, next-token logits, position, step) has a fixed size, so memory does
not grow with the generated length. Token `i` is drawn with `fold_in(key, i)`, so the output
does not depend on how the generation is cut into chunks.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class SamplerState(NamedTuple):
    """Decoding state; every leaf has a size independent of the generated length.

    cache: the model's per-block caches. logits: `[batch, vocab]` float32 for the next token.
    position: `[batch]` int32 segment position of the next token. step: scalar int32, tokens
    generated so far.
    """

    cache: Any
    logits: jax.Array
    position: jax.Array
    step: jax.Array


def sample_from_logits(
    logits: jax.Array, rng: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """Draws tokens `[batch]` from `logits [batch, vocab]`.

    temperature 0 is greedy; `top_k > 0` keeps the k most likely; `top_p < 1` keeps the
    smallest set whose probability reaches p (nucleus).
    """
    logits = logits.astype(jnp.float32)
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
        cutoff = jnp.min(jnp.where(cum < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def prefill(model: nn.Module, params: Any, prompt: jax.Array) -> SamplerState:
    """Runs the prompt `[batch, time]` in one parallel pass and returns the decoding state."""
    b, t = prompt.shape
    segment_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache = model.apply({"params": params}, prompt, segment_pos, return_cache=True)
    return SamplerState(
        cache=cache,
        logits=logits[:, -1].astype(jnp.float32),
        position=jnp.full((b,), t, jnp.int32),
        step=jnp.zeros((), jnp.int32),
    )


def decode_chunk(
    model: nn.Module,
    params: Any,
    state: SamplerState,
    key: jax.Array,
    *,
    num_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[SamplerState, jax.Array]:
    """Generates `num_tokens` tokens under `lax.scan`; returns the new state and `[batch, n]`."""

    def body(s: SamplerState, _):
        token = sample_from_logits(
            s.logits, jax.random.fold_in(key, s.step), temperature, top_k, top_p
        )
        logits, cache = model.apply(
            {"params": params}, token[:, None], s.position[:, None], cache=s.cache
        )
        new = SamplerState(cache, logits[:, -1].astype(jnp.float32), s.position + 1, s.step + 1)
        return new, token

    state, tokens = jax.lax.scan(body, state, None, length=num_tokens)
    return state, tokens.T


def generate(
    model: nn.Module,
    params: Any,
    prompt: np.ndarray,
    num_tokens: int,
    *,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    chunk_tokens: int = 250,
) -> Iterator[np.ndarray]:
    """Yields generated tokens `[batch, <=chunk_tokens]` chunk by chunk (host numpy).

    Memory stays constant in `num_tokens`: only one chunk of tokens is alive at a time.
    """
    key = jax.random.key(seed)
    state = jax.jit(functools.partial(prefill, model))(params, jnp.asarray(prompt, jnp.int32))
    step_fns: dict[int, Any] = {}
    done = 0
    while done < num_tokens:
        n = min(chunk_tokens, num_tokens - done)
        if n not in step_fns:
            step_fns[n] = jax.jit(
                functools.partial(
                    decode_chunk,
                    model,
                    num_tokens=n,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                ),
                donate_argnums=(1,),
            )
        state, tokens = step_fns[n](params, state, key)
        done += n
        yield np.asarray(tokens)
