"""Chapter 09: the paper's three open questions, measured at small scale and answered in one sentence each.

1. **Where does recovery stop?** The *margin* of the dense teacher over the strongest cheap baseline is
   ``m = t − b`` (``b − t`` for a lower-is-better metric such as WER). A student with metric ``v`` keeps
   the fraction ``(v − b) / (t − b)`` of it and loses ``1 −`` that (:func:`margin_lost`).
   :func:`recovery_limits` gives, per loss and threshold (1 %, 5 %, 10 % of the margin), the lowest
   sparsity whose mean over seeds loses more than the threshold, and the same for the worst and the best
   seed. :func:`longer_run` fine-tunes once more with more steps at the first failing sparsity.
2. **Does the best loss depend on the architecture?** :func:`loss_comparison` takes each task's recovery
   results at the multi-seed pattern where the losses differ most: the best loss and which differences
   to CE exceed the seed-to-seed spread.
3. **How do sparsity and quantization trade off?** :func:`quantization_vs_sparsity` compares, on the
   recovered students' grid sparsity × precision (:func:`sparsekit.quant.report.quantize_students`), the
   cost of each quantization step with the cost of the next sparsity step.

Each section ends with a sentence built by :func:`answer_recovery`, :func:`answer_losses` or
:func:`answer_tradeoff` from the measured tables only. The runs that chapters 03–05 already made are read
from their cache (:mod:`sparsekit.distill.store`) and only the missing ones run (:func:`extend_recovery`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from sparsekit.distill.experiment import compare_losses, parse_pattern, seed_spread, with_overrides

__all__ = ["ARCHITECTURES", "QUESTION_CONFIGS", "has_margin", "margin_lost", "chosen_test_runs",
           "extend_recovery",
           "recovered_student", "longer_run", "longer_summary", "first_failing", "recovery_limits",
           "answer_recovery", "loss_comparison", "answer_losses", "quantization_vs_sparsity",
           "answer_tradeoff"]

ARCHITECTURES = {"translation": "encoder-decoder (T5)", "speech": "encoder-decoder (Whisper)",
                 "math": "decoder-only (MPT)"}

# What chapter 09 adds to chapters 03–05's runs, per scale. Book: two sparsities beyond 03–05's grid for
# CE and CE+SquareHead (seed 0), one run with twice the steps per task, and the 50 % student in the grid of
# question 3 (70 % and 80 % are chapter 08's).
QUESTION_CONFIGS = {
    "smoke": dict(patterns=("50%", "80%", "95%"), losses=("CE", "CE+SquareHead"), longer_steps=2,
                  grid_patterns=("50%", "80%"), thresholds=(0.01, 0.05, 0.10)),
    "book": dict(patterns=("50%", "60%", "70%", "80%", "90%", "95%"), losses=("CE", "CE+SquareHead"),
                 longer_steps=2, grid_patterns=("50%", "70%", "80%"), thresholds=(0.01, 0.05, 0.10)),
}
QUESTION_CONFIGS["paper"] = QUESTION_CONFIGS["book"]


# ---- question 1 --------------------------------------------------------------------------------------------

def has_margin(dense: float, baseline: float, higher_is_better: bool) -> bool:
    """Whether the teacher beats the baseline (at smoke scale the teachers are untrained and do not)."""
    return bool((dense - baseline) > 0 if higher_is_better else (baseline - dense) > 0)


def margin_lost(value: float, dense: float, baseline: float, higher_is_better: bool) -> float:
    """The fraction of the teacher's margin over the baseline that ``value`` loses (0: none, 1: all);
    NaN when the teacher has no margin to lose (:func:`has_margin`)."""
    if not has_margin(dense, baseline, higher_is_better):
        return math.nan
    margin = (dense - baseline) if higher_is_better else (baseline - dense)
    kept = (value - baseline) if higher_is_better else (baseline - value)
    return 1.0 - kept / margin


def chosen_test_runs(results) -> pd.DataFrame:
    """The test rows of a :class:`~sparsekit.distill.experiment.RecoveryResults` on its chosen subset."""
    runs = results.runs
    runs = runs[(runs.split == "test") & (runs.train_size == results.train_size)]
    return runs[["pattern", "sparsity", "loss", "seed", "value"]].assign(steps=results.config.steps)


def extend_recovery(experiment, results, patterns: Sequence[str], losses: Sequence[str],
                    seed: int | None = None) -> pd.DataFrame:
    """``results``' test runs plus the (pattern, loss) pairs it lacks, fine-tuned now by ``experiment``
    (a :class:`~sparsekit.distill.experiment.RecoveryExperiment` with the same task, scale and config)
    on the same training subset, seed ``seed`` (default: the config's first)."""
    seed = results.config.seeds[0] if seed is None else seed
    have = chosen_test_runs(results)
    done = set(zip(have.pattern, have.loss))
    for pattern in patterns:
        for loss in losses:
            if (pattern, loss) not in done:
                experiment.fine_tune(pattern, loss, seed, results.size_key, ("test",))
    new = experiment.measured_runs()
    if not new.empty:
        new = new[new.split == "test"][["pattern", "sparsity", "loss", "seed", "value"]]
        have = pd.concat([have, new.assign(steps=results.config.steps)], ignore_index=True)
    return have[have.pattern.isin(patterns) & have.loss.isin(losses)].reset_index(drop=True)


def recovered_student(experiment, folder, results, pattern: str, loss: str = "CE+SquareHead"):
    """The fine-tuned student of ``pattern`` (seed 0): from the cache when chapters 03–05 saved it, else
    fine-tuned now by ``experiment`` on ``results``' training subset."""
    from sparsekit.distill import store

    saved = store.saved_students(folder)
    if ((saved.pattern == pattern) & (saved.loss == loss) & (saved.seed == results.config.seeds[0])).any():
        return store.load_student(folder, experiment.task, pattern, loss, results.config.seeds[0])
    return experiment.student(pattern, loss, results.config.seeds[0], results.size_key).eval()


def longer_run(task_name: str, scale: str, results, pattern: str, loss: str, factor: int,
               teacher=None) -> dict:
    """One fine-tuning run at ``pattern`` with ``factor`` × the configured steps (seed 0, same subset)."""
    from sparsekit.distill.experiment import RecoveryExperiment

    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise ValueError(f"factor must be an int >= 2 (more steps than the configured run), got {factor!r}")
    config = with_overrides(results.config, steps=factor * results.config.steps,
                            warmup=factor * results.config.warmup)
    experiment = RecoveryExperiment(task_name, scale, config, progress=False, teacher=teacher, save=False)
    experiment.fine_tune(pattern, loss, config.seeds[0], results.size_key, ("test",))
    row = experiment.measured_runs().iloc[0]
    return {"pattern": pattern, "sparsity": parse_pattern(pattern)[0], "loss": loss, "seed": int(row.seed),
            "value": float(row.value), "steps": config.steps}


def longer_summary(longer: Mapping, runs: pd.DataFrame, dense: float, baseline: float,
                   higher_is_better: bool) -> dict:
    """The :func:`longer_run` row with ``"lost"`` (its margin lost), ``"lost before"`` (the configured
    run's, same pattern, loss and seed, from ``runs``) and ``"steps_before"``."""
    before = runs[(runs.pattern == longer["pattern"]) & (runs.loss == longer["loss"])
                  & (runs.seed == longer["seed"])]
    if before.empty:
        raise ValueError(f"runs has no {longer['pattern']} {longer['loss']} seed {longer['seed']} row")
    return {**longer, "lost": margin_lost(longer["value"], dense, baseline, higher_is_better),
            "lost before": margin_lost(float(before.value.iloc[0]), dense, baseline, higher_is_better),
            "steps_before": int(before.steps.iloc[0])}


def first_failing(limits: pd.DataFrame, loss: str, threshold: float) -> float:
    """The first failing sparsity (mean over seeds) of ``loss`` at ``threshold``; NaN when none fails."""
    row = limits[(limits.loss == loss) & (limits.threshold == threshold)]
    if row.empty:
        raise ValueError(f"limits has no row for loss {loss!r} at threshold {threshold}")
    return float(row["mean"].iloc[0])


def recovery_limits(runs: pd.DataFrame, dense: float, baseline: float, higher_is_better: bool,
                    thresholds: Sequence[float] = (0.01, 0.05, 0.10)) -> pd.DataFrame:
    """Per loss and threshold: the lowest sparsity losing more than ``threshold`` of the margin.

    ``runs``: ``sparsity``, ``loss``, ``seed``, ``value`` (test). Columns: ``loss``, ``threshold``,
    ``mean`` (first failing sparsity of the mean over seeds), ``worst seed``, ``best seed`` (of the
    per-sparsity worst / best seed), ``last tested``, ``no margin`` (the teacher does not beat the
    baseline: nothing can fail); NaN: no tested sparsity fails.
    """
    rows = []
    worst, best = (min, max) if higher_is_better else (max, min)
    for loss, frame in runs.groupby("loss", sort=False):
        by_sparsity = frame.groupby("sparsity")["value"]
        summary = {"mean": by_sparsity.mean(), "worst seed": by_sparsity.agg(worst),
                   "best seed": by_sparsity.agg(best)}
        for threshold in thresholds:
            row = {"loss": loss, "threshold": threshold}
            for name, values in summary.items():
                failing = [s for s, v in values.items()
                           if margin_lost(v, dense, baseline, higher_is_better) > threshold]
                row[name] = min(failing) if failing else math.nan
            row["last tested"] = float(max(values.index))
            row["no margin"] = not has_margin(dense, baseline, higher_is_better)
            rows.append(row)
    return pd.DataFrame(rows)


def _pct(sparsity: float) -> str:
    return f"{round(100 * sparsity)}%"


def answer_recovery(limits: Mapping[str, pd.DataFrame], longer: Mapping[str, Mapping] | None = None,
                    threshold: float = 0.05) -> str:
    """One sentence: per task, the first sparsity at which each loss loses more than ``threshold`` of
    the margin, and whether the longer run there kept it within ``threshold`` (``longer[task]``: the
    :func:`longer_run` row plus ``"lost"`` (its margin lost) and ``"lost before"``)."""
    parts = []
    for task, frame in limits.items():
        rows = frame[frame.threshold == threshold]
        if rows.empty:
            raise ValueError(f"threshold {threshold} was not measured for {task}")
        if rows["no margin"].all():
            parts.append(f"{task}: not measurable, the teacher does not beat the baseline at this scale")
            continue
        said = []
        for _, row in rows.iterrows():
            if math.isnan(row["mean"]):
                said.append(f"{row.loss} holds up to the highest tested {_pct(row['last tested'])}")
            else:
                said.append(f"{row.loss} first loses more at {_pct(row['mean'])}")
        text = f"{task}: " + ", ".join(said)
        extra = (longer or {}).get(task)
        if extra and not math.isnan(extra["lost"]):
            moved = "kept it within" if extra["lost"] <= threshold else "did not bring it back within"
            text += (f" ({extra['steps']} steps instead of {extra['steps_before']} at "
                     f"{_pct(extra['sparsity'])} {moved} the limit: {100 * extra['lost']:.1f}% of the "
                     f"margin lost against {100 * extra['lost before']:.1f}%)")
        parts.append(text)
    return (f"Recovery stops, at {100 * threshold:g}% of the teacher's margin over the best cheap baseline, "
            + "; ".join(parts) + ".")


# ---- question 2 --------------------------------------------------------------------------------------------

def loss_comparison(results_by_task: Mapping[str, object]) -> pd.DataFrame:
    """Per task, at the multi-seed pattern where the losses' means differ most: the best loss, its mean,
    the range of the means, and each loss's gain over CE with whether it exceeds the seed spread."""
    rows = []
    for task, results in results_by_task.items():
        spread = seed_spread(results)
        spread = spread[spread.n > 1]
        if spread.empty:
            raise ValueError(f"{task}: no pattern has several seeds; the seed spread cannot be measured")
        ranges = spread.groupby("pattern", sort=False)["mean"].agg(lambda v: v.max() - v.min())
        pattern = ranges.idxmax()
        cells = spread[spread.pattern == pattern].set_index("loss")["mean"]
        best = cells.idxmax() if results.higher_is_better else cells.idxmin()
        gains = compare_losses(results)
        gains = gains[gains.pattern == pattern]
        exceeding = gains[gains["exceeds spread"]].loss.tolist()
        rows.append({"task": task, "architecture": ARCHITECTURES.get(task, task), "pattern": pattern,
                     "best loss": best, "best mean": float(cells[best]),
                     "range of means": float(ranges[pattern]),
                     "beyond the seed spread vs CE": ", ".join(exceeding) or "none"})
    return pd.DataFrame(rows)


def answer_losses(comparison: pd.DataFrame) -> str:
    """One sentence: the best loss per architecture, whether it is the same everywhere, and which of its
    differences to CE exceed the seed spread."""
    def said(r) -> str:
        if r["range of means"] == 0:
            return "all losses tie"
        return f"{r['best loss']} (beyond the seed spread vs CE: {r['beyond the seed spread vs CE']})"

    per_task = "; ".join(f"{r.task} ({r.architecture}, {r.pattern}): {said(r)}"
                         for _, r in comparison.iterrows())
    same = comparison["best loss"].nunique() == 1 and bool((comparison["range of means"] > 0).all())
    verdict = ("the same loss is best on every architecture" if same
               else "the best loss differs between the tasks")
    return f"At the sparsity where the losses differ most, {verdict}: {per_task}."


# ---- question 3 --------------------------------------------------------------------------------------------

def quantization_vs_sparsity(frame: pd.DataFrame, higher_is_better: bool, unit: float) -> pd.DataFrame:
    """Per sparsity and quantized precision of ``frame`` (rows of
    :func:`~sparsekit.quant.report.quantize_students`, one route): the quantization's cost against the
    same model in float, and the cost of the next sparsity step in float instead, in points (× ``unit``),
    with both variants' bytes per weight. ``costlier``: quantization costs more than that sparsity step."""
    sign = 1.0 if higher_is_better else -1.0
    float_rows = frame[frame.bits == 0].set_index("sparsity").sort_index()
    sparsities = list(float_rows.index)
    rows = []
    for sparsity in sparsities[:-1]:
        following = sparsities[sparsities.index(sparsity) + 1]
        base, step = float_rows.loc[sparsity], float_rows.loc[following]
        step_cost = unit * sign * (base.value - step.value)
        for _, quant in frame[(frame.bits > 0) & (frame.sparsity == sparsity)].iterrows():
            cost = unit * sign * (base.value - quant.value)
            rows.append({"sparsity": sparsity, "bits": int(quant.bits), "quantization cost": cost,
                         "bytes quantized": quant.bytes_per_weight, "next sparsity": following,
                         "next step cost": step_cost, "bytes next step": step.bytes_per_weight,
                         "costlier": bool(cost > step_cost)})
    return pd.DataFrame(rows)


def answer_tradeoff(tables: Mapping[str, pd.DataFrame]) -> str:
    """One sentence: per task, where quantizing costs more than the next sparsity step (or nowhere)."""
    parts = []
    for task, table in tables.items():
        costly = table[table.costlier]
        if costly.empty:
            parts.append(f"{task}: nowhere in {len(table)} comparisons")
        else:
            cases = ", ".join(f"int{r.bits} at {_pct(r.sparsity)} ({r['quantization cost']:+.2f} vs "
                              f"{r['next step cost']:+.2f} points to {_pct(r['next sparsity'])})"
                              for _, r in costly.iterrows())
            parts.append(f"{task}: {cases}")
    return "Quantization costs more than the next sparsity step on " + "; ".join(parts) + "."
