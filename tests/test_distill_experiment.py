import pytest

from sparsekit.distill.experiment import (
    CONFIGS,
    RecoveryConfig,
    RecoveryExperiment,
    compare_losses,
    parse_pattern,
    recovery_config,
    recovery_table,
    training_subset,
    with_overrides,
)


def test_parse_pattern():
    assert parse_pattern("70%") == (pytest.approx(0.7), None)
    assert parse_pattern("2:4") == (0.5, (2, 4))
    for bad in ("70", "120%", "4:2", "a:b", 0.7):
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad)


def test_config_validation_and_lookup():
    with pytest.raises(ValueError, match="losses"):
        RecoveryConfig(patterns=("50%",), steps=1, batch_size=1, lr=1e-3, warmup=0, train_sizes=(1,),
                       losses=("MSE",), headline=("50%",), sweep_pattern="50%")
    with pytest.raises(ValueError, match="headline"):
        RecoveryConfig(patterns=("50%",), steps=1, batch_size=1, lr=1e-3, warmup=0, train_sizes=(1,))
    with pytest.raises(ValueError, match="scale"):
        recovery_config("math", "huge")
    for name in CONFIGS:
        assert recovery_config(name, "book").steps > 0


def test_training_subset_is_fixed_and_nested():
    from sparsekit import tasks

    task = tasks.get("translation")
    small, large = training_subset(task, 5, "smoke"), training_subset(task, 20, "smoke")
    assert large[:5] == small and training_subset(task, 5, "smoke") == small
    assert len(training_subset(task, 0, "smoke")) == len(task.rows("train", "smoke"))
    with pytest.raises(ValueError, match="size"):
        training_subset(task, -1, "smoke")


def test_recovery_experiment_chooses_on_validation_and_reports_on_test():
    config = with_overrides(recovery_config("translation", "smoke"), patterns=("50%", "80%"),
                            train_sizes=(8, 16), steps=2)
    results = RecoveryExperiment("translation", "smoke", config, progress=False).run()
    runs = results.runs
    keys = runs[["pattern", "loss", "seed", "train_size"]].drop_duplicates()
    assert len(keys) == config.fine_tuning_runs()
    validation = runs[runs.split == "validation"]
    assert set(validation.pattern) == {config.sweep_pattern} and set(validation.train_size) == {8, 16}
    test = runs[runs.split == "test"]
    assert set(test.train_size) == {results.train_size} and results.train_size in (8, 16)
    assert len(test) == len(config.patterns) * len(config.losses) + len(config.losses)  # + seed 1 at 80%
    table = recovery_table(results)
    assert list(table.index) == ["50%", "80%"] and "dense teacher" in table.columns
    assert set(compare_losses(results).loss) == {"CE+KD", "SquareHead", "CE+SquareHead"}
