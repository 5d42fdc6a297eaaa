"""Weight-only quantisation of a frozen base (QLoRA): int8 per channel and NF4 blockwise.

A quantised kernel is a `QTensor` pytree (codes + float32 scales; kind and block are
static), stored in the params tree in place of the float kernel `[..., in, out]` (leading axes,
e.g. the stacked layers of `nn.scan`, are kept, so scanned stacks slice it per layer):

  * "int8": per output channel absmax: `scale[..., 1, out] = max |w| over in / 127`,
    `codes = round(w / scale)` int8. 1 byte per weight (+ 4 / in).
  * "nf4": QLoRA's 4-bit NormalFloat. Blocks of `block` (64) consecutive weights along `in`
    (for a kernel stored `[in, out]` these are exactly the blocks bitsandbytes takes along a
    row of PyTorch's `[out, in]` weight) are scaled by their absmax into [-1, 1] and rounded to
    the nearest of the 16 NF4 values; two codes per uint8. 0.5 byte per weight + 4 / block
    (the scales are kept float32: QLoRA's double quantisation of the scales is not done).

`quantize_params` quantises the decoder's projection weights (`BASE_WEIGHTS`); the tree then
runs under `avjax.nn.lora.lora_scope` / `LoraModel`. `qmatmul(x, q)` is the dequantise-on-the-fly
matmul `x [..., in] @ W [in, out]`: int8 multiplies
by the integer codes and applies the per-channel scale to the output (exact factorisation); NF4
looks the codes up (codebook[code] * block scale) inside the jitted matmul, so only the
quantised form is held between steps.
"""

from __future__ import annotations

import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The 16 NF4 values (QLoRA; bitsandbytes' table): quantiles of N(0, 1) normalised to [-1, 1],
# 8 positive, 7 negative and an exact zero.
NF4_CODEBOOK = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
KINDS = ("int8", "nf4")


@flax.struct.dataclass
class QTensor:
    """A quantised `[..., in, out]` weight. int8: `codes [..., in, out]` int8, `scales
    [..., 1, out]`. nf4: `codes [..., in / block, block / 2, out]` uint8 (two codes each),
    `scales [..., in / block, 1, out]`."""

    codes: jax.Array
    scales: jax.Array
    kind: str = flax.struct.field(pytree_node=False)
    block: int = flax.struct.field(pytree_node=False, default=64)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes plus scales."""
        return int(self.codes.size * self.codes.dtype.itemsize + self.scales.size * 4)


def quantize(w: jax.Array, kind: str = "nf4", block: int = 64) -> QTensor:
    """Quantises a float kernel `w [..., in, out]` ("int8" or "nf4", see the module doc)."""
    w = jnp.asarray(w, jnp.float32)
    if w.ndim < 2:
        raise ValueError(f"quantize needs a [..., in, out] kernel, got shape {w.shape}")
    if kind == "int8":
        scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127.0
        scale = jnp.where(scale == 0, 1.0, scale)
        codes = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
        return QTensor(codes, scale, "int8", block)
    if kind != "nf4":
        raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
    n_in = w.shape[-2]
    if n_in % block or block % 2:
        raise ValueError(f"nf4: the in dimension {n_in} is not a multiple of block={block}")
    blocks = w.reshape(*w.shape[:-2], n_in // block, block, w.shape[-1])
    scale = jnp.max(jnp.abs(blocks), axis=-2, keepdims=True)
    scale = jnp.where(scale == 0, 1.0, scale)
    mids = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2  # nearest value = count of midpoints below
    idx = jnp.searchsorted(jnp.asarray(mids), blocks / scale).astype(jnp.uint8)
    packed = idx[..., 0::2, :] | (idx[..., 1::2, :] << 4)
    return QTensor(packed, scale, "nf4", block)


def _nf4_values(q: QTensor, dtype: Any) -> jax.Array:
    """Blocks of normalised values `[..., in / block, block, out]` from the packed codes."""
    lo, hi = q.codes & 0xF, q.codes >> 4
    idx = jnp.stack([lo, hi], axis=-2)  # [..., nb, block/2, 2, out]
    idx = idx.reshape(*q.codes.shape[:-2], q.block, q.codes.shape[-1])
    return jnp.asarray(NF4_CODEBOOK, dtype)[idx.astype(jnp.int32)]


def dequantize(q: QTensor, dtype: Any = jnp.float32) -> jax.Array:
    """The float kernel `[..., in, out]` a `QTensor` stands for."""
    if q.kind == "int8":
        return q.codes.astype(dtype) * q.scales.astype(dtype)
    w = _nf4_values(q, dtype) * q.scales.astype(dtype)  # [..., in / block, block, out]
    return w.reshape(*w.shape[:-3], w.shape[-3] * w.shape[-2], w.shape[-1])


def qmatmul(x: jax.Array, q: QTensor, dtype: Any = None) -> jax.Array:
    """`x [..., in] @ dequantize(q) [in, out]` -> `[..., out]` in `dtype` (default x's); `q`
    is one 2-D kernel (inside `nn.scan` a stacked one is sliced per layer)."""
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    if q.kind == "int8":
        y = jnp.einsum("...i,io->...o", x, q.codes.astype(dtype))
        scale = q.scales.astype(dtype).reshape((1,) * (y.ndim - 1) + (-1,))
        return y * scale
    return jnp.einsum("...i,io->...o", x, dequantize(q, dtype))


def path_str(path: tuple) -> str:
    """ "blocks_0/attention/q/kernel" for a pytree path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


# The decoder's projection weights: attention q/k/v/out and MLP-down kernels (multiplied on the
# fly by `avjax.nn.lora`'s Dense interceptor) and the fused gate/up `ffw_up_w` (dequantised
# per layer inside `avjax.nn.transformer.GatedMLP`). Embeddings, lm_head and norms stay float.
BASE_WEIGHTS = r"(attention/(q|k|v|out)/kernel|mlp/ffw_down/kernel|mlp/ffw_up_w)$"


def quantize_params(
    params: Any, kind: str = "nf4", target: str = BASE_WEIGHTS, block: int = 64
) -> Any:
    """`params` with every leaf whose path matches `target` replaced by its `QTensor`.

    The quantised tree runs under `avjax.nn.lora.lora_scope` (or a `LoraModel`), whose Dense
    interceptor multiplies quantised kernels with `qmatmul`. Raises if nothing matches.
    """
    pattern, hits = re.compile(target), []

    def one(path: tuple, x: Any) -> Any:
        if isinstance(x, QTensor) or not pattern.search(path_str(path)):
            return x
        hits.append(path_str(path))
        return quantize(x, kind, block)

    out = jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, QTensor))
    if not hits:
        raise ValueError(f"quantize_params: no parameter path matches {target!r}")
    return out


def dequantize_params(params: Any, dtype: Any = jnp.float32) -> Any:
    """`params` with every `QTensor` replaced by its float kernel."""
    return jax.tree.map(
        lambda x: dequantize(x, dtype) if isinstance(x, QTensor) else x,
        params,
        is_leaf=lambda x: isinstance(x, QTensor),
    )


def param_bytes(params: Any) -> int:
    """Bytes the params tree holds (a `QTensor` counts its codes and scales)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QTensor))
    return sum(
        x.nbytes if isinstance(x, QTensor) else int(x.size * x.dtype.itemsize) for x in leaves
    )


# --- a quantised frozen base kept beside the trained params -----------------------------------
# A train step differentiates the whole params tree, and integer codes cannot be differentiated
# (nor need to be: a quantised base is frozen). So a trainer keeps the quantised kernels in a
# separate variable collection (`BASE_COLLECTION`), a nested dict mirroring the params paths with
# `{"codes", "scales"}` at each quantised kernel (plain arrays: checkpoints need no custom
# pytree node), and `join_quantized` puts them back as `QTensor`s for `apply`.
BASE_COLLECTION = "qbase"


def _qnames(names: tuple, kind: str) -> tuple[tuple, tuple]:
    """Logical axis names of (codes, scales) for a kernel named `names` (`[..., in, out]`): the
    codes and scales are sharded as the kernel along its leading, `in` and `out` axes."""
    lead, n_in, n_out = tuple(names[:-2]), names[-2], names[-1]
    if kind == "int8":
        return lead + (n_in, n_out), lead + (None, n_out)
    return lead + (n_in, None, n_out), lead + (n_in, None, n_out)


def _quantize_leaf(x: Any, kind: str, block: int) -> dict[str, Any]:
    """`{"codes", "scales"}` of a (possibly logically boxed) float kernel, boxed alike."""
    boxed = isinstance(x, nn.meta.AxisMetadata)
    q = quantize(x.unbox() if boxed else x, kind, block)
    if not boxed:
        return {"codes": q.codes, "scales": q.scales}
    code_names, scale_names = _qnames(tuple(x.names), kind)
    return {
        "codes": x.replace(value=q.codes, names=code_names),
        "scales": x.replace(value=q.scales, names=scale_names),
    }


def split_quantized(
    params: dict[str, Any],
    kind: str,
    block: int = 64,
    target: str = BASE_WEIGHTS,
    select: Any = None,
    prefix: str = "",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(rest, stored)`: `params` (nested dicts; leaves possibly logically boxed) without the
    kernels whose path matches `target` (and, if given, whose leaf of the bool tree `select` is
    True), and those kernels quantised (`kind`, `block`) as `{"codes", "scales"}` dicts at the
    same paths. Raises if nothing matches."""
    rest, stored = _split(params, re.compile(target), select, prefix, kind, block)
    if not stored:
        raise ValueError(f"split_quantized: no selected parameter path matches {target!r}")
    return rest, stored


def _split(
    tree: dict, pattern: re.Pattern, select: Any, prefix: str, kind: str, block: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`split_quantized` on one level of nested dicts (`select`: its bool tree, or None)."""
    rest: dict[str, Any] = {}
    stored: dict[str, Any] = {}
    for k, v in tree.items():
        name, sel = f"{prefix}{k}", None if select is None else select.get(k, False)
        if isinstance(v, dict) and (select is None or isinstance(sel, dict)):
            r, s = _split(v, pattern, sel, name + "/", kind, block)
            rest[k] = r
            if s:
                stored[k] = s
        elif pattern.search(name) and (select is None or bool(sel)):
            stored[k] = _quantize_leaf(v, kind, block)
        else:
            rest[k] = v
    return rest, stored


def join_quantized(params: dict[str, Any], stored: dict[str, Any], kind: str, block: int) -> Any:
    """`params` with each `{"codes", "scales"}` of `stored` (from `split_quantized`, unboxed)
    inserted at its path as a `QTensor` (what `avjax.nn.lora`'s interceptor multiplies)."""
    out = dict(params)
    for k, v in stored.items():
        if set(v) == {"codes", "scales"} and not isinstance(v["codes"], dict):
            out[k] = QTensor(v["codes"], v["scales"], kind, block)
        else:
            out[k] = join_quantized(out.get(k, {}), v, kind, block)
    return out
