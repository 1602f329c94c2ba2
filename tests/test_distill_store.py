"""The recovery cache: a run saves its results and CE+SquareHead students; later chapters read them back."""

import pytest
import torch

from sparsekit import tasks
from sparsekit.distill import store
from sparsekit.distill.experiment import RecoveryExperiment, recovery_config, with_overrides
from sparsekit.fileio import verify_manifest


def _config():
    return with_overrides(recovery_config("translation", "smoke"), patterns=("50%", "80%"),
                          headline=("80%",), losses=("CE", "CE+SquareHead"), sweep_losses=("CE",),
                          train_sizes=(8,), train_size=8, steps=2, seeds=(0,))


def test_run_saves_results_and_students_that_load_back_exactly():
    task = tasks.get("translation")
    teacher = task.teacher("smoke", progress=False)
    config = _config()
    experiment = RecoveryExperiment("translation", "smoke", config, progress=False, teacher=teacher)
    results = experiment.run()
    folder = store.experiment_dir("translation", "smoke", config, teacher)
    verify_manifest(folder)  # complete, every file's sha256 as recorded
    loaded = store.load_results(folder)
    assert loaded.config == config and loaded.train_size == results.train_size
    assert loaded.reference == pytest.approx(results.reference)
    assert loaded.runs["value"].tolist() == pytest.approx(results.runs["value"].tolist())
    saved = store.saved_students(folder)
    assert sorted(saved.pattern) == ["50%", "80%"] and set(saved.loss) == {"CE+SquareHead"}
    for pattern in ("50%", "80%"):
        student = store.load_student(folder, task, pattern)
        trained = experiment._models[(pattern, "CE+SquareHead", 0, 8)].model
        pairs = zip(sorted(student.state_dict().items()), sorted(trained.state_dict().items()))
        for (name, a), (_, b) in pairs:
            assert torch.equal(a, b.to(a.dtype)), name  # the mask (zeros) and the fine-tuned values
    with pytest.raises(FileNotFoundError, match="saved: "):
        store.load_student(folder, task, "80%", loss="CE")
    # another configuration, or another teacher, is another experiment
    assert store.experiment_dir("translation", "smoke", with_overrides(config, steps=3), teacher) != folder
    other = task.student_like(teacher)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert store.experiment_dir("translation", "smoke", config, other) != folder


def test_missing_or_incomplete_experiment_reads_as_none(tmp_path):
    assert store.load_results(tmp_path / "nothing") is None
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "results.json").write_text("{}")  # no manifest: never completed
    assert store.load_results(tmp_path / "half") is None
    assert store.saved_students(tmp_path / "half").empty
