"""Tasks: one per paper. Only this package and `avjax.main` know model names."""

from __future__ import annotations

import importlib

import ml_collections

from avjax.tasks.base import Task

# name -> "module:class"; imported lazily so one model's dependencies never load another's.
REGISTRY = {
    "df3dface": "avjax.tasks.df3dface:DF3DFaceTask",
    "mab": "avjax.tasks.mab:MABTask",
    "mms_llama": "avjax.tasks.mms_llama:MMSLLaMATask",
    "speechssm": "avjax.tasks.speechssm:SpeechSSMTask",
    "speechtransformer": "avjax.tasks.speechtransformer:SpeechTransformerTask",
    "syncnet": "avjax.tasks.syncnet:SyncNetTask",
    "synctalkface": "avjax.tasks.synctalkface:SyncTalkFaceTask",
    "ttaid": "avjax.tasks.ttaid:TTAIDTask",
}


def task_class(config: ml_collections.ConfigDict) -> type[Task]:
    """The Task class named by `config.task`; importing its module also registers the
    evaluators that module defines, so `config.evals` may name them."""
    name = config.get("task")
    if name not in REGISTRY:
        raise ValueError(f"config.task={name!r} is not a known task; known: {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_task(config: ml_collections.ConfigDict, workdir: str) -> Task:
    """The Task named by `config.task`."""
    return task_class(config)(config, workdir)
