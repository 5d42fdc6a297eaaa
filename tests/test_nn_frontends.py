"""Lip-reading front-ends and back-ends (`avjax.nn.resnet`, `audio_front`, `temporal`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from avjax.nn.audio_front import AudioFrontend
from avjax.nn.resnet import VisualFrontend
from avjax.nn.temporal import MSTCN, BiGRU
from avjax.train.sharding import make_mesh

TINY = {"stem_features": 4, "widths": (4, 8, 8, 16), "blocks": (1, 1, 1, 1)}


def _jit_apply(model: nn.Module):
    return jax.jit(model.apply, static_argnames=("train", "mutable"))


def _video(seed: int, b: int = 8, t: int = 3, s: int = 24) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (b, t, s, s, 1))


@pytest.fixture(scope="module")
def visual():
    model = VisualFrontend(**TINY)
    variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False))(
        _video(0)
    )
    return model, nn.unbox(variables)


def test_visual_frontend_shapes_and_torch_layout(visual):
    model, variables = visual
    out = _jit_apply(model)(variables, _video(1), train=False)
    assert out.shape == (8, 3, 16)
    assert variables["params"]["stem"]["kernel"].shape == (5, 7, 7, 1, 4)
    # The paper's size: 112 x 112 frames -> 512 per frame; the ResNet-18 trunk has exactly
    # torchvision's resnet18 parameters less conv1, bn1 and fc (11,166,976), PReLUs aside.
    paper = VisualFrontend()
    shapes = jax.eval_shape(lambda: paper.init(jax.random.key(0), jnp.zeros((1, 2, 112, 112, 1))))
    assert jax.eval_shape(paper.apply, shapes, jnp.zeros((1, 2, 112, 112, 1))).shape == (1, 2, 512)
    flat = jax.tree_util.tree_leaves_with_path(nn.unbox(shapes["params"]["trunk"]))
    count = sum(int(np.prod(v.shape)) for k, v in flat if "a_param" not in jax.tree_util.keystr(k))
    assert count == 11_166_976
    assert "batch_stats" in variables


def test_batch_norm_train_uses_the_batch_and_eval_the_running_stats(visual):
    model, variables = visual
    apply = _jit_apply(model)
    x = _video(2) * 3.0 + 1.0
    out, updated = apply(variables, x, train=True, mutable=("batch_stats",))
    # Training: statistics from the batch -> an example's output depends on the others.
    out_other, _ = apply(variables, x.at[4:].set(0.0), train=True, mutable=("batch_stats",))
    assert not np.allclose(out[:4], out_other[:4], atol=1e-4)
    # The running mean moved 10 % towards the batch mean (PyTorch momentum 0.1).
    mean = updated["batch_stats"]["stem_bn"]["mean"]
    assert np.abs(mean).max() > 1e-3
    # Eval: running statistics -> examples independent, and the updated stats change output.
    ev = apply(variables, x, train=False)
    ev_other = apply(variables, x.at[4:].set(0.0), train=False)
    np.testing.assert_allclose(ev[:4], ev_other[:4], atol=1e-5)
    ev2 = apply({**variables, **updated}, x, train=False)
    assert not np.allclose(ev, ev2, atol=1e-4)


def test_batch_norm_statistics_are_global_under_data_sharding(visual):
    model, variables = visual
    x = _video(3)
    step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    want_out, want_stats = step(variables, x)
    mesh = make_mesh({"data": 8, "fsdp": 1, "sequence": 1, "tensor": 1})
    with jax.set_mesh(mesh), nn.logical_axis_rules([("batch", "data"), ("frames", None)]):
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        got_out, got_stats = step(variables, xs)
    assert got_out.sharding.spec[0] == "data"
    np.testing.assert_allclose(got_out, want_out, atol=2e-5)
    for a, b in zip(jax.tree.leaves(got_stats), jax.tree.leaves(want_stats), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_audio_frontend_pools_to_the_video_rate():
    model = AudioFrontend(channels=(4, 8), dim=12)
    mel = jax.random.normal(jax.random.key(0), (2, 4 * 5, 16))
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(1, impl="rbg"), mel))
    apply = _jit_apply(model)
    out, _ = apply(variables, mel, train=True, mutable=("batch_stats",))
    assert out.shape == (2, 5, 12)
    assert variables["params"]["proj"]["kernel"].shape == (4 * 8, 12)
    # Causality in time is not claimed, but frames far apart are independent (receptive field).
    mel2 = mel.at[:, -4:].set(0.0)
    a, b = (apply(variables, m, train=False) for m in (mel, mel2))
    np.testing.assert_allclose(a[:, :2], b[:, :2], atol=1e-6)
    assert not np.allclose(a[:, -1], b[:, -1])
    with pytest.raises(ValueError, match="multiples|\\* 4"):
        model.apply(variables, mel[:, :-1], train=False)


def _torch_gru_from_flax(params: dict, dim: int, hidden: int, layers: int) -> torch.nn.GRU:
    """A `torch.nn.GRU(bidirectional=True)` with the flax BiGRU's weights copied in."""
    gru = torch.nn.GRU(dim, hidden, layers, batch_first=True, bidirectional=True)
    for layer in range(layers):
        for suffix, key in (("", f"layer{layer}_fwd"), ("_reverse", f"layer{layer}_bwd")):
            cell = params[key]
            w = lambda n, c=cell: np.asarray(c[n]["kernel"]).T  # noqa: E731
            b = lambda n, c=cell: np.asarray(c[n]["bias"])  # noqa: E731
            zeros = np.zeros(hidden, np.float32)
            tensors = {
                f"weight_ih_l{layer}{suffix}": np.concatenate([w("ir"), w("iz"), w("in")]),
                f"weight_hh_l{layer}{suffix}": np.concatenate([w("hr"), w("hz"), w("hn")]),
                f"bias_ih_l{layer}{suffix}": np.concatenate([b("ir"), b("iz"), b("in")]),
                f"bias_hh_l{layer}{suffix}": np.concatenate([zeros, zeros, b("hn")]),
            }
            for name, value in tensors.items():
                getattr(gru, name).data = torch.from_numpy(np.ascontiguousarray(value))
    return gru


def test_bigru_matches_torch_gru_and_reverses_within_valid_lengths():
    dim, hidden, layers = 6, 5, 2
    model = BiGRU(hidden=hidden, layers=layers)
    x = jax.random.normal(jax.random.key(0), (3, 7, dim))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1, impl="rbg"), x))["params"]
    apply = jax.jit(model.apply)
    got = np.asarray(apply({"params": params}, x))
    assert got.shape == (3, 7, 2 * hidden)
    gru = _torch_gru_from_flax(params, dim, hidden, layers)
    with torch.no_grad():
        want = gru(torch.tensor(np.asarray(x)))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # One layer: the backward half at frame 0 sees the last frame, the forward half does not.
    first = {k: v for k, v in params.items() if k.startswith("layer0")}
    one = jax.jit(BiGRU(hidden=hidden, layers=1).apply)
    a, b = (np.asarray(one({"params": first}, v)) for v in (x, x.at[:, -1].add(1.0)))
    assert not np.allclose(a[:, 0, hidden:], b[:, 0, hidden:])
    np.testing.assert_allclose(a[:, :-1, :hidden], b[:, :-1, :hidden], atol=1e-6)
    # ... and with lengths it starts at each clip's last valid frame: padding never leaks.
    lengths = jnp.array([7, 4, 2])
    masked = np.asarray(apply({"params": params}, x, lengths))
    for i, n in enumerate([7, 4, 2]):
        with torch.no_grad():
            ref = gru(torch.tensor(np.asarray(x[i : i + 1, :n])))[0].numpy()[0]
        np.testing.assert_allclose(masked[i, :n], ref, atol=1e-5)


def test_mstcn_shapes_and_padding_does_not_leak():
    model = MSTCN(widths=(6, 9), kernels=(3, 5, 7), dropout=0.1)
    x = jax.random.normal(jax.random.key(0), (2, 10, 4))
    lengths = jnp.array([10, 6])
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(1, impl="rbg"), x, lengths))
    apply = _jit_apply(model)
    out, _ = apply(
        variables,
        x,
        lengths,
        train=True,
        mutable=("batch_stats",),
        rngs={"dropout": jax.random.key(2, impl="rbg")},
    )
    assert out.shape == (2, 10, 9)
    ev = apply(variables, x, lengths, train=False)
    ev2 = apply(variables, x.at[1, 6:].set(100.0), lengths, train=False)
    np.testing.assert_allclose(ev[1, :6], ev2[1, :6], atol=1e-5)
    np.testing.assert_array_equal(ev2[1, 6:], 0.0)
