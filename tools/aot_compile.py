r"""Ahead-of-time fit check: compile a config's real train step for a TPU topology, on a CPU.

  pip install -e '.[tpu]'     # libtpu, for TPU topologies without a TPU
  python tools/aot_compile.py --config=configs/speechssm.py:2b --topology=v5e:16x16 \
      --json=aot.json

Compiles the sharded train step (same code as training) for the topology's devices and prints
the per-chip memory (parameters, optimizer state, batch, temporaries) against the chip's HBM,
the compiler's FLOPs and the implied step time and MFU, and the bytes accessed per step with
their split by op category (attention, recurrence, matmul, other; estimated from the compiled
HLO, scaled to the compiler's total). `--topology=cpu:8` compiles for host CPU devices instead
(for testing the tool itself without libtpu).
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avjax.train.aot import compile_report  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", "v5e:16x16", "TPU topology 'v5e:16x16', 'v5p:4x4x4', 'v4:4x4x4' or 'cpu:N'."
)
_JSON = flags.DEFINE_string("json", None, "Write the report as JSON here.")


def _gib(b: float) -> str:
    return f"{b / 2**30:8.2f} GiB"


def main(argv: list[str]) -> None:
    del argv
    report = compile_report(_CONFIG.value, _TOPOLOGY.value)
    r = report
    print(f"{r['topology']}: {r['num_chips']} chips, mesh {r['mesh']}, {r['params']:,} params")
    for k in ("params", "optimizer", "batch", "temp", "code", "peak"):
        print(f"  {k:<10} {_gib(r[f'{k}_bytes_per_chip'])} per chip")
    if r["hbm_bytes_per_chip"]:
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        print(f"  HBM        {_gib(r['hbm_bytes_per_chip'])} per chip -> {verdict}")
    analytic = r["analytic_flops_per_step"]
    if r.get("cost_analysis_undercounts_loops"):
        print(
            "  note       the compiler's FLOPs/bytes count each scanned (while) body once: the "
            "roofline uses the analytic FLOPs and the HLO walk's bytes"
        )
    print(
        f"  FLOPs/step compiler {r['flops_per_step']:.3e}, "
        + (f"analytic {analytic:.3e}" if analytic else "analytic n/a (MFU from the compiler's)")
    )
    if r["compute_bound_s"] is not None:
        mem = r["memory_bound_s"]
        print(
            f"  roofline   compute {r['compute_bound_s']:.3f} s, memory "
            + (f"{mem:.3f} s" if mem is not None else "n/a")
            + f" ({r['bytes_accessed_per_chip'] / 2**30:.1f} GiB accessed per chip)"
        )
    total = r["bytes_accessed_per_chip"]
    if total:
        shares = ", ".join(
            f"{k} {100 * v / total:.0f}%"
            for k, v in r["bytes_accessed_by_category_per_chip"].items()
        )
        print(f"  traffic    {total / 2**30:.2f} GiB per chip per step: {shares}")
    if r["estimated_step_s"]:
        mfu = r["estimated_mfu"]
        print(
            f"  est. step  {r['estimated_step_s']:.3f} s ({r['estimated_step_source']}), MFU "
            + (f"{100 * mfu:.1f}%" if mfu is not None and math.isfinite(mfu) else "n/a")
        )
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {_JSON.value}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
