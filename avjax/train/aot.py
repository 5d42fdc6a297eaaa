"""Ahead-of-time compilation of a config's train step for a (possibly absent) TPU topology.

Used by `tools/aot_compile.py`: compiles the same sharded train step as training for the
topology's devices and reports per-chip memory against HBM, the compiler's FLOPs, an estimated
step time and MFU, and where the memory traffic goes (`hlo_bytes_by_category`: attention,
recurrence, matmuls, other). `topology="cpu:N"` compiles for host CPU devices (tests, no
libtpu).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
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


BYTES_CATEGORIES = ("attention", "recurrence", "matmul", "other")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8})
_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all"}


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (`f32[8,128]{1,0}` or a tuple of them)."""
    total = 0
    for dtype, dims in _SHAPE.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def _category(op_name: str, opcode: str, calls_dot: bool) -> str:
    """Op category from the JAX op name (Flax module path) and the HLO opcode."""
    if "attention_core" in op_name:
        return "attention"
    if calls_dot or opcode in ("dot", "convolution"):
        return "matmul"
    if "rg_lru" in op_name or "conv_1d" in op_name or "linear_scan" in op_name:
        return "recurrence"
    return "other"


def _parse_hlo(text: str) -> tuple[dict[str, list[tuple]], dict[str, str], str]:
    """Computations of an HLO module text -> ({name: [(name, shape, opcode, rest)]}, shapes by
    instruction name, entry computation name)."""
    comps: dict[str, list[tuple]] = {}
    shapes: dict[str, str] = {}
    entry, current = "", None
    for line in text.splitlines():
        if line.endswith("{") and "=" not in line.split("(")[0]:
            head = line.split()
            is_entry = head[0] == "ENTRY"
            current = (head[1] if is_entry else head[0]).lstrip("%")
            comps[current] = []
            entry = current if is_entry else entry
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            name, shape, opcode, rest = m.groups()
            shapes[name] = shape
            comps[current].append((name, shape, opcode, rest))
    return comps, shapes, entry


def _trip_count(rest: str, comps: dict[str, list[tuple]]) -> int:
    """Iterations of a while loop: XLA's `known_trip_count` (CPU), else read off its condition
    `counter < N` with N a constant (TPU programs carry no trip count); 1 if neither."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", rest)
    instrs = comps.get(cond.group(1), []) if cond else []
    consts = {n: r for n, _, op, r in instrs if op == "constant"}
    for _, _, opcode, args in instrs:
        direction = re.search(r"direction=(LT|LE|GT|GE)", args)
        if opcode != "compare" or not direction:
            continue
        operands = re.findall(r"%([\w.\-]+)", args.split(")", 1)[0])
        const = [i for i, o in enumerate(operands) if o in consts]
        value = re.match(r"\s*(-?\d+)\)", consts[operands[const[0]]]) if len(const) == 1 else None
        if value is None:
            continue
        d = direction.group(1)
        on_right = const[0] == 1  # counter < N (or N > counter)
        n = int(value.group(1)) + (1 if d in ("LE", "GE") else 0)
        if (d in ("LT", "LE")) == on_right:
            return max(n, 1)
    return 1


def _executed(
    comps: dict[str, list[tuple]], entry: str, into_fusions: bool = False
) -> Iterator[tuple[str, str, str, str, float]]:
    """Instructions of the entry computation as executed: `(name, shape, opcode, rest, times)`,
    descending into while bodies (times multiplied by XLA's `known_trip_count`, 1 if unknown),
    calls, conditionals (every branch), async starts and, if `into_fusions`, fusions."""
    descend = ("call", "conditional", "async-start") + (("fusion",) if into_fusions else ())

    def visit(comp: str, mult: float, depth: int) -> Iterator[tuple[str, str, str, str, float]]:
        for name, shape, opcode, rest in comps.get(comp, []):
            if opcode == "while" and depth < 32:
                body = re.search(r"body=%?([\w.\-]+)", rest)
                if body:
                    times = mult * _trip_count(rest, comps)
                    yield from visit(body.group(1), times, depth + 1)
                continue
            if opcode in descend and depth < 32:
                for callee in re.findall(
                    r"(?:to_apply|calls|branch_computations)=\{?%?([\w.\-]+)", rest
                ):
                    yield from visit(callee, mult, depth + 1)
                continue
            yield name, shape, opcode, rest, mult

    return visit(entry, 1.0, 0)


def _dims(shape: str) -> list[int]:
    """Dimensions of the first array in an HLO shape string (`f32[8,128]{1,0}` -> [8, 128])."""
    m = _SHAPE.search(shape)
    return [int(d) for d in filter(None, m.group(2).split(","))] if m else []


@functools.lru_cache(maxsize=4096)
def _valid_taps(
    size: int, win: int, out: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int
) -> int:
    """Kernel taps, summed over the `out` output positions of one spatial dimension, that land
    on an input element (`size` of them, `lhs_dil`-dilated) rather than on padding or on the
    holes of the dilation."""
    import numpy as np

    pos = np.arange(out)[:, None] * stride + np.arange(win)[None, :] * rhs_dil - pad_lo
    ok = (pos >= 0) & (pos <= (size - 1) * lhs_dil) & (pos % lhs_dil == 0)
    return int(ok.sum())


def _window(spec: str, key: str, rank: int, default: int) -> list[int]:
    """One per-dimension field of an HLO convolution window (`stride=11x1`; pads: low side)."""
    m = re.search(rf"\b{key}=([0-9_x\-]+)", spec)
    if not m:
        return [default] * rank
    return [int(v.split("_")[0]) for v in m.group(1).split("x")]


def _conv_reduction(rest: str, lhs: list[int], rhs: list[int], out: list[int]) -> float:
    """Multiply-adds per output element of an HLO convolution: input features per group x
    the kernel taps that land on input elements, averaged over output positions. (TPU
    programs write batched matmuls as convolutions over padded or dilated spatial axes, most
    of whose taps read padding.)"""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
    if not labels or len(labels.group(2)) != len(rhs) or len(labels.group(1)) != len(lhs):
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    per_out = float(rhs[rhs_l.index("i")])
    win = re.search(r"window=\{([^}]*)\}", rest)
    spec = win.group(1) if win else ""
    sizes = _window(spec, "size", 0, 1)
    rank = len(sizes)
    fields = [
        _window(spec, k, rank, d)
        for k, d in (("stride", 1), ("pad", 0), ("lhs_dilate", 1), ("rhs_dilate", 1))
    ]
    for d, w in enumerate(sizes):
        digit = str(d)
        if digit not in lhs_l or digit not in out_l:
            per_out *= w
            continue
        o = out[out_l.index(digit)]
        stride, lo, ld, rd = (f[d] for f in fields)
        taps = _valid_taps(lhs[lhs_l.index(digit)], w, o, stride, lo, ld, rd)
        per_out *= taps / max(o, 1)
    return per_out


def _matmul_flops(shape: str, opcode: str, rest: str, shapes: dict[str, str]) -> float:
    """FLOPs of one dot (2 x result elements x contracted size) or convolution (2 x result
    elements x input features per group x kernel taps on the input); 0 for any other op."""
    if opcode not in ("dot", "convolution"):
        return 0.0
    out = _dims(shape)
    operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
    if len(operands) < 2:
        return 0.0
    lhs, rhs = (_dims(shapes.get(o, "")) for o in operands[:2])
    if opcode == "dot":
        axes = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
        picked = [int(i) for i in filter(None, axes.group(1).split(","))] if axes else []
        return 2.0 * math.prod(out) * math.prod(lhs[i] for i in picked if i < len(lhs))
    return 2.0 * math.prod(out) * _conv_reduction(rest, lhs, rhs, out)


def hlo_matmul_flops(hlo_text: str) -> float:
    """Matmul FLOPs one device executes in a compiled (optimised, per-device) HLO module: dots
    and convolutions, inside fusions too, times the trip count of the while loops around
    them. Unlike XLA's cost analysis (which counts a while body once) this counts every
    scanned layer and every recomputation that remat adds; elementwise FLOPs are left out.
    """
    comps, shapes, entry = _parse_hlo(hlo_text)
    return sum(
        _matmul_flops(shape, opcode, rest, shapes) * mult
        for _, shape, opcode, rest, mult in _executed(comps, entry, into_fusions=True)
    )


def _fusion_reads(callee: str, comps: dict[str, list[tuple]]) -> dict[int, int]:
    """Bytes a fusion reads of those operands (by position) that its computation only
    dynamic-slices (a loop body's fusion picking its chunk of a scanned buffer): the slices'
    sizes, not the whole buffer."""
    instrs = comps.get(callee, [])
    params = {n: int(r.split(")")[0]) for n, _, op, r in instrs if op == "parameter"}
    uses = [
        (shape, op, re.findall(r"%([\w.\-]+)", r.split(")", 1)[0]))
        for _, shape, op, r in instrs
        if op != "parameter"
    ]
    reads: dict[int, int] = {}
    for pname, index in params.items():
        users = [(shape, op, ops) for shape, op, ops in uses if pname in ops]
        if users and all(op == "dynamic-slice" and ops[:1] == [pname] for _, op, ops in users):
            reads[index] = sum(_shape_bytes(shape) for shape, _, _ in users)
    return reads


def hlo_bytes_by_category(hlo_text: str) -> dict[str, float]:
    """Bytes accessed per op category in a compiled (optimised, per-device) HLO module.

    Every executed instruction outside fusions (a fusion counts as one) reads its operands
    and writes its result: bytes = operand sizes + result size (in-place dynamic updates: the
    update only; an async start/done pair such as TPU's copy-start/copy-done once, at its
    start, whose result tuple already holds the operands and the destination), times the
    trip count of the while loops around it (XLA's `known_trip_count`). Categories:
    "attention" (ops under the `attention_core` name scope: logits, mask, softmax, weighted
    values), "matmul" (dots and convolutions, fused or not, elsewhere), "recurrence" (RG-LRU
    gates' elementwise work, the linear scan, the temporal conv1d), "other" (norms, MLP
    activation, residuals, embedding, loss, optimizer). An estimate of the same quantity as
    the compiler's "bytes accessed".
    """
    comps, shapes, entry = _parse_hlo(hlo_text)
    has_dot = {
        c: any(op in ("dot", "convolution") for _, _, op, _ in instrs)
        for c, instrs in comps.items()
    }
    out = dict.fromkeys(BYTES_CATEGORIES, 0.0)
    for name, shape, opcode, rest, mult in _executed(comps, entry):
        if opcode in _NO_TRAFFIC or opcode.endswith("-done"):
            continue  # (an async pair's transfer is counted once, at its start)
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        sizes = [_shape_bytes(shapes.get(o, "")) for o in operands]
        callee = re.search(r"calls=%?([\w.\-]+)", rest)
        if opcode == "fusion" and callee:  # operands the fusion only slices: the slices
            read = _fusion_reads(callee.group(1), comps)
            sizes = [read.get(i, b) for i, b in enumerate(sizes)]
        nbytes = _shape_bytes(shape) + sum(sizes)
        if opcode.endswith("-start") and shape.startswith("("):
            nbytes = _shape_bytes(shape)  # (operands echoed, destination, context)
        elif "dynamic-update-slice" in opcode or "dynamic-update-slice" in name:
            nbytes = 2 * (sum(sizes) - max(sizes, default=0))  # in place: the update only
        elif opcode == "dynamic-slice":
            nbytes = 2 * _shape_bytes(shape)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        cat = _category(
            op_name.group(1) if op_name else "",
            opcode,
            bool(callee and has_dot.get(callee.group(1))),
        )
        out[cat] += nbytes * mult
    return out


def _lower_and_compile(config: Any, topology: str) -> dict[str, Any]:
    """Step 1: the task, trainer and mesh for `topology`, and the compiled train step."""
    import flax.linen as nn
    import jax

    from avjax.tasks import get_task
    from avjax.train import loop
    from avjax.train.sharding import apply_preset, batch_sharding, make_mesh

    apply_preset(config)
    devices, chip = topology_devices(topology, int(config.mesh.get("dcn_data", 1)))
    mesh = make_mesh(config.mesh, devices=devices)
    task = get_task(config, "/tmp/avjax_aot_unused")
    trainer = loop.build_trainer(task, config, mesh)
    dummy = task.dummy_batch()
    batch = {
        k: jax.ShapeDtypeStruct(
            v.shape, v.dtype, sharding=batch_sharding(mesh, trainer.rules, v.ndim)
        )
        for k, v in dummy.items()
    }
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(trainer.rules)):
        compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
    return dict(
        task=task,
        trainer=trainer,
        mesh=mesh,
        chip=chip,
        n_chips=len(devices),
        batch=batch,
        dummy=dummy,
        compiled=compiled,
    )


def _memory(c: dict[str, Any]) -> dict[str, Any]:
    """Step 2: per-chip bytes of parameters, optimizer, batch, temporaries, code and peak."""
    import jax
    import numpy as np

    mem = c["compiled"].memory_analysis()
    state = c["trainer"].abstract_state
    arg_b = int(getattr(mem, "argument_size_in_bytes", 0))
    out_b = int(getattr(mem, "output_size_in_bytes", 0))
    alias_b = int(getattr(mem, "alias_size_in_bytes", 0))
    temp_b = int(getattr(mem, "temp_size_in_bytes", 0))
    code_b = int(getattr(mem, "generated_code_size_in_bytes", 0))
    peak_b = arg_b + out_b - alias_b + temp_b + code_b
    hbm = c["chip"]["hbm"]
    return {
        "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
        "hbm_bytes_per_chip": hbm,
        "params_bytes_per_chip": _bytes_per_device(state.params),
        "optimizer_bytes_per_chip": _bytes_per_device(state.opt_state),
        "batch_bytes_per_chip": _bytes_per_device(c["batch"]),
        "temp_bytes_per_chip": temp_b,
        "code_bytes_per_chip": code_b,
        "peak_bytes_per_chip": peak_b,
        "fits": bool(hbm == 0 or peak_b <= hbm),
    }


def _speed(c: dict[str, Any]) -> dict[str, Any]:
    """Step 3: FLOPs (compiler, executed and analytic), bytes by op category, the roofline.

    Per chip: compute-bound time (the FLOPs executed / peak) and memory-bound time (bytes the
    compiler says the program touches / HBM bandwidth); the step takes at least the larger.
    Collectives are in neither bound. XLA's own "optimal_seconds" is used when positive and
    the cost analysis saw every loop iteration (it is negative for some TPU programs). MFU is
    useful FLOPs (the analytic count, else the compiler's) / (peak x estimated step time), so
    remat's recomputation lowers it (`recompute_factor` = FLOPs executed / useful FLOPs)."""
    import numpy as np

    cost = c["compiled"].cost_analysis()
    cost = dict((cost[0] if isinstance(cost, list) else cost) or {})
    chip, n_chips, dummy = c["chip"], c["n_chips"], c["dummy"]
    tokens = int(np.prod(dummy["inputs"].shape)) if "inputs" in dummy else 0
    analytic_flops = (c["task"].flops_per_token() or 0.0) * tokens
    compiler_flops = float(cost.get("flops", 0.0)) * n_chips  # cost_analysis is per device
    hlo_text = c["compiled"].as_text()
    matmul_flops = hlo_matmul_flops(hlo_text) * n_chips  # with trip counts and remat
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    by_cat = hlo_bytes_by_category(hlo_text)
    parsed = sum(by_cat.values())
    # XLA's cost analysis counts a while loop's body once, whatever its trip count, so a
    # program with scanned layers reports a fraction of its FLOPs and bytes. Then the
    # roofline uses the HLO walk's bytes (which multiply by trip counts); either way the
    # category shares come from the HLO walk.
    undercounted = bool(analytic_flops) and compiler_flops < 0.5 * analytic_flops
    if undercounted:
        bytes_accessed = parsed
    breakdown = {k: (v / parsed * bytes_accessed if parsed else 0.0) for k, v in by_cat.items()}
    # FLOPs executed: the largest of the three counts (the compiler's misses loop iterations,
    # the analytic one recomputation, the HLO walk's elementwise work).
    candidates = {"compiler": compiler_flops, "hlo_matmul": matmul_flops}
    candidates["analytic"] = analytic_flops
    executed_source = max(candidates, key=lambda k: candidates[k])
    executed = candidates[executed_source]
    compute_s = executed / (n_chips * chip["flops"]) if chip["flops"] else None
    memory_s = bytes_accessed / chip["hbm_bw"] if chip.get("hbm_bw") else None
    step_s, step_source = float(cost.get("optimal_seconds", 0.0)), "compiler"
    if step_s <= 0 or undercounted:
        step_s, step_source = None, None
        if compute_s is not None:
            step_s = max(compute_s, memory_s or 0.0)
            bound = "memory-bound" if (memory_s or 0.0) > compute_s else "compute-bound"
            step_source = "roofline: " + bound
    model_flops = analytic_flops or compiler_flops
    mfu = model_flops / (n_chips * chip["flops"] * step_s) if step_s and chip["flops"] else None
    return {
        "tokens_per_step": tokens,
        "flops_per_step": compiler_flops,
        "analytic_flops_per_step": analytic_flops,
        "hlo_matmul_flops_per_step": matmul_flops,
        "executed_flops_per_step": executed,
        "executed_flops_source": executed_source,
        "recompute_factor": executed / model_flops if model_flops else None,
        "bytes_accessed_per_chip": bytes_accessed,
        "bytes_accessed_per_step": bytes_accessed * n_chips,
        "bytes_accessed_by_category_per_chip": breakdown,
        "bytes_accessed_hlo_estimate_per_chip": parsed,
        "compute_bound_s": compute_s,
        "memory_bound_s": memory_s,
        "estimated_step_s": step_s,
        "estimated_step_source": step_source,
        "estimated_mfu": mfu,
        "mfu_flops_source": "analytic" if analytic_flops else "compiler",
        "cost_analysis_undercounts_loops": undercounted,
    }


def compile_report(config: Any, topology: str) -> dict[str, Any]:
    """Compiles the train step of `config` for `topology`; returns the fit/speed report."""
    c = _lower_and_compile(config, topology)
    return {
        "config": config.get("task"),
        "topology": topology,
        "num_chips": c["n_chips"],
        "mesh": dict(c["mesh"].shape),
        "preset": config.mesh.get("preset", ""),
        "remat": config.model.get("remat", "none"),
        "scan_layers": bool(config.model.get("scan_layers", False)),
        **_memory(c),
        **_speed(c),
    }
