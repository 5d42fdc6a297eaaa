"""Logical axis names: the one place they are spelled.

Every parameter (`nn.with_logical_partitioning`) and large activation
(`nn.with_logical_constraint`) names its dimensions with these constants, and
`avjax.train.sharding` maps the same constants onto mesh axes. A name that no sharding rule
covers is silently replicated, so use the constants, never string literals: a typo is then a
`NameError` at import, and `tests/test_nn_axes.py` checks that every name in every model's
parameter tree is covered by every sharding preset.
"""

from __future__ import annotations

BATCH = "batch"  # examples in a batch (activations)
LENGTH = "length"  # time steps / tokens of a sequence (activations)
EMBED = "embed"  # the model (residual stream) width
MLP = "mlp"  # the MLP hidden width
HEADS = "heads"  # attention heads x head_dim (query side); block-diagonal gate blocks
KV = "kv"  # key/value heads x head_dim
VOCAB = "vocab"  # token vocabulary
RNN = "rnn"  # recurrence (RG-LRU, selective SSM) width
CONV = "conv"  # convolution kernel taps
LAYERS = "layers"  # the stacked-layers axis of `nn.scan`ned stacks
SLOTS = "slots"  # key-value memory slots
FRAMES = "frames"  # video frames (activations)

ALL: tuple[str, ...] = (
    BATCH,
    LENGTH,
    EMBED,
    MLP,
    HEADS,
    KV,
    VOCAB,
    RNN,
    CONV,
    LAYERS,
    SLOTS,
    FRAMES,
)
