"""Figures and measured sentences for the recovery notebooks (03-05), from :class:`RecoveryResults`.

Every number in the text is read from the results; nothing is asserted in advance.
"""

from __future__ import annotations

import pandas as pd

from sparsekit.distill.experiment import RecoveryResults, compare_losses, parse_pattern, seed_spread

__all__ = ["axis_label", "plot_recovery", "plot_loss_curves", "plot_data_sweep", "stability_table",
           "data_sweep_table", "recovery_text", "beats_teacher", "gap_closed", "findings"]

METRIC_LABELS = {"bleu": "BLEU", "wer": "WER (%)", "accuracy": "accuracy"}


def axis_label(results: RecoveryResults, split: str = "test") -> str:
    """``"test BLEU (higher is better)"`` and the like, for a figure's metric axis."""
    direction = "higher is better" if results.higher_is_better else "lower is better"
    return f"{split} {METRIC_LABELS.get(results.metric, results.metric)} ({direction})"


def _scale(results: RecoveryResults) -> float:
    return 100.0 if results.metric == "wer" else 1.0


def plot_recovery(results: RecoveryResults, ax=None):
    """Test metric against sparsity: a line per loss (mean over seeds, min-max bars where several),
    one-shot SparseGPT dashed, the dense teacher and the trivial baseline as horizontal lines; N:M
    patterns as separate markers at their sparsity."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    k = _scale(results)
    spread = seed_spread(results)
    spread["nm"] = [parse_pattern(p)[1] is not None for p in spread.pattern]
    spread["sparsity"] = [100 * parse_pattern(p)[0] for p in spread.pattern]
    palette = dict(zip(results.config.losses, sns.color_palette(n_colors=len(results.config.losses))))
    for loss in results.config.losses:
        line = spread[(spread.loss == loss) & ~spread.nm].sort_values("sparsity")
        ax.errorbar(line.sparsity, k * line["mean"], yerr=[k * (line["mean"] - line["min"]),
                                                           k * (line["max"] - line["mean"])],
                    fmt="-o", ms=4, capsize=3, color=palette[loss], label=loss)
        for _, cell in spread[(spread.loss == loss) & spread.nm].iterrows():
            ax.scatter(cell.sparsity, k * cell["mean"], marker="s", s=50, color=palette[loss], edgecolor="k",
                       zorder=3)
    shot = results.one_shot.assign(nm=[parse_pattern(p)[1] is not None for p in results.one_shot.pattern])
    line = shot[~shot.nm].sort_values("sparsity")
    ax.plot(100 * line.sparsity, k * line["value"], "--", color="grey", marker="x",
            label="one-shot SparseGPT")
    for _, cell in shot[shot.nm].iterrows():
        ax.scatter(100 * cell.sparsity, k * cell["value"], marker="s", s=50, color="grey", edgecolor="k")
    ax.axhline(k * results.reference["dense"], color="k", lw=2, alpha=0.5, label="dense teacher")
    ax.axhline(k * results.reference["baseline"], color="k", ls=":", label="strongest trivial baseline")
    nm = sorted(set(spread.pattern[spread.nm]))
    title = f"{results.task}: recovery after sparse fine-tuning"
    ax.set_title(title + (f" (squares: {', '.join(nm)})" if nm else ""))
    ax.set_xlabel("sparsity of the pruned layers (%)")
    ax.set_ylabel(axis_label(results))
    ax.legend(fontsize=8, loc="best")
    return ax


def plot_loss_curves(results: RecoveryResults, pattern: str | None = None, ax=None):
    """Training loss per optimizer step for every loss at ``pattern`` (default: the highest unstructured
    sparsity), seed ``seeds[0]``, on the chosen training subset; loss spikes circled."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from sparsekit.distill.trainer import loss_spikes

    pattern = pattern or _highest(results)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    palette = dict(zip(results.config.losses, sns.color_palette(n_colors=len(results.config.losses))))
    seed = results.config.seeds[0]
    for loss in results.config.losses:
        record = results.curves.get((pattern, loss, seed, results.size_key))
        if not record:
            continue
        steps, values = [e["step"] for e in record], [e["loss"] for e in record]
        ax.plot(steps, values, color=palette[loss], lw=1.2, label=loss)
        spikes = loss_spikes(values)
        ax.scatter([steps[t] for t in spikes], [values[t] for t in spikes], s=60, facecolors="none",
                   edgecolors=palette[loss])
    ax.set_yscale("log")
    ax.set_title(f"{results.task}: training loss at {pattern} (seed {seed})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (each loss's own mix, log scale)")
    ax.legend(fontsize=8)
    return ax


def plot_data_sweep(results: RecoveryResults, ax=None):
    """Validation metric against the size of the fine-tuning subset, at the sweep's sparsity."""
    import matplotlib.pyplot as plt

    frame = data_sweep_table(results)
    if frame.empty:
        return None
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    k = _scale(results)
    for loss, line in frame.groupby("loss", sort=False):
        ax.plot(line.train_size, k * line.value, "-o", label=loss)
    ax.axhline(k * results.reference["dense_validation"], color="k", lw=2, alpha=0.5, label="dense teacher")
    ax.axvline(results.train_size, color="grey", ls=":", label=f"chosen: {results.train_size} rows")
    ax.set_xscale("log")
    sizes = sorted(set(frame.train_size))
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.minorticks_off()
    ax.set_title(f"{results.task}: fine-tuning set size at {results.config.sweep_pattern}")
    ax.set_xlabel("training rows used for fine-tuning (log scale)")
    ax.set_ylabel(axis_label(results, "validation"))
    ax.legend(fontsize=8)
    return ax


def data_sweep_table(results: RecoveryResults) -> pd.DataFrame:
    runs = results.runs
    frame = runs[(runs.split == "validation") & (runs.pattern == results.config.sweep_pattern)]
    return frame[["train_size", "loss", "value", "spikes", "train_s"]].sort_values(["loss", "train_size"])


def stability_table(results: RecoveryResults) -> pd.DataFrame:
    """Loss spikes (steps above 1.5× the running median of the 20 before), the largest gradient norm and
    the mean final training loss, per pattern and loss (summed / maximised / averaged over seeds), on the
    chosen subset."""
    runs = results.runs[(results.runs.split == "test") & (results.runs.train_size == results.train_size)]
    return runs.groupby(["pattern", "loss"], sort=False).agg(
        spikes=("spikes", "sum"), max_grad_norm=("max_grad_norm", "max"), final_loss=("final_loss", "mean"),
        runs=("seed", "count"),
    ).reset_index()


def beats_teacher(results: RecoveryResults) -> pd.DataFrame:
    """(pattern, loss) whose *worst* seed is better than the dense teacher on test."""
    spread = seed_spread(results)
    dense = results.reference["dense"]
    worst = spread["min"] if results.higher_is_better else spread["max"]
    better = worst > dense if results.higher_is_better else worst < dense
    return spread[better]


def _highest(results: RecoveryResults) -> str:
    unstructured = [p for p in results.config.patterns if parse_pattern(p)[1] is None]
    return max(unstructured, key=lambda p: parse_pattern(p)[0])


def _fmt(results: RecoveryResults, value: float) -> str:
    return f"{100 * value:.1f}%" if results.metric == "wer" else f"{value:.3f}"


def recovery_text(results: RecoveryResults) -> str:
    """A short Markdown paragraph with the measured numbers at the headline patterns."""
    spread = seed_spread(results)
    shot = results.one_shot.set_index("pattern")["value"]
    metric = {"bleu": "BLEU", "wer": "WER"}.get(results.metric, results.metric)
    lines = [f"The dense teacher scores {_fmt(results, results.reference['dense'])} {metric} on test, the "
             f"trivial baseline ({results.reference['baseline_name']}) "
             f"{_fmt(results, results.reference['baseline'])}."]
    for pattern in results.config.headline:
        cells = spread[spread.pattern == pattern].set_index("loss")
        parts = ", ".join(f"{loss} {_fmt(results, cells.loc[loss, 'mean'])} "
                          f"[{_fmt(results, cells.loc[loss, 'min'])}–{_fmt(results, cells.loc[loss, 'max'])}]"
                          for loss in results.config.losses if loss in cells.index)
        lines.append(f"At {pattern}, one-shot SparseGPT gives {_fmt(results, shot[pattern])}; after "
                     f"fine-tuning (mean [min–max] over {int(cells['n'].max())} seeds): {parts}.")
    compared = compare_losses(results)
    if not compared.empty:
        above = compared[compared["exceeds spread"]]
        if above.empty:
            lines.append("No loss differs from CE by more than the seed-to-seed spread at these patterns.")
        else:
            better = above[above.iloc[:, 2] > 0]
            worse = above[above.iloc[:, 2] < 0]
            if not better.empty:
                lines.append("Better than CE by more than the seed spread: " + "; ".join(
                    f"{r.loss} at {r.pattern}" for r in better.itertuples()) + ".")
            if not worse.empty:
                lines.append("Worse than CE by more than the seed spread: " + "; ".join(
                    f"{r.loss} at {r.pattern}" for r in worse.itertuples()) + ".")
    return " ".join(lines)


def gap_closed(value: float, one_shot: float, dense: float) -> float:
    """Share of the one-shot → dense gap that fine-tuning closes: ``(value − one_shot) / (dense − one_shot)``
    (1 = back to the dense teacher, 0 = no better than one-shot; the sign convention of the metric cancels).
    ``nan`` when one-shot already equals the teacher."""
    return float("nan") if dense == one_shot else (value - one_shot) / (dense - one_shot)


def findings(results: RecoveryResults) -> str:
    """The chapter's closing Markdown bullets, every number read from ``results``: the share of the
    one-shot gap each loss closes at the headline patterns, the best loss there, loss spikes at the
    headline patterns and the highest sparsity, the fine-tuning set chosen on validation, and whether a
    student beats its teacher."""
    spread = seed_spread(results)
    shot = results.one_shot.set_index("pattern")["value"]
    dense = results.reference["dense"]
    sign = 1.0 if results.higher_is_better else -1.0
    bullets = []
    for pattern in results.config.headline:
        cells = spread[spread.pattern == pattern].set_index("loss")["mean"]
        best = (sign * cells).idxmax()
        lead = (f"the best loss is **{best}** ({_fmt(results, cells[best])}" if cells.nunique() > 1
                else f"every loss scores the same ({_fmt(results, cells[best])}")
        text = (f"At {pattern}, {lead} against {_fmt(results, shot[pattern])} one-shot and "
                f"{_fmt(results, dense)} dense).")
        if dense == shot[pattern]:
            text += " One-shot already equals the dense teacher here: there is no gap to close."
        else:
            text += " Share of the one-shot → dense gap closed (mean over seeds): " + ", ".join(
                f"{loss} {gap_closed(cells[loss], shot[pattern], dense):.0%}" for loss in cells.index) + "."
        bullets.append(text)
    stability = stability_table(results)
    for pattern in dict.fromkeys((*results.config.headline, _highest(results))):
        rows = stability[stability.pattern == pattern]
        bullets.append(f"Stability at {pattern}: loss spikes per loss (summed over seeds) "
                       + ", ".join(f"{r.loss} {int(r.spikes)}" for r in rows.itertuples())
                       + "; largest gradient norm " + ", ".join(f"{r.loss} {r.max_grad_norm:.2g}"
                                                                for r in rows.itertuples()) + ".")
    sweep = data_sweep_table(results)
    if not sweep.empty:
        sizes = ", ".join(str(size) for size in sorted(set(sweep.train_size)))
        bullets.append(f"Fine-tuning set: {results.train_size} training rows, chosen on validation among "
                       f"{sizes}.")
    else:
        bullets.append(f"Fine-tuning set: {results.train_size} training rows, fixed by the configuration.")
    winners = beats_teacher(results)
    bullets.append("No sparse student's worst seed beats the dense teacher on test." if winners.empty else
                   "Worst seed above the dense teacher: " + "; ".join(
                       f"{r.loss} at {r.pattern}" for r in winners.itertuples()) + ".")
    return "\n".join(f"* {b}" for b in bullets)
