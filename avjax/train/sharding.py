"""Device mesh and logical-axis sharding.

Every parameter and large activation carries logical axis names (`batch`, `length`, `embed`,
`mlp`, `heads`, `kv`, `vocab`, `rnn`, ...). `config.sharding_rules` maps them onto the mesh axes
`data`, `fsdp` and `tensor` built from `config.mesh`. Nothing here knows about a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Default rules: batch over data+fsdp; weights' embed dim over fsdp (ZeRO-3 style), their
# feature dims over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("rnn", "tensor"),
    ("vocab", "tensor"),
    ("conv", None),
)


def _named(sizes: Sequence[int]) -> dict[str, int]:
    return dict(zip(MESH_AXES, sizes, strict=True))


def mesh_shape(mesh_cfg: Any, num_devices: int | None = None) -> tuple[int, int, int]:
    """Resolves `config.mesh` (`data`, `fsdp`, `tensor`; one of them may be -1) to sizes.

    Raises:
      ValueError: naming the field when sizes do not multiply to the device count.
    """
    n = jax.device_count() if num_devices is None else num_devices
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {_named(sizes)}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {_named(sizes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(
                f"config.mesh={_named(sizes)}: {n} devices are not divisible by {known}"
            )
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"config.mesh={_named(sizes)} needs {math.prod(sizes)} devices, "
            f"but {n} are available (set one axis to -1 to use the rest)"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the `(data, fsdp, tensor)` mesh from `config.mesh` with `jax.make_mesh`."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
    """Normalises `config.sharding_rules` (lists from JSON/CLI become tuples)."""
    out = []
    for name, target in rules:
        if isinstance(target, list):
            target = tuple(target)
        out.append((str(name), target))
    return tuple(out)


def logical_shardings(tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings for a (possibly abstract) pytree of `nn.Partitioned`-boxed values.

    Leaves without logical names are replicated.
    """
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def batch_sharding(mesh: Mesh, rules: LogicalRules, ndim: int) -> NamedSharding:
    """Sharding of a `[batch, ...]` array: the batch dim over the rule for `batch`."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), list(rules))
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh, rules: LogicalRules) -> int:
    """How many ways the batch dimension is split (the global batch must divide by it)."""
    spec = nn.logical_to_mesh_axes(("batch",), list(rules))[0]
    if spec is None:
        return 1
    axes = (spec,) if isinstance(spec, str) else spec
    return int(np.prod([mesh.shape[a] for a in axes]))


def put_batch(
    batch: dict[str, np.ndarray], mesh: Mesh, rules: LogicalRules
) -> dict[str, jax.Array]:
    """Assembles this process's slice of the global batch into sharded global arrays."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
        for k, v in batch.items()
    }
