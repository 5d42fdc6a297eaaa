"""The mesh data: analytic head, embedded corpus, VOCASET layout + restricted unpickler, data
module windows and representation round trip."""

import os
import pickle

import ml_collections
import numpy as np
import pytest

from avjax.data.mesh import corpus as corpus_lib
from avjax.data.mesh import head as head_lib
from avjax.data.mesh import vocaset
from avjax.data.mesh.mesh_data import MeshData


def test_head_bases_move_the_right_parts():
    h = head_lib.build_head()
    assert 2000 <= h.num_vertices <= 6000 and h.faces.max() == h.num_vertices - 1
    t = np.zeros((1, len(head_lib.EXPRESSION_NAMES)), np.float32)
    jaw = t.copy()
    jaw[0, 0] = 1.0
    v0 = head_lib.vertices(h, np.zeros(head_lib.NUM_IDENTITY), t)[0]
    v1 = head_lib.vertices(h, np.zeros(head_lib.NUM_IDENTITY), jaw)[0]
    gap = lambda v: np.linalg.norm(v[h.upper_lip] - v[h.lower_lip])  # noqa: E731
    assert gap(v1) > gap(v0) + 0.1  # the jaw opens the mouth
    assert np.abs(v1[h.upper_face] - v0[h.upper_face]).max() < 1e-3  # and not the brow
    pose = np.array([[0.3, -0.2, 0.1, 0.05, 0.0, 0.0]], np.float32)
    vp = head_lib.vertices(h, np.zeros(head_lib.NUM_IDENTITY), t, pose)[0]
    d = lambda v: np.linalg.norm(v[:100] - v[100:200], axis=-1)  # noqa: E731
    np.testing.assert_allclose(d(vp), d(v0), atol=1e-5)  # pose is rigid


def test_restricted_unpickler_admits_arrays_and_refuses_code(tmp_path):
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps({"a": [np.arange(3), (1, "x")], "b": np.float32(2)}))
    got = vocaset.safe_load_pickle(ok)
    np.testing.assert_array_equal(got["a"][0], np.arange(3))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "templates.pkl"
    bad.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(vocaset.UnsafePickleError, match="templates.pkl.*system"):
        vocaset.safe_load_pickle(bad)


def test_vocaset_layout_loads_with_its_splits(tmp_path):
    root = vocaset.write_vocaset_fixture(tmp_path / "voca", frames=40, num_vertices=300)
    seqs = vocaset.load_vocaset(root)
    assert sorted(s.split for s in seqs) == ["test", "test", "train", "train"]
    assert all(s.fps == 30.0 and s.vertices.shape == (20, 300, 3) for s in seqs)
    assert abs(len(seqs[0].audio) / 16000 - 40 / 60) < 0.01  # 22 kHz -> 16 kHz
    (root / "templates.pkl").write_bytes(pickle.dumps(pickle.Pickler))
    with pytest.raises(vocaset.UnsafePickleError, match="templates.pkl"):
        vocaset.load_vocaset(root)
    (root / "templates.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="templates.pkl"):
        vocaset.load_vocaset(root)


def test_biwi_layout_loads_with_faceformer_splits(tmp_path):
    root = vocaset.write_biwi_fixture(tmp_path / "biwi", frames=25, num_vertices=300)
    seqs = {s.name: s for s in vocaset.load_biwi(root)}
    # F2 (seen): sentence 1 trains, 33 validates, 40 is in no split; M1 (unseen) tests on 37.
    assert {n: s.split for n, s in seqs.items()} == {
        "F2_e01": "train",
        "F2_e33": "val",
        "M1_e37": "test",
    }
    assert all(s.fps == 25.0 and s.vertices.shape == (25, 300, 3) for s in seqs.values())
    assert seqs["M1_e37"].speaker == "M1" and abs(len(seqs["F2_e01"].audio) / 16000 - 1) < 0.01
    facts = _data(tmp_path, name="biwi", manual_dir=str(root), pca_dim=2).prepare()
    assert facts["vertices"] == 300 and facts["fps"] == 25.0 and facts["train_sequences"] == 1
    (root / "wav" / "F2_e33.wav").unlink()
    with pytest.raises(FileNotFoundError, match=r"F2_e33.npy has no audio .*F2_e33.wav"):
        vocaset.load_biwi(root)
    (root / "templates.pkl").write_bytes(pickle.dumps(pickle.Pickler))
    with pytest.raises(vocaset.UnsafePickleError, match="templates.pkl"):
        vocaset.load_biwi(root)


def _data(tmp_path, **kw):
    dc = ml_collections.ConfigDict(
        dict(
            name="default",
            minutes=0.6,
            num_speakers=3,
            heldout_speakers=1,
            cache_dir=str(tmp_path / "cache"),
            manual_dir="",
            representation="pca",
            pca_dim=24,
            window=16,
            vocaset_stride=2,
            fps=30.0,
        )
    )
    dc.update(kw)
    return MeshData(dc, str(tmp_path / "w"), batch_size=4, num_eval_batches=2)


def test_default_corpus_windows_and_representation(tmp_path):
    data = _data(tmp_path)
    facts = data.prepare()
    assert facts["heldout_speakers"] == ["spk02"] and facts["dim"] == 24
    batch = next(iter(data.train_dataset(0, 1)))
    assert batch["x"].shape == (4, 16, 24) and batch["audio"].shape == (4, 16, 320)
    assert abs(float(batch["x"].std()) - 1.0) < 0.5  # unit-scaled codes
    held = data.eval_batches(0, 1)
    assert len(held) == 2 and not np.array_equal(held[0]["x"], held[1]["x"])
    seq = data.heldout[0]
    v = seq.vertices
    rec = data.repr.decode(data.repr.encode(v))
    # 24 PCA components of 2 training speakers keep a new speaker's motion (its identity,
    # outside their span, is the per-sequence mean, removed here as the metrics do)
    err = np.abs((rec - rec.mean(0)) - (v - v.mean(0))).mean()
    assert err < 0.3 * np.abs(v - v.mean(0)).mean()
    # read-only reuses the saved representation
    again = _data(tmp_path)
    again.read_only = True
    again.prepare()
    np.testing.assert_array_equal(again.repr.mean, data.repr.mean)
    spk = corpus_lib.load_corpus(next((tmp_path / "cache").glob("mesh_corpus-*")))
    assert {s.speaker for s in spk} == {"spk00", "spk01", "spk02"}


def test_hubert_features_condition_the_mesh_frames(tmp_path):
    """data.audio_features=hubert: layer-L HuBERT frames of a local HF directory, interpolated
    to the mesh frame times; the batches carry hidden_size features."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.HubertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        conv_dim=(8, 8),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
    )
    transformers.HubertModel(cfg).eval().save_pretrained(tmp_path / "hub")
    root = vocaset.write_biwi_fixture(tmp_path / "biwi", frames=25, num_vertices=60)
    data = _data(tmp_path, name="biwi", manual_dir=str(root), pca_dim=2)
    data.data.update(dict(audio_features="hubert", hubert_dir=str(tmp_path / "hub")))
    data.data.hubert_layer = 1
    data.prepare()
    assert data.feature_dim == 16 and data.dummy_batch()["audio"].shape[-1] == 16
    batch = next(iter(data.train_dataset(0, 1)))
    assert batch["audio"].shape == (4, 16, 16) and np.isfinite(batch["audio"]).all()
    held = data.heldout_features(0)
    assert held.shape == (data.heldout[0].num_frames, 16) and held.std() > 0.1
    assert "hubert_dir" in data.compatibility()["mesh_data"]


def test_interpolate_frames_is_linear_in_time():
    from avjax.data.mesh.mesh_data import interpolate_frames

    feats = np.arange(10, dtype=np.float32)[:, None] * [1.0, -2.0]  # 50 Hz ramp
    out = interpolate_frames(feats, 50.0, 7, 30.0)
    np.testing.assert_allclose(out[:, 0], np.minimum(np.arange(7) * 50 / 30, 9), rtol=1e-6)
    np.testing.assert_allclose(out[:, 1], -2 * out[:, 0], rtol=1e-6)
