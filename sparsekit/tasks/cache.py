"""On-disk cache of trained teachers (and of generated data) under ``$SPARSEKIT_CACHE``.

A teacher lives in ``<cache>/teachers/<task>-<scale>-<key>/`` with

- ``model.safetensors`` + ``config.json`` (``save_pretrained(safe_serialization=True)``; loaded with
  ``from_pretrained(use_safetensors=True)``, never through pickle),
- ``tokenizer/`` (the tokenizer trained here, ``save_pretrained``),
- ``curve.json`` (the training curve) and ``meta.json`` (key material, wall time, sec/step),
- ``manifest.json`` (the sha256 of every file, written last: :func:`sparsekit.fileio.staged_directory`).

The entry is built in a temp sibling and renamed into place; it is served only when its manifest
verifies (:func:`sparsekit.fileio.verify_manifest`), otherwise it is retrained with a warning naming it.

The key is a SHA-256 of the task name, the scale, the model config, the training config, the task's
data version, a digest of the data itself (the generated rows of every split, the versions of their
generators and the tokenizer's code; see :meth:`sparsekit.tasks.base.Task.tokenizer_key`) and a digest
of the code that builds and trains the teacher (:meth:`sparsekit.tasks.base.Task.teacher_code_key`), so
changing any of them trains a new teacher instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sparsekit import fileio

__all__ = ["cache_dir", "cache_key", "teacher_dir", "data_dir", "write_json", "read_json"]


def cache_dir() -> Path:
    """``$SPARSEKIT_CACHE`` if set, else ``~/.cache/sparsekit`` (created on demand)."""
    root = Path(os.environ.get("SPARSEKIT_CACHE") or Path.home() / ".cache" / "sparsekit")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def cache_key(
    task: str, scale: str, model_config: dict, train_config: dict, data_version: str, data_key: str = "",
    code_key: str = "",
) -> str:
    """Hex SHA-256 (first 16 digits) of everything that determines a trained teacher."""
    material = {
        "task": task,
        "scale": scale,
        "model_config": model_config,
        "train_config": train_config,
        "data_version": data_version,
        "data_key": data_key,
        "code_key": code_key,
    }
    return hashlib.sha256(_canonical(material).encode()).hexdigest()[:16]


def teacher_dir(task: str, scale: str, key: str) -> Path:
    return cache_dir() / "teachers" / f"{task}-{scale}-{key}"


def data_dir(task: str, scale: str, data_version: str) -> Path:
    """Folder for generated data (jsonl, audio) of one task, scale and data version."""
    path = cache_dir() / "data" / f"{task}-{scale}-{data_version}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as standard JSON atomically (:func:`sparsekit.fileio.atomic_write_json`); a NaN or
    infinite number (a validation metric of a diverged step) is written ``null`` instead of failing after the
    training it records (:func:`sparsekit.fileio.json_safe`)."""
    fileio.atomic_write_json(path, fileio.json_safe(obj), default=str)


def read_json(path: Path):
    return json.loads(Path(path).read_text())
