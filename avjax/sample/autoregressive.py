"""Autoregressive sampling with a constant-size decoding state, in jitted chunks.

Works with any LM whose `apply(variables, tokens, segment_pos, cache=None, return_cache=False)`
returns `(logits [batch, time, vocab], cache)` (e.g. `avjax.nn.griffin.GriffinLM`):

  state = prefill(prompt)                           # one parallel pass over the prompt
  for state, tokens in decode_chunks(state, ...):   # host loop: progress, streaming, saves
      ...                                           # lax.scan over <= chunk_tokens steps

`decode_chunks` is the one decode loop: `generate` streams it, `avjax.sample.resumable` saves
its state between chunks. The state (model cache, next-token logits, position, step) has a
fixed size, so memory does not grow with the generated length. Token `i` is drawn with
`fold_in(key, i)`, and chunks end at multiples of `chunk_tokens` counted from token 0, so the
output depends neither on how the generation is cut into calls nor on where it resumed.

`score` runs the same step with given tokens instead of sampled ones (teacher forcing): the
log-probabilities of a continuation in constant memory, whatever its length.
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


def advance(model: nn.Module, params: Any, state: SamplerState, token: jax.Array) -> SamplerState:
    """Feeds `token [batch]` int32 (one per sequence) and returns the next state."""
    logits, cache = model.apply(
        {"params": params}, token[:, None], state.position[:, None], cache=state.cache
    )
    next_logits = logits[:, -1].astype(jnp.float32)
    return SamplerState(cache, next_logits, state.position + 1, state.step + 1)


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
        return advance(model, params, s, token), token

    state, tokens = jax.lax.scan(body, state, None, length=num_tokens)
    return state, tokens.T


def score_chunk(
    model: nn.Module, params: Any, state: SamplerState, targets: jax.Array
) -> tuple[SamplerState, jax.Array]:
    """Teacher forcing under `lax.scan`: feeds `targets [batch, n]` int32 one step at a time.

    Returns the new state and `[batch, n]` float32 `log p(targets[:, i] | everything before)`.
    """

    def body(s: SamplerState, token: jax.Array):
        logp = jax.nn.log_softmax(s.logits, axis=-1)
        lp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
        return advance(model, params, s, token), lp

    state, logprobs = jax.lax.scan(body, state, targets.T)
    return state, logprobs.T


def chunk_sizes(start: int, num_tokens: int, chunk_tokens: int) -> Iterator[int]:
    """Sizes of the chunks from token `start` to `num_tokens`, ending at multiples of
    `chunk_tokens` (so a run resumed at any chunk end cuts the rest as an unbroken run does)."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    done = start
    while done < num_tokens:
        n = min(chunk_tokens - done % chunk_tokens, num_tokens - done)
        yield n
        done += n


def decode_chunks(
    model: nn.Module,
    params: Any,
    state: SamplerState,
    key: jax.Array,
    num_tokens: int,
    *,
    start: int = 0,
    chunk_tokens: int = 250,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Iterator[tuple[SamplerState, jax.Array]]:
    """The decode loop: from token `start` (= `state.step`) to `num_tokens`, one jitted
    `decode_chunk` per chunk (`chunk_sizes`).

    Yields `(state after the chunk, tokens [batch, n])` as device arrays. The state is donated
    to the next chunk: use it (e.g. save it) before asking for the next item.
    """
    fn = jax.jit(
        functools.partial(decode_chunk, model, temperature=temperature, top_k=top_k, top_p=top_p),
        static_argnames="num_tokens",
        donate_argnums=(1,),
    )  # compiled once per chunk size
    for n in chunk_sizes(start, num_tokens, chunk_tokens):
        state, tokens = fn(params, state, key, num_tokens=n)
        yield state, tokens


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
    state = jax.jit(functools.partial(prefill, model))(params, jnp.asarray(prompt, jnp.int32))
    for _, tokens in decode_chunks(
        model,
        params,
        state,
        jax.random.key(seed),
        num_tokens,
        chunk_tokens=chunk_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    ):
        yield np.asarray(tokens)


def score(
    model: nn.Module,
    params: Any,
    prompt: np.ndarray,
    targets: np.ndarray,
    *,
    chunk_tokens: int = 250,
) -> np.ndarray:
    """Teacher-forced log-probabilities of `targets [batch, n]` after `prompt [batch, P]`.

    Returns `[batch, n]` float32 `log p(targets[:, i] | prompt, targets[:, :i])`. The prompt is
    prefilled in one pass, the targets are fed in jitted chunks of `chunk_tokens` steps: memory
    stays constant in `n` (a full-length parallel pass would build `n x n` attention scores).
    """
    targets = np.asarray(targets, np.int32)
    state = jax.jit(functools.partial(prefill, model))(params, jnp.asarray(prompt, jnp.int32))
    fn = jax.jit(functools.partial(score_chunk, model), donate_argnums=(1,))
    out, done = [], 0
    for n in chunk_sizes(0, targets.shape[1], chunk_tokens):
        state, lp = fn(params, state, jnp.asarray(targets[:, done : done + n]))
        out.append(np.asarray(lp))
        done += n
    return np.concatenate(out, axis=1) if out else np.zeros((len(targets), 0), np.float32)
