"""Test set-up: the CPU platform with 8 forced host devices (sharding tests), quiet TF, and
implicit rank promotion as an error (`jax_numpy_rank_promotion="raise"`: broadcasting
`[b, t, d]` with `[d]` must be written out, e.g. `x * w[None, None]`, so a wrong shape that
happens to broadcast is caught).

The platform is forced, not defaulted: on a GPU or TPU machine (or with `JAX_PLATFORMS=cuda`
exported) the tests still run on 8 CPU devices, so the 8-device tests run everywhere. If JAX
cannot provide 8 devices (its backend was started before this file ran), the session stops
with an error instead of skipping those tests.
"""

import os
import re

os.environ["JAX_PLATFORMS"] = "cpu"
_xla = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_xla.strip()} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

NUM_DEVICES = 8

jax.config.update("jax_numpy_rank_promotion", "raise")

try:
    jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
except RuntimeError:  # the backend is already up: the check below says what it has
    pass
if jax.default_backend() != "cpu" or jax.device_count() != NUM_DEVICES:
    raise RuntimeError(
        f"tests need {NUM_DEVICES} CPU devices, got {jax.devices()}: was JAX initialised "
        "before tests/conftest.py?"
    )
