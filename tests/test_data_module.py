"""`DataModule`: every task's data module shares its fields, construction and errors."""

import ml_collections
import pytest

from avjax.data.image.ttaid_data import TTAIDData
from avjax.data.mesh.mesh_data import MeshData
from avjax.data.module import DataModule
from avjax.data.speech.speech_lm import SpeechLMData
from avjax.data.video.av_data import AVData
from avjax.data.video.procedural import ProceduralClips

MODULES = [SpeechLMData, AVData, MeshData, TTAIDData, ProceduralClips]


def _config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "seed": 3,
            "stage": "pretrain",
            "data": {"name": "default"},
            "train": {"batch_size": 6, "eval_batches": 2},
        }
    )


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_every_data_module_is_built_from_the_config_alike(cls):
    assert issubclass(cls, DataModule)
    data = cls.from_config(_config(), "/tmp/w")
    assert (data.seed, data.batch_size, data.num_eval_batches) == (3, 6, 2)
    assert data.data.name == "default" and data.read_only is False
    assert data.per_process_batch(3) == 2
    with pytest.raises(ValueError, match="config.train.batch_size=6 .* 4 processes"):
        data.per_process_batch(4)
    if cls is not MeshData:  # (MeshData prepares on first use)
        with pytest.raises(RuntimeError, match=f"{cls.__name__}.facts before prepare"):
            _ = data.facts


def test_an_incomplete_data_module_cannot_be_built():
    class NoBatches(DataModule):
        def prepare(self, read_only=None):
            return {}

    with pytest.raises(TypeError, match="abstract"):
        NoBatches(ml_collections.ConfigDict())
