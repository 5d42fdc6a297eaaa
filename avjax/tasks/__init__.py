"""Tasks: one per paper. Only this package and `avjax.main` know model names."""

from __future__ import annotations

import importlib

import ml_collections

from avjax.tasks.base import Task

# name -> "module:class"; imported lazily so one model's dependencies never load another's.
REGISTRY = {
    "df3dface": "avjax.tasks.df3dface:DF3DFaceTask",
    "speechssm": "avjax.tasks.speechssm:SpeechSSMTask",
    "speechtransformer": "avjax.tasks.speechtransformer:SpeechTransformerTask",
    "syncnet": "avjax.tasks.syncnet:SyncNetTask",
    "ttaid": "avjax.tasks.ttaid:TTAIDTask",
}


def get_task(config: ml_collections.ConfigDict, workdir: str) -> Task:
    """The Task named by `config.task`."""
    name = config.get("task")
    if name not in REGISTRY:
        raise ValueError(f"config.task={name!r} is not a known task; known: {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(config, workdir)
