"""Compatibility re-exports: the recurrent cores now live in `avjax.nn.rglru` (Griffin's
RG-LRU and recurrent block) and `avjax.nn.mamba` (Mamba's selective SSM). Import from those."""

from avjax.nn.mamba import (
    MambaCache,
    SelectiveSSM,
    a_log_init,
    dt_bias_init,
    init_mamba_cache,
)
from avjax.nn.rglru import (
    RGLRU,
    C,
    RecurrentBlock,
    RecurrentBlockCache,
    a_param_init,
    init_recurrent_cache,
    sqrt_clipped_grad,
)

__all__ = [
    "C",
    "RGLRU",
    "MambaCache",
    "RecurrentBlock",
    "RecurrentBlockCache",
    "SelectiveSSM",
    "a_log_init",
    "a_param_init",
    "dt_bias_init",
    "init_mamba_cache",
    "init_recurrent_cache",
    "sqrt_clipped_grad",
]
