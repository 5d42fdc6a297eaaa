"""DF-3DFace: a tiny CLI train -> sample -> eval on the embedded mesh corpus, DDIM sampling as
one compiled scan, training from a fixture in VOCASET's layout."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avjax import main
from avjax.data.mesh import vocaset
from avjax.tasks import get_task
from avjax.tasks.df3dface import _noaudio_lve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.data.minutes=0.5",
    "--config.data.num_speakers=3",
    "--config.data.heldout_speakers=1",
    "--config.data.window=16",
    "--config.data.pca_dim=16",
    "--config.model.width=32",
    "--config.model.num_layers=1",
    "--config.model.num_heads=2",
    "--config.model.mlp_width=64",
    "--config.train.steps=4",
    "--config.train.batch_size=8",
    "--config.train.eval_every=4",
    "--config.train.checkpoint_every=4",
    "--config.train.eval_batches=1",
    "--config.train.log_every=2",
]


def _config(overrides: list[str], variant: str = ""):
    import importlib.util

    spec = importlib.util.spec_from_file_location("df3dface_cfg", f"{REPO}/configs/df3dface.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(variant)
    for o in overrides:
        key, value = o.removeprefix("--config.").split("=", 1)
        node = c
        *path, leaf = key.split(".")
        for k in path:
            node = node[k]
        node[leaf] = (
            type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"
        )
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny model trained through the entry point's `run` (4 steps): (config, workdir)."""
    tmp = tmp_path_factory.mktemp("df3dface")
    workdir = tmp / "w"
    c = _config([*TINY, f"--config.data.cache_dir={tmp / 'cache'}"])
    assert main.run(c, str(workdir), "train") == {"step": 4}
    metrics = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in m for m in metrics)
    return c, str(workdir)


def test_sample_and_eval_write_meshes_video_and_report(trained):
    c, workdir = trained
    c.sample.num_samples, c.sample.steps, c.sample.obj, c.sample.size = 2, 5, True, 64
    # eval scores the whole of held-out 0, the utterance sampled above: one compile for both
    c.eval.num_sequences, c.eval.samples, c.eval.max_frames = 1, 2, 10_000
    c.sample.guidance = 1.5  # (the guided sampler)
    s = main.run(c, workdir, "sample")
    meshes = np.load(s["meshes"])
    assert meshes.shape[0] == 2 and meshes.shape[2:] == (3074, 3) and np.isfinite(meshes).all()
    assert os.path.getsize(s["video"]) > 1000 and s["obj_frames"] == meshes.shape[1]
    assert not np.allclose(meshes[0], meshes[1])  # two draws, two faces
    e = main.run(c, workdir, "eval")
    for k in ("lve", "lve_mean_motion", "lve_audio_masked", "fdd", "lip_sync"):
        assert np.isfinite(e[k]), k
    assert e["diversity_identity"] > 0 and e["diversity_pose_deg"] > 0
    assert e["guidance"] == 1.5
    for k in ("identity", "pose_deg", "lip_spread", "upper_spread"):  # the corpus floor
        assert e[f"corpus_{k}"] > 0
        assert e[f"diversity_{k}_vs_corpus"] == pytest.approx(
            e[f"diversity_{k}"] / e[f"corpus_{k}"]
        )
    assert os.path.exists(e["report"])
    assert _noaudio_lve(workdir) == {"lve_noaudio_model": e["lve"]}  # (:noaudio's, beside)


def test_corpus_renditions_share_the_lips_of_the_speech(trained):
    """Other speakers' renditions of a held-out utterance: its length, other identities, and
    lips that follow the same phones (LVE vs its ground truth far below no motion)."""
    from avjax.eval import mesh_metrics as mm

    c, workdir = trained
    task = get_task(c, workdir)
    task.read_only = True
    data, rep = task.data, task.data.repr
    gt = data.heldout[0].vertices
    r = data.heldout_renditions(0, 2, seed=0)
    assert r.shape == (2, *gt.shape) and not np.allclose(r[0].mean(0), r[1].mean(0))
    rigid = np.setdiff1d(np.arange(gt.shape[1]), rep.regions.lip)
    gm = mm.motion(gt, rep.mean, rigid)
    still = mm.lve(np.zeros_like(gm), gm, rep.regions.lip)
    for x in r:
        assert mm.lve(mm.motion(x, rep.mean, rigid), gm, rep.regions.lip) < 0.1 * still


def test_ddim_50_steps_is_one_compiled_scan(trained):
    c, workdir = trained
    c = _config([*TINY, f"--config.data.cache_dir={c.data.cache_dir}"])
    task = get_task(c, workdir)
    task.read_only = True
    task.prepare()
    model = task.build_model()
    batch = task.dummy_batch()
    params = model.init(jax.random.PRNGKey(0), **task.model_inputs(batch))["params"]
    params = jax.tree.map(
        lambda x: getattr(x, "value", x) + 0.02,  # (the output layer starts at zero)
        params,
        is_leaf=lambda x: hasattr(x, "value"),
    )
    run = task.sampler(model, 50, 1.0)
    audio = jnp.zeros((2, 12, batch["audio"].shape[-1]))
    mask = jnp.ones((2, 12))
    a = run(params, audio, mask, jax.random.PRNGKey(1))
    b = run(params, audio, mask, jax.random.PRNGKey(2))
    assert a.shape == (2, 13, task.data.repr.dim) and not np.allclose(a, b)
    assert run.jitted._cache_size() == 1  # noqa: SLF001
    jaxpr = jax.make_jaxpr(run.jitted)(params, audio, mask, jax.random.PRNGKey(1), run.timesteps)
    inner = jaxpr.jaxpr.eqns[0].params["jaxpr"].jaxpr  # the pjit body
    scans = [e for e in inner.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 50


def test_trains_from_vocaset_layout(tmp_path):
    root = vocaset.write_vocaset_fixture(tmp_path / "voca", frames=80, num_vertices=200)
    c = _config(
        [
            *TINY,
            "--config.data.name=vocaset",
            f"--config.data.manual_dir={root}",
            "--config.data.pca_dim=8",
            "--config.train.steps=1",
            "--config.data.code_dim=9",  # declared wrong: refused before training
        ]
    )
    with pytest.raises(ValueError, match=r"config.data.code_dim=9, .* gives 8"):
        main.run(c, str(tmp_path / "bad"), "train")
    c.data.code_dim = 8
    assert main.run(c, str(tmp_path / "w"), "train") == {"step": 1}
    facts = json.loads((tmp_path / "w" / "data_facts.json").read_text())
    assert facts["vertices"] == 200 and facts["train_sequences"] == 2 and facts["fps"] == 30.0


def test_paper_variant_builds_from_declared_shapes_without_a_corpus(tmp_path):
    c = _config([], "paper")
    c.data.manual_dir = str(tmp_path / "nowhere")  # never read: shapes are declared
    task = get_task(c, str(tmp_path / "w"))
    batch = task.dummy_batch()
    assert batch["x"].shape == (64, 150, 5023 * 3) and batch["audio"].shape == (64, 150, 768)
    model = task.build_model()
    small = {k: v[:1] for k, v in batch.items()}
    shapes = jax.eval_shape(lambda r: task.init_variables(model, r, small), jax.random.key(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    assert n == 70_974_685  # the AOT report's count (README)
    assert not (tmp_path / "w").exists()
