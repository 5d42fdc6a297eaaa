"""Diffusion core: schedules, forward noising, parameterisations, DDPM/DDIM steps and samplers.

Everything here is a pure function of arrays (or a small NamedTuple of arrays), so it composes
with `jax.jit`, `jax.grad` and sharding, and numbers are float32 throughout. Shapes are written
`[batch, ...]`: any number of trailing dimensions (mesh frames x vertices x 3, mel frames x
bins, ...). Timesteps are int32 indices into the training schedule, `0 .. T-1`.

The conventions follow the DDPM (Ho et al., 2020) and DDIM (Song et al., 2021) papers and are
numerically the same as `diffusers`' `DDPMScheduler` and `DDIMScheduler` (tested against them
in `tests/test_nn_diffusion.py`, to ~1e-5):

  - noise schedules `linear`, `scaled_linear`, `squaredcos_cap_v2` (alias `cosine`, Nichol &
    Dhariwal 2021) of any length, optionally rescaled to zero terminal SNR (Lin et al., 2024);
  - `q_sample`: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps;
  - three parameterisations of the denoiser output, `epsilon`, `sample` (x0) and
    `v_prediction` (v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022), and exact
    conversions between them;
  - the DDPM posterior q(x_prev | x_t, x0) with fixed-small or fixed-large variance, for any
    pair (t, prev_t), so respaced chains work;
  - the DDIM update with stochasticity eta (eta = 0: deterministic; eta = 1: DDPM-like);
  - inference timestep spacings `leading` (+ `steps_offset`), `trailing` and `linspace`;
  - classifier-free guidance (Ho & Salimans, 2022): condition dropout in training and the
    guided combination of conditional and unconditional predictions at sampling time;
  - `sample`: a whole reverse chain as one `lax.scan` over the timesteps array, so it traces
    the denoiser once and compiles once, whatever the number of steps;
  - `training_inputs` / `diffusion_loss`: sample t and noise, build the target of the chosen
    parameterisation, (masked, optionally min-SNR weighted) mean squared error.

Two details are kept as diffusers has them, on purpose, so that configurations carry over:
DDIM's previous timestep is `t - T // num_steps` (`prev_rule="stride"`; for `trailing` or
`linspace` spacing this is not always the next timestep of the list; `prev_rule="next"` uses
the list), while DDPM's is the next timestep of the list. Sample clipping defaults to off here
(diffusers defaults it on): mesh or feature data are not images in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ScheduleName = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "cosine"]
PredictionType = Literal["epsilon", "sample", "v_prediction"]
VarianceType = Literal["fixed_small", "fixed_large"]
Spacing = Literal["leading", "trailing", "linspace"]
Method = Literal["ddpm", "ddim"]
PrevRule = Literal["next", "stride"]

SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES: tuple[str, ...] = ("fixed_small", "fixed_large")
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
METHODS: tuple[str, ...] = ("ddpm", "ddim")

# Floor of the DDPM fixed-small variance (it is exactly 0 on the last step to x0).
_MIN_VARIANCE = 1e-20

# A denoiser: (x_t [batch, ...] float32, t [batch] int32) -> model output [batch, ...].
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; expected one of {tuple(allowed)}")


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


class Schedule(NamedTuple):
    """A discrete noise schedule of T training timesteps (a pytree: pass it through `jit`).

    betas: `[T]` float32, beta_t = 1 - abar_t / abar_{t-1}.
    alphas_cumprod: `[T]` float32, abar_t = prod_{s <= t} (1 - beta_s); the signal fraction
      of x_t is sqrt(abar_t), the noise fraction sqrt(1 - abar_t).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])


def _cosine_alpha_bar(s: float) -> float:
    # Nichol & Dhariwal (2021), offset 0.008, on s in [0, 1].
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def schedule_betas(
    name: ScheduleName = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    max_beta: float = 0.999,
) -> np.ndarray:
    """The `[T]` betas of a named schedule, float64 on the host.

    `linear`: evenly spaced from `beta_start` to `beta_end`. `scaled_linear`: evenly spaced in
    sqrt(beta), then squared (Stable Diffusion's). `squaredcos_cap_v2` / `cosine`: betas that
    discretise abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), each capped at `max_beta`
    (`beta_start` / `beta_end` are not used).
    """
    _check("schedule", name, SCHEDULES)
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps={num_train_timesteps}; expected >= 1")
    n = num_train_timesteps
    if name == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if name == "scaled_linear":
        return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), n, dtype=np.float64) ** 2
    betas = [
        min(1.0 - _cosine_alpha_bar((i + 1) / n) / _cosine_alpha_bar(i / n), max_beta)
        for i in range(n)
    ]
    return np.asarray(betas, dtype=np.float64)


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(abar) so that abar_{T-1} = 0 and abar_0 is unchanged."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    abar = root**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def make_schedule(
    name: ScheduleName = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    max_beta: float = 0.999,
    rescale_zero_terminal_snr: bool = False,
) -> Schedule:
    """A `Schedule` (float32 betas and cumulative alphas) from a named beta schedule.

    Betas are rounded to float32 first (as the reference implementations hold them) and the
    cumulative product is taken in float64 on the host, then rounded to float32 (within ~1e-6
    relative of diffusers' float32 products; near t = 0, where 1 - abar is tiny, one ulp of
    abar is ~1e-3 relative of 1 - abar, so steps there agree with diffusers only to that
    degree unless they share the arrays, see `schedule_from_betas` and `Schedule(...)`).
    `rescale_zero_terminal_snr=True` makes abar_{T-1} exactly 0 (pure noise at the last
    step; use with `v_prediction` or `sample` parameterisations, never `epsilon`).
    """
    betas = schedule_betas(name, num_train_timesteps, beta_start, beta_end, max_beta)
    if rescale_zero_terminal_snr:
        betas = _zero_terminal_snr(betas.astype(np.float32).astype(np.float64))
    return schedule_from_betas(betas)


def schedule_from_betas(betas: np.ndarray | Sequence[float]) -> Schedule:
    """A `Schedule` from explicit `[T]` betas (diffusers' `trained_betas`), each in (0, 1]."""
    betas = np.asarray(betas, np.float32).astype(np.float64)
    if betas.ndim != 1 or betas.size == 0 or not np.all((betas > 0) & (betas <= 1)):
        raise ValueError(f"schedule_from_betas: expected [T] betas in (0, 1], got {betas!r:.80}")
    alphas_cumprod = np.cumprod(1.0 - betas)
    return Schedule(jnp.asarray(betas, jnp.float32), jnp.asarray(alphas_cumprod, jnp.float32))


def inference_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    spacing: Spacing = "leading",
    steps_offset: int = 0,
) -> np.ndarray:
    """The `[num_inference_steps]` int32 timesteps of a sampling chain, in decreasing order.

    `leading`: multiples of T // n from 0, plus `steps_offset` (e.g. T=1000, n=50: 980, ...,
    20, 0). `trailing`: T - 1 going down in steps of T / n, rounded (999, 979, ..., 19): the
    chain starts from the noisiest training timestep (diffusers' values, but always n of
    them: diffusers appends a spurious -1 for some n). `linspace`: n rounded points evenly
    spaced over [0, T-1], both ends included.
    """
    _check("spacing", spacing, SPACINGS)
    t_total, n = num_train_timesteps, num_inference_steps
    if not 1 <= n <= t_total:
        raise ValueError(
            f"num_inference_steps={n}; expected 1 <= n <= num_train_timesteps={t_total}"
        )
    if spacing == "linspace":
        ts = np.round(np.linspace(0.0, t_total - 1, n))[::-1]
    elif spacing == "leading":
        ts = (np.arange(n) * (t_total // n))[::-1] + steps_offset
    else:
        # The float `arange` sometimes yields n + 1 points (the last rounds to -1; diffusers
        # keeps it, e.g. T=1000, n=61): keep the first n. Its exact float values decide
        # rounding ties, hence `arange` rather than T - i * T / n.
        ts = np.round(np.arange(t_total, 0, -t_total / n)[:n]) - 1
    ts = np.ascontiguousarray(ts).astype(np.int32)
    if ts.shape != (n,) or ts.max() >= t_total or ts.min() < 0:
        raise ValueError(
            f"inference_timesteps: spacing={spacing!r}, steps_offset={steps_offset} gives "
            f"timesteps {ts.tolist()[:4]}... outside [0, {t_total}) or not {n} of them"
        )
    return ts


def previous_timesteps(
    timesteps: jax.Array | np.ndarray,
    num_train_timesteps: int,
    rule: PrevRule = "next",
) -> jax.Array:
    """For each timestep of a chain, the timestep it steps to (-1 = the clean sample x0).

    `next`: the following entry of `timesteps`, then -1 (DDPM in diffusers). `stride`:
    t - T // n for n = len(timesteps) (DDIM in diffusers). Works on traced arrays.
    """
    _check("prev_rule", rule, ("next", "stride"))
    ts = jnp.asarray(timesteps, jnp.int32)
    if rule == "stride":
        return ts - num_train_timesteps // ts.shape[0]
    return jnp.concatenate([ts[1:], jnp.full((1,), -1, jnp.int32)])


# --------------------------------------------------------------------------------------------
# Forward process and parameterisations
# --------------------------------------------------------------------------------------------


def _expand(a: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape a scalar or `[batch]` array to broadcast against `x` `[batch, ...]`."""
    a = jnp.asarray(a, jnp.float32)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def alpha_bar(schedule: Schedule, t: jax.Array, final: float | jax.Array = 1.0) -> jax.Array:
    """abar at integer timesteps `t` (any shape); `final` where t < 0 (the step to x0)."""
    t = jnp.asarray(t, jnp.int32)
    ac = schedule.alphas_cumprod
    inside = ac[jnp.clip(t, 0, ac.shape[0] - 1)]
    return jnp.where(t >= 0, inside, jnp.asarray(final, jnp.float32))


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio abar_t / (1 - abar_t) at timesteps `t`."""
    a = alpha_bar(schedule, t)
    return a / (1.0 - a)


def q_sample(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward noising x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (diffusers' `add_noise`).

    x0, noise: `[batch, ...]`; t: `[batch]` int (or a scalar). Returns float32 `[batch, ...]`.
    """
    x0 = jnp.asarray(x0, jnp.float32)
    a = _expand(alpha_bar(schedule, t), x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * jnp.asarray(noise, jnp.float32)


add_noise = q_sample


def velocity(x0: jax.Array, noise: jax.Array, abar: jax.Array) -> jax.Array:
    """v = sqrt(abar) noise - sqrt(1 - abar) x0; `abar` broadcasts against `x0`."""
    return jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0


def split_prediction(
    model_output: jax.Array,
    x_t: jax.Array,
    abar: jax.Array,
    prediction_type: PredictionType = "epsilon",
) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) implied by a model output of the given parameterisation at noisy x_t.

    `abar` is abar_t broadcastable against `x_t` `[batch, ...]`. For `epsilon` the x0 estimate
    divides by sqrt(abar_t); for `sample` the eps estimate by sqrt(1 - abar_t).
    """
    _check("prediction_type", prediction_type, PREDICTION_TYPES)
    out = jnp.asarray(model_output, jnp.float32)
    x_t = jnp.asarray(x_t, jnp.float32)
    sa, sb = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        return (x_t - sb * out) / sa, out
    if prediction_type == "sample":
        return out, (x_t - sa * out) / sb
    return sa * x_t - sb * out, sa * out + sb * x_t


def prediction_target(
    x0: jax.Array, noise: jax.Array, abar: jax.Array, prediction_type: PredictionType
) -> jax.Array:
    """What a denoiser of the given parameterisation should output for x_t = q(x0, noise)."""
    _check("prediction_type", prediction_type, PREDICTION_TYPES)
    x0 = jnp.asarray(x0, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    return velocity(x0, noise, abar)


def convert_prediction(
    model_output: jax.Array,
    x_t: jax.Array,
    abar: jax.Array,
    source: PredictionType,
    target: PredictionType,
) -> jax.Array:
    """Re-express a model output in another parameterisation (exact, up to rounding)."""
    _check("target", target, PREDICTION_TYPES)
    if source == target:
        return jnp.asarray(model_output, jnp.float32)
    x0, eps = split_prediction(model_output, x_t, abar, source)
    return prediction_target(x0, eps, abar, target)


# --------------------------------------------------------------------------------------------
# Reverse steps
# --------------------------------------------------------------------------------------------


class StepOutput(NamedTuple):
    """One reverse step: `prev_sample` x_prev and the step's estimate `pred_x0`, `[batch, ...]`."""

    prev_sample: jax.Array
    pred_x0: jax.Array


def _clip(x0: jax.Array, clip_sample: bool, clip_sample_range: float) -> jax.Array:
    return jnp.clip(x0, -clip_sample_range, clip_sample_range) if clip_sample else x0


def ddpm_posterior(
    schedule: Schedule,
    x0: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    prev_t: jax.Array,
    variance_type: VarianceType = "fixed_small",
) -> tuple[jax.Array, jax.Array]:
    """Mean `[batch, ...]` and variance (broadcastable) of q(x_prev | x_t, x0).

    With abar_prev = abar[prev_t] (1 where prev_t < 0), alpha = abar_t / abar_prev and
    beta = 1 - alpha (the effective beta of a respaced step):
      mean = sqrt(abar_prev) beta / (1 - abar_t) x0 + sqrt(alpha) (1 - abar_prev) / (1 - abar_t) x_t
      fixed_small variance = (1 - abar_prev) / (1 - abar_t) beta (floored at 1e-20);
      fixed_large variance = beta.
    t, prev_t: scalars or `[batch]` ints.
    """
    _check("variance_type", variance_type, VARIANCE_TYPES)
    x_t = jnp.asarray(x_t, jnp.float32)
    a_t = _expand(alpha_bar(schedule, t), x_t)
    a_prev = _expand(alpha_bar(schedule, prev_t), x_t)
    alpha = a_t / a_prev
    beta = 1.0 - alpha
    mean = (jnp.sqrt(a_prev) * beta / (1.0 - a_t)) * jnp.asarray(x0, jnp.float32) + (
        jnp.sqrt(alpha) * (1.0 - a_prev) / (1.0 - a_t)
    ) * x_t
    if variance_type == "fixed_small":
        variance = jnp.maximum((1.0 - a_prev) / (1.0 - a_t) * beta, _MIN_VARIANCE)
    else:
        variance = beta
    return mean, variance


def ddpm_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    prev_t: jax.Array,
    noise: jax.Array | None = None,
    *,
    prediction_type: PredictionType = "epsilon",
    variance_type: VarianceType = "fixed_small",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
) -> StepOutput:
    """Ancestral DDPM step x_t -> x_prev: the posterior mean plus sqrt(variance) * noise.

    model_output, x_t, noise: `[batch, ...]`; t, prev_t: scalars or `[batch]` ints (prev_t =
    t - 1 for the full chain, -1 for the last step). No noise is added where t == 0, or when
    `noise` is None (then the result is the posterior mean). x0 is clipped to
    [-clip_sample_range, clip_sample_range] if `clip_sample`.
    """
    x_t = jnp.asarray(x_t, jnp.float32)
    a_t = _expand(alpha_bar(schedule, t), x_t)
    x0, _ = split_prediction(model_output, x_t, a_t, prediction_type)
    x0 = _clip(x0, clip_sample, clip_sample_range)
    mean, variance = ddpm_posterior(schedule, x0, x_t, t, prev_t, variance_type)
    if noise is None:
        return StepOutput(mean, x0)
    scale = jnp.sqrt(variance) * _expand(jnp.asarray(t) > 0, x_t)
    return StepOutput(mean + scale * jnp.asarray(noise, jnp.float32), x0)


def ddim_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    prev_t: jax.Array,
    noise: jax.Array | None = None,
    *,
    eta: float | jax.Array = 0.0,
    prediction_type: PredictionType = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    set_alpha_to_one: bool = True,
    use_clipped_model_output: bool = False,
) -> StepOutput:
    """DDIM step x_t -> x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z.

    s = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)); z = `noise`
    `[batch, ...]` (None: no noise term, right for eta = 0). Where prev_t < 0, abar_prev is 1
    if `set_alpha_to_one`, else abar_0. `use_clipped_model_output` re-derives eps from the
    clipped x0. model_output, x_t: `[batch, ...]`; t, prev_t: scalars or `[batch]` ints.
    """
    x_t = jnp.asarray(x_t, jnp.float32)
    final = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
    a_t = _expand(alpha_bar(schedule, t), x_t)
    a_prev = _expand(alpha_bar(schedule, prev_t, final), x_t)
    x0, eps = split_prediction(model_output, x_t, a_t, prediction_type)
    x0 = _clip(x0, clip_sample, clip_sample_range)
    if use_clipped_model_output:
        eps = (x_t - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = jnp.asarray(eta, jnp.float32) * jnp.sqrt(variance)
    direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - std**2, 0.0)) * eps
    prev = jnp.sqrt(a_prev) * x0 + direction
    if noise is not None:
        prev = prev + std * jnp.asarray(noise, jnp.float32)
    return StepOutput(prev, x0)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _is_static_zero(x: Any) -> bool:
    return isinstance(x, int | float) and x == 0


def sample(
    denoise_fn: DenoiseFn,
    shape: Sequence[int],
    rng: jax.Array,
    schedule: Schedule,
    timesteps: jax.Array | np.ndarray,
    *,
    method: Method = "ddim",
    prev_timesteps: jax.Array | np.ndarray | None = None,
    prediction_type: PredictionType = "epsilon",
    eta: float | jax.Array = 0.0,
    variance_type: VarianceType = "fixed_small",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    set_alpha_to_one: bool = True,
    x_init: jax.Array | None = None,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Run a reverse chain from Gaussian noise; one `lax.scan` over `timesteps`.

    denoise_fn(x_t `[batch, ...]` float32, t `[batch]` int32) -> model output `[batch, ...]`
      in `prediction_type`'s parameterisation; close over parameters and conditions (or wrap
      it with `guided_denoise_fn`). It is traced once, whatever the number of steps.
    shape: `[batch, ...]` of the sample. rng: a PRNG key (initial noise and step noise).
    timesteps: `[steps]` ints, decreasing (`inference_timesteps`); a scan input, so jitting
      over it compiles once per number of steps and reuses the executable for any values.
    method: `ddim` (with `eta`; noise drawn only if eta is not a static 0) or `ddpm` (ancestral,
      `variance_type`). prev_timesteps: `[steps]` where each step lands (-1: x0); default:
      diffusers' rule, the next timestep for DDPM and t - T // steps for DDIM.
    x_init: start from this `[batch, ...]` x_T instead of drawing it from `rng`.
    Returns x0 `[batch, ...]` float32, and with `return_trajectory` also `[steps, batch, ...]`
    (x after each step).
    """
    _check("method", method, METHODS)
    timesteps = jnp.asarray(timesteps, jnp.int32)
    if timesteps.ndim != 1:
        raise ValueError(f"sample: timesteps of shape {timesteps.shape}; expected [steps]")
    if prev_timesteps is None:
        rule = "next" if method == "ddpm" else "stride"
        prev_timesteps = previous_timesteps(timesteps, schedule.num_train_timesteps, rule)
    prev_timesteps = jnp.asarray(prev_timesteps, jnp.int32)
    if prev_timesteps.shape != timesteps.shape:
        raise ValueError(
            f"sample: prev_timesteps of shape {prev_timesteps.shape}; expected {timesteps.shape}"
        )
    shape = tuple(int(d) for d in shape)
    init_rng, step_rng = jax.random.split(rng)
    if x_init is None:
        x = jax.random.normal(init_rng, shape, jnp.float32)
    else:
        x = jnp.asarray(x_init, jnp.float32)
        if x.shape != shape:
            raise ValueError(f"sample: x_init of shape {x.shape}; expected {shape}")
    stochastic = method == "ddpm" or not _is_static_zero(eta)
    step_keys = jax.random.split(step_rng, timesteps.shape[0])

    def body(x: jax.Array, inputs: tuple[jax.Array, jax.Array, jax.Array]):
        t, prev_t, key = inputs
        out = denoise_fn(x, jnp.full((shape[0],), t, jnp.int32))
        noise = jax.random.normal(key, shape, jnp.float32) if stochastic else None
        common = dict(
            prediction_type=prediction_type,
            clip_sample=clip_sample,
            clip_sample_range=clip_sample_range,
        )
        if method == "ddpm":
            step = ddpm_step(
                schedule, out, x, t, prev_t, noise, variance_type=variance_type, **common
            )
        else:
            step = ddim_step(
                schedule,
                out,
                x,
                t,
                prev_t,
                noise,
                eta=eta,
                set_alpha_to_one=set_alpha_to_one,
                **common,
            )
        x_prev = step.prev_sample
        return x_prev, (x_prev if return_trajectory else None)

    x, trajectory = jax.lax.scan(body, x, (timesteps, prev_timesteps, step_keys))
    return (x, trajectory) if return_trajectory else x


# --------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------


def guidance_combine(
    cond_output: jax.Array, uncond_output: jax.Array, guidance_scale: float | jax.Array
) -> jax.Array:
    """uncond + scale (cond - uncond): scale 1 is the conditional model, 0 the unconditional."""
    cond_output = jnp.asarray(cond_output, jnp.float32)
    uncond_output = jnp.asarray(uncond_output, jnp.float32)
    return uncond_output + jnp.asarray(guidance_scale, jnp.float32) * (cond_output - uncond_output)


def _broadcast_like(null: jax.Array, like: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(null, like.dtype), like.shape)


def guided_denoise_fn(
    denoise_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    cond: Any,
    null_cond: Any,
    guidance_scale: float | jax.Array,
) -> DenoiseFn:
    """A `DenoiseFn` that applies classifier-free guidance with one doubled-batch call.

    denoise_fn(x `[batch, ...]`, t `[batch]`, cond) -> output `[batch, ...]`; cond: a pytree of
    `[batch, ...]` arrays; null_cond: the same structure, each leaf broadcastable to cond's
    (e.g. an unbatched learned null embedding, or zeros and a zero mask). The returned
    function evaluates x with cond and with null_cond as one `[2 * batch, ...]` call and
    returns `guidance_combine(cond_out, uncond_out, guidance_scale)`.
    """
    both = jax.tree.map(
        lambda c, n: jnp.concatenate([c, _broadcast_like(n, c)], axis=0), cond, null_cond
    )

    def fn(x: jax.Array, t: jax.Array) -> jax.Array:
        out = denoise_fn(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), both)
        cond_out, uncond_out = jnp.split(out, 2, axis=0)
        return guidance_combine(cond_out, uncond_out, guidance_scale)

    return fn


def condition_keep_mask(rng: jax.Array, batch: int, drop_prob: float | jax.Array) -> jax.Array:
    """`[batch]` bool: True where the condition is kept, False (probability `drop_prob`)
    where it is replaced by the null condition."""
    return jax.random.uniform(rng, (batch,)) >= jnp.asarray(drop_prob, jnp.float32)


def drop_condition(
    rng: jax.Array, cond: Any, null_cond: Any, drop_prob: float | jax.Array
) -> tuple[Any, jax.Array]:
    """Condition dropout for classifier-free guidance training.

    cond: a pytree of `[batch, ...]` arrays (features, masks, ...); null_cond: the same
    structure, leaves broadcastable to cond's. Each example independently, with probability
    `drop_prob`, has all its condition leaves replaced by the null ones. Returns the new
    pytree and the `[batch]` bool keep mask.
    """
    leaves = jax.tree.leaves(cond)
    if not leaves:
        raise ValueError("drop_condition: cond has no arrays")
    keep = condition_keep_mask(rng, leaves[0].shape[0], drop_prob)

    def pick(c: jax.Array, n: jax.Array) -> jax.Array:
        c = jnp.asarray(c)
        k = keep.reshape(keep.shape + (1,) * (c.ndim - 1))
        return jnp.where(k, c, _broadcast_like(n, c))

    return jax.tree.map(pick, cond, null_cond), keep


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class DiffusionInputs(NamedTuple):
    """One training draw: noisy input `x_t` `[batch, ...]`, timesteps `t` `[batch]` int32,
    the `noise` used `[batch, ...]`, and the regression `target` `[batch, ...]` (float32)."""

    x_t: jax.Array
    t: jax.Array
    noise: jax.Array
    target: jax.Array


def training_inputs(
    rng: jax.Array,
    x0: jax.Array,
    schedule: Schedule,
    prediction_type: PredictionType = "epsilon",
) -> DiffusionInputs:
    """Draw t ~ U{0..T-1} and eps ~ N(0, I) per example, noise x0 `[batch, ...]`, and build the
    target of `prediction_type` (eps, x0, or v)."""
    x0 = jnp.asarray(x0, jnp.float32)
    t_rng, n_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_train_timesteps, jnp.int32)
    noise = jax.random.normal(n_rng, x0.shape, jnp.float32)
    x_t = q_sample(schedule, x0, noise, t)
    target = prediction_target(x0, noise, _expand(alpha_bar(schedule, t), x0), prediction_type)
    return DiffusionInputs(x_t, t, noise, target)


def min_snr_weights(
    schedule: Schedule, t: jax.Array, gamma: float, prediction_type: PredictionType
) -> jax.Array:
    """`[batch]` min-SNR-gamma loss weights (Hang et al., 2023), expressed for the
    parameterisation's own MSE: min(snr, gamma) / snr for epsilon, / (snr + 1) for v, and
    min(snr, gamma) for x0."""
    _check("prediction_type", prediction_type, PREDICTION_TYPES)
    s = snr(schedule, t)
    clipped = jnp.minimum(s, gamma)
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped


def weighted_mse(
    prediction: jax.Array,
    target: jax.Array,
    mask: jax.Array | None = None,
    example_weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Masked mean squared error in float32: (scalar loss, `[batch]` per-example loss).

    prediction, target: `[batch, ...]`; mask: broadcastable to them (e.g. `[batch, frames, 1]`
    for padded frames; 0 = ignore); example_weights: `[batch]`. Each example's loss is the mean
    over its unmasked elements; the scalar is the mean over the batch of weight x that.
    """
    err = jnp.square(jnp.asarray(prediction, jnp.float32) - jnp.asarray(target, jnp.float32))
    axes = tuple(range(1, err.ndim))
    if mask is None:
        per_example = jnp.mean(err, axis=axes)
    else:
        m = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), err.shape)
        per_example = jnp.sum(err * m, axis=axes) / jnp.maximum(jnp.sum(m, axis=axes), 1.0)
    weighted = per_example
    if example_weights is not None:
        weighted = per_example * jnp.asarray(example_weights, jnp.float32)
    return jnp.mean(weighted), per_example


def diffusion_loss(
    denoise_fn: DenoiseFn,
    rng: jax.Array,
    x0: jax.Array,
    schedule: Schedule,
    *,
    prediction_type: PredictionType = "epsilon",
    mask: jax.Array | None = None,
    snr_gamma: float | None = None,
) -> tuple[jax.Array, DiffusionInputs]:
    """The denoising loss of one batch: `training_inputs`, then `weighted_mse` of
    denoise_fn(x_t, t) against the target, min-SNR weighted if `snr_gamma` is given.

    x0: `[batch, ...]` clean data; mask: broadcastable to x0 (padding). Returns (scalar float32
    loss, the `DiffusionInputs` drawn). For models that need more than (x_t, t) (dropout rngs,
    condition dropout), call `training_inputs` and `weighted_mse` directly.
    """
    inputs = training_inputs(rng, x0, schedule, prediction_type)
    prediction = denoise_fn(inputs.x_t, inputs.t)
    weights = None
    if snr_gamma is not None:
        weights = min_snr_weights(schedule, inputs.t, snr_gamma, prediction_type)
    loss, _ = weighted_mse(prediction, inputs.target, mask, weights)
    return loss, inputs


def timestep_embedding(
    t: jax.Array,
    dim: int,
    max_period: float = 10_000.0,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
) -> jax.Array:
    """Sinusoidal embedding `[batch, dim]` float32 of timesteps `t` `[batch]`.

    Frequencies max_period^(-i / (dim/2 - downscale_freq_shift)) for i < dim/2, the cos half
    first if `flip_sin_to_cos`, zero-padded when `dim` is odd (diffusers' `Timesteps` layer
    with the same arguments).
    """
    half = dim // 2
    exponent = jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    freqs = jnp.exp(-math.log(max_period) * exponent)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
