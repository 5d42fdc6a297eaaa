"""Cheap compiles for test modules that compile much and run little (imported by the test
modules as `from compile_settings import cheap_compiles`, like tests/toy_capabilities.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax


@contextlib.contextmanager
def cheap_compiles(cache_dir: str) -> Iterator[None]:
    """For the enclosed tests only (the previous values are restored afterwards):
    - the `rbg` PRNG, whose random bits are one XLA op where threefry's hash is unrolled per
      draw (a tiny model's jitted init compiled in 4 instead of 17 CPU-s);
    - XLA's backend optimizations off (LLVM -O0: about half the compile time; the programs
      run only a few steps);
    - a persistent compilation cache in `cache_dir`, so that a resumed run reuses the
      programs the first run compiled.
    """
    from jax._src import compilation_cache  # reset: the cache reads its config once

    settings = {
        "jax_default_prng_impl": "rbg",
        "jax_disable_most_optimizations": True,
        "jax_compilation_cache_dir": cache_dir,
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    saved = {n: jax.config.values[n] for n in settings}
    for n, v in settings.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for n, v in saved.items():
            jax.config.update(n, v)
        compilation_cache.reset_cache()
