"""Diffusion core: parity with diffusers' DDPMScheduler / DDIMScheduler (PyTorch CPU), the
sampler as one compiled scan, classifier-free guidance, condition dropout, the training loss."""

import diffusers  # a hard dependency of this file (the `test` extra): no silent skip
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.schedulers import scheduling_ddpm

from avjax.nn import diffusion as D

RTOL = ATOL = 1e-5
# (schedule, beta_start, beta_end): Stable Diffusion's range for scaled_linear.
SCHEDULE_ARGS = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "squaredcos_cap_v2": (1e-4, 0.02),
}


def _ref(cls, name="linear", T=1000, **kw):
    beta_start, beta_end = SCHEDULE_ARGS[name]
    return cls(
        num_train_timesteps=T,
        beta_schedule=name,
        beta_start=beta_start,
        beta_end=beta_end,
        **kw,
    )


def _ours(name="linear", T=1000, **kw):
    beta_start, beta_end = SCHEDULE_ARGS[name]
    return D.make_schedule(name, T, beta_start, beta_end, **kw)


def _shared(ref):
    """Our schedule holding diffusers' own float32 arrays: step parity without the ~1e-6
    rounding difference of the schedules, which near t = 0 (1 - abar ~ 1e-4) is amplified."""
    return D.Schedule(jnp.asarray(ref.betas.numpy()), jnp.asarray(ref.alphas_cumprod.numpy()))


def _close(ours, ref, rtol=RTOL, atol=ATOL):
    ref = ref.numpy() if isinstance(ref, torch.Tensor) else ref
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=rtol, atol=atol)


def _randn(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("T", [1000, 37])
@pytest.mark.parametrize("name", list(SCHEDULE_ARGS))
def test_schedules_match_diffusers(name, T):
    ref = _ref(diffusers.DDPMScheduler, name, T)
    ours = _ours(name, T)
    assert ours.num_train_timesteps == T
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == jnp.float32
    _close(ours.betas, ref.betas, atol=0)
    _close(ours.alphas_cumprod, ref.alphas_cumprod, atol=0)
    trained = D.schedule_from_betas(ref.betas.numpy())
    _close(trained.alphas_cumprod, ref.alphas_cumprod, atol=0)


def test_cosine_alias_zero_snr_and_reference_values():
    cos = D.make_schedule("cosine")
    np.testing.assert_array_equal(cos.betas, D.make_schedule("squaredcos_cap_v2").betas)
    # Test vectors of ../shared/papers/diffusion_and_denoising.md.
    _close(cos.alphas_cumprod[:3], np.array([0.9999587, 0.99991256, 0.99986154]))
    _close(cos.alphas_cumprod[999], 2.4287e-9, rtol=1e-4, atol=0)
    assert float(cos.betas.max()) == pytest.approx(0.999)
    x = D.q_sample(cos, jnp.ones((2, 3)), jnp.zeros((2, 3)), jnp.array([10, 500]))
    _close(x[:, 0], np.array([0.99963933, 0.7016302]))
    ref = _ref(diffusers.DDPMScheduler, "scaled_linear", rescale_betas_zero_snr=True)
    ours = _ours("scaled_linear", rescale_zero_terminal_snr=True)
    _close(ours.betas, ref.betas)
    _close(ours.alphas_cumprod, ref.alphas_cumprod)
    assert float(ours.alphas_cumprod[-1]) == 0.0


def test_add_noise_velocity_and_conversions():
    ref = _ref(diffusers.DDPMScheduler, "squaredcos_cap_v2")
    sched = _ours("squaredcos_cap_v2")
    x0, noise = _randn(0, (6, 4, 3)), _randn(1, (6, 4, 3))
    t = np.array([0, 1, 250, 500, 998, 999])
    tt = torch.from_numpy(t)
    x_t = D.q_sample(sched, x0, noise, t)
    _close(x_t, ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt))
    assert D.add_noise is D.q_sample
    abar = D.alpha_bar(sched, t)[:, None, None]
    v = D.velocity(x0, noise, abar)
    _close(v, ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt))
    # Each parameterisation's target, split at x_t, gives back (x0, noise); conversions agree.
    # (t = 999 excluded for epsilon -> x0: it divides by sqrt(abar_999) ~ 5e-5.)
    targets = {p: D.prediction_target(x0, noise, abar, p) for p in D.PREDICTION_TYPES}
    for p, out in targets.items():
        x0_hat, eps_hat = D.split_prediction(out, x_t, abar, p)
        _close(x0_hat[:5], x0[:5], atol=2e-3 if p == "epsilon" else 1e-4)
        _close(eps_hat[1:], noise[1:], atol=1e-4)
        for q in D.PREDICTION_TYPES:
            conv = D.convert_prediction(out, x_t, abar, p, q)
            _close(conv[1:5], targets[q][1:5], atol=2e-4)
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        D.prediction_target(x0, noise, abar, "x0")


@pytest.mark.parametrize("spacing", D.SPACINGS)
def test_set_timesteps_matches_diffusers(spacing):
    for T in (1000, 37):
        for n in sorted({1, 2, 7, 10, 25, 36, 37, 50, 61, 100, 999, 1000} & set(range(1, T + 1))):
            for offset in (0, 1) if spacing == "leading" else (0,):
                if spacing == "leading" and offset and n == T:
                    with pytest.raises(ValueError, match="outside"):
                        D.inference_timesteps(T, n, spacing, offset)
                    continue
                ours = D.inference_timesteps(T, n, spacing, offset)
                assert ours.dtype == np.int32 and ours.shape == (n,)
                for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
                    ref = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
                    ref.set_timesteps(n)
                    ref_ts = ref.timesteps.numpy()
                    # diffusers' float `arange` adds a spurious -1 for some n (trailing).
                    assert len(ref_ts) == n or (spacing == "trailing" and ref_ts[n:] == [-1])
                    np.testing.assert_array_equal(ours, ref_ts[:n], err_msg=f"{cls} {T} {n}")
    if spacing == "leading":
        np.testing.assert_array_equal(D.inference_timesteps(1000, 50)[:3], [980, 960, 940])
    with pytest.raises(ValueError, match="num_inference_steps=1001"):
        D.inference_timesteps(1000, 1001, spacing)


def _patch_noise(monkeypatch, noises):
    """Make diffusers' DDPM step draw the given noises, in order."""
    it = iter(noises)
    monkeypatch.setattr(
        scheduling_ddpm, "randn_tensor", lambda *a, **kw: torch.from_numpy(next(it))
    )


@pytest.mark.parametrize("variance_type", D.VARIANCE_TYPES)
@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
def test_ddpm_steps_match_diffusers(monkeypatch, prediction_type, variance_type):
    shape = (2, 5, 3)
    clip = prediction_type == "sample"  # clipping exercised once per variance type
    kw = dict(prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip)
    name = "squaredcos_cap_v2" if variance_type == "fixed_large" else "linear"
    # A respaced chain (10 steps, trailing) and full-chain steps t -> t - 1.
    ref = _ref(diffusers.DDPMScheduler, name, timestep_spacing="trailing", **kw)
    ref.set_timesteps(10)
    ts = D.inference_timesteps(1000, 10, "trailing")
    prev = np.asarray(D.previous_timesteps(ts, 1000, "next"))
    full = _ref(diffusers.DDPMScheduler, name, **kw)
    sched = _shared(full)
    chains = [(ref, ts, prev), (full, np.array([999, 500, 1, 0]), np.array([998, 499, 0, -1]))]
    noises = [_randn(100 + i, shape) for i in range(len(ts) + 4)]
    _patch_noise(monkeypatch, noises)
    k = 0
    for scheduler, steps, prevs in chains:
        x = _randn(7, shape) * 1.5
        for t, p in zip(steps, prevs, strict=True):
            if scheduler is ref:
                assert int(scheduler.previous_timestep(int(t))) == p
            out = _randn(1000 + int(t), shape)
            r = scheduler.step(torch.from_numpy(out), int(t), torch.from_numpy(x))
            noise = noises[k] if t > 0 else None  # diffusers draws no noise at t = 0
            k += t > 0
            o = D.ddpm_step(
                sched,
                out,
                x,
                t,
                p,
                noise,
                prediction_type=prediction_type,
                variance_type=variance_type,
                clip_sample=clip,
            )
            _close(o.pred_x0, r.pred_original_sample, atol=3e-5)
            _close(o.prev_sample, r.prev_sample, atol=3e-5)
            x = r.prev_sample.numpy()
    assert k == len(noises) - 1
    # The posterior itself: the mean with no noise, and diffusers' variance.
    mean, var = D.ddpm_posterior(sched, noises[0], noises[1], 500, 499, variance_type)
    _close(var.reshape(()), full._get_variance(500), rtol=1e-5)
    step = D.ddpm_step(sched, noises[0], noises[1], 500, 499, prediction_type="sample")
    _close(step.prev_sample, mean, atol=0)  # no noise given: the posterior mean


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
@pytest.mark.parametrize(
    "spacing,eta,set_alpha_to_one",
    [
        ("leading", 0.0, False),
        ("trailing", 0.0, True),
        ("linspace", 0.6, True),
        ("leading", 1.0, False),
    ],
)
def test_ddim_steps_match_diffusers(prediction_type, spacing, eta, set_alpha_to_one):
    shape = (3, 4, 2)
    name = "scaled_linear" if spacing == "linspace" else "linear"
    clip = prediction_type == "epsilon" and eta == 1.0
    ref = _ref(
        diffusers.DDIMScheduler,
        name,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
        set_alpha_to_one=set_alpha_to_one,
        clip_sample=clip,
        steps_offset=1 if spacing == "leading" else 0,
    )
    ref.set_timesteps(8)
    sched = _shared(ref)
    ts = D.inference_timesteps(1000, 8, spacing, 1 if spacing == "leading" else 0)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    prev = np.asarray(D.previous_timesteps(ts, 1000, "stride"))
    x = _randn(3, shape)
    for i, (t, p) in enumerate(zip(ts, prev, strict=True)):
        out, z = _randn(50 + i, shape), _randn(80 + i, shape)
        r = ref.step(
            torch.from_numpy(out),
            int(t),
            torch.from_numpy(x),
            eta=eta,
            variance_noise=torch.from_numpy(z) if eta > 0 else None,
            use_clipped_model_output=clip,
        )
        o = D.ddim_step(
            sched,
            out,
            x,
            t,
            p,
            z if eta > 0 else None,
            eta=eta,
            prediction_type=prediction_type,
            set_alpha_to_one=set_alpha_to_one,
            clip_sample=clip,
            use_clipped_model_output=clip,
        )
        _close(o.pred_x0, r.pred_original_sample, atol=3e-5)
        _close(o.prev_sample, r.prev_sample, atol=3e-5)
        x = r.prev_sample.numpy()


def test_ddim_reference_value_and_batched_timesteps():
    sched = D.make_schedule("linear")
    ts = D.inference_timesteps(1000, 10, "leading")
    np.testing.assert_array_equal(ts, np.arange(900, -1, -100))
    prev = D.previous_timesteps(ts, 1000, "stride")
    o = D.ddim_step(
        sched, jnp.zeros((1, 1)), jnp.ones((1, 1)), ts[0], prev[0], set_alpha_to_one=False
    )
    _close(o.prev_sample[0, 0], 2.3618548)
    # Per-example timesteps `[batch]` equal one call per example.
    x, out = _randn(0, (3, 4)), _randn(1, (3, 4))
    t, p = np.array([900, 500, 20]), np.array([800, 400, -1])
    batched = D.ddim_step(sched, out, x, t, p, prediction_type="v_prediction")
    for i in range(3):
        one = D.ddim_step(
            sched, out[i : i + 1], x[i : i + 1], t[i], p[i], prediction_type="v_prediction"
        )
        _close(batched.prev_sample[i : i + 1], one.prev_sample, atol=1e-6)


def _toy_denoiser(x, t):
    """A smooth stand-in for a network: eps_hat = 0.3 tanh(x) + 1e-3 t."""
    return 0.3 * jnp.tanh(x) + 1e-3 * t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))


def test_sampler_is_one_scan_compiled_once_and_matches_diffusers_loop():
    sched = D.make_schedule("linear")
    shape = (2, 6, 3)
    traces = []

    def fn(x, t):
        traces.append(1)
        return _toy_denoiser(x, t)

    run = jax.jit(lambda rng, ts: D.sample(fn, shape, rng, sched, ts, method="ddim"))
    ts50 = D.inference_timesteps(1000, 50, "leading")
    x_a = run(jax.random.key(0), ts50)
    x_b = run(jax.random.key(1), D.inference_timesteps(1000, 50, "trailing"))
    assert len(traces) == 1 and run._cache_size() == 1
    assert np.all(np.isfinite(x_a)) and not np.allclose(x_a, x_b)
    jaxpr = jax.make_jaxpr(lambda rng, ts: D.sample(fn, shape, rng, sched, ts))(
        jax.random.key(0), ts50
    )
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 50

    # The same chain, deterministic DDIM from a given x_T, against diffusers' loop.
    ref = diffusers.DDIMScheduler(clip_sample=False)
    ref.set_timesteps(50)
    x_T = _randn(5, shape)
    x = torch.from_numpy(x_T)
    for t in ref.timesteps:
        out = torch.from_numpy(
            np.array(_toy_denoiser(jnp.asarray(x.numpy()), jnp.full((2,), int(t))))
        )
        x = ref.step(out, t, x).prev_sample
    ours, traj = D.sample(
        _toy_denoiser, shape, jax.random.key(0), sched, ts50, x_init=x_T, return_trajectory=True
    )
    _close(ours, x, atol=1e-4)
    assert traj.shape == (50, *shape)
    _close(traj[-1], ours, atol=0)


def test_ddpm_sampler_lands_on_predicted_x0_and_ddim_eta_is_random():
    sched = D.make_schedule("squaredcos_cap_v2")
    target = jnp.linspace(-2.0, 2.0, 12).reshape(2, 6)

    def oracle(x, t):
        return jnp.broadcast_to(target, x.shape)

    ddpm = jax.jit(
        lambda ts: D.sample(
            oracle, (2, 6), jax.random.key(3), sched, ts, method="ddpm", prediction_type="sample"
        )
    )
    for spacing in ("leading", "trailing"):
        _close(ddpm(D.inference_timesteps(1000, 20, spacing)), target, atol=1e-4)

    ts = D.inference_timesteps(1000, 10, "trailing")
    draw = jax.jit(
        lambda key, eta, x_init: D.sample(
            _toy_denoiser, (2, 6), key, sched, ts, eta=eta, x_init=x_init
        ),
        static_argnums=1,
    )
    x_init = jnp.asarray(_randn(0, (2, 6)))
    # eta = 0 ignores the key (deterministic); eta = 1 depends on it, reproducibly.
    _close(draw(jax.random.key(0), 0.0, x_init), draw(jax.random.key(1), 0.0, x_init), atol=0)
    a, b, c = (draw(jax.random.key(k), 1.0, x_init) for k in (1, 2, 1))
    _close(a, c, atol=0)
    assert not np.allclose(a, b)


def test_classifier_free_guidance():
    cond_out, uncond_out = _randn(0, (4, 3)), _randn(1, (4, 3))
    _close(D.guidance_combine(cond_out, uncond_out, 1.0), cond_out, atol=0)
    _close(D.guidance_combine(cond_out, uncond_out, 0.0), uncond_out, atol=0)
    _close(D.guidance_combine(cond_out, uncond_out, 3.0), uncond_out + 3 * (cond_out - uncond_out))

    cond = {"feat": jnp.asarray(_randn(2, (4, 5))), "mask": jnp.ones((4, 5), bool)}
    null = {"feat": jnp.zeros((5,)), "mask": jnp.zeros((), bool)}
    w = jnp.asarray(_randn(3, (5, 3)))
    calls = []

    def net(x, t, c):
        calls.append(x.shape[0])
        h = jnp.where(c["mask"], c["feat"], 0.0) @ w
        return x * 0.5 + h + t[:, None] * 1e-3

    x, t = jnp.asarray(_randn(4, (4, 3))), jnp.arange(4, dtype=jnp.int32)
    guided1 = D.guided_denoise_fn(net, cond, null, 1.0)(x, t)
    _close(guided1, net(x, t, cond), atol=1e-6)
    assert calls[0] == 8  # one doubled-batch call
    uncond = net(x, t, jax.tree.map(lambda n, c: jnp.broadcast_to(n, c.shape), null, cond))
    guided0 = D.guided_denoise_fn(net, cond, null, 0.0)(x, t)
    _close(guided0, uncond, atol=1e-6)
    # Guided sampling runs under the scan.
    fn = D.guided_denoise_fn(net, cond, null, 2.5)
    out = D.sample(
        fn, (4, 3), jax.random.key(0), D.make_schedule("linear"), D.inference_timesteps(1000, 5)
    )
    assert out.shape == (4, 3) and np.all(np.isfinite(out))


def test_condition_dropout_rate_and_replacement():
    batch, p = 20_000, 0.3
    cond = {"feat": jnp.ones((batch, 2, 3)), "mask": jnp.ones((batch, 2), bool)}
    null = {"feat": jnp.full((3,), -1.0), "mask": jnp.zeros((batch, 2), bool)}
    dropped, keep = jax.jit(D.drop_condition, static_argnums=3)(jax.random.key(0), cond, null, p)
    assert keep.shape == (batch,) and keep.dtype == jnp.bool_
    assert abs(1.0 - float(keep.mean()) - p) < 0.015
    k = np.asarray(keep)
    np.testing.assert_array_equal(np.asarray(dropped["feat"])[k], 1.0)
    np.testing.assert_array_equal(np.asarray(dropped["feat"])[~k], -1.0)
    np.testing.assert_array_equal(np.asarray(dropped["mask"]).all(axis=1), k)
    _, keep0 = D.drop_condition(jax.random.key(1), cond, null, 0.0)
    _, keep1 = D.drop_condition(jax.random.key(1), cond, null, 1.0)
    assert bool(keep0.all()) and not bool(keep1.any())


def test_training_loss_targets_and_mask():
    sched = D.make_schedule("squaredcos_cap_v2", 100)
    x0 = jnp.asarray(_randn(0, (64, 5, 2)))
    mask = jnp.arange(5)[None, :, None] < 3  # the last 2 of 5 frames are padding
    rng = jax.random.key(0)
    for p in D.PREDICTION_TYPES:
        inputs = D.training_inputs(rng, x0, sched, p)
        assert inputs.t.dtype == jnp.int32 and inputs.t.shape == (64,)
        assert 0 <= int(inputs.t.min()) < int(inputs.t.max()) < 100
        _close(inputs.x_t, D.q_sample(sched, x0, inputs.noise, inputs.t))
        # An oracle that knows x0 recovers the noise from x_t, so any target exactly.
        abar = D.alpha_bar(sched, inputs.t)[:, None, None]
        eps = (inputs.x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
        exact = D.prediction_target(x0, eps, abar, p)
        assert float(D.weighted_mse(exact, inputs.target)[0]) < 1e-6, p
        # Errors only on padded frames: ignored under the mask (min-SNR weighted too).
        broken = exact + jnp.where(mask, 0.0, 10.0)
        weights = D.min_snr_weights(sched, inputs.t, 5.0, p)
        masked, per_example = D.weighted_mse(broken, inputs.target, mask, weights)
        assert float(masked) < 1e-6 and per_example.shape == (64,)
        unmasked, _ = D.weighted_mse(broken, inputs.target)
        assert float(unmasked) == pytest.approx(40.0, rel=1e-3)  # 10^2 on 2 of 5 frames
    # diffusion_loss = training_inputs + denoiser + weighted_mse, and is differentiable.
    loss_fn = lambda s: D.diffusion_loss(lambda x, t: s * x, rng, x0, sched, snr_gamma=5.0)[0]  # noqa: E731
    inputs = D.training_inputs(rng, x0, sched)
    w = D.min_snr_weights(sched, inputs.t, 5.0, "epsilon")
    _close(loss_fn(0.5), D.weighted_mse(0.5 * inputs.x_t, inputs.noise, None, w)[0])
    assert np.isfinite(jax.grad(loss_fn)(1.0))
    _close(
        D.min_snr_weights(sched, jnp.array([0, 99]), 5.0, "epsilon"),
        [5.0 / float(D.snr(sched, 0)), 1.0],
    )


def test_timestep_embedding_matches_diffusers():
    t = np.array([0, 3, 250, 999])
    for dim, flip, shift in [(32, True, 0.0), (17, False, 1.0)]:
        ref = get_timestep_embedding(torch.from_numpy(t), dim, flip, shift)
        ours = D.timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        _close(ours, ref, atol=2e-5)
