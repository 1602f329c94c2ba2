"""The recipes of the recovery experiments: the authors' per-sparsity schedule at paper scale, clipping,
precision, and the dense teacher fine-tuned before pruning."""

import pytest
import torch

from sparsekit.distill import experiment
from sparsekit.distill.experiment import (
    AUTHORS_RECIPE,
    RecoveryConfig,
    RecoveryExperiment,
    authors_recipe,
    dense_teacher,
    recovery_config,
    with_overrides,
)

# IST-DASLab/SparseFinetuning, scripts/train/scripts/mpt/run_sparse_finetune.sh: (epochs, lr)
THEIRS = {"40%": (2, 3e-5), "50%": (2, 3e-5), "60%": (2, 1e-4), "70%": (4, 8e-5), "80%": (4, 1e-4),
          "2:4": (4, 1e-4), "16:32": (4, 1e-4), "16:64": (4, 1e-4)}


def test_paper_math_config_carries_the_authors_recipe():
    config = recovery_config("math", "paper")
    assert set(config.patterns) == set(THEIRS)
    for pattern, (epochs, lr) in THEIRS.items():
        assert config.schedule(pattern) == {"steps": None, "epochs": epochs, "lr": lr}
    assert config.max_grad_norm is None and config.bf16 is True
    assert (config.batch_size, config.warmup, config.temperature, config.train_size) == (32, 20, 1.0, 0)


@pytest.mark.parametrize("task", ["translation", "speech"])
def test_paper_t5_and_whisper_use_the_authors_precision_without_clipping(task):
    config = recovery_config(task, "paper")
    assert config.max_grad_norm is None and config.bf16 is True
    assert config.schedule("80%") == {"steps": config.steps, "epochs": None, "lr": config.lr}


def test_paper_t5_teacher_is_fine_tuned_densely_first():
    assert recovery_config("translation", "paper").teacher_steps > 0
    assert recovery_config("speech", "paper").teacher_steps is None  # whisper-small-hi is already fine-tuned


@pytest.mark.parametrize("task", ["translation", "speech", "math"])
def test_book_scale_keeps_its_clipping(task):
    assert recovery_config(task, "book").max_grad_norm == 1.0 and recovery_config(task, "book").recipe == ()


def test_authors_recipe_refuses_a_pattern_they_did_not_run():
    assert authors_recipe(("70%", "2:4")) == (("70%", 4, 8e-5), ("2:4", 4, 1e-4))
    assert AUTHORS_RECIPE == THEIRS
    with pytest.raises(ValueError, match="90%"):
        authors_recipe(("90%",))


@pytest.mark.parametrize("changes,argument", [
    ({"max_grad_norm": 0.0}, "max_grad_norm"), ({"max_grad_norm": float("inf")}, "max_grad_norm"),
    ({"recipe": (("70%", 0, 1e-4),)}, "epochs"), ({"recipe": (("70%", 2, float("nan")),)}, "lr"),
    ({"recipe": (("70", 2, 1e-4),)}, "pattern"),
    ({"recipe": (("70%", 2, 1e-4), ("70%", 4, 1e-4))}, "more than once"),
    ({"recipe": [("70%", 2, 1e-4)]}, "tuple"), ({"teacher_steps": 0}, "teacher_steps"),
    ({"teacher_lr": -1.0}, "teacher_lr")])
def test_bad_recipe_fields_name_the_argument(changes, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        with_overrides(recovery_config("math", "smoke"), **changes)


def test_each_run_gets_its_patterns_schedule_and_clipping(monkeypatch):
    """What RecoveryExperiment.fine_tune hands to finetune(): the pattern's recipe, and no clipping as 0."""
    seen = []

    class Stop(Exception):
        pass

    def fake_finetune(student, teacher, rows, collate, loss, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(experiment, "finetune", fake_finetune)
    config = with_overrides(recovery_config("translation", "smoke"), recipe=(("80%", 3, 2e-4),),
                            max_grad_norm=None)
    exp = RecoveryExperiment("translation", "smoke", config, progress=False)
    exp.teacher = exp.task.teacher("smoke", progress=False)
    with pytest.raises(Stop):
        exp.fine_tune("80%", "CE", 0, 16, ("validation",))
    assert seen[0]["epochs"] == 3 and seen[0]["steps"] is None and seen[0]["lr"] == 2e-4
    assert seen[0]["max_grad_norm"] == 0.0  # transformers: 0 = no clipping
    clipped = RecoveryExperiment("translation", "smoke", progress=False)
    clipped.teacher = exp.teacher
    with pytest.raises(Stop):
        clipped.fine_tune("80%", "CE", 0, 16, ("validation",))
    assert seen[1]["steps"] == 4 and seen[1]["epochs"] is None and seen[1]["max_grad_norm"] == 1.0


def test_dense_teacher_is_fine_tuned_cached_and_reloaded(tmp_cache):
    from sparsekit import tasks

    task = tasks.get("translation")
    plain = task.teacher("smoke", progress=False)
    config = with_overrides(recovery_config("translation", "smoke"), teacher_steps=2, teacher_lr=1e-3)
    assert dense_teacher(task, "smoke", recovery_config("translation", "smoke"), progress=False) is not None
    tuned = dense_teacher(task, "smoke", config, progress=False)
    changed = [name for name, p in tuned.state_dict().items()
               if not torch.equal(p, plain.state_dict()[name])]
    assert changed  # it trained
    cached = list((tmp_cache / "dense_teachers").iterdir())
    assert len(cached) == 1 and (cached[0] / "manifest.json").exists()
    again = dense_teacher(task, "smoke", config, progress=False)
    assert all(torch.equal(p, again.state_dict()[name]) for name, p in tuned.state_dict().items())
    assert not tuned.training


def test_recovery_experiment_takes_model_and_dataset_sources(tmp_path):
    exp = RecoveryExperiment("translation", "smoke", progress=False, model=str(tmp_path), dataset=None)
    assert exp.task.real.model_id == str(tmp_path)


def test_recovery_config_is_still_hashable_and_frozen():
    config = RecoveryConfig(patterns=("50%",), steps=1, batch_size=1, lr=1e-3, warmup=0, train_sizes=(1,),
                            headline=("50%",), sweep_pattern="50%", recipe=(("50%", 2, 3e-5),))
    assert hash(config) == hash(with_overrides(config))


def test_measure_candidates_runs_each_candidate_on_validation():
    from sparsekit.distill.experiment import measure_candidates

    candidates = {"clip 1.0": {}, "no clipping": {"max_grad_norm": None}}
    rows = measure_candidates("translation", "smoke", candidates, losses=("CE",), size=16, progress=False)
    assert [r["candidate"] for r in rows] == ["clip 1.0", "no clipping"]
    assert all(0.0 <= r["CE"] <= 1.0 and r["CE max grad norm"] > 0 for r in rows)  # smoke BLEU is a fraction
