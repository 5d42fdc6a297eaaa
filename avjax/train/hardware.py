"""Accelerator facts: HBM per chip and peak dense bf16 FLOP/s, for MFU and fit checks.

Peak figures are the vendors' dense (no sparsity) bf16 numbers per chip. `peak_flops` maps a
`jax.Device.device_kind` string to them; unknown kinds (CPUs among them) give None, and no MFU
is logged then.
"""

from __future__ import annotations

from typing import Any

# TPU generations by the name used in topology strings ("v5e:16x16"): HBM bytes, HBM bandwidth
# (bytes/s), peak bf16 FLOP/s, chips-per-host bounds for `get_topology_desc`.
TPU_CHIPS: dict[str, dict[str, Any]] = {
    "v4": {"hbm": 32 * 2**30, "hbm_bw": 1228e9, "flops": 275e12, "host_bounds": (2, 2, 1)},
    "v5e": {"hbm": 16 * 2**30, "hbm_bw": 819e9, "flops": 197e12, "host_bounds": (2, 2, 1)},
    "v5p": {"hbm": 95 * 2**30, "hbm_bw": 2765e9, "flops": 459e12, "host_bounds": (2, 2, 1)},
    "v6e": {"hbm": 32 * 2**30, "hbm_bw": 1640e9, "flops": 918e12, "host_bounds": (2, 2, 1)},
}

# `device_kind` substrings (lower case) -> peak bf16 FLOP/s per device. First match wins.
_DEVICE_KIND_FLOPS: tuple[tuple[str, float], ...] = (
    ("v5 lite", TPU_CHIPS["v5e"]["flops"]),
    ("v5e", TPU_CHIPS["v5e"]["flops"]),
    ("v6 lite", TPU_CHIPS["v6e"]["flops"]),
    ("v6e", TPU_CHIPS["v6e"]["flops"]),
    ("v5p", TPU_CHIPS["v5p"]["flops"]),
    ("tpu v5", TPU_CHIPS["v5p"]["flops"]),
    ("tpu v4", TPU_CHIPS["v4"]["flops"]),
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device of `device_kind`, or None if unknown."""
    kind = device_kind.lower()
    for key, flops in _DEVICE_KIND_FLOPS:
        if key in kind:
            return flops
    return None
