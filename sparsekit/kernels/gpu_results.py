"""Recorded GPU results of the Triton kernels: ``kernels/results/gpu-*.json``, written by ``gpu_check.sh``.

Only files measured on a GPU (``"device": "cuda"``) count; a CPU dry run (``"cpu-interpreter"``) is a
check of the script, not a result. The frames here feed notebook 07's tables and figures.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["RESULTS_DIR", "load_gpu_results", "result_label", "timing_frame", "goal_frame", "plot_result"]

RESULTS_DIR = Path(__file__).resolve().parents[2] / "kernels" / "results"


def load_gpu_results(folder: str | Path | None = None) -> list[dict]:
    """Every ``gpu-*.json`` in ``folder`` (default :data:`RESULTS_DIR`) measured on a GPU, oldest first.

    Each result gets ``"file"`` (its name). A missing folder gives ``[]``.
    """
    folder = Path(folder) if folder is not None else RESULTS_DIR
    results = []
    for path in sorted(folder.glob("gpu-*.json")) if folder.is_dir() else []:
        result = json.loads(path.read_text())
        if result.get("device") == "cuda":
            results.append({**result, "file": path.name})
    return sorted(results, key=lambda r: r.get("date", ""))


def result_label(result: dict) -> str:
    """``"<GPU> · driver … · torch … · Triton … · <date>"``: the machine and date of a recorded result."""
    return (f"{result.get('gpu')} · driver {result.get('driver')} · torch {result.get('torch')} · "
            f"Triton {result.get('triton')} · {str(result.get('date', ''))[:10]}")


def timing_frame(result: dict):
    """The timings as a ``pandas.DataFrame``, one row per (shape, batch, method), with speedups.

    Columns: ``shape`` ("rows x cols"), ``batch``, ``method``, ``pattern``, ``sparsity``, ``bits``, ``us``,
    ``gbs``, ``bw_frac``, ``speedup_vs_dense_fp16`` (cuBLAS fp16 time / time), ``speedup_vs_dense_bf16``,
    ``speedup_vs_torch_24`` (torch ``to_sparse_semi_structured`` 2:4 time / time; NaN where not measured).
    """
    import pandas as pd

    frame = pd.DataFrame(result.get("timings", []))
    if frame.empty:
        return frame
    frame["shape"] = frame["shape"].map(lambda s: f"{s[0]}x{s[1]}")
    for method, column in (("dense-fp16", "speedup_vs_dense_fp16"), ("dense-bf16", "speedup_vs_dense_bf16"),
                           ("torch-2:4", "speedup_vs_torch_24")):
        base = frame[frame.method == method].set_index(["shape", "batch"])["us"].rename("base_us")
        frame = frame.drop(columns=[column], errors="ignore").join(base, on=["shape", "batch"])
        frame[column] = frame["base_us"] / frame["us"]
        frame = frame.drop(columns=["base_us"])
    return frame


def goal_frame(result: dict):
    """The issue's goals as recorded (``goal``, ``target``, ``measured``, ``met``)."""
    import pandas as pd

    return pd.DataFrame(result.get("goals", []), columns=["goal", "target", "measured", "met"])


SPEEDUP_METHODS = ("triton-bitmask-fp16-70%", "triton-bitmask-fp16-90%", "triton-nm2:4-fp16",
                   "triton-nm2:4-int4", "triton-bitmask-int4-70%", "torch-2:4", "dense-bf16")


def plot_result(result: dict) -> list:
    """Figures of one recorded result (matplotlib ``Figure`` objects, titled with :func:`result_label`).

    1. on the first timed shape (the goals' 11008x4096): speedup over cuBLAS fp16 against sparsity (the
       bitmask kernel, one line per batch; the 2:4 kernels and torch's 2:4 as markers) and against batch;
    2. the Triton 2:4 kernels over torch's 2:4 per batch and shape (when torch's 2:4 was measured).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import NullLocator

    frame = timing_frame(result)
    if frame.empty:
        return []
    label = result_label(result)
    shape = frame["shape"].iloc[0]
    at = frame[frame["shape"] == shape]
    batches = sorted(at.batch.unique())
    colors = dict(zip(batches, sns.color_palette("viridis", len(batches)), strict=True))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    bitmask = at[at.method.str.startswith("triton-bitmask-fp16")]
    sns.lineplot(data=bitmask, x="sparsity", y="speedup_vs_dense_fp16", hue="batch", palette=colors,
                 marker="o", ax=axes[0])
    for method, marker in (("triton-nm2:4-fp16", "s"), ("triton-nm2:4-int4", "D"), ("torch-2:4", "X")):
        points = at[at.method == method]
        axes[0].scatter(points.sparsity, points.speedup_vs_dense_fp16, marker=marker, s=55, label=method,
                        c=[colors[b] for b in points.batch], edgecolors="k")
    axes[0].set(xlabel="sparsity (fraction of zeros)", ylabel="speedup over cuBLAS fp16 (x)",
                title=f"{shape}: against sparsity (lines: bitmask fp16; colour: batch)")
    shown = at[at.method.isin(SPEEDUP_METHODS)]
    sns.lineplot(data=shown, x="batch", y="speedup_vs_dense_fp16", hue="method", marker="o", ax=axes[1])
    axes[1].set(xscale="log", yscale="log", xlabel="batch (rows of x)", ylabel="speedup over cuBLAS fp16 (x)",
                title=f"{shape}: against batch")
    axes[1].xaxis.set_minor_locator(NullLocator())
    axes[1].set_xticks(batches, [str(b) for b in batches])
    for ax in axes:
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.legend(fontsize=7)
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    figures = [fig]
    vs24 = frame[frame.method.str.startswith("triton-nm2:4") & frame.speedup_vs_torch_24.notna()]
    if not vs24.empty:
        grid = sns.catplot(data=vs24, x="batch", y="speedup_vs_torch_24", hue="shape", col="method",
                           kind="bar", height=3.2, aspect=1.3)
        for ax in grid.axes.flat:
            ax.axhline(1.0, color="k", lw=0.8, ls=":")
        grid.set_axis_labels("batch (rows of x)", "speedup over torch 2:4 (x)")
        grid.figure.suptitle(f"Triton 2:4 over torch's 2:4 (cuSPARSELt/CUTLASS) · {label}", y=1.05,
                             fontsize=9)
        figures.append(grid.figure)
    return figures
