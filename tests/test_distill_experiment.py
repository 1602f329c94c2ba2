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


def _synthetic_results(higher_is_better=True):
    """A hand-built RecoveryResults: one-shot 0.2 at 80 %, dense 0.6, CE 0.3 / 0.5 over two seeds, and
    CE+SquareHead 0.5 / 0.7; validation sweep over 100 and 400 rows."""
    import pandas as pd

    from sparsekit.distill.experiment import RecoveryResults

    config = RecoveryConfig(patterns=("80%",), steps=1, batch_size=1, lr=1e-3, warmup=0,
                            train_sizes=(100, 400),
                            losses=("CE", "CE+SquareHead"), headline=("80%",), sweep_pattern="80%",
                            sweep_losses=("CE",))
    rows = []
    for loss, values, spikes in (("CE", (0.3, 0.5), (2, 1)), ("CE+SquareHead", (0.5, 0.7), (0, 0))):
        for seed, (value, spike) in enumerate(zip(values, spikes)):
            rows.append(dict(pattern="80%", sparsity=0.8, loss=loss, seed=seed, train_size=400, split="test",
                             value=value, spikes=spike, max_grad_norm=1.0 + seed, final_loss=0.1,
                             train_s=1.0))
    for size, value in ((100, 0.3), (400, 0.4)):
        rows.append(dict(pattern="80%", sparsity=0.8, loss="CE", seed=0, train_size=size, split="validation",
                         value=value, spikes=0, max_grad_norm=1.0, final_loss=0.1, train_s=1.0))
    return RecoveryResults(task="math", metric="accuracy", higher_is_better=higher_is_better, config=config,
                           runs=pd.DataFrame(rows), one_shot=pd.DataFrame([dict(pattern="80%", sparsity=0.8,
                                                                                 value=0.2)]),
                           reference=dict(dense=0.6, baseline=0.01, baseline_name="most common",
                                          dense_validation=0.6, parameters=1),
                           curves={}, train_size=400, size_key=400, seconds={})


def test_findings_read_every_number_from_the_results():
    from sparsekit.distill.report import findings, gap_closed

    assert gap_closed(0.4, 0.2, 0.6) == pytest.approx(0.5)
    assert gap_closed(30.0, 50.0, 10.0) == pytest.approx(0.5)  # lower-is-better metric: same share
    text = findings(_synthetic_results())
    assert "best loss is **CE+SquareHead** (0.600 against 0.200 one-shot and 0.600 dense)" in text
    assert "CE 50%, CE+SquareHead 100%" in text  # CE mean 0.4 closes half of 0.2 -> 0.6
    assert "CE 3, CE+SquareHead 0" in text  # spikes summed over seeds
    assert "400 training rows, chosen on validation among 100, 400" in text
    assert "No sparse student's worst seed beats the dense teacher" in text  # worst seed 0.5 < 0.6


def test_findings_name_a_student_whose_worst_seed_beats_the_teacher():
    from sparsekit.distill.report import findings

    results = _synthetic_results()
    results.reference["dense"] = 0.45
    assert "Worst seed above the dense teacher: CE+SquareHead at 80%." in findings(results)


def test_group_by_length_needs_a_task_with_row_lengths():
    config = with_overrides(recovery_config("speech", "smoke"), group_by_length=True)
    with pytest.raises(ValueError, match="group_by_length=True needs a task with row_length; speech has"):
        RecoveryExperiment("speech", "smoke", config, progress=False)
    grouped = with_overrides(recovery_config("math", "smoke"), group_by_length=True)
    RecoveryExperiment("math", "smoke", grouped, progress=False)
    for name in ("group_by_length", "bf16"):
        with pytest.raises(ValueError, match=f"{name} must be True or False, got 'no'"):
            with_overrides(recovery_config("math", "smoke"), **{name: "no"})


def test_streaming_runs_the_same_runs_one_pattern_at_a_time(tmp_path, monkeypatch):
    """``stream=True`` (the paper-scale default): the same rows as the book's order, at most one pruned
    model alive at a time, every fine-tuned model freed after its evaluation and saved with its zeros."""
    from transformers import AutoModelForSeq2SeqLM

    from sparsekit.distill import experiment as experiment_module
    from sparsekit.masks import sparsity_report

    config = with_overrides(recovery_config("translation", "smoke"), patterns=("50%", "80%"),
                            headline=("80%",), losses=("CE", "CE+SquareHead"), seeds=(0, 1), train_size=8,
                            steps=2)
    book = RecoveryExperiment("translation", "smoke", config, progress=False, stream=False).run()
    streamed_experiment = RecoveryExperiment("translation", "smoke", config, progress=False, stream=True,
                                             save_dir=tmp_path)
    alive = []
    pruned = streamed_experiment.pruned
    monkeypatch.setattr(streamed_experiment, "pruned",
                        lambda pattern: (alive.append(len(streamed_experiment._pruned)), pruned(pattern))[1])
    streamed = streamed_experiment.run()
    columns = ["pattern", "loss", "seed", "train_size", "split", "value"]
    order = ["pattern", "loss", "seed", "split"]
    assert book.runs[columns].sort_values(order).reset_index(drop=True).equals(
        streamed.runs[columns].sort_values(order).reset_index(drop=True))
    assert book.one_shot["value"].tolist() == streamed.one_shot["value"].tolist()
    assert max(alive) <= 1 and not streamed_experiment._pruned
    assert all(result.model is None for result in streamed_experiment._models.values())
    assert RecoveryExperiment("translation", "paper", config, progress=False).stream
    folders = sorted(path.name for path in tmp_path.iterdir())
    assert len(folders) == 6 and experiment_module._run_folder("80%", "CE+SquareHead", 1, 8) in folders
    saved = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / experiment_module._run_folder("80%", "CE", 0, 8))
    assert sparsity_report(saved)["sparsity"].iloc[-1] > 0.79
