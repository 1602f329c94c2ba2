"""One-shot pruning sweeps: every method at every sparsity pattern, evaluated on a task.

This is the "before fine-tuning" experiment of the paper: each method prunes a fresh copy of the dense
teacher with the same calibration batches, and the pruned model is scored with the task's metric.

A method of the sweep is a :data:`VARIANTS` entry: a solver of :func:`sparsekit.prune.prune_model` with
its options. ``"magnitude"`` is the papers' magnitude baseline, one threshold per layer (SparseGPT's and
Wanda's papers and code); ``"magnitude-row"`` is the per-row variant (every row equally sparse).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import pandas as pd
from tqdm.auto import tqdm

from sparsekit import _validate
from sparsekit.masks import nm_sparsity, validate_nm, validate_sparsity

__all__ = ["one_shot_sweep", "pattern_label", "METHODS", "VARIANTS"]

VARIANTS: dict[str, tuple[str, dict]] = {
    "magnitude": ("magnitude", {"scope": "layer"}),  # the papers' baseline: one threshold per layer
    "magnitude-row": ("magnitude", {"scope": "row"}),
    "wanda": ("wanda", {}),
    "sparsegpt": ("sparsegpt", {}),
}
METHODS = ("magnitude", "wanda", "sparsegpt")


def pattern_label(sparsity: float | None = None, nm=None) -> str:
    """``"50%"`` for unstructured sparsity, ``"2:4"`` for an N:M pattern."""
    return f"{nm[0]}:{nm[1]}" if nm is not None else f"{round(100 * sparsity)}%"


def _patterns(sparsities, nms):
    for s in sparsities:
        yield {"sparsity": validate_sparsity(s), "nm": None}
    for nm in nms:
        yield {"sparsity": nm_sparsity(validate_nm(nm)), "nm": tuple(nm)}


def _fits(model, nm) -> bool:
    """True when every prunable layer's input width is a multiple of ``m`` (else ``n:m`` is undefined)."""
    from sparsekit.blocks import in_features_of, prunable_linears

    return nm is None or all(in_features_of(layer) % nm[1] == 0 for _, layer in prunable_linears(model))


def one_shot_sweep(task, teacher, methods: Sequence[str] = METHODS, sparsities: Sequence[float] = (0.5,),
                   nms: Sequence[tuple[int, int]] = (), scale: str = "book", split: str = "test",
                   limit: int | None = None, n_calib: int = 128, calib_batch_size: int = 16,
                   progress: bool = True):
    """Prune a copy of ``teacher`` with each method (a :data:`VARIANTS` key) and pattern; evaluate each.

    Returns ``(results, layers)``:

    * ``results``: one row per (method, pattern) plus a ``dense`` row: ``method``, ``pattern``,
      ``structure`` ("dense" | "unstructured" | "n:m"), ``sparsity`` (target), ``reached`` (zeros of
      the pruned layers), the task's metrics, ``prune_seconds``, ``eval_seconds``;
    * ``layers``: the per-layer reports of :func:`sparsekit.prune.prune_model` with ``method`` and
      ``pattern`` columns (reconstruction error and solver time of every layer).
    """
    from sparsekit.prune import prune_model

    for method in _validate.names(methods, "methods"):
        _validate.choice(method, "methods entry", VARIANTS)
    patterns = list(_patterns(sparsities, nms))
    for pattern in [p for p in patterns if not _fits(teacher, p["nm"])]:
        n, m = pattern["nm"]
        warnings.warn(f"{task.name}: skipping {n}:{m}, the model has layers whose input width is not a "
                      f"multiple of {m}", stacklevel=2)
        patterns.remove(pattern)
    calib = task.calibration_batches(n=n_calib, batch_size=calib_batch_size, scale=scale)

    start = time.perf_counter()
    dense = task.evaluate(teacher, split=split, limit=limit, scale=scale)
    rows = [{"method": "dense", "pattern": "0%", "structure": "dense", "sparsity": 0.0, "reached": 0.0,
             **dense, "prune_seconds": 0.0, "eval_seconds": time.perf_counter() - start}]
    layers = []
    runs = [(m, p) for m in methods for p in patterns]
    for method, pattern in tqdm(runs, desc=f"one-shot {task.name}", disable=not progress):
        label = pattern_label(pattern["sparsity"], pattern["nm"])
        model = task.student_like(teacher).eval()
        start = time.perf_counter()
        solver, options = VARIANTS[method]
        report = prune_model(model, calib, method=solver, sparsity=pattern["sparsity"], nm=pattern["nm"],
                             progress=False, **options)
        pruned = time.perf_counter()
        metrics = task.evaluate(model, split=split, limit=limit, scale=scale)
        weights = report["shape"].map(lambda shape: shape[0] * shape[1])
        rows.append({"method": method, "pattern": label,
                     "structure": "n:m" if pattern["nm"] else "unstructured",
                     "sparsity": pattern["sparsity"],
                     "reached": float((report["sparsity"] * weights).sum() / weights.sum()),
                     **metrics, "prune_seconds": pruned - start,
                     "eval_seconds": time.perf_counter() - pruned})
        layers.append(report.assign(method=method, pattern=label))
    return pd.DataFrame(rows), pd.concat(layers, ignore_index=True) if layers else pd.DataFrame()
