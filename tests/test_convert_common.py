"""Converted-model directories are written all-or-nothing, and names read from files or flags
cannot point outside their folders (safetensors `weight_map`, eval_longform's `--name`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from avjax.convert import common, hubert, mamba

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(value: float) -> dict:
    return {"w": np.full((2, 3), value, np.float32), "b": np.zeros((3,), np.float32)}


def _siblings(path) -> list[str]:
    return sorted(os.listdir(os.path.dirname(path)))


def test_save_writes_params_then_model_json_and_replaces_only_when_complete(tmp_path, monkeypatch):
    out = str(tmp_path / "model")
    common.save_params_dir(out, {"width": 1}, _params(1.0))
    fields, params = common.load_params_dir(out, "test")
    assert fields == {"width": 1} and np.all(params["w"] == 1.0)

    real_save = ocp.StandardCheckpointer.save
    seen = []

    def save(self, directory, *args, **kwargs):
        # While the new params are written: no model.json next to them yet, the old output
        # is still there, whole.
        assert not os.path.exists(os.path.join(os.path.dirname(directory), "model.json"))
        assert json.load(open(os.path.join(out, "model.json"))) == {"width": 1}
        assert os.path.isdir(os.path.join(out, "params"))
        seen.append(str(directory))
        return real_save(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save)
    common.save_params_dir(out, {"width": 2}, _params(2.0))
    assert seen and not seen[0].startswith(out + os.sep)  # written elsewhere, then moved
    fields, params = common.load_params_dir(out, "test")
    assert fields == {"width": 2} and np.all(params["w"] == 2.0)
    assert _siblings(out) == ["model"]  # no temporary directory left behind


def test_a_failed_save_leaves_the_old_output_intact(tmp_path, monkeypatch):
    out = str(tmp_path / "model")
    common.save_params_dir(out, {"width": 1}, _params(1.0))
    real_save = ocp.StandardCheckpointer.save

    def broken_save(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)  # the params are written, then it dies
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        common.save_params_dir(out, {"width": 2}, _params(2.0))
    fields, params = common.load_params_dir(out, "test")
    assert fields == {"width": 1} and np.all(params["w"] == 1.0)
    assert _siblings(out) == ["model"]


def test_save_refuses_to_replace_a_folder_that_is_not_a_converted_model(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="precious.txt"):
        common.save_params_dir(str(out), {"width": 1}, _params(1.0))
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "entry, reason",
    [
        ("/etc/passwd", "absolute"),
        ("../outside.safetensors", r"'\.\.'"),
        ("shards/../../outside.safetensors", r"'\.\.'"),
        ("..\\outside.safetensors", r"'\.\.'"),
        ("gs://bucket/x.safetensors", "URL"),
        ("", "non-empty"),
        (".", "folder itself"),
        (7, "non-empty"),
    ],
)
def test_weight_map_entries_cannot_escape_the_model_folder(tmp_path, entry, reason):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "model-1.safetensors", "b.weight": entry}})
    )
    for reader in (mamba.read_hf_state_dict, hubert.read_hf_state_dict):
        with pytest.raises(ValueError, match=reason) as e:
            reader(str(tmp_path))
        assert "weight_map['b.weight']" in str(e.value)  # the error names the entry


def test_weight_map_inside_the_folder_is_read(tmp_path):
    import safetensors.numpy as safetensors

    (tmp_path / "sub").mkdir()
    safetensors.save_file({"a": np.ones((2,), np.float32)}, str(tmp_path / "m-1.safetensors"))
    safetensors.save_file({"b": np.zeros((3,), np.float32)}, str(tmp_path / "sub/m-2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "./sub/m-2.safetensors"}})
    )
    sd = mamba.read_hf_state_dict(str(tmp_path))
    assert sorted(sd) == ["a", "b"] and sd["b"].shape == (3,)


@pytest.mark.parametrize("flag", ["name", "baseline_name"])
def test_eval_longform_names_cannot_escape_the_audio_folder(tmp_path, flag):
    out = tmp_path / "report"
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "eval_longform.py"),
            "--config=configs/speechssm.py",
            f"--workdir={tmp_path / 'missing'}",
            f"--out={out}",
            f"--{flag}=../../evil",
        ],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0
    assert f"--{flag}=../../evil" in res.stderr and "plain name" in res.stderr
    assert not out.exists()


def test_leftovers_of_a_killed_conversion_are_removed_unless_they_hold_the_only_copy(tmp_path):
    out = tmp_path / "model"
    (tmp_path / "model.tmp-deadbeef0001" / "params").mkdir(parents=True)  # killed mid-write
    common.save_params_dir(str(out), {"width": 1}, _params(1.0))
    assert _siblings(out) == ["model"]
    # Killed after moving the old output aside: the aside copy is the only one, so it stays
    # while the new conversion is written (and goes once an output exists again).
    os.rename(out, tmp_path / "model.tmp-deadbeef0002")
    common.save_params_dir(str(out), {"width": 2}, _params(2.0))
    assert _siblings(out) == ["model", "model.tmp-deadbeef0002"]
    common.save_params_dir(str(out), {"width": 3}, _params(3.0))
    assert _siblings(out) == ["model"]


def test_place_checked_builds_the_tree_and_names_shape_errors():
    from avjax.convert.common import place_checked

    expected = {"a/kernel": (2, 3), "a/bias": (3,), "b/scale": (4,)}
    items = [("w", "a/kernel", np.ones((2, 3))), ("bb", "a/bias", np.zeros(3))]
    tree = place_checked(iter(items + [("s", "b/scale", np.ones(4))]), expected, "Toy")
    assert tree["a"]["kernel"].shape == (2, 3) and tree["b"]["scale"].shape == (4,)
    with pytest.raises(ValueError, match=r"Toy weight 'w' gives shape \(3, 2\).*a/kernel"):
        place_checked(iter([("w", "a/kernel", np.ones((3, 2)))]), expected, "Toy")
    with pytest.raises(AssertionError, match=r"leaves parameters unset: \['b/scale'\]"):
        place_checked(iter(items), expected, "Toy")
