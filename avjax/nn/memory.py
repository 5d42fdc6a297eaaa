"""Key-value memory addressing and the associative bridge between two modalities.

The core of Multi-modality Associative Bridging through Memory (MAB; Kim et al., ICCV 2021)
and of SyncTalkFace's Audio-Lip Memory (Park et al., AAAI 2022); facts in
`shared/papers/memory.md`.

A memory is a bank of `num_slots` learned slots `[slots, dim]`. A query `[batch, time, dim]`
addresses it by cosine similarity scaled by a radius `r` and normalised over slots,

    A = softmax_slots(r * cos(query, keys))                       [batch, time, slots]

and reads the values with that addressing, `A @ values` -> `[batch, time, value_dim]`. A larger
radius sharpens the addressing (r = 16 in both papers). With `num_heads = h > 1` the query,
keys and values are split along their feature axis into `h` equal parts, each part is
addressed and read on its own (addressing `[batch, time, heads, slots]`), and the reads are
concatenated; `h = 1` is the single-head memory exactly.

The bridge (`AssociativeBridge`) holds a source-key memory `K [slots, key_dim]` and a
target-value memory `V [slots, value_dim]` whose slots correspond one to one:

    A_src = softmax(r * cos(q_embd(f_src), K))        source addressing (train and test)
    recalled = A_src @ stopgrad(V)                     target features recalled from source
    A_tgt = softmax(r * cos(v_embd(stopgrad(f_tgt)), V))   target addressing (training only)
    reconstructed = A_tgt @ V

    reconstruction (storage) loss = MSE(reconstructed, stopgrad(f_tgt))
    alignment (bridge) loss       = KL(stopgrad(A_tgt) || A_src)

Stop-gradients, as in the MAB paper's official code (`ms-dot-k/Visual-Audio-Memory`,
`src/models/memory.py`; SyncTalkFace's memory is the same module with lip motion as target):

- `stopgrad(V)` when recalling: the value memory is written only by the reconstruction loss
  (it stores target-modality features); the task loss on the recalled features trains the
  source side (`K`, `q_embd`, the source encoder) to address the right slots, never `V`.
- `stopgrad(f_tgt)` into `v_embd` and as the reconstruction target: the memory learns to store
  the target encoder's features; it does not pull that encoder towards what it can store.
- `stopgrad(A_tgt)` in the KL: the target addressing is the teacher. It is fixed by what the
  value memory stores, and the source addressing learns to reproduce it (the bridge). Letting
  the KL move `A_tgt` would let the value memory drift towards the (harder to address)
  source side instead of storing the target modality faithfully.

SyncTalkFace writes its storage loss against the embedded lip feature
(`L_store = ||stopgrad(v_embd(f_lip)) - A_lip M_lip||^2`); `reconstruct_embedded=True` selects
that target. Neither paper uses a contrastive loss on the memory (see memory.md), so none is
defined here.

Parameters are float32 with logical axis names `(slots, embed)`, so slots shard over a
mesh axis mapped to `slots`; addressing logits, softmax and losses are float32.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from avjax.nn import axes, layers

_EPS = 1e-12  # as torch.nn.functional.normalize


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """`[..., dim] -> [..., heads, dim / heads]`."""
    if x.shape[-1] % num_heads:
        raise ValueError(f"feature dim {x.shape[-1]} is not divisible by {num_heads} heads")
    return x.reshape(x.shape[:-1] + (num_heads, x.shape[-1] // num_heads))


def _l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _EPS**2))


def cosine_similarity(query: jax.Array, keys: jax.Array, num_heads: int = 1) -> jax.Array:
    """Cosine similarity of each query with each slot, in float32.

    Args:
      query: `[..., dim]`.
      keys: `[slots, dim]`.
      num_heads: split `dim` into this many heads and compare per head.

    Returns:
      `[..., slots]` for one head, `[..., heads, slots]` for several.
    """
    if query.shape[-1] != keys.shape[-1]:
        raise ValueError(
            f"query dim {query.shape[-1]} does not match key dim {keys.shape[-1]} "
            f"(query {layers.shape_str(query.shape)}, keys {layers.shape_str(keys.shape)})"
        )
    if num_heads == 1:
        return jnp.einsum("...d,sd->...s", _l2_normalize(query), _l2_normalize(keys))
    q = _l2_normalize(_split_heads(query, num_heads))
    k = _l2_normalize(_split_heads(keys, num_heads))
    return jnp.einsum("...hd,shd->...hs", q, k)


def addressing_logits(
    query: jax.Array, keys: jax.Array, radius: float, num_heads: int = 1
) -> jax.Array:
    """`radius * cos(query, keys)`: float32 logits over slots, `[..., (heads,) slots]`."""
    return radius * cosine_similarity(query, keys, num_heads)


def address(query: jax.Array, keys: jax.Array, radius: float, num_heads: int = 1) -> jax.Array:
    """`softmax_slots(radius * cos(query, keys))`: float32, sums to 1 over the last axis.

    `query [..., dim]`, `keys [slots, dim]` -> `[..., slots]` (`[..., heads, slots]`).
    """
    return jax.nn.softmax(addressing_logits(query, keys, radius, num_heads), axis=-1)


def _check_slots(addressing: jax.Array, values: jax.Array) -> None:
    if addressing.shape[-1] != values.shape[0]:
        raise ValueError(
            f"addressing {layers.shape_str(addressing.shape)} has {addressing.shape[-1]} slots, "
            f"values {layers.shape_str(values.shape)} have {values.shape[0]}"
        )


def read(addressing: jax.Array, values: jax.Array) -> jax.Array:
    """Reads `values [slots, value_dim]` with `addressing [..., slots]` -> `[..., value_dim]`.

    Float32. For a multi-head addressing `[..., heads, slots]` see `read_heads`.
    """
    _check_slots(addressing, values)
    return jnp.einsum("...s,sd->...d", addressing.astype(jnp.float32), values.astype(jnp.float32))


def read_heads(addressing: jax.Array, values: jax.Array) -> jax.Array:
    """Multi-head read: `addressing [..., heads, slots]`, `values [slots, value_dim]`.

    Head `i` reads the `i`-th of `heads` equal parts of `value_dim`; the parts are
    concatenated -> `[..., value_dim]` (float32).
    """
    _check_slots(addressing, values)
    heads = addressing.shape[-2]
    v = _split_heads(values.astype(jnp.float32), heads)  # [slots, heads, value_dim / heads]
    out = jnp.einsum("...hs,shd->...hd", addressing.astype(jnp.float32), v)
    return out.reshape(out.shape[:-2] + (values.shape[-1],))


def entropy(addressing: jax.Array) -> jax.Array:
    """Entropy (nats) of each addressing over slots: `[..., slots] -> [...]`."""
    p = addressing.astype(jnp.float32)
    return -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)


def _masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of `x [batch, time, ...]` over the frames where `mask [batch, time]` is true."""
    x = x.astype(jnp.float32)
    if mask is None:
        return jnp.mean(x)
    per_frame = jnp.mean(x.reshape(x.shape[:2] + (-1,)), axis=-1)
    w = mask.astype(jnp.float32)
    return jnp.sum(per_frame * w) / jnp.maximum(jnp.sum(w), 1.0)


def alignment_loss(
    source_logits: jax.Array, target_logits: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """The bridge loss `KL(stopgrad(A_tgt) || A_src)`, averaged over frames (and heads).

    The target addressing is detached: it is the teacher the source addressing learns to
    reproduce (MAB's `F.kl_div(log A_src, A_tgt.detach(), reduction="batchmean")` over the
    `batch * time` frames; SyncTalkFace's `L_align = KL(A_lip || A_aud)`). Gradients reach
    only `source_logits`.

    Args:
      source_logits, target_logits: `[batch, time, (heads,) slots]` addressing logits
        (`radius * cos`), softmax-normalised here in float32.
      mask: optional `[batch, time]`, true on valid frames.

    Returns:
      A float32 scalar, 0 exactly when the two addressings agree.
    """
    if source_logits.shape != target_logits.shape:
        raise ValueError(
            f"source logits {layers.shape_str(source_logits.shape)} and target logits "
            f"{layers.shape_str(target_logits.shape)} differ in shape"
        )
    log_src = jax.nn.log_softmax(source_logits.astype(jnp.float32), axis=-1)
    log_tgt = jax.lax.stop_gradient(jax.nn.log_softmax(target_logits.astype(jnp.float32), -1))
    kl = jnp.sum(jnp.exp(log_tgt) * (log_tgt - log_src), axis=-1)  # [batch, time, (heads)]
    return _masked_mean(kl, mask)


def reconstruction_loss(
    reconstructed: jax.Array, target: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """The storage loss `MSE(A_tgt @ V, stopgrad(target))`, mean over frames and features.

    `reconstructed`, `target`: `[batch, time, value_dim]`; `mask` optional `[batch, time]`.
    The target is detached: the memory learns to store the target features, not the other way.
    """
    if reconstructed.shape != target.shape:
        raise ValueError(
            f"reconstructed {layers.shape_str(reconstructed.shape)} and target "
            f"{layers.shape_str(target.shape)} differ in shape"
        )
    err = reconstructed.astype(jnp.float32) - jax.lax.stop_gradient(target).astype(jnp.float32)
    return _masked_mean(jnp.square(err), mask)


def _slots(module: nn.Module, name: str, num_slots: int, dim: int, std: float) -> jax.Array:
    """A `[slots, dim]` float32 memory parameter, init N(0, std), logical axes (slots, embed)."""
    init = nn.with_logical_partitioning(nn.initializers.normal(std), (axes.SLOTS, axes.EMBED))
    return module.param(name, init, (num_slots, dim), jnp.float32)


def _read_any(addressing: jax.Array, values: jax.Array, num_heads: int) -> jax.Array:
    return read(addressing, values) if num_heads == 1 else read_heads(addressing, values)


def _constrain(logits: jax.Array) -> jax.Array:
    """Shards `[batch, time, (heads,) slots]` logits: batch and slots by the logical rules."""
    if logits.ndim == 3:
        return nn.with_logical_constraint(logits, (axes.BATCH, axes.LENGTH, axes.SLOTS))
    if logits.ndim == 4:
        return nn.with_logical_constraint(logits, (axes.BATCH, axes.LENGTH, None, axes.SLOTS))
    return logits


class MemoryRead(NamedTuple):
    """What `KeyValueMemory` returns.

    values: `[batch, time, value_dim]`, the read (in the module's dtype).
    logits: `[batch, time, (heads,) slots]`, float32 `radius * cos`.
    """

    values: jax.Array
    logits: jax.Array

    @property
    def addressing(self) -> jax.Array:
        """`[batch, time, (heads,) slots]`, float32, sums to 1 over slots."""
        return jax.nn.softmax(self.logits, axis=-1)


class KeyValueMemory(nn.Module):
    """A key memory `[slots, key_dim]` addressed by queries, read from a value memory.

    `__call__(query [batch, time, key_dim]) -> MemoryRead`. With `value_dim=None` the keys are
    also the values (a single memory addressed by its own slots, like the bridge's value
    memory).

    Attributes:
      num_slots: number of slots.
      key_dim: feature size of the queries and keys.
      value_dim: feature size of the values; `None` to read the keys themselves.
      radius: the cosine-similarity scale `r`.
      num_heads: address per head on equal splits of the feature axes; 1 = single-head.
      init_std: slots are initialised N(0, init_std) (0.5 in MAB).
      dtype: dtype of the returned read (addressing is float32 regardless).
    """

    num_slots: int
    key_dim: int
    value_dim: int | None = None
    radius: float = 16.0
    num_heads: int = 1
    init_std: float = 0.5
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, query: jax.Array) -> MemoryRead:
        keys = _slots(self, "keys", self.num_slots, self.key_dim, self.init_std)
        if self.value_dim is None:
            values = keys
        else:
            values = _slots(self, "values", self.num_slots, self.value_dim, self.init_std)
        logits = _constrain(addressing_logits(query, keys, self.radius, self.num_heads))
        out = _read_any(jax.nn.softmax(logits, axis=-1), values, self.num_heads)
        return MemoryRead(out.astype(self.dtype or query.dtype), logits)


class BridgeOutput(NamedTuple):
    """What `AssociativeBridge` returns; the target fields are `None` without a target.

    recalled: `[batch, time, value_dim]`, `A_src @ stopgrad(V)`: target-modality features
      recalled from the source alone (the test-time branch).
    source_logits: `[batch, time, (heads,) slots]`, `r * cos(q_embd(f_src), K)`, float32.
    target_logits: `[batch, time, (heads,) slots]`, `r * cos(v_embd(stopgrad(f_tgt)), V)`.
    reconstructed: `[batch, time, value_dim]`, `A_tgt @ V`.
    target: `[batch, time, value_dim]`, the (detached) reconstruction target.
    """

    recalled: jax.Array
    source_logits: jax.Array
    target_logits: jax.Array | None = None
    reconstructed: jax.Array | None = None
    target: jax.Array | None = None

    @property
    def source_addressing(self) -> jax.Array:
        return jax.nn.softmax(self.source_logits, axis=-1)

    @property
    def target_addressing(self) -> jax.Array | None:
        if self.target_logits is None:
            return None
        return jax.nn.softmax(self.target_logits, axis=-1)


class AssociativeBridge(nn.Module):
    """MAB's visual-audio memory / SyncTalkFace's audio-lip memory (see the module docstring).

    `__call__(source [batch, time, source_dim], target=None [batch, time, value_dim])
    -> BridgeOutput`. Pass `target` in training (it adds the target addressing, the
    reconstruction and the loss inputs); at test time the source alone recalls the target.
    The fusion of `recalled` (or the real target) with the source features belongs to the
    model, not here.

    Attributes:
      num_slots: slots in each memory (88 in MAB with a BiGRU back-end, 96 in SyncTalkFace).
      key_dim: size of the source key memory `K` (and of `q_embd`'s output).
      value_dim: size of the target value memory `V`; the target features have this size.
      radius: `r` (16 in both papers).
      num_heads: multi-head addressing on both memories (1 in both papers).
      embed_queries: apply the linear `q_embd` / `v_embd` before addressing (as the papers).
      reconstruct_embedded: reconstruct `stopgrad(v_embd(f_tgt))` (SyncTalkFace's L_store)
        instead of `stopgrad(f_tgt)` (MAB's code).
      init_std: slots are initialised N(0, init_std).
      dtype: dtype of the embeddings and the returned reads (addressing is float32).
    """

    num_slots: int
    key_dim: int
    value_dim: int
    radius: float = 16.0
    num_heads: int = 1
    embed_queries: bool = True
    reconstruct_embedded: bool = False
    init_std: float = 0.5
    dtype: jnp.dtype | None = None

    def _embed(self, x: jax.Array, features: int, name: str) -> jax.Array:
        if not self.embed_queries:
            return x
        # PyTorch nn.Linear's default init variance, 1 / (3 fan_in).
        proj = layers.dense(features, (axes.EMBED, None), scale=1 / 3, dtype=self.dtype, name=name)
        return proj(x)

    @nn.compact
    def __call__(self, source: jax.Array, target: jax.Array | None = None) -> BridgeOutput:
        keys = _slots(self, "source_keys", self.num_slots, self.key_dim, self.init_std)
        values = _slots(self, "target_values", self.num_slots, self.value_dim, self.init_std)
        dtype = self.dtype or source.dtype

        query = self._embed(source, self.key_dim, "q_embd")
        src_logits = _constrain(addressing_logits(query, keys, self.radius, self.num_heads))
        recalled = _read_any(
            jax.nn.softmax(src_logits, axis=-1), jax.lax.stop_gradient(values), self.num_heads
        )
        if target is None:
            return BridgeOutput(recalled.astype(dtype), src_logits)

        if target.shape[:-1] != source.shape[:-1] or target.shape[-1] != self.value_dim:
            raise ValueError(
                f"target {layers.shape_str(target.shape)} must be [batch, time, value_dim="
                f"{self.value_dim}] matching source {layers.shape_str(source.shape)}"
            )
        target = jax.lax.stop_gradient(target)
        target_query = self._embed(target, self.value_dim, "v_embd")
        tgt_logits = _constrain(
            addressing_logits(target_query, values, self.radius, self.num_heads)
        )
        reconstructed = _read_any(jax.nn.softmax(tgt_logits, axis=-1), values, self.num_heads)
        goal = target_query if self.reconstruct_embedded else target
        return BridgeOutput(
            recalled.astype(dtype),
            src_logits,
            tgt_logits,
            reconstructed.astype(dtype),
            jax.lax.stop_gradient(goal),
        )


def bridge_losses(out: BridgeOutput, mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """`{"reconstruction": MSE(A_tgt V, sg(f_tgt)), "alignment": KL(sg(A_tgt) || A_src)}`.

    Needs an output computed with a target. `mask`: optional `[batch, time]` valid frames.
    """
    if out.target_logits is None or out.reconstructed is None or out.target is None:
        raise ValueError("bridge_losses needs a BridgeOutput computed with a target")
    return {
        "reconstruction": reconstruction_loss(out.reconstructed, out.target, mask),
        "alignment": alignment_loss(out.source_logits, out.target_logits, mask),
    }
