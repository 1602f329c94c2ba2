"""Chapter 09's logic: margins, recovery limits, loss comparison, quantization against sparsity, and the
one-sentence answers, which must change when the measurements do."""

import math

import pandas as pd
import pytest

from sparsekit import open_questions as oq
from sparsekit.distill.experiment import RecoveryConfig, RecoveryExperiment, RecoveryResults, with_overrides


def test_margin_lost_for_both_metric_directions():
    assert oq.margin_lost(0.5, dense=0.6, baseline=0.1, higher_is_better=True) == pytest.approx(0.2)
    assert oq.margin_lost(0.3, dense=0.2, baseline=0.7, higher_is_better=False) == pytest.approx(0.2)  # WER
    assert oq.margin_lost(0.7, dense=0.6, baseline=0.1, higher_is_better=True) < 0  # beats the teacher
    assert math.isnan(oq.margin_lost(0.5, dense=0.1, baseline=0.1, higher_is_better=True))  # no margin
    runs = _runs({"CE": (0.6, (0.5, 0.58), 0.2)})
    limits = oq.recovery_limits(runs, dense=0.1, baseline=0.2, higher_is_better=True)
    assert limits["no margin"].all() and limits["mean"].isna().all()
    assert "math: not measurable" in oq.answer_recovery({"math": limits})


def _runs(values):
    """CE and CE+SquareHead at 50/70/90 %, two seeds at 70 %: ``values[loss] = (v50, (v70a, v70b), v90)``."""
    rows = []
    for loss, (v50, v70, v90) in values.items():
        rows.append(dict(pattern="50%", sparsity=0.5, loss=loss, seed=0, value=v50, steps=10))
        rows += [dict(pattern="70%", sparsity=0.7, loss=loss, seed=s, value=v, steps=10)
                 for s, v in enumerate(v70)]
        rows.append(dict(pattern="90%", sparsity=0.9, loss=loss, seed=0, value=v90, steps=10))
    return pd.DataFrame(rows)


def test_recovery_limits_use_the_mean_and_each_seed():
    runs = _runs({"CE": (0.6, (0.5, 0.58), 0.2), "CE+SquareHead": (0.6, (0.6, 0.6), 0.59)})
    limits = oq.recovery_limits(runs, dense=0.6, baseline=0.1, higher_is_better=True, thresholds=(0.05,))
    ce = limits[limits.loss == "CE"].iloc[0]
    assert ce["mean"] == 0.7 and ce["worst seed"] == 0.7 and ce["best seed"] == 0.9  # 0.58 loses 4 %
    sh = limits[limits.loss == "CE+SquareHead"].iloc[0]
    assert math.isnan(sh["mean"]) and sh["last tested"] == 0.9
    assert oq.first_failing(limits, "CE", 0.05) == 0.7


def test_answer_recovery_is_built_from_the_measurements():
    texts = []
    for v90 in (0.59, 0.3):
        runs = _runs({"CE": (0.6, (0.5, 0.58), 0.2), "CE+SquareHead": (0.6, (0.6, 0.6), v90)})
        limits = {"math": oq.recovery_limits(runs, 0.6, 0.1, True)}
        longer = oq.longer_summary(dict(pattern="90%", sparsity=0.9, loss="CE+SquareHead", seed=0, value=0.58,
                                        steps=20), runs, 0.6, 0.1, True)
        texts.append(oq.answer_recovery(limits, {"math": longer}))
    assert texts[0] != texts[1]
    assert "CE+SquareHead holds up to the highest tested 90%" in texts[0]
    assert "CE+SquareHead first loses more at 90%" in texts[1] and "CE first loses more at 70%" in texts[1]
    assert "20 steps instead of 10 at 90% kept it within" in texts[1]
    assert "4.0% of the margin lost against 60.0%" in texts[1]


def _results(task, ce, sh, higher=True):
    """RecoveryResults with CE and CE+SquareHead over two seeds at 70 % and one at 50 %."""
    config = RecoveryConfig(patterns=("50%", "70%"), steps=1, batch_size=1, lr=1e-3, warmup=0,
                            train_sizes=(8,), losses=("CE", "CE+SquareHead"), headline=("70%",),
                            sweep_pattern="70%", sweep_losses=("CE",))
    rows = [dict(pattern="50%", sparsity=0.5, loss=loss, seed=0, train_size=8, split="test", value=0.5)
            for loss in ("CE", "CE+SquareHead")]
    for loss, values in (("CE", ce), ("CE+SquareHead", sh)):
        rows += [dict(pattern="70%", sparsity=0.7, loss=loss, seed=s, train_size=8, split="test", value=v)
                 for s, v in enumerate(values)]
    return RecoveryResults(task=task, metric="accuracy", higher_is_better=higher, config=config,
                           runs=pd.DataFrame(rows), one_shot=pd.DataFrame(), reference={"dense": 0.6},
                           curves={}, train_size=8, size_key=8, seconds={})


def test_loss_comparison_and_its_answer_follow_the_seed_spread():
    wide = {"translation": _results("translation", (0.30, 0.34), (0.50, 0.52)),
            "math": _results("math", (0.30, 0.34), (0.31, 0.35))}
    table = oq.loss_comparison(wide)
    assert table.set_index("task")["best loss"].to_dict() == {"translation": "CE+SquareHead",
                                                              "math": "CE+SquareHead"}
    assert table.set_index("task")["beyond the seed spread vs CE"].to_dict() == {
        "translation": "CE+SquareHead", "math": "none"}
    flipped = {**wide, "math": _results("math", (0.40, 0.42), (0.30, 0.31))}
    first, second = oq.answer_losses(table), oq.answer_losses(oq.loss_comparison(flipped))
    assert "the same loss is best on every architecture" in first
    assert "differs between the tasks" in second and "decoder-only (MPT), 70%): CE (" in second
    tied = {"math": _results("math", (0.30, 0.34), (0.30, 0.34))}
    assert "math (decoder-only (MPT), 70%): all losses tie" in oq.answer_losses(oq.loss_comparison(tied))


def _grid(int4_at_50):
    rows = []
    for sparsity, value, size in ((0.0, 0.60, 2.0), (0.5, 0.58, 1.1), (0.8, 0.50, 0.5)):
        rows.append(dict(sparsity=sparsity, bits=0, value=value, bytes_per_weight=size))
        rows.append(dict(sparsity=sparsity, bits=8, value=value - 0.001, bytes_per_weight=size / 2))
    rows.append(dict(sparsity=0.5, bits=4, value=int4_at_50, bytes_per_weight=0.4))
    return pd.DataFrame(rows)


def test_quantization_against_the_next_sparsity_step_and_its_answer():
    table = oq.quantization_vs_sparsity(_grid(0.57), True, unit=100)
    row = table[(table.sparsity == 0.5) & (table.bits == 4)].iloc[0]
    assert row["quantization cost"] == pytest.approx(1.0) and row["next step cost"] == pytest.approx(8.0)
    assert not table.costlier.any()
    costly = oq.quantization_vs_sparsity(_grid(0.40), True, unit=100)
    first, second = oq.answer_tradeoff({"math": table}), oq.answer_tradeoff({"math": costly})
    assert "nowhere in 3 comparisons" in first
    assert "int4 at 50% (+18.00 vs +8.00 points to 80%)" in second


def test_extend_recovery_runs_only_what_the_cache_lacks_and_longer_run_uses_more_steps():
    from sparsekit import tasks

    task = tasks.get("translation")
    teacher = task.teacher("smoke", progress=False)
    config = with_overrides(RecoveryConfig(patterns=("80%",), steps=2, batch_size=8, lr=1e-3, warmup=0,
                                           train_sizes=(8,), train_size=8, seeds=(0,), headline=("80%",),
                                           losses=("CE", "CE+SquareHead"), sweep_pattern="80%",
                                           eval_limit=4, n_calib=8, calib_batch_size=8))
    results = RecoveryExperiment("translation", "smoke", config, progress=False, teacher=teacher,
                                 save=False).run()
    experiment = RecoveryExperiment("translation", "smoke", config, progress=False, teacher=teacher,
                                    save=False)
    runs = oq.extend_recovery(experiment, results, ["50%", "80%"], ["CE+SquareHead"])
    assert sorted(runs.pattern) == ["50%", "80%"] and set(runs.loss) == {"CE+SquareHead"}
    assert set(experiment.measured_runs().pattern) == {"50%"}  # 80 % came from the results
    longer = oq.longer_run("translation", "smoke", results, "80%", "CE+SquareHead", 2, teacher=teacher)
    assert longer["steps"] == 4 and longer["pattern"] == "80%"
    with pytest.raises(ValueError, match="factor"):
        oq.longer_run("translation", "smoke", results, "80%", "CE", 1, teacher=teacher)


def test_recovered_student_loads_the_saved_one_or_fine_tunes_it(tmp_path):
    from sparsekit import tasks
    from sparsekit.distill import store

    task = tasks.get("translation")
    teacher = task.teacher("smoke", progress=False)
    config = RecoveryConfig(patterns=("80%",), steps=1, batch_size=8, lr=1e-3, warmup=0, train_sizes=(8,),
                            train_size=8, seeds=(0,), headline=("80%",), losses=("CE+SquareHead",),
                            sweep_pattern="80%", sweep_losses=("CE+SquareHead",), eval_limit=2, n_calib=8,
                            calib_batch_size=8)
    first = RecoveryExperiment("translation", "smoke", config, progress=False, teacher=teacher, save=False)
    results = first.run()
    folder = store.save_experiment(tmp_path / "saved", results,
                                   {("80%", "CE+SquareHead", 0): first.student("80%", "CE+SquareHead", 0, 8)})
    later = RecoveryExperiment("translation", "smoke", config, progress=False, teacher=teacher, save=False)
    loaded = oq.recovered_student(later, folder, results, "80%")
    assert later.measured_runs().empty  # read from the cache, nothing fine-tuned
    new = oq.recovered_student(later, folder, results, "50%")
    zeros = [float((p == 0).float().mean()) for n, p in new.named_parameters() if n.endswith("q.weight")]
    assert loaded is not None and min(zeros) > 0.4  # the 50 % student was pruned and fine-tuned now
