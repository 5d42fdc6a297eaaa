"""Compiled decoding over a decoder's KV cache: greedy, sampling and beam search.

Works with any LM whose `apply(variables, tokens, segment_pos, cache=None, return_cache=False)`
returns `(logits [batch, time, vocab], cache)` (`avjax.nn.transformer.TransformerLM`, Griffin).
The prompt `[batch, prompt_len]` (one document per row, all rows the same length) is run in one
parallel prefill; then every generated token is one cached step inside a jitted
`lax.while_loop`, which stops as soon as every row (or every beam search) is done, or after
`max_new_tokens`. No Python loop runs over the steps.

  * `generate(..., temperature=0)` is greedy; `temperature > 0` samples, optionally restricted
    to the `top_k` most likely tokens and/or the nucleus of mass `top_p`
    (`avjax.sample.autoregressive.sample_from_logits`; token i uses `fold_in(key, i)`).
    Rows that produced `eos_id` continue with `pad_id`, as HF `generate` does.
  * `beam_search` follows HF transformers' vectorised beam search (v4.50+; `num_beams`,
    `length_penalty`, `early_stopping` False / True / "never"): per step the 2 x num_beams best
    continuations of all beams; those ending in EOS among the best num_beams become finished
    hypotheses scored `sum log p / generated_len ** length_penalty` (EOS counted); the best
    num_beams others continue. The result is the best finished hypothesis, token for token the
    ids `LlamaForCausalLM.generate(num_beams=..., do_sample=False)` returns (tested).

The cache must hold `prompt_len + max_new_tokens` tokens (`max_len` of the module).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from avjax.sample.autoregressive import sample_from_logits

NEG = -1.0e9  # HF's "impossible" score offset, kept identical so ties and sums match


@functools.lru_cache(maxsize=64)
def _compiled(fn: Any, model: Any, **static: Any) -> Any:
    """`jax.jit(fn(model, ..., **static))`, one per (model, options): repeated calls (e.g. one
    per eval batch) reuse the compiled loop instead of re-tracing it."""
    return jax.jit(functools.partial(fn, model, **static))


def _batch_axis(model: Any) -> int:
    """Axis of the batch in the cache leaves (1 when layers are scanned: `[layers, batch]`)."""
    return 1 if getattr(model, "scan_layers", False) else 0


def _check_len(model: Any, prompt_len: int, max_new_tokens: int) -> None:
    max_len = getattr(model, "max_len", None)
    if max_len is not None and prompt_len + max_new_tokens > max_len:
        raise ValueError(
            f"prompt of {prompt_len} + max_new_tokens={max_new_tokens} tokens > the module's "
            f"cache max_len={max_len}; build the model with a larger max_len"
        )


def _prefill(model: Any, variables: Any, prompt: jax.Array) -> tuple[jax.Array, Any]:
    """`prompt [b, t]` -> (next-token logits `[b, vocab]` float32, cache)."""
    b, t = prompt.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache = model.apply(variables, prompt, pos, return_cache=True)
    return logits[:, -1].astype(jnp.float32), cache


def _step(
    model: Any, variables: Any, cache: Any, token: jax.Array, position: jax.Array
) -> tuple[jax.Array, Any]:
    """Feeds `token [b]` at segment position `position` (scalar) -> (logits `[b, V]`, cache)."""
    pos = jnp.full((token.shape[0], 1), position, jnp.int32)
    logits, cache = model.apply(variables, token[:, None], pos, cache=cache)
    return logits[:, -1].astype(jnp.float32), cache


class _SampleState(NamedTuple):
    step: jax.Array  # scalar int32: tokens generated so far
    cache: Any
    logits: jax.Array  # [b, vocab] float32, for the next token
    tokens: jax.Array  # [b, max_new_tokens] int32 (pad_id where not generated)
    done: jax.Array  # [b] bool: produced eos_id


def _generate(
    model: Any,
    variables: Any,
    prompt: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_id: int | None,
    pad_id: int,
) -> jax.Array:
    b, t = prompt.shape
    logits, cache = _prefill(model, variables, prompt)
    state = _SampleState(
        jnp.zeros((), jnp.int32),
        cache,
        logits,
        jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((b,), bool),
    )

    def cond(s: _SampleState) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: _SampleState) -> _SampleState:
        token = sample_from_logits(
            s.logits, jax.random.fold_in(key, s.step), temperature, top_k, top_p
        )
        token = jnp.where(s.done, pad_id, token)
        done = s.done | (token == eos_id) if eos_id is not None else s.done
        logits, cache = _step(model, variables, s.cache, token, t + s.step)
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, axis=1)
        return _SampleState(s.step + 1, cache, logits, tokens, done)

    return jax.lax.while_loop(cond, body, state).tokens


def generate(
    model: Any,
    variables: Any,
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> jax.Array:
    """Greedy (`temperature=0`) or sampled continuation of `prompt [batch, prompt_len]` int32.

    Returns `[batch, max_new_tokens]` int32: the generated tokens, `pad_id` after a row's
    `eos_id` (the EOS itself is kept). `key` is required when `temperature > 0`.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    _check_len(model, prompt.shape[1], max_new_tokens)
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    fn = _compiled(
        _generate,
        model,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        eos_id=eos_id,
        pad_id=pad_id,
    )
    return fn(variables, prompt, jax.random.key(0) if key is None else key)


class BeamResult(NamedTuple):
    """`tokens [batch, max_new_tokens]` int32 (the best hypothesis, `pad_id` after its end),
    `lengths [batch]` its generated length (EOS included), `scores [batch]` its
    length-penalised log-probability (HF's `sequences_scores`)."""

    tokens: jax.Array
    lengths: jax.Array
    scores: jax.Array


class _BeamState(NamedTuple):
    step: jax.Array  # scalar int32
    cache: Any  # batch * num_beams rows
    logits: jax.Array  # [b * k, vocab] float32
    running: jax.Array  # [b, k, n] int32 running hypotheses (generated part)
    running_scores: jax.Array  # [b, k] float32 sum log p
    finished: jax.Array  # [b, k, n] int32 best finished hypotheses
    finished_scores: jax.Array  # [b, k] float32 (length-penalised; NEG-ish when empty)
    finished_len: jax.Array  # [b, k] int32
    is_finished: jax.Array  # [b, k] bool: slot holds a finished hypothesis
    improvable: jax.Array  # [b] bool: HF's early-stop heuristic not yet satisfied
    stop: jax.Array  # scalar bool


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """`x [b, m, ...]`, `idx [b, j]` -> `[b, j, ...]`."""
    return jax.vmap(lambda a, i: a[i])(x, idx)


def _reorder_cache(cache: Any, flat_idx: jax.Array, axis: int) -> Any:
    return jax.tree.map(lambda c: jnp.take(c, flat_idx, axis=axis), cache)


def _beam_step(
    s: _BeamState,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_id: int | None,
    length_penalty: float,
    early_stopping: bool | str,
) -> tuple[_BeamState, jax.Array, jax.Array]:
    """One HF beam-search step on the logits in `s` (no model call).

    Returns (state with updated hypotheses, new running tokens `[b, k]`, their parent flat
    row indices `[b * k]` for reordering the cache).
    """
    b, k, n = s.running.shape
    vocab = s.logits.shape[-1]
    logp = jax.nn.log_softmax(s.logits, axis=-1).reshape(b, k, vocab)
    flat = (logp + s.running_scores[:, :, None]).reshape(b, k * vocab)
    keep = 2 * num_beams
    top_lp, top_idx = jax.lax.top_k(flat, keep)  # [b, 2k]
    parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    cand = _gather(s.running, parent).at[:, :, s.step].set(token)  # [b, 2k, n]
    hits = jnp.broadcast_to(s.step + 1 >= max_new_tokens, token.shape)
    if eos_id is not None:
        hits = hits | (token == eos_id)
    # the best num_beams unfinished candidates continue
    run_lp = top_lp + hits.astype(jnp.float32) * NEG
    nxt = jax.lax.top_k(run_lp, num_beams)[1]
    running, running_scores = _gather(cand, nxt), _gather(run_lp, nxt)
    parents = _gather(parent, nxt) + jnp.arange(b)[:, None] * num_beams
    # finished: among the top num_beams candidates, those that hit a stopping criterion
    top_mask = jnp.arange(keep) < num_beams
    just_done = hits & top_mask[None]
    cand_scores = top_lp / ((s.step + 1).astype(jnp.float32) ** length_penalty)
    full = jnp.all(s.is_finished, axis=-1, keepdims=True) & (early_stopping is True)
    cand_scores = cand_scores + full.astype(jnp.float32) * NEG
    cand_scores = cand_scores + (~s.improvable)[:, None].astype(jnp.float32) * NEG
    cand_scores = cand_scores + (~just_done).astype(jnp.float32) * NEG
    merged_scores = jnp.concatenate([s.finished_scores, cand_scores], axis=1)
    best = jax.lax.top_k(merged_scores, num_beams)[1]
    merged_len = jnp.concatenate(
        [s.finished_len, jnp.full(token.shape, s.step + 1, jnp.int32)], axis=1
    )
    finished = _gather(jnp.concatenate([s.finished, cand], axis=1), best)
    is_finished = _gather(jnp.concatenate([s.is_finished, just_done], axis=1), best)
    finished_scores = _gather(merged_scores, best)
    finished_len = _gather(merged_len, best)
    # HF's early-stop heuristic, at the new length
    new_len = (s.step + 1).astype(jnp.float32)
    if early_stopping == "never" and length_penalty > 0.0:
        new_len = jnp.float32(max_new_tokens)
    best_running = running_scores[:, 0] / (new_len**length_penalty)
    worst = jnp.where(is_finished, finished_scores.min(-1, keepdims=True), NEG)
    improvable = s.improvable & jnp.any(best_running[:, None] > worst, axis=-1)
    open_beam = ~(jnp.all(is_finished) & (early_stopping is True))
    stop = ~(jnp.any(improvable) & open_beam & ~jnp.all(hits))
    state = s._replace(
        step=s.step + 1,
        running=running,
        running_scores=running_scores,
        finished=finished,
        finished_scores=finished_scores,
        finished_len=finished_len,
        is_finished=is_finished,
        improvable=improvable,
        stop=stop,
    )
    return state, running[:, :, s.step], parents.reshape(-1)


def _beam_search(
    model: Any,
    variables: Any,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float,
    early_stopping: bool | str,
    eos_id: int | None,
    pad_id: int,
) -> BeamResult:
    b, t = prompt.shape
    k, n = num_beams, max_new_tokens
    logits, cache = _prefill(model, variables, prompt)
    rows = jnp.repeat(jnp.arange(b), k)
    axis = _batch_axis(model)
    init = _BeamState(
        step=jnp.zeros((), jnp.int32),
        cache=_reorder_cache(cache, rows, axis),
        logits=logits[rows],
        running=jnp.full((b, k, n), pad_id, jnp.int32),
        running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG),
        finished=jnp.full((b, k, n), pad_id, jnp.int32),
        finished_scores=jnp.full((b, k), NEG, jnp.float32),
        finished_len=jnp.zeros((b, k), jnp.int32),
        is_finished=jnp.zeros((b, k), bool),
        improvable=jnp.ones((b,), bool),
        stop=jnp.zeros((), bool),
    )
    step = functools.partial(
        _beam_step,
        num_beams=k,
        max_new_tokens=n,
        eos_id=eos_id,
        length_penalty=float(length_penalty),
        early_stopping=early_stopping,
    )

    def body(s: _BeamState) -> _BeamState:
        s, token, parents = step(s)
        cache = _reorder_cache(s.cache, parents, axis)
        logits, cache = _step(model, variables, cache, token.reshape(-1), t + s.step - 1)
        return s._replace(cache=cache, logits=logits)

    s = jax.lax.while_loop(lambda s: ~s.stop & (s.step < n), body, init)
    length = s.finished_len[:, 0]
    tokens = jnp.where(jnp.arange(n)[None] < length[:, None], s.finished[:, 0], pad_id)
    return BeamResult(tokens, length, s.finished_scores[:, 0])


def beam_search(
    model: Any,
    variables: Any,
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    num_beams: int = 5,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> BeamResult:
    """Beam search from `prompt [batch, prompt_len]` int32 (HF transformers' algorithm).

    Each row runs `num_beams` hypotheses in a `[batch * num_beams]` cache. `length_penalty`
    divides a finished hypothesis' summed log-probability by its generated length (EOS
    included) to that power, as HF's `length_penalty`; `early_stopping` as HF's (False: stop
    when no running beam can beat the worst kept finished one at the current length).
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping={early_stopping!r}; expected True, False or 'never'")
    prompt = jnp.asarray(prompt, jnp.int32)
    _check_len(model, prompt.shape[1], max_new_tokens)
    fn = _compiled(
        _beam_search,
        model,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        length_penalty=float(length_penalty),
        early_stopping=early_stopping,
        eos_id=eos_id,
        pad_id=pad_id,
    )
    return fn(variables, prompt)
