"""The recovery experiments on disk: their measured results and fine-tuned students, for later chapters.

Chapters 03–05 run :class:`~sparsekit.distill.experiment.RecoveryExperiment`; chapter 08 quantizes the
students they fine-tuned and chapter 09 builds on their runs. Each experiment is saved once, as one
folder written through :func:`sparsekit.fileio.staged_directory` (complete or absent, sha256 manifest):

    <cache>/recovery/<task>-<scale>-<key>/
        results.json                      reference, config, chosen training-set size, seconds
        runs.json, one_shot.json          the result tables (pandas records)
        students/<pattern>-<loss>-seed<k>/  model.safetensors + config.json (save_pretrained, safetensors)

``key`` is a SHA-256 of the configuration and of the teacher's weights, so a changed configuration or a
retrained teacher never reads a stale experiment. The students saved are :data:`SAVED_LOSS` at the first
seed, one per pattern (the models chapter 08 quantizes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import pandas as pd
import torch

from sparsekit.fileio import atomic_write_json, is_complete, staged_directory
from sparsekit.tasks.cache import cache_dir

__all__ = ["SAVED_LOSS", "teacher_digest", "experiment_dir", "save_experiment", "load_results",
           "load_student", "saved_students", "student_name", "recovery_results"]

SAVED_LOSS = "CE+SquareHead"  # the paper's loss: the students that later chapters build on


def teacher_digest(model) -> str:
    """SHA-256 (16 hex digits) of a model's parameters and buffers (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def _config_dict(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def experiment_dir(task_name: str, scale: str, config, teacher) -> Path:
    """The folder of the experiment of ``task_name`` at ``scale`` with ``config`` from ``teacher``."""
    material = json.dumps({"config": _config_dict(config), "teacher": teacher_digest(teacher)},
                          sort_keys=True, default=str)
    key = hashlib.sha256(material.encode()).hexdigest()[:16]
    return cache_dir() / "recovery" / f"{task_name}-{scale}-{key}"


def student_name(pattern: str, loss: str, seed: int) -> str:
    """Folder name of a student: ``"70%-CE+SquareHead-seed0"`` -> ``"70pct-CE+SquareHead-seed0"``."""
    return f"{pattern.replace('%', 'pct').replace(':', 'of')}-{loss}-seed{seed}"


def save_experiment(folder: Path, results, students: dict[tuple[str, str, int], torch.nn.Module]) -> Path:
    """Write ``results`` (a :class:`~sparsekit.distill.experiment.RecoveryResults`) and ``students``
    (``{(pattern, loss, seed): model}``) into ``folder`` (replacing an older copy)."""
    with staged_directory(folder, overwrite=True) as tmp:
        summary = {"task": results.task, "metric": results.metric,
                   "higher_is_better": bool(results.higher_is_better), "config": _config_dict(results.config),
                   "reference": results.reference, "train_size": int(results.train_size),
                   "size_key": int(results.size_key), "seconds": results.seconds,
                   "students": [{"pattern": p, "loss": loss, "seed": int(s), "name": student_name(p, loss, s)}
                                for p, loss, s in students]}
        atomic_write_json(tmp / "results.json", json.loads(json.dumps(summary, default=float)))
        for name, frame in (("runs", results.runs), ("one_shot", results.one_shot)):
            (tmp / f"{name}.json").write_text(frame.to_json(orient="records"))
        for (pattern, loss, seed), model in students.items():
            path = tmp / "students" / student_name(pattern, loss, seed)
            model.save_pretrained(path, safe_serialization=True)
    return folder


def _complete(folder: Path) -> bool:
    return folder.is_dir() and is_complete(folder)


def load_results(folder: Path):
    """The :class:`~sparsekit.distill.experiment.RecoveryResults` saved in ``folder`` (``None`` if absent
    or incomplete). The training curves are not saved (``curves`` is empty)."""
    from sparsekit.distill.experiment import RecoveryConfig, RecoveryResults

    if not _complete(folder):
        return None
    summary = json.loads((folder / "results.json").read_text())
    fields = summary["config"].items()
    config = RecoveryConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields})
    frames = {name: pd.read_json(io.StringIO((folder / f"{name}.json").read_text()), orient="records")
              for name in ("runs", "one_shot")}
    return RecoveryResults(task=summary["task"], metric=summary["metric"],
                           higher_is_better=summary["higher_is_better"], config=config, runs=frames["runs"],
                           one_shot=frames["one_shot"], reference=summary["reference"], curves={},
                           train_size=summary["train_size"], size_key=summary["size_key"],
                           seconds=summary["seconds"])


def saved_students(folder: Path) -> pd.DataFrame:
    """The students of a saved experiment: ``pattern``, ``loss``, ``seed``, ``name`` (empty if none)."""
    if not _complete(folder):
        return pd.DataFrame(columns=["pattern", "loss", "seed", "name"])
    return pd.DataFrame(json.loads((folder / "results.json").read_text())["students"],
                        columns=["pattern", "loss", "seed", "name"])


def load_student(folder: Path, task, pattern: str, loss: str = SAVED_LOSS, seed: int = 0):
    """A saved student (eval mode, safetensors only); ``FileNotFoundError`` naming what is saved."""
    saved = saved_students(folder)
    match = saved[(saved.pattern == pattern) & (saved.loss == loss) & (saved.seed == seed)]
    if match.empty:
        have = [f"{r.pattern} {r.loss} seed {r.seed}" for r in saved.itertuples()]
        raise FileNotFoundError(f"no student {pattern} {loss} seed {seed} in {folder}; "
                                f"saved: {have or 'none'}")
    path = folder / "students" / match.iloc[0]["name"]
    return task.model_class().from_pretrained(path, use_safetensors=True).eval()


def recovery_results(task_name: str, scale: str, progress: bool = True):
    """``(results, folder)`` of the recovery experiment of ``task_name`` at ``scale``: read from the cache
    when chapters 03–05 saved it with the current configuration and teacher, else run (and saved) now."""
    from sparsekit import tasks
    from sparsekit.distill.experiment import RecoveryExperiment, recovery_config

    task = tasks.get(task_name)
    teacher = task.teacher(scale, progress=progress)
    folder = experiment_dir(task_name, scale, recovery_config(task_name, scale), teacher)
    results = load_results(folder)
    if results is None:
        results = RecoveryExperiment(task_name, scale, progress=progress, teacher=teacher).run()
    return results, folder
