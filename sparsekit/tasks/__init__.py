"""The three embedded tasks: translation (T5), speech recognition (Whisper), grade-school math (MPT).

``get(name)`` returns a :class:`~sparsekit.tasks.base.Task`. Task modules are imported lazily, so a
task whose optional system package is missing (e.g. ``espeak-ng`` for speech) does not break the others.
"""

from __future__ import annotations

import importlib

from sparsekit.tasks.base import RealPath, Task, TrainConfig

__all__ = ["get", "names", "Task", "TrainConfig", "RealPath"]

# task name -> (module, class name)
_REGISTRY = {
    "translation": ("sparsekit.tasks.translation", "TranslationTask"),
    "speech": ("sparsekit.tasks.speech", "SpeechTask"),
    "math": ("sparsekit.tasks.math", "MathTask"),
}
_INSTANCES: dict[str, Task] = {}


def names() -> list[str]:
    """The names accepted by :func:`get`."""
    return list(_REGISTRY)


def get(name: str, model=None, dataset=None) -> Task:
    """The task called ``name`` (one shared instance per name, so its in-memory data caches are reused).

    ``model``/``dataset`` point its paper path (``scale="paper"``) at another teacher or data set: a hub id
    or a local path, or a mapping task name -> one (as the notebooks' parameters); unset, the paper's own
    (see :mod:`sparsekit.tasks.real`). Given either, a fresh instance is returned.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}: {name!r}; allowed: {names()}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown task name {name!r}; allowed: {names()}")
    if name not in _INSTANCES:
        module_name, class_name = _REGISTRY[name]
        module = importlib.import_module(module_name)
        _INSTANCES[name] = getattr(module, class_name)()
    if model is None and dataset is None:
        return _INSTANCES[name]
    from sparsekit.tasks.real import pick_source, with_sources

    return with_sources(_INSTANCES[name], pick_source(model, name), pick_source(dataset, name))
