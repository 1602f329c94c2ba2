"""Sparsity × quantization on a task: one-shot sparse students quantized to int8/int4, scored and sized.

The variants of :func:`quant_variants` each prune (SparseGPT) and/or quantize a fresh copy of the dense
teacher with the same calibration batches, through :func:`sparsekit.prune.prune_model`:

* ``dense``; ``dense + intB RTN`` / ``dense + intB GPTQ`` (quantization alone);
* ``S%`` (SparseGPT alone); ``S% + intB RTN`` (prune, then round to nearest), ``S% + intB GPTQ``
  (prune, then GPTQ on the pruned weights), ``S% + intB joint`` (GPTQ inside SparseGPT's column loop).

Sizes are the analytic bytes per weight of the pruned layers (:func:`sparsekit.patterns.storage_bytes`,
which the tests check against the formats): float values as bf16 (dense, or the bitmask format when
sparse), quantized ones as int8/int4 codes with float16 scales (dense, or bitmask + codes).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import pandas as pd
from tqdm.auto import tqdm

from sparsekit.blocks import in_features_of, prunable_linears, weight_out_in
from sparsekit.patterns import storage_bytes
from sparsekit.quant.config import QuantConfig

__all__ = ["Variant", "HOWS", "quant_variants", "quant_sweep", "fitting_group_size", "bytes_per_weight",
           "pareto_front"]


@dataclass(frozen=True)
class Variant:
    """One point of the sweep: ``sparsity`` (0 = dense) and ``quant`` (None = float values)."""

    sparsity: float
    quant: QuantConfig | None = None

    @property
    def label(self) -> str:
        pattern = "dense" if self.sparsity == 0 else f"{round(100 * self.sparsity)}%"
        if self.quant is None:
            return pattern
        how = "joint" if self.quant.is_joint("sparsegpt") and self.sparsity else self.quant.method.upper()
        return f"{pattern} + int{self.quant.bits} {how}"

    @property
    def kind(self) -> str:
        """``"dense"``, ``"sparse"``, ``"quantized"`` or ``"sparse+quantized"``."""
        sparse = "sparse" if self.sparsity else ""
        quantized = "quantized" if self.quant is not None else ""
        return "+".join(k for k in (sparse, quantized) if k) or "dense"


HOWS = ("rtn", "gptq", "joint")


def quant_variants(sparsities: Sequence[float] = (0.5, 0.7), bits: Sequence[int] = (8, 4),
                   group_size: int | None = 128, hows: Sequence[str] = HOWS) -> list[Variant]:
    """The variants of the module docstring; int8 is per-channel, int4 uses ``group_size``.

    ``hows`` picks the quantization routes among ``"rtn"``, ``"gptq"`` (after pruning) and ``"joint"``;
    the dense model gets RTN and/or GPTQ (GPTQ when ``"gptq"`` or ``"joint"`` is asked for).
    """
    unknown = sorted(set(hows) - set(HOWS))
    if unknown:
        raise ValueError(f"hows must be among {HOWS}, got unknown {unknown}")
    configs = {"rtn": {"method": "rtn"}, "gptq": {"joint": False}, "joint": {}}

    def config(b, how):
        return QuantConfig(bits=b, group_size=group_size if b == 4 else None, **configs[how])

    dense_hows = [h for h in ("rtn", "gptq") if h in hows or (h == "gptq" and "joint" in hows)]
    out = [Variant(0.0)] + [Variant(0.0, config(b, h)) for b in bits for h in dense_hows]
    for s in sparsities:
        out.append(Variant(s))
        out += [Variant(s, config(b, h)) for b in bits for h in HOWS if h in hows]
    return out


def fitting_group_size(model, at_most: int = 128) -> int:
    """The largest group size ``<= at_most`` that divides the input width of every prunable layer."""
    widths = [in_features_of(layer) for _, layer in prunable_linears(model)]
    common = reduce(math.gcd, widths)
    return max(d for d in range(1, min(common, at_most) + 1) if common % d == 0)


def bytes_per_weight(shapes: Sequence[tuple[int, int]], variant: Variant) -> float:
    """Bytes per weight of layers ``[(out, in)]`` stored as ``variant`` (see the module docstring)."""
    fmt = "dense" if variant.sparsity == 0 else "bitmask"
    quant = variant.quant
    total = sum(storage_bytes(rows, cols, variant.sparsity, fmt, value_bytes=2,
                              bits=None if quant is None else quant.bits,
                              group_size=None if quant is None else quant.group_size)
                for rows, cols in shapes)
    return total / sum(rows * cols for rows, cols in shapes)


def pareto_front(sizes: Sequence[float], scores: Sequence[float],
                 higher_is_better: bool = True) -> list[bool]:
    """True for each point that no other point beats: as small or smaller and as good or better, and
    strictly in one of the two."""
    sign = 1 if higher_is_better else -1
    points = [(float(s), sign * float(q)) for s, q in zip(sizes, scores)]
    return [not any(s2 <= s and q2 >= q and (s2 < s or q2 > q) for s2, q2 in points) for s, q in points]


def quant_sweep(task, teacher, variants: Sequence[Variant], scale: str = "book", split: str = "test",
                limit: int | None = None, n_calib: int = 128, calib_batch_size: int = 16,
                progress: bool = True) -> pd.DataFrame:
    """Evaluate every variant of ``teacher`` on ``split``; one row per variant.

    Columns: ``variant`` (label), ``kind``, ``sparsity``, ``bits`` (0 = float), ``quant_method``
    (``""``, ``"rtn"``, ``"gptq"``, ``"joint"``), ``group_size``, ``bytes_per_weight``, the task's
    metrics, ``mean_rel_error`` (layer reconstruction error, mean over layers; 0 for dense),
    ``prune_seconds``, ``eval_seconds``.
    """
    from sparsekit.prune import prune_model

    calib = task.calibration_batches(n=n_calib, batch_size=calib_batch_size, scale=scale)
    shapes = [tuple(weight_out_in(layer).shape) for _, layer in prunable_linears(teacher)]
    rows = []
    for variant in tqdm(variants, desc=f"quantization {task.name}", disable=not progress):
        model = task.student_like(teacher).eval()
        start = time.perf_counter()
        error = 0.0
        if variant.sparsity or variant.quant is not None:
            method = "sparsegpt" if variant.sparsity else "magnitude"  # magnitude at 0%: quantize only
            report = prune_model(model, calib, method, variant.sparsity, quant=variant.quant, progress=False)
            error = float(report["rel_error"].mean())
        pruned = time.perf_counter()
        metrics = task.evaluate(model, split=split, limit=limit, scale=scale)
        quant = variant.quant
        how = "" if quant is None else ("joint" if quant.is_joint("sparsegpt") and variant.sparsity
                                        else quant.method)
        rows.append({"variant": variant.label, "kind": variant.kind, "sparsity": variant.sparsity,
                     "bits": 0 if quant is None else quant.bits, "quant_method": how,
                     "group_size": None if quant is None else quant.group_size,
                     "bytes_per_weight": bytes_per_weight(shapes, variant), **metrics,
                     "mean_rel_error": error, "prune_seconds": pruned - start,
                     "eval_seconds": time.perf_counter() - pruned})
    return pd.DataFrame(rows)
