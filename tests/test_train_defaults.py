"""The shared config.train / config.mesh blocks (avjax/train/defaults.py)."""

import pytest

from avjax.train.defaults import MESH, TRAIN, mesh_config, train_config


def test_overrides_keep_float_fields_float_and_refuse_unknown_keys():
    c = train_config(steps=7, weight_decay=0, lr=3e-3)
    assert c.steps == 7 and c.lr == 3e-3 and set(c) == set(TRAIN)
    assert isinstance(c.weight_decay, float)  # so --config.train.weight_decay=0.1 overrides
    c.weight_decay = 0.1
    with pytest.raises(ValueError, match=r"train_config: unknown keys \['stpes'\]"):
        train_config(stpes=7)
    assert dict(mesh_config(tensor=2)) == {**MESH, "tensor": 2}
