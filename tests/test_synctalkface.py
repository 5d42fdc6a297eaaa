"""SyncTalkFace: the Wav2Lip-style networks (shapes, per-frame lip context, U-Net skips at
every scale), the training windows (masks, reference distance, mel alignment), and tiny CLI
runs through `avjax.main`: a 1-step sync expert, then SyncTalkFace trained with both GAN
optimizers straight and resumed from its step-1 checkpoint (equal states) -> eval (PSNR /
SSIM / LSE, contact sheet) -> sample (an MP4 with an audio stream and a side-by-side)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_settings import cheap_compiles

from avjax.data.video import av_corpus
from avjax.nn import wav2lip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 32  # face size in the network tests
S_CLI = 16  # face size in the CLI runs (the smallest SSIM takes: its window is 11)


def _init_apply(module, *args):
    """Variables and output shapes, traced only (no compile: shapes are all we check)."""

    def run(*args):
        variables = module.init(jax.random.key(0), *args)
        return variables, module.apply(variables, *args)

    return jax.eval_shape(run, *args)


def test_stage_widths():
    assert wav2lip.stage_widths(128, 16, 512) == [16, 32, 64, 128, 256, 512, 512]
    assert wav2lip.stage_widths(32, 4, 16) == [4, 8, 16, 16, 16]
    with pytest.raises(ValueError, match="power of two"):
        wav2lip.stage_widths(96, 16, 512)


def test_encoder_and_discriminator_shapes():
    x = jnp.ones((2, S, S, 6))
    _, feats = _init_apply(wav2lip.IdentityEncoder(base=4, max_width=16, bottleneck=24), x)
    assert [f.shape for f in feats] == [
        (2, 32, 32, 4),
        (2, 16, 16, 8),
        (2, 8, 8, 16),
        (2, 4, 4, 16),
        (2, 2, 2, 16),
        (2, 1, 1, 24),
    ]
    _, a = _init_apply(wav2lip.AudioEncoder(base=4, dim=24), jnp.ones((3, 80, 16, 1)))
    assert a.shape == (3, 24)
    _, lip = _init_apply(
        wav2lip.LipEncoder(base=4, max_width=16, dim=24), jnp.ones((2, 5, S, S, 3))
    )
    assert lip.shape == (2, 5, 24)
    _, d = _init_apply(
        wav2lip.QualityDiscriminator(base=4, max_width=16), jnp.ones((3, S // 2, S, 3))
    )
    assert d.shape == (3,)
    with pytest.raises(ValueError, match="80, 16"):
        _init_apply(wav2lip.AudioEncoder(base=4, dim=8), jnp.ones((1, 80, 12, 1)))


def test_lip_encoder_is_per_frame_over_five_frame_context():
    """Frame t's feature depends on frames t-2..t+2 only (Conv3d with kernel 5 in time)."""
    enc = wav2lip.LipEncoder(base=4, max_width=8, dim=8)
    x = jax.random.normal(jax.random.key(1), (1, 7, 16, 16, 3))

    @jax.jit
    def grad_of_first_frame(x):
        v = enc.init(jax.random.key(0), x)
        return jax.grad(lambda x: enc.apply(v, x)[0, 0].sum())(x)

    per_frame = np.abs(np.asarray(grad_of_first_frame(x))).sum(axis=(0, 2, 3, 4))
    assert (per_frame[:3] > 0).all() and (per_frame[3:] == 0).all()


def test_decoder_skips_connect_at_every_scale():
    """The output depends on the identity input through each skip scale (and the code)."""
    enc = wav2lip.IdentityEncoder(base=4, max_width=8, bottleneck=8)
    dec = wav2lip.FaceDecoder(max_width=8)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 6))
    code = jax.random.normal(jax.random.key(2), (2, 12))

    @jax.jit
    def run(x, code):  # one compiled program: init, forward and every gradient
        ve = enc.init(jax.random.key(0), x)
        skips = enc.apply(ve, x)
        vd = dec.init(jax.random.key(3), code, skips)

        def total(code, skips):
            return jnp.sum(dec.apply(vd, code, skips) ** 2)

        g_code, g_skips = jax.grad(total, argnums=(0, 1))(code, skips)
        g_x = jax.grad(lambda x: total(code, enc.apply(ve, x)))(x)
        return dec.apply(vd, code, skips), g_code, g_skips, g_x

    out, g_code, g_skips, g_x = run(x, code)
    assert out.shape == (2, 16, 16, 3) and float(jnp.max(jnp.abs(out))) < 1.0
    assert float(jnp.abs(g_code).sum()) > 0 and float(jnp.abs(g_x).sum()) > 0
    assert len(g_skips) == 5  # 16, 8, 4, 2 and the 1 x 1 bottleneck
    for i, g in enumerate(g_skips):
        assert float(jnp.abs(g).sum()) > 0, f"skip {i} ({g.shape}) does not reach the output"


# --- the task end to end ------------------------------------------------------------------------


def _load_config(name: str, arg: str = ""):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", f"{REPO}/configs/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _tiny_data(c, cache: str) -> None:
    c.data.update(name="synthetic", view="lrw", cache_dir=cache, num_frames=29)
    c.data.update(image_size=S_CLI, crop_size=S_CLI, grayscale=False, hflip=0.0, read_threads=1)
    c.data.synthetic = dataclasses.asdict(av_corpus.TINY)


def _expert_config(cache: str):
    c = _load_config("syncnet")
    _tiny_data(c, cache)
    c.data.num_frames = 29
    c.model.update(face_size=S_CLI, width=4, max_shift=10)  # 29 frames hold shifts <= 11
    c.model.offset_radius = 0  # BCE only: one loss path less to compile
    c.train.update(steps=1, batch_size=8, log_every=1, eval_every=0, checkpoint_every=1)
    c.train.update(warmup_steps=0, async_checkpoints=False)
    return c


def _stf_config(cache: str, expert: str, steps: int = 2):
    c = _load_config("synctalkface")
    _tiny_data(c, cache)
    c.model.update(id_base=2, max_width=8, dim=8, audio_base=2, lip_base=2, disc_base=2)
    c.model.update(residual=0, num_slots=4, norm_groups=2, sync_expert_workdir=expert)
    c.train.update(steps=steps, batch_size=8, log_every=1, eval_every=0, checkpoint_every=100)
    c.train.update(warmup_steps=0, async_checkpoints=False)
    c.stf_eval.clips = 2
    return c


def _state(workdir: str):
    import orbax.checkpoint as ocp

    from avjax.train import checkpoint as ckpt_lib

    step = ckpt_lib.latest_step(workdir)
    return step, ocp.StandardCheckpointer().restore(
        ckpt_lib.checkpoint_dir(workdir) / str(step) / "state"
    )


@pytest.fixture(scope="module", autouse=True)
def _cheap_compiles(tmp_path_factory):
    """Compiling dominates this module: `compile_settings.cheap_compiles` for it only."""
    with cheap_compiles(str(tmp_path_factory.mktemp("jax_cache"))):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny sync expert (1 step), then SyncTalkFace straight for 2 steps (checkpoints at 1
    and 2), and a copy of its step-1 checkpoint resumed to 2, as after a stop at step 1:
    `(cache, expert workdir, straight workdir, resumed workdir)`."""
    from avjax import main
    from avjax.train import checkpoint as ckpt_lib

    root = tmp_path_factory.mktemp("stf")
    cache, expert = str(root / "cache"), str(root / "expert")
    assert main.run(_expert_config(cache), expert, "train")["step"] == 1
    straight, resumed = root / "straight", root / "resumed"
    c = _stf_config(cache, expert)
    c.train.update(checkpoint_every=1, keep_checkpoints=2)
    assert main.run(c, str(straight), "train")["step"] == 2
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "2")
    assert ckpt_lib.latest_step(resumed) == 1  # the resumed run restores step 1's state
    assert main.run(c, str(resumed), "train")["step"] == 2
    return cache, expert, str(straight), str(resumed)


def test_resume_restores_both_optimizers_exactly(trained):
    _, _, straight, resumed = trained
    (step_a, a), (step_b, b) = _state(straight), _state(resumed)
    assert step_a == step_b == 2
    assert set(a["opt_state"]) == {"generator", "discriminator"}
    assert set(a["params"]) == {"generator", "discriminator"}
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for (path, x), y in zip(la, lb, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_eval_and_sample(trained, tmp_path):
    from avjax import main
    from avjax.data.audio import write_wav
    from avjax.data.video import io as vio

    cache, expert, straight, _ = trained
    out = main.run(_stf_config(cache, expert), straight, "eval")
    assert out["step"] == 2 and out["stf/clips"] == 2
    assert 0 < out["stf/psnr"] < 60 and -1 <= out["stf/ssim"] <= 1
    for k in ("gen_lse_c", "gen_lse_d", "real_lse_c", "real_lse_d"):
        assert np.isfinite(out[f"stf/{k}"]), k
    assert os.path.getsize(out["stf/contact_sheet"]) > 0
    assert np.isfinite(out["eval_loss"])

    wav = str(tmp_path / "speech.wav")
    # 29 frames of audio: the held-out clips' length, so sampling reuses eval's compiled
    # generator (same shapes) from the compilation cache.
    t = np.arange(29 * 640) / 16000.0
    write_wav(wav, (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 3 * t) > 0)))
    face = str(tmp_path / "face.png")
    from PIL import Image

    Image.fromarray(np.full((48, 48, 3), 128, np.uint8)).save(face)
    c = _stf_config(cache, expert)
    c.sample.update(audio=wav, video=face)
    res = main.run(c, straight, "sample")
    assert res["frames"] == 29
    frames, audio, info = vio.read_video(res["video"])
    assert frames.shape[1:] == (S_CLI, S_CLI, 3) and abs(len(frames) - 29) <= 1
    assert len(audio) > 15000 and np.abs(audio).max() > 0.05  # the audio stream is muxed in
    side = vio.read_video(res["side_by_side"])[0]
    assert side.shape[2] > 2 * S_CLI


def test_windows_masks_and_mel_alignment():
    from avjax.models import synctalkface as stf
    from avjax.tasks import synctalkface as task_lib

    x = jnp.ones((2, 5, 8, 8, 3))
    assert float(stf.mask_lower_half(x)[..., 4:, :, :].sum()) == 0
    assert float(stf.mask_lower_half(x)[..., :4, :, :].min()) == 1
    assert float(stf.mask_upper_half(x)[..., :4, :, :].sum()) == 0
    assert stf.lower_half(x).shape == (2, 5, 4, 8, 3)
    # Frame ids painted into the video: windows are 5 consecutive frames, the reference window
    # is >= 5 frames away, in the valid part of each clip.
    n, b = 29, 8
    video = np.broadcast_to(
        np.arange(n, dtype=np.uint8)[None, :, None, None, None], (b, n, 4, 4, 3)
    )
    length = np.array([29, 29, 14, 16, 29, 20, 29, 15], np.int32)  # >= 14: a far reference
    batch = {"video": video, "audio": np.zeros((b, n * 640), np.float32), "length": length}
    windows = jax.jit(task_lib.sample_windows)
    for seed in range(3):
        w = windows(jax.random.key(seed), batch)
        ids = np.round((np.asarray(w["faces"][:, :, 0, 0, 0]) + 1) * 127.5).astype(int)
        refs = np.round((np.asarray(w["reference"][:, :, 0, 0, 0]) + 1) * 127.5).astype(int)
        np.testing.assert_array_equal(np.diff(ids, axis=1), 1)
        assert (ids[:, -1] < length).all() and (refs[:, -1] < length).all()
        assert (np.abs(refs[:, 0] - ids[:, 0]) >= 5).all()
        assert w["mel"].shape == (b, 5, 80, 16) and w["sync_mel"].shape == (b, 80, 16)
    # A click at frame f is in the middle of frame f's mel window and at the start of the
    # sync window of a 5-frame window starting at f.
    audio = np.zeros((1, n * 640), np.float32)
    f = 10
    audio[0, f * 640 + 320 : f * 640 + 330] = 1.0

    @jax.jit
    def mels(audio, starts):
        mel = task_lib.padded_mel(audio)
        return task_lib.frame_mels(mel, starts), task_lib.window_mel(mel, starts)

    frame_win, sync_win = mels(jnp.asarray(audio), jnp.array([f]))
    assert 6 <= int(np.argmax(np.asarray(frame_win)[0, 0].mean(0))) <= 9  # of 16 steps
    assert int(np.argmax(np.asarray(sync_win)[0].mean(0))) <= 2
