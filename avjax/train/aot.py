"""Ahead-of-time compilation of a config's train step for a (possibly absent) TPU topology.

Used by `tools/aot_compile.py`: compiles the same sharded train step as training for the
topology's devices and reports per-chip memory against HBM, the compiler's FLOPs, an estimated
step time and MFU. `topology="cpu:N"` compiles for host CPU devices (tests, no libtpu).
"""

from __future__ import annotations

from typing import Any

from avjax.train.hardware import TPU_CHIPS as CHIPS


def topology_devices(topology: str, num_slices: int = 1) -> tuple[list[Any], dict[str, Any]]:
    """Devices (possibly of a TPU we do not have) and the chip's facts for `topology`.

    `num_slices` > 1 describes that many copies of the slice (a multi-slice job).
    """
    import jax

    kind, _, shape = topology.partition(":")
    if kind == "cpu":
        n = int(shape or 8) * num_slices
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ValueError(
                f"--topology={topology}: only {len(devices)} CPU devices; set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={n}"
            )
        return devices[:n], {"hbm": 0, "flops": 0.0}
    if kind not in CHIPS:
        raise ValueError(f"--topology={topology}: unknown chip {kind!r}; known {sorted(CHIPS)}")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topology,
        chip_config_name="default",
        chips_per_host_bounds=CHIPS[kind]["host_bounds"],
        num_slices=num_slices,
    )
    return list(desc.devices), CHIPS[kind]


def _bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return total


def compile_report(config: Any, topology: str) -> dict[str, Any]:
    """Compiles the train step of `config` for `topology`; returns the fit/speed report."""
    import flax.linen as nn
    import jax
    import numpy as np

    from avjax.tasks import get_task
    from avjax.train import loop
    from avjax.train.sharding import apply_preset, batch_sharding, make_mesh

    apply_preset(config)
    devices, chip = topology_devices(topology, int(config.mesh.get("dcn_data", 1)))
    mesh = make_mesh(config.mesh, devices=devices)
    task = get_task(config, "/tmp/avjax_aot_unused")
    trainer = loop.build_trainer(task, config, mesh)
    dummy = task.dummy_batch()
    abstract_batch = {
        k: jax.ShapeDtypeStruct(
            v.shape, v.dtype, sharding=batch_sharding(mesh, trainer.rules, v.ndim)
        )
        for k, v in dummy.items()
    }
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(trainer.rules)):
        lowered = trainer.train_step.lower(trainer.abstract_state, abstract_batch)
        compiled = lowered.compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    cost = dict(cost or {})
    params = trainer.abstract_state.params
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    params_b = _bytes_per_device(params)
    opt_b = _bytes_per_device(trainer.abstract_state.opt_state)
    batch_b = _bytes_per_device(abstract_batch)
    arg_b = int(getattr(mem, "argument_size_in_bytes", 0))
    out_b = int(getattr(mem, "output_size_in_bytes", 0))
    alias_b = int(getattr(mem, "alias_size_in_bytes", 0))
    temp_b = int(getattr(mem, "temp_size_in_bytes", 0))
    code_b = int(getattr(mem, "generated_code_size_in_bytes", 0))
    peak_b = arg_b + out_b - alias_b + temp_b + code_b
    n_chips = len(devices)
    tokens = int(np.prod(dummy["inputs"].shape)) if "inputs" in dummy else 0
    flops_per_token = task.flops_per_token() or 0.0
    analytic_flops = flops_per_token * tokens
    compiler_flops = float(cost.get("flops", 0.0)) * n_chips  # cost_analysis is per device
    # Roofline per chip: compute-bound time (FLOPs / peak) and memory-bound time (bytes the
    # compiler says the program touches / HBM bandwidth); the step takes at least the larger.
    # Collectives are not in either bound. XLA's own "optimal_seconds" is used when positive
    # (it is negative for some TPU programs).
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    compute_s = compiler_flops / (n_chips * chip["flops"]) if chip["flops"] else None
    memory_s = bytes_accessed / chip["hbm_bw"] if chip.get("hbm_bw") else None
    step_s = float(cost.get("optimal_seconds", 0.0))
    step_source = "compiler"
    if step_s <= 0:
        step_s, step_source = None, None
        if compute_s is not None:
            step_s = max(compute_s, memory_s or 0.0)
            step_source = "roofline: " + (
                "memory-bound" if (memory_s or 0.0) > compute_s else "compute-bound"
            )
    mfu = analytic_flops / (n_chips * chip["flops"] * step_s) if step_s and chip["flops"] else None
    return {
        "config": config.get("task"),
        "topology": topology,
        "num_chips": n_chips,
        "mesh": dict(mesh.shape),
        "preset": config.mesh.get("preset", ""),
        "remat": config.model.get("remat", "none"),
        "scan_layers": bool(config.model.get("scan_layers", False)),
        "params": num_params,
        "tokens_per_step": tokens,
        "hbm_bytes_per_chip": chip["hbm"],
        "params_bytes_per_chip": params_b,
        "optimizer_bytes_per_chip": opt_b,
        "batch_bytes_per_chip": batch_b,
        "temp_bytes_per_chip": temp_b,
        "code_bytes_per_chip": code_b,
        "peak_bytes_per_chip": peak_b,
        "fits": bool(chip["hbm"] == 0 or peak_b <= chip["hbm"]),
        "flops_per_step": compiler_flops,
        "analytic_flops_per_step": analytic_flops,
        "bytes_accessed_per_chip": bytes_accessed,
        "compute_bound_s": compute_s,
        "memory_bound_s": memory_s,
        "estimated_step_s": step_s,
        "estimated_step_source": step_source,
        "estimated_mfu": mfu,
    }
