"""Sync expert and LSE: the syncnet_python protocol on a constructed case with a known offset,
SyncNet's MFCC against python_speech_features, the SyncNet v2 importer against a PyTorch
module of the same architecture, the mel front-end against librosa, the pair sampler, and a
tiny train + `--mode=eval` through `avjax.main`."""

from __future__ import annotations

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from avjax.convert import syncnet as convert_syncnet
from avjax.eval import lse
from avjax.models import syncnet as syncnet_lib
from avjax.nn.syncnet import SyncNetV2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- LSE protocol --------------------------------------------------------------------------------


def _torch_reference(video: np.ndarray, audio: np.ndarray, vshift: int) -> dict[str, float]:
    """syncnet_python's calc_pdist + scoring, written with torch ops."""
    v, a = torch.from_numpy(video).double(), torch.from_numpy(audio).double()
    ap = torch.nn.functional.pad(a, (0, 0, vshift, vshift))
    win = 2 * vshift + 1
    dists = [
        torch.nn.functional.pairwise_distance(v[[i], :].repeat(win, 1), ap[i : i + win, :])
        for i in range(len(v))
    ]
    mdist = torch.mean(torch.stack(dists, 1), 1)
    minval, minidx = torch.min(mdist, 0)
    return {
        "lse_d": float(minval),
        "lse_c": float(torch.median(mdist) - minval),
        "offset": int(vshift - minidx),
    }


@pytest.mark.parametrize("delay", [-4, 0, 3])
def test_lse_recovers_a_known_offset(delay):
    """Audio lagging the video by `delay` frames: offset -delay (syncnet_python's sign), a
    clear confidence, and the same numbers as the torch formulation of the original."""
    rng = np.random.default_rng(0)
    n, dim = 40, 16
    content = rng.standard_normal((n + 20, dim))
    video = content[10 : 10 + n]
    audio = content[10 - delay : 10 - delay + n] + 0.05 * rng.standard_normal((n, dim))
    dists = lse.offset_distances(video, audio)
    assert dists.shape == (n, 31)
    ours = lse.lse_from_distances(dists)
    assert ours["offset"] == -delay
    assert ours["lse_c"] > 2.0 and ours["lse_d"] < 1.0  # edge windows meet zero padding
    ref = _torch_reference(video, audio, 15)
    assert ours["offset"] == ref["offset"]
    np.testing.assert_allclose([ours["lse_d"], ours["lse_c"]], [ref["lse_d"], ref["lse_c"]], 1e-6)


def test_lse_windows_and_short_clip():
    assert lse.num_windows(50, 50 * 640) == 45
    assert lse.num_windows(50, 30 * 640 + 639) == 25
    calls = []

    def emb(s, e):
        calls.append((s, e))
        return np.ones((e - s, 3))

    out = lse.lse(emb, emb, 12, 12 * 640, batch=4)
    assert out["windows"] == 7 and calls[:2] == [(0, 4), (4, 7)]
    with pytest.raises(ValueError, match="too short"):
        lse.lse(emb, emb, 5, 5 * 640)


def test_syncnet_mfcc_matches_python_speech_features():
    psf = pytest.importorskip("python_speech_features")
    wav = np.random.default_rng(1).standard_normal(16000 + 321) * 3000.0
    ref = np.asarray(psf.mfcc(wav, 16000)).T
    ours = lse.syncnet_mfcc(wav)
    assert ours.shape == ref.shape == (13, 101)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


# --- SyncNet v2 importer --------------------------------------------------------------------


def _bn_relu(module: tnn.Module, ch: int, dim: int) -> list[tnn.Module]:
    bn = {1: tnn.BatchNorm1d, 2: tnn.BatchNorm2d, 3: tnn.BatchNorm3d}[dim](ch)
    return [module, bn, tnn.ReLU()]


class TorchSyncNetV2(tnn.Module):
    """The architecture of syncnet_python's `S` (module names and Sequential indices)."""

    def __init__(self):
        super().__init__()
        c2, c3, mp2, mp3 = tnn.Conv2d, tnn.Conv3d, tnn.MaxPool2d, tnn.MaxPool3d
        self.netcnnaud = tnn.Sequential(
            *_bn_relu(c2(1, 64, 3, 1, 1), 64, 2), mp2(1, 1),
            *_bn_relu(c2(64, 192, 3, 1, 1), 192, 2), mp2(3, (1, 2)),
            *_bn_relu(c2(192, 384, 3, padding=1), 384, 2),
            *_bn_relu(c2(384, 256, 3, padding=1), 256, 2),
            *_bn_relu(c2(256, 256, 3, padding=1), 256, 2), mp2(3, 2),
            *_bn_relu(c2(256, 512, (5, 4)), 512, 2),
        )  # fmt: skip
        self.netcnnlip = tnn.Sequential(
            *_bn_relu(c3(3, 96, (5, 7, 7), (1, 2, 2)), 96, 3), mp3((1, 3, 3), (1, 2, 2)),
            *_bn_relu(c3(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), 256, 3),
            mp3((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            *_bn_relu(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, 3),
            *_bn_relu(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, 3),
            *_bn_relu(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, 3),
            mp3((1, 3, 3), (1, 2, 2)),
            *_bn_relu(c3(256, 512, (1, 6, 6)), 512, 3),
        )  # fmt: skip
        for name in ("netfcaud", "netfclip"):
            fc = [*_bn_relu(tnn.Linear(512, 512), 512, 1), tnn.Linear(512, 1024)]
            setattr(self, name, tnn.Sequential(*fc))

    def forward(self, lips, mfcc):
        a = self.netfcaud(self.netcnnaud(mfcc).flatten(1))
        v = self.netfclip(self.netcnnlip(lips).flatten(1))
        return v, a


def test_syncnet_v2_import_round_trip(tmp_path):
    torch.manual_seed(0)
    net = TorchSyncNetV2().eval()
    with torch.no_grad():  # non-trivial batch statistics
        for m in net.modules():
            if isinstance(m, tnn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    state = {**net.state_dict(), "extra.head.weight": torch.zeros(2)}
    path = tmp_path / "syncnet_v2.model"
    torch.save(state, path)
    variables, report = convert_syncnet.load_syncnet_v2(path)
    assert report == {"unmapped": ["extra.head.weight"], "missing": []}

    rng = np.random.default_rng(0)
    lips = rng.uniform(0, 255, (1, 5, 224, 224, 3)).astype(np.float32)
    mfcc = rng.standard_normal((1, 13, 20)).astype(np.float32) * 10
    v, a = SyncNetV2().apply(variables, jnp.asarray(lips), jnp.asarray(mfcc))
    with torch.no_grad():
        tv, ta = net(torch.from_numpy(lips).permute(0, 4, 1, 2, 3), torch.from_numpy(mfcc)[:, None])
    np.testing.assert_allclose(np.asarray(a), ta.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(np.asarray(v), tv.numpy(), rtol=2e-3, atol=2e-3)

    bad = dict(state)
    bad["netfclip.3.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="netfclip.3.weight"):
        convert_syncnet.convert_state_dict(bad)
    with pytest.raises(ValueError, match="lack"):
        convert_syncnet.convert_state_dict({"netfclip.3.bias": torch.zeros(1024)})
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        convert_syncnet.load_syncnet_v2(tmp_path / "absent.model")


# --- the expert's inputs ------------------------------------------------------------------------


def test_wav2lip_mel_matches_librosa():
    librosa = pytest.importorskip("librosa")
    from scipy.signal import lfilter

    wav = np.random.default_rng(2).standard_normal(6400).astype(np.float32) * 0.1
    d = librosa.stft(lfilter([1, -0.97], [1], wav), n_fft=800, hop_length=200, pad_mode="reflect")
    mel = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600) @ np.abs(d)
    db = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    ref = np.clip(8 * (db + 100) / 100 - 4, -4, 4).T
    ours = np.asarray(syncnet_lib.wav2lip_mel(jnp.asarray(wav[None])))[0]
    assert ours.shape == ref.shape == (33, 80)
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_sample_pairs():
    v, a, label = syncnet_lib.sample_pairs(jax.random.key(0), 512, 40, 2, 15)
    v, a, label = np.asarray(v), np.asarray(a), np.asarray(label)
    assert 0.4 < label.mean() < 0.6
    assert (v[label == 1] == a[label == 1]).all()
    shift = np.abs(v - a)[label == 0]
    assert shift.min() >= 2 and shift.max() <= 15
    assert v.min() >= 0 and max(v.max(), a.max()) <= 40 - 6 and a.min() >= 0
    # LRW-length clips (29 frames) cannot hold shifts of 15 both ways: refused, not clamped.
    with pytest.raises(ValueError, match=r"model.max_shift=15: need >= 36 frames .* <= 11"):
        syncnet_lib.sample_pairs(jax.random.key(0), 8, 29, 1, 15)


def test_offset_windows_and_loss():
    v, a = syncnet_lib.sample_offset_windows(jax.random.key(0), 256, 40, 7)
    v, a = np.asarray(v), np.asarray(a)
    assert a.shape == (256, 15) and (a[:, 7] == v).all() and (np.diff(a, axis=1) == 1).all()
    assert a.min() >= 0 and a.max() <= 40 - 6
    with pytest.raises(ValueError, match="need >= 22 frames"):
        syncnet_lib.sample_offset_windows(jax.random.key(0), 4, 20, 8)
    face = jax.random.normal(jax.random.key(1), (4, 8))
    face = face / jnp.linalg.norm(face, axis=-1, keepdims=True)
    others = jnp.broadcast_to(-face[:, None], (4, 5, 8)).at[:, 2].set(face)
    ce, correct = syncnet_lib.offset_loss(jnp.float32(1.0), face, others)
    np.testing.assert_allclose(ce, np.log1p(4 * np.exp(-2.0)), rtol=1e-5)
    assert (np.asarray(correct) == 1).all()
    # A constant added to every candidate's logit changes nothing (what the clip shares).
    _, wrong = syncnet_lib.offset_loss(jnp.float32(10.0), face, others[:, ::-1][:, [0, 1, 3, 2, 4]])
    assert (np.asarray(wrong) == 0).all()


def test_centred_expert_ignores_the_static_face_and_loudness():
    from avjax.nn.syncnet import centre_frames

    cfg = _config().model
    cfg.update(centre=True, head="linear")
    model = syncnet_lib.sync_expert(cfg)
    faces = jax.random.uniform(jax.random.key(0), (2, 16, 32, 15))
    mel = jax.random.normal(jax.random.key(1), (2, 80, 16))
    params = jax.jit(model.init)(jax.random.key(2), faces, mel)
    apply = jax.jit(model.apply)  # one compile for both calls (op by op is far slower)
    logit, fe, ae = apply(params, faces, mel)
    assert logit.shape == (2,) and fe.shape == ae.shape == (2, 4 * cfg.width)  # shallow: 4 w
    assert float(jnp.min(fe)) < 0.0  # signed embeddings (no ReLU on the last layer)
    still = jnp.tile(jax.random.uniform(jax.random.key(3), (2, 16, 32, 3)), (1, 1, 1, 5))
    np.testing.assert_allclose(centre_frames(faces + still, 3), centre_frames(faces, 3), atol=1e-6)
    logit2, _, _ = apply(params, faces + still, mel + 3.0)
    np.testing.assert_allclose(logit2, logit, atol=1e-4)
    # The offset softmax's logits: each candidate scored as a pair would be.
    other = jax.random.normal(jax.random.key(4), (2, 80, 16))
    cands = jax.jit(functools.partial(model.apply, method="candidate_logits"))
    both = cands(params, faces, jnp.stack([other, mel], axis=1))
    assert both.shape == (2, 2)
    np.testing.assert_allclose(both[:, 1], logit, atol=1e-4)
    np.testing.assert_allclose(both[:, 0], apply(params, faces, other)[0], atol=1e-4)


# --- the CLI ---------------------------------------------------------------------------------


def _config():
    spec = importlib.util.spec_from_file_location("_cfg_syncnet", f"{REPO}/configs/syncnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.data.procedural.update(identities=6, heldout_identities=2, train_clips=16, eval_clips=8)
    c.data.update(num_frames=40, crop_size=32)
    c.model.update(face_size=32, width=4)
    c.train.update(steps=4, batch_size=8, log_every=2, eval_every=4, checkpoint_every=4)
    c.train.update(warmup_steps=1, async_checkpoints=False)
    c.sync_eval.update(repeats=1, clips=2, offset_clips=1, max_offset=2)
    return c


def test_cli_train_then_eval(tmp_path):
    from avjax import main

    config, workdir = _config(), str(tmp_path / "w")
    assert main.run(config, workdir, "train")["step"] == 4
    out = main.run(_config(), workdir, "eval")
    assert out["step"] == 4
    assert 0.0 <= out["sync/accuracy"] <= 1.0
    assert np.isfinite(out["eval_loss"])
    assert out["sync/offset_trials"] == 5
    for k in ("insync_lse_d", "insync_lse_c", "shifted_lse_d", "shifted_lse_c"):
        assert np.isfinite(out[f"sync/{k}"]) and out[f"sync/{k}"] >= 0.0, k
    assert 0.0 <= out["sync/offset_exact"] <= out["sync/offset_within_1"] <= 1.0
