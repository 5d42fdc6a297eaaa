"""Image data: noise families, the camera noise model, the photograph corpus, the real-noise
benchmark loaders (on fixtures written in each layout) and the TTAID data module."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from avjax.data.image import benchmarks, corpus, noise
from avjax.data.image.ttaid_data import TTAIDData


def _flat(v=0.5, size=64):
    return np.full((size, size, 3), v, np.float32)


def test_gaussian_and_speckle_sigma():
    rng = np.random.default_rng(0)
    g = noise.gaussian(_flat(), rng, sigma=20 / 255) - 0.5
    assert abs(g.std() - 20 / 255) < 0.01 and abs(g.mean()) < 0.01
    s_dark = noise.speckle(_flat(0.2), rng, sigma=0.1) - 0.2
    s_bright = noise.speckle(_flat(0.8), rng, sigma=0.1) - 0.8
    assert s_bright.std() > 3 * s_dark.std()  # multiplicative


def test_salt_pepper_and_synthetic():
    rng = np.random.default_rng(1)
    sp = noise.salt_pepper(_flat(), rng, amount=0.1)
    hit = np.any(sp != 0.5, axis=-1)
    assert 0.07 < hit.mean() < 0.13
    assert set(np.unique(sp[hit])) <= {0.0, 1.0}
    out = noise.synthetic(_flat(), np.random.default_rng(2))
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 0.01
    with pytest.raises(ValueError, match="noise family"):
        noise.apply("pink", _flat(), rng)


def test_camera_noise_is_signal_dependent_and_correlated():
    rng = np.random.default_rng(3)
    dark = noise.camera(_flat(0.15), rng, iso=1600, jpeg_quality=95) - 0.15
    bright = noise.camera(_flat(0.6), rng, iso=1600, jpeg_quality=95) - 0.6
    low_iso = noise.camera(_flat(0.6), rng, iso=100, jpeg_quality=95) - 0.6
    assert bright.std() > low_iso.std()  # more noise at higher ISO
    assert dark.std() != pytest.approx(bright.std(), rel=0.05)  # depends on the signal
    r = bright[..., 1] - bright[..., 1].mean()
    corr = np.mean(r[:, 1:] * r[:, :-1]) / np.mean(r * r)
    assert corr > 0.1  # demosaicking correlates neighbours; white noise would not
    img = corpus.center_crop(corpus.load("astronaut"), 64)
    cam = noise.camera(img, np.random.default_rng(4))
    assert cam.shape == img.shape and 0 < np.abs(cam - img).mean() < 0.2


def test_corpus_images_and_crops():
    img = corpus.load("camera")  # grey -> 3 channels
    assert img.shape == (512, 512, 3) and img.dtype == np.float32 and img.max() <= 1.0
    assert not set(corpus.TRAIN) & set(corpus.HELDOUT)
    c = corpus.random_crop(img, 32, np.random.default_rng(0))
    assert c.shape == (32, 32, 3)
    with pytest.raises(ValueError, match="smaller than the crop"):
        corpus.random_crop(img[:16], 32, np.random.default_rng(0))


def _png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def _rand(seed, h=16, w=16):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_sidd_small_fixture(tmp_path):
    root = tmp_path / "sidd"
    for i, scene in enumerate(["0001_001_S6_00100_00060_3200_L", "0002_001_S6_00100_00020_3200_N"]):
        d = root / "Data" / scene
        _png(str(d / "GT_SRGB_010.PNG"), _rand(i))
        _png(str(d / "NOISY_SRGB_010.PNG"), _rand(10 + i))
    pairs, skipped = benchmarks.load("sidd_small", str(root))
    assert len(pairs) == 2 and skipped == 0
    name, noisy, clean = pairs[0]
    assert name.endswith("NOISY_SRGB_010.PNG")
    np.testing.assert_array_equal(clean, _rand(0))
    np.testing.assert_array_equal(noisy, _rand(10))
    os.remove(root / "Data" / "0002_001_S6_00100_00020_3200_N" / "GT_SRGB_010.PNG")
    with pytest.raises(FileNotFoundError, match="GT_SRGB_010.PNG"):
        benchmarks.load("sidd_small", str(root))
    assert benchmarks.load("sidd_small", str(root), skip_bad=True)[1] == 1


def test_sidd_val_fixture(tmp_path):
    import scipy.io

    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
    clean = rng.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
    scipy.io.savemat(
        tmp_path / "ValidationNoisyBlocksSrgb.mat", {"ValidationNoisyBlocksSrgb": noisy}
    )
    scipy.io.savemat(tmp_path / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": clean})
    pairs, _ = benchmarks.load("sidd_val", str(tmp_path))
    assert len(pairs) == 6
    np.testing.assert_array_equal(pairs[4][1], noisy[1, 1])
    np.testing.assert_array_equal(pairs[4][2], clean[1, 1])


@pytest.mark.parametrize(
    "name,files",
    [
        ("polyu", ["Canon5D2_bag_real.JPG", "Canon5D2_bag_mean.JPG"]),
        ("nam", ["CC15/Canon_EOS_5D_ISO3200_C1_real.png", "CC15/Canon_EOS_5D_ISO3200_C1_mean.png"]),
    ],
)
def test_polyu_and_nam_fixtures(tmp_path, name, files):
    _png(str(tmp_path / files[0]), _rand(1))
    _png(str(tmp_path / files[1]), _rand(2))
    _png(str(tmp_path / files[0].replace("_real", "x_real")), _rand(3, 8, 8))  # shape mismatch
    _png(str(tmp_path / files[1].replace("_mean", "x_mean")), _rand(4))
    with pytest.raises(ValueError, match="x_real"):
        benchmarks.load(name, str(tmp_path))
    pairs, skipped = benchmarks.load(name, str(tmp_path), skip_bad=True)
    assert skipped == 1 and len(pairs) == 1 and pairs[0][1].shape == (16, 16, 3)
    if name == "nam":  # PNG is lossless
        np.testing.assert_array_equal(pairs[0][1], _rand(1))
    with pytest.raises(FileNotFoundError, match="manual_dir"):
        benchmarks.load(name, str(tmp_path / "missing"))


def _data_cfg(**kw):
    d = ml_collections.ConfigDict(
        {
            "name": "default",
            "manual_dir": "",
            "skip_bad": False,
            "heldout_fraction": 0.5,
            "crop": 16,
            "noise": "auto",
        }
    )
    d.update(kw)
    return d


def test_ttaid_data_module_is_deterministic():
    data = TTAIDData(_data_cfg(), stage="meta_transfer", seed=3, batch_size=4)
    facts = data.prepare()
    assert facts["noise"] == "camera" and facts["heldout_images"] == len(corpus.HELDOUT)
    it = iter(data.train_dataset(0, 2))
    b = next(it)
    assert b["noisy"].shape == (2, 16, 16, 3) and b["clean"].dtype == np.float32
    assert np.abs(b["noisy"] - b["clean"]).mean() > 1e-3
    again = next(iter(data.train_dataset(0, 2)))
    np.testing.assert_array_equal(b["noisy"], again["noisy"])
    other = next(iter(data.train_dataset(1, 2)))
    assert not np.array_equal(b["clean"], other["clean"])
    held = data.heldout("gaussian", 32)
    assert [h[0] for h in held] == list(corpus.HELDOUT) and held[0][1].shape == (32, 32, 3)
    assert data.eval_batches(0, 1)[0]["noisy"].shape == (4, 16, 16, 3)
    assert TTAIDData(_data_cfg(), stage="pretrain").noise_family == "synthetic"


def test_ttaid_data_from_benchmark(tmp_path):
    for i in range(4):
        _png(str(tmp_path / f"img{i}_real.png"), _rand(i, 20, 20))
        _png(str(tmp_path / f"img{i}_mean.png"), _rand(10 + i, 20, 20))
    data = TTAIDData(_data_cfg(name="nam", manual_dir=str(tmp_path)), batch_size=2)
    assert data.prepare()["train_images"] == 2
    b = next(iter(data.train_dataset(0, 1)))
    assert b["noisy"].shape == (2, 16, 16, 3)
    held = data.heldout("camera", 16)
    np.testing.assert_allclose(
        held[0][1] * 255, corpus.center_crop(_rand(2, 20, 20), 16), atol=1e-3
    )
