"""Device mesh and logical-axis sharding.

Every parameter and large activation carries logical axis names (`batch`, `length`, `embed`,
`mlp`, `heads`, `kv`, `vocab`, `rnn`, `layers`, ...: the constants of `avjax.nn.axes`).
`config.sharding_rules` maps them onto the mesh axes `data`, `fsdp`, `sequence` and `tensor`
built from `config.mesh`. Nothing here knows about a model.

Presets (`config.mesh.preset`) set both the mesh and the rules for the usual layouts:

  dp        data=-1                  params replicated; batch over data
  fsdp      fsdp=-1                  params' embed dim over fsdp (ZeRO-3); batch over fsdp
  fsdp_tp   fsdp=-1, tensor=T        fsdp + feature dims (mlp, heads, rnn, vocab, slots)
                                     over tensor
  fsdp_sp   fsdp=-1, sequence=S      fsdp + activations' length dim over sequence

T and S come from `config.mesh.tensor` / `config.mesh.sequence` (>= 2). With
`config.mesh.dcn_data = N > 1` the mesh spans N slices (multi-slice TPU), data-parallel across
slices over the data-centre network and as configured within each slice
(`mesh_utils.create_hybrid_device_mesh`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from avjax.nn import axes

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Default rules: batch over data+fsdp; weights' embed dim over fsdp (ZeRO-3 style), their
# feature dims over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    (axes.BATCH, ("data", "fsdp")),
    (axes.LENGTH, None),
    (axes.FRAMES, None),
    (axes.EMBED, "fsdp"),
    (axes.MLP, "tensor"),
    (axes.HEADS, "tensor"),
    (axes.KV, None),
    (axes.RNN, "tensor"),
    (axes.VOCAB, "tensor"),
    (axes.SLOTS, "tensor"),
    (axes.CONV, None),
    (axes.LAYERS, None),
)

_PARAM_AXES = (
    axes.EMBED,
    axes.MLP,
    axes.HEADS,
    axes.KV,
    axes.RNN,
    axes.VOCAB,
    axes.SLOTS,
    axes.CONV,
    axes.LAYERS,
)
_REPLICATED_PARAMS = tuple((name, None) for name in _PARAM_AXES)
PRESETS: dict[str, dict[str, Any]] = {
    "dp": {
        "mesh": {"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1},
        "rules": ((axes.BATCH, "data"), (axes.LENGTH, None), (axes.FRAMES, None))
        + _REPLICATED_PARAMS,
    },
    "fsdp": {
        "mesh": {"data": 1, "fsdp": -1, "sequence": 1, "tensor": 1},
        "rules": (
            (axes.BATCH, ("data", "fsdp")),
            (axes.LENGTH, None),
            (axes.FRAMES, None),
            (axes.EMBED, "fsdp"),
        )
        + tuple(r for r in _REPLICATED_PARAMS if r[0] != axes.EMBED),
    },
    "fsdp_tp": {
        "mesh": {"data": 1, "fsdp": -1, "sequence": 1, "tensor": "tensor"},
        "rules": DEFAULT_RULES,
    },
    "fsdp_sp": {
        "mesh": {"data": 1, "fsdp": -1, "sequence": "sequence", "tensor": 1},
        "rules": tuple(
            (axes.LENGTH, "sequence")
            if name == axes.LENGTH
            else (name, None if t == "tensor" else t)
            for name, t in DEFAULT_RULES
        ),
    },
}


def apply_preset(config: Any) -> Any:
    """Sets `config.mesh` sizes and `config.sharding_rules` from `config.mesh.preset`.

    A no-op when the preset is "" (the mesh and rules are taken as written). Returns `config`,
    changed in place.

    Raises:
      ValueError: for an unknown preset, or a tensor/sequence size < 2 where the preset needs it.
    """
    name = config.mesh.get("preset", "")
    if not name:
        return config
    if name not in PRESETS:
        raise ValueError(f"config.mesh.preset={name!r}; expected '' or one of {list(PRESETS)}")
    preset = PRESETS[name]
    for axis, size in preset["mesh"].items():
        if isinstance(size, str):  # taken from the config, must actually split
            size = int(config.mesh.get(size, 1))
            if size < 2:
                raise ValueError(
                    f"config.mesh.preset={name!r} needs config.mesh.{axis} >= 2, got {size}"
                )
        if axis in config.mesh:
            config.mesh[axis] = size
        elif size != 1:
            raise ValueError(f"config.mesh has no field {axis!r} (needed by preset {name!r})")
    config.sharding_rules = preset["rules"]
    return config


def _named(sizes: Sequence[int]) -> dict[str, int]:
    return dict(zip(MESH_AXES, sizes, strict=True))


def mesh_shape(mesh_cfg: Any, num_devices: int | None = None) -> tuple[int, ...]:
    """Resolves `config.mesh` (`data`, `fsdp`, `sequence`, `tensor`; one may be -1) to sizes.

    A missing axis counts as 1. With `dcn_data = N > 1` the sizes are per slice
    (`num_devices / N` devices).

    Raises:
      ValueError: naming the field when sizes do not multiply to the device count.
    """
    n = jax.device_count() if num_devices is None else num_devices
    dcn = int(mesh_cfg.get("dcn_data", 1))
    if dcn < 1 or n % dcn:
        raise ValueError(f"config.mesh.dcn_data={dcn} does not divide the {n} devices")
    n //= dcn
    sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
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
    """Builds the `(data, fsdp, sequence, tensor)` mesh from `config.mesh`.

    One slice: `jax.make_mesh` (topology-aware device order). Several (`dcn_data > 1`):
    `mesh_utils.create_hybrid_device_mesh`, the data axis spanning slices.
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(mesh_cfg, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    dcn = int(mesh_cfg.get("dcn_data", 1))
    if dcn == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    from jax.experimental import mesh_utils

    dcn_shape = (dcn,) + (1,) * (len(MESH_AXES) - 1)
    # Multi-slice TPUs number their slices (`slice_index`); elsewhere (GPU hosts, CPU
    # processes) every device reports slice 0 or none, and a process is the DCN granule.
    slices = {getattr(d, "slice_index", 0) for d in devices}
    grid = mesh_utils.create_hybrid_device_mesh(
        shape, dcn_shape, devices, process_is_granule=len(slices) < dcn
    )
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


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
    spec = nn.logical_to_mesh_axes((axes.BATCH,) + (None,) * (ndim - 1), list(rules))
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh, rules: LogicalRules) -> int:
    """How many ways the batch dimension is split (the global batch must divide by it)."""
    spec = nn.logical_to_mesh_axes((axes.BATCH,), list(rules))[0]
    if spec is None:
        return 1
    mesh_axes = (spec,) if isinstance(spec, str) else spec
    return int(np.prod([mesh.shape[a] for a in mesh_axes]))


def put_batch(
    batch: dict[str, np.ndarray], mesh: Mesh, rules: LogicalRules
) -> dict[str, jax.Array]:
    """Assembles this process's slice of the global batch into sharded global arrays."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
        for k, v in batch.items()
    }
