"""TTAID: the meta-gradient (second order vs finite differences, first order at inner lr 0),
the masked-mean auxiliary loss, test-time adaptation (one compile per shape, tiling), exact
resume, and one tiny CLI chain train (pretrain, meta_aux -> meta_transfer) -> sample -> eval.

Compile time dominates: the unit tests compile each function once at XLA's lowest backend
optimisation level (`_compiled`), and the CLI fixture shares a persistent compilation cache
between its runs (restored afterwards)."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from avjax import main as avjax_main
from avjax.models import ttaid as ttaid_lib
from avjax.tasks import ttaid as task_lib
from avjax.train import checkpoint as ckpt_lib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import ttaid as ttaid_config  # noqa: E402


def _tiny_net():
    """No residual blocks in the body or mask net (compile time): the meta-gradient's algebra
    does not depend on the depth."""
    return ttaid_lib.TTAIDNet(features=2, scale_step=2, body_blocks=0, head_blocks=1, mask_blocks=0)


def _meta(**kw):
    m = ml_collections.ConfigDict(
        {
            "inner_lr": 0.02,  # the masked-mean aux loss diverges at 0.3 on this net
            "inner_steps": 2,
            "aux_weight": 10.0,
            "outer_weight": 1.0,
            "mask_tv": 1e-2,
            "first_order": False,
            "aux_norm": "mask",
        }
    )
    m.update(kw)
    return m


_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled(fn, *args):
    """`fn` jitted and compiled for `args` with XLA's cheapest backend passes (tests only)."""
    return jax.jit(fn).lower(*args).compile(_FAST)


@pytest.fixture(scope="module")
def tiny():
    net = _tiny_net()
    rng = np.random.default_rng(0)
    clean = jnp.asarray(rng.random((1, 8, 8, 3)), jnp.float32)
    noisy = clean + 0.1 * jnp.asarray(rng.normal(size=(1, 8, 8, 3)), jnp.float32)
    key = jax.random.key(0)
    params = _compiled(net.init, key, noisy)(key, noisy)["params"]
    params = jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p, params)
    return net, params, noisy, clean


def _directional(net, params, noisy, clean, stage, direction, eps=1e-3):
    """`(second, first, fd)`: `<grad, direction>` of the meta loss with second- and first-order
    inner gradients and the central finite difference along `direction`, in one compile."""

    def f(p, first_order):
        meta = _meta(first_order=first_order)
        return task_lib.meta_objective(net, p, noisy, clean, stage, meta)[0]

    def dot(a, b):
        return sum(
            jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    def derivatives(p, d):
        dots = [dot(jax.grad(f)(p, fo), d) for fo in (False, True)]
        plus = f(jax.tree.map(lambda x, v: x + eps * v, p, d), False)
        minus = f(jax.tree.map(lambda x, v: x - eps * v, p, d), False)
        return dots[0], dots[1], (plus - minus) / (2 * eps)

    return [float(x) for x in _compiled(derivatives, params, direction)(params, direction)]


@pytest.mark.parametrize("stage", ["meta_transfer", "meta_aux"])
def test_second_order_meta_gradient_matches_finite_differences(tiny, stage):
    net, params, noisy, clean = tiny
    keys = jax.random.split(jax.random.key(1), len(jax.tree.leaves(params)))
    leaves = [
        jax.random.normal(k, p.shape) for k, p in zip(keys, jax.tree.leaves(params), strict=True)
    ]
    direction = jax.tree.unflatten(jax.tree.structure(params), leaves)
    # a direction over the mask net only: it learns through the inner step only, so first
    # order (inner gradients stopped) misses what second order gets
    direction = {
        k: jax.tree.map(lambda x, k=k: x * (k == ttaid_lib.MASK), v) for k, v in direction.items()
    }
    with jax.default_matmul_precision("highest"):
        second, first, fd = _directional(net, params, noisy, clean, stage, direction)
    assert second == pytest.approx(fd, rel=2e-2, abs=1e-4)
    assert abs(first - fd) > 10 * abs(second - fd)  # the test can tell the orders apart


def test_first_order_equals_second_order_at_zero_inner_lr(tiny):
    net, params, noisy, clean = tiny

    def both(p):
        return [
            jax.grad(
                lambda p_, fo=fo, stage=stage: task_lib.meta_objective(
                    net, p_, noisy, clean, stage, _meta(inner_lr=0.0, first_order=fo)
                )[0]
            )(p)
            for stage in ("meta_aux", "meta_transfer")
            for fo in (False, True)
        ]

    grads = _compiled(both, params)(params)
    for second, first in (grads[:2], grads[2:]):
        for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(first), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_masked_mean_aux_loss_ignores_the_mask_scale():
    rng = np.random.default_rng(3)
    noisy, recon = (jnp.asarray(rng.random((2, 4, 4, 3)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.random((2, 4, 4, 1)), jnp.float32)
    err = np.abs(np.asarray(noisy) - np.asarray(recon))
    want = float((err * np.asarray(mask)).sum() / (3 * np.asarray(mask).sum()))
    masked = [float(ttaid_lib.aux_loss(noisy, recon, s * mask, "mask")) for s in (1.0, 1e-3)]
    assert masked == pytest.approx([want, want], rel=1e-3)
    # the paper's mean(|noisy - recon| * mask) shrinks with the mask: what let it collapse
    mean = [float(ttaid_lib.aux_loss(noisy, recon, s * mask, "mean")) for s in (1.0, 1e-3)]
    assert mean[1] == pytest.approx(1e-3 * mean[0], rel=1e-4) and mean[0] < want
    tv = [float(ttaid_lib.mask_smoothness(s * mask, "mask")) for s in (1.0, 1e-3)]
    assert tv[1] == pytest.approx(tv[0], rel=1e-2)


def test_adaptation_compiles_once_per_shape_and_tiles(tiny):
    net, params, _, _ = tiny
    tc = ml_collections.ConfigDict(
        {"steps": 3, "lr": 1e-2, "optimizer": "adam", "tile": 16, "overlap": 4}
    )
    fn = task_lib.adaptation_fn(net, tc, "mask")
    rng = np.random.default_rng(5)
    images = [rng.random((16, 16, 3), np.float32) for _ in range(3)]
    outs = [task_lib.denoise_tiled(fn, params, img, tc) for img in images]
    assert fn._cache_size() == 1  # three images of one shape: one compilation
    res = outs[0]
    # the unrolled steps (default, fast on XLA:CPU) are the while loop's math
    looped = task_lib.adaptation_fn(net, ml_collections.ConfigDict({**tc, "unroll": False}), "mask")
    ref = task_lib.denoise_tiled(looped, params, images[0], tc)
    np.testing.assert_allclose(res["adapted"], ref["adapted"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res["aux_losses"], ref["aux_losses"], rtol=1e-5)
    assert res["aux_losses"].shape == (1, 4) and res["aux_losses"][0, -1] < res["aux_losses"][0, 0]
    assert not np.allclose(res["plain"], res["adapted"])
    big = task_lib.denoise_tiled(fn, params, rng.random((30, 37, 3), np.float32), tc)
    assert big["adapted"].shape == (30, 37, 3) and big["aux_losses"].shape[0] == 3 * 3
    assert fn._cache_size() == 1  # tiles share the tile shape
    assert task_lib.tile_positions(37, 16, 4) == [0, 12, 21]


def test_heldout_lattice_and_draws():
    from avjax.data.image.ttaid_data import TTAIDData

    data = TTAIDData(ttaid_config.get_config().data)
    one = data.heldout("camera", 24)
    many = data.heldout("camera", 24, grid=2, draws=2)
    photos = [n for n, _, _ in one]
    assert len(photos) == 3 and len(many) == 3 * 4 * 2
    assert many[0][0] == f"{photos[0]}_c0_d0" and many[-1][0] == f"{photos[-1]}_c3_d1"
    # two draws: one clean crop, different noise; lattice crops differ from each other
    np.testing.assert_array_equal(many[0][2], many[1][2])
    assert not np.array_equal(many[0][1], many[1][1])
    assert not np.array_equal(many[0][2], many[2][2])
    assert all(n.shape == c.shape == (24, 24, 3) for _, n, c in many)
    # grid = draws = 1: the central crop, deterministic
    again = data.heldout("camera", 24)
    for (_, n1, c1), (_, n2, c2) in zip(one, again, strict=True):
        np.testing.assert_array_equal(n1, n2)
        np.testing.assert_array_equal(c1, c2)


def _cli_config(stage, **kw):
    c = ttaid_config.get_config()
    c.stage = stage
    c.data.crop = 16
    c.model.update(
        {"features": 4, "scale_step": 2, "body_blocks": 0, "head_blocks": 1, "mask_blocks": 0}
    )
    c.meta.inner_steps = 2
    c.train.update(
        {
            "steps": 2,
            "batch_size": 8,
            "eval_every": 2 if stage == "meta_transfer" else 0,  # the held-out loss: once
            "checkpoint_every": 2,
            "eval_batches": 1,
            "log_every": 1,
            "async_checkpoints": False,
        }
    )
    c.eval.update({"size": 24, "families": "gaussian,camera"})
    c.tta.update({"tile": 16, "overlap": 4, "lr": 1e-3})
    for k, v in kw.items():
        c[k] = v
    return c


def _params(workdir):
    return jax.tree.leaves(ckpt_lib.newest_params(str(workdir), "init_from")[0])


_CACHE_FLAGS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """The chain: pretrain; meta_aux straight, and stopped after 1 step + resumed; meta_transfer
    from meta_aux (2 steps each). Runs of one stage compile the same programs: a persistent
    compilation cache for this fixture only (restored afterwards) compiles them once."""
    from jax._src import compilation_cache  # reset: the cache reads its config once

    root = tmp_path_factory.mktemp("ttaid")
    saved = {n: getattr(jax.config, n) for n in _CACHE_FLAGS}
    for n, v in zip(_CACHE_FLAGS, (str(root / "jax_cache"), 0.0, 0), strict=True):
        jax.config.update(n, v)
    compilation_cache.reset_cache()
    try:
        avjax_main.run(_cli_config("pretrain"), str(root / "pretrain"), "train")
        avjax_main.run(_cli_config("meta_aux"), str(root / "meta_aux"), "train")
        resumed = str(root / "resumed")
        assert avjax_main.run(_cli_config("meta_aux"), resumed, "train", stop_after=1)["step"] == 1
        avjax_main.run(_cli_config("meta_aux"), resumed, "train")  # resumes at 1
        mt = _cli_config("meta_transfer", init_from=str(root / "meta_aux"))
        avjax_main.run(mt, str(root / "meta_transfer"), "train")
        yield root
    finally:
        for n, v in saved.items():
            jax.config.update(n, v)
        compilation_cache.reset_cache()


def test_stages_resume_exactly_and_chain(stages):
    for a, b in zip(_params(stages / "meta_aux"), _params(stages / "resumed"), strict=True):
        np.testing.assert_array_equal(a, b)
    # stage 2 started from stage 1's params: the body moved on from them, but not far
    first, second = _params(stages / "meta_aux"), _params(stages / "meta_transfer")
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    # 2 Adam steps of lr <= 1e-3 move every parameter by less than ~2e-3
    assert max(float(np.abs(a - b).max()) for a, b in zip(first, second, strict=True)) < 0.01
    with open(stages / "meta_transfer" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert any("inner_last" in r for r in rows) and any("eval_loss" in r for r in rows)
    assert all(0.0 < r["mask_mean"] < 1.0 for r in rows if "mask_mean" in r)


def test_cli_sample_and_eval_report(stages, tmp_path):
    from PIL import Image

    img = (np.random.default_rng(0).random((20, 28, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "photo.png")
    mt = stages / "meta_transfer"
    sample_cfg = _cli_config("meta_transfer")
    sample_cfg.sample.image = str(tmp_path / "photo.png")
    out = avjax_main.run(sample_cfg, str(mt), "sample")
    side = Image.open(os.path.join(out["out_dir"], "photo_side.png"))
    assert side.size == (28 * 3, 20)  # noisy | no adaptation | adapted (clean unknown)
    assert os.path.exists(os.path.join(out["out_dir"], "photo_denoised.png"))
    eval_cfg = _cli_config(
        "meta_transfer",
        eval=ml_collections.ConfigDict(
            {
                "size": 24,
                "grid": 2,
                "draws": 1,
                "families": "gaussian,camera",
                "compare": f"pretrain={stages / 'pretrain'}",
            }
        ),
    )
    summary = avjax_main.run(eval_cfg, str(mt), "eval")
    assert np.isfinite(summary["camera/psnr_adapted"]) and "eval_loss" in summary
    with open(summary["report"].replace(".md", ".json")) as f:
        rows = json.load(f)
    assert {(r["run"], r["noise"]) for r in rows} == {
        (run, fam) for run in ("meta_transfer", "pretrain") for fam in ("gaussian", "camera")
    }
    assert all(r["psnr_noisy"] < 40 for r in rows)
    assert all(r["images"] == 3 * 4 and len(r["gain_by_image"]) == 3 for r in rows)
    for r in rows:  # the mean gain is the mean of the photographs' (equal-sized) means
        assert r["psnr_gain"] == pytest.approx(np.mean(list(r["gain_by_image"].values())))
        assert r["psnr_gain"] == pytest.approx(r["psnr_adapted"] - r["psnr_plain"], abs=1e-9)
        assert np.isfinite(r["psnr_gain_se"]) and np.isfinite(r["psnr_gain_se_images"])
