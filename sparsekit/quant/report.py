"""Chapter 08's measurements and sentences: the recovered sparse students quantized, sized and timed.

* :func:`quantize_students` quantizes each model of ``{label: (model, sparsity)}`` (the dense teacher and
  the fine-tuned sparse students that :mod:`sparsekit.distill.store` saved) with RTN and/or GPTQ at int8
  and int4; zeros stay zeros (GPTQ after pruning keeps the mask), one row per variant with the task
  metric, the layers' reconstruction error and the bytes per weight of the pruned layers.
* :func:`choose_symmetric` picks the symmetric or asymmetric grid from validation rows.
* :func:`decode_speeds` times greedy decoding with chapter 06's kernels (``SparseLinear`` over the
  bitmask format, int8/int4 codes or bf16 values) on blocks of MPT-7B's width, one per (sparsity,
  bits) of the table: speed depends on the format and the shape, not on the weights' values.
* :func:`loss_vs`, :func:`pareto_fronts`, :func:`quantization_costs`, :func:`cost_lines`,
  :func:`headline_table` and :func:`findings` turn the rows into the chapter's table and sentences
  (every number read from the measured rows).

Costs are in *points*: BLEU as is, accuracy and WER × 100; positive = worse.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from sparsekit.blocks import prunable_linears, weight_out_in
from sparsekit.quant.config import QuantConfig
from sparsekit.quant.sweep import Variant, bytes_per_weight, pareto_front

__all__ = ["ROUTES", "quant_label", "quantize_students", "choose_symmetric", "decode_speeds", "points_unit",
           "loss_vs", "pareto_fronts", "quantization_costs", "cost_lines", "headline_table", "findings"]

ROUTES = ("rtn", "gptq")  # on an already sparse (fine-tuned) model: round, or GPTQ with the mask kept


def quant_label(bits: int | None, group_size: int | None, route: str | None) -> str:
    """``"int4 g128 GPTQ"``, ``"int8 RTN"``, or ``""`` for float values."""
    if bits is None:
        return ""
    group = f" g{group_size}" if bits == 4 and group_size else ""
    return f"int{bits}{group} {route.upper()}"


def _check_routes(routes: Sequence[str]) -> None:
    unknown = sorted(set(routes) - set(ROUTES))
    if unknown or not routes:
        raise ValueError(f"routes must be a non-empty subset of {ROUTES}, got {list(routes)!r}")


def _zero_point_bytes(shapes, quant: QuantConfig | None) -> float:
    """Bytes per weight of the uint8 zero points of an asymmetric grid (0 when symmetric or float)."""
    if quant is None or quant.symmetric:
        return 0.0
    groups = sum(rows * (cols // (quant.group_size or cols)) for rows, cols in shapes)
    return groups / sum(rows * cols for rows, cols in shapes)


def quantize_students(task, models: Mapping[str, tuple[torch.nn.Module, float]], calib: list[dict],
                      bits: Sequence[int] = (8, 4), group_size: int = 128, routes: Sequence[str] = ROUTES,
                      symmetric: bool = True, scale: str = "book", split: str = "test",
                      limit: int | None = None) -> pd.DataFrame:
    """Every model of ``models`` (``{label: (model, sparsity)}``) as is and quantized; one row per variant.

    int8 is per-channel, int4 uses ``group_size``. ``calib``: the calibration batches of GPTQ. Columns:
    ``variant`` (``"<label>"`` or ``"<label> + int4 g128 GPTQ"``), ``model`` (the label), ``sparsity``,
    ``bits`` (0 = float), ``route``, ``group_size``, ``symmetric``, ``bytes_per_weight``, the task's
    metrics, ``value`` (the task metric), ``mean_rel_error`` (the layers' reconstruction error; 0 as is).
    """
    from sparsekit.prune import prune_model

    _check_routes(routes)
    rows = []
    for label, (model, sparsity) in models.items():
        shapes = [tuple(weight_out_in(layer).shape) for _, layer in prunable_linears(model)]
        configs = [None] + [QuantConfig(bits=b, group_size=group_size if b == 4 else None,
                                        symmetric=symmetric, method=route, joint=False)
                            for b in bits for route in routes]
        for quant in configs:
            student = task.student_like(model).eval()
            error = 0.0
            if quant is not None:  # magnitude at 0 % prunes nothing: the layers are only quantized
                report = prune_model(student, calib, "magnitude", 0.0, quant=quant, progress=False)
                error = float(report["rel_error"].mean())
            metrics = task.evaluate(student, split=split, limit=limit, scale=scale)
            route = "" if quant is None else quant.method
            name = quant_label(None if quant is None else quant.bits, group_size, route)
            size = bytes_per_weight(shapes, Variant(sparsity, quant)) + _zero_point_bytes(shapes, quant)
            rows.append({"variant": f"{label} + {name}" if name else label, "model": label,
                         "sparsity": sparsity, "bits": 0 if quant is None else quant.bits, "route": route,
                         "group_size": None if quant is None else quant.group_size, "symmetric": symmetric,
                         "bytes_per_weight": size, **metrics, "value": metrics[task.metric],
                         "mean_rel_error": error})
    return pd.DataFrame(rows)


def choose_symmetric(symmetric_rows: pd.DataFrame, asymmetric_rows: pd.DataFrame,
                     higher_is_better: bool) -> bool:
    """True when the symmetric grid is at least as good on validation (mean ``value`` over the quantized
    rows; a tie keeps symmetric, the only grid the sparse formats store)."""
    means = [frame.loc[frame.bits > 0, "value"].mean() for frame in (symmetric_rows, asymmetric_rows)]
    if any(pd.isna(m) for m in means):
        raise ValueError("both frames need quantized rows (bits > 0) with a 'value'")
    sym, asym = means
    return bool(sym >= asym if higher_is_better else sym <= asym)


# ---- speed -------------------------------------------------------------------------------------------------

def _compressed_copy(base, sparsity: float, bits: int | None, group_size: int):
    """``base`` with every block Linear magnitude-pruned to ``sparsity`` and stored in the bitmask format
    (bf16 values, or int8/int4 codes on round-to-nearest grids)."""
    from sparsekit.benchmarking import prune_weight
    from sparsekit.formats import BitmaskWeight
    from sparsekit.kernels.sparse_linear import SparseLinear

    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    for name, linear in prunable_linears(model):
        W = linear.weight.detach()
        if sparsity:
            W = prune_weight(W, f"{round(100 * sparsity)}%")
        weight = (BitmaskWeight.from_dense(W, dtype=torch.bfloat16) if bits is None
                  else BitmaskWeight.from_dense(W, bits=bits, group_size=group_size if bits == 4 else None))
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, SparseLinear(weight, linear.bias))
    return model


def decode_speeds(sparsities: Sequence[float], bits: Sequence[int], group_size: int = 128,
                  d_model: int = 4096, n_layers: int = 1, vocab_size: int = 4096, new_tokens: int = 16,
                  repeats: int = 2, seed: int = 0) -> pd.DataFrame:
    """Greedy-decoding tokens/s (batch 1) of an MPT of width ``d_model`` in every storage of the table.

    Models: dense fp32 and dense bf16 (``torch``), and for each sparsity in ``sparsities`` (0 included)
    and each of float (bf16 values) and ``bits``, the block Linears in the bitmask format run by
    chapter 06's kernels (``SparseLinear``). Timed interleaved, best of ``repeats``
    (:func:`sparsekit.benchmarking.interleaved_times`). Columns: ``sparsity``, ``bits`` (0 = float),
    ``storage``, ``tokens_per_s``, ``speedup_vs_bf16``.
    """
    from sparsekit.benchmarking import decode_rows, interleaved_times, tiny_mpt

    base = tiny_mpt(d_model, n_layers, vocab_size, seed=seed)
    models = {"dense fp32": base, "dense bf16": copy.deepcopy(base).to(torch.bfloat16)}
    keys = {"dense fp32": (0.0, 0, "dense fp32"), "dense bf16": (0.0, 0, "dense bf16")}
    for sparsity in sparsities:
        for b in [None, *bits]:
            if not sparsity and b is None:
                continue  # dense float: the torch models above
            values = "bf16" if b is None else f"int{b}" + (f" g{group_size}" if b == 4 else "")
            storage = f"bitmask {values}"
            name = f"{round(100 * sparsity)}% {storage}"
            models[name] = _compressed_copy(base, sparsity, b, group_size)
            keys[name] = (float(sparsity), b or 0, storage)
    ids = torch.randint(1, vocab_size, (1, 8), generator=torch.Generator().manual_seed(seed))

    def decoder(model):
        def run(_):
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)
        return run

    times = interleaved_times({name: decoder(m) for name, m in models.items()}, repeats, warmup=1)
    rows = decode_rows(models, times, new_tokens)
    return pd.DataFrame([{"sparsity": keys[r["model"]][0], "bits": keys[r["model"]][1],
                          "storage": keys[r["model"]][2], "tokens_per_s": r["tokens_per_s"],
                          "speedup_vs_bf16": r["speedup_vs_bf16"]} for r in rows])


# ---- tables and sentences ----------------------------------------------------------------------------------

def points_unit(metric: str) -> float:
    """Points per unit of ``metric``: BLEU is already in points, accuracy and WER are fractions (× 100)."""
    return 1.0 if metric == "bleu" else 100.0


def loss_vs(frame: pd.DataFrame, reference: str, variant: str, higher_is_better: bool) -> float:
    """How much worse ``variant`` is than ``reference`` in ``frame.value`` (positive = worse)."""
    values = frame.set_index("variant")["value"]
    for label in (reference, variant):
        if label not in values.index:
            raise ValueError(f"variant {label!r} is not in the frame; it has {list(values.index)}")
    difference = float(values[reference] - values[variant])
    return difference if higher_is_better else -difference


def pareto_fronts(frames: Mapping[str, pd.DataFrame], higher: Mapping[str, bool]) -> dict[str, pd.DataFrame]:
    """Per task, the rows on the size-quality Pareto front (``bytes_per_weight`` against ``value``),
    smallest first."""
    out = {}
    for task, frame in frames.items():
        on_front = pareto_front(frame.bytes_per_weight, frame.value, higher_is_better=higher[task])
        out[task] = frame[on_front].sort_values("bytes_per_weight")
    return out


def quantization_costs(frames: Mapping[str, pd.DataFrame], metrics: Mapping[str, str],
                       higher: Mapping[str, bool], bits: int = 4) -> pd.DataFrame:
    """Per task and model (dense or sparse fine-tuned): the cost in points of each ``bits`` variant
    against the same model unquantized. Columns ``task``, ``model``, ``sparsity``, ``variant``, ``route``,
    ``points``."""
    rows = []
    for task, frame in frames.items():
        unit = points_unit(metrics[task])
        for _, row in frame[frame.bits == bits].iterrows():
            points = unit * loss_vs(frame, row.model, row.variant, higher[task])
            rows.append({"task": task, "model": row.model, "sparsity": row.sparsity, "variant": row.variant,
                         "route": row.route.upper(), "points": points})
    return pd.DataFrame(rows, columns=["task", "model", "sparsity", "variant", "route", "points"])


def cost_lines(costs: pd.DataFrame, metrics: Mapping[str, str]) -> str:
    """One markdown bullet per (task, model): each route's cost in points (negative: better)."""
    lines = []
    for (task, model), group in costs.groupby(["task", "model"], sort=False):
        text = ", ".join(f"{r.route} {r.points:+.2f}" for r in group.itertuples())
        lines.append(f"* **{task}**, {model}: {text} points of {metrics[task]} against {model} unquantized")
    return "\n".join(lines)


def headline_table(frame: pd.DataFrame, speeds: pd.DataFrame, route: str = "gptq") -> pd.DataFrame:
    """One task's headline rows: each model as is and quantized by ``route``, with its metric, bytes per
    weight and the decode tokens/s of its storage (from :func:`decode_speeds`; dense float = bf16)."""
    rows = frame[(frame.bits == 0) | (frame.route == route)]
    speed = {(round(float(r.sparsity), 6), int(r.bits)): r.tokens_per_s for r in speeds.itertuples()
             if r.storage != "dense fp32"}
    return pd.DataFrame({"variant": rows.variant, "value": rows.value, "bytes/weight": rows.bytes_per_weight,
                         "decode tokens/s": [speed.get((round(float(s), 6), int(b))) for s, b in
                                             zip(rows.sparsity, rows.bits)]}).set_index("variant")


def findings(costs: pd.DataFrame, fronts: Mapping[str, pd.DataFrame], within: float = 1.0) -> str:
    """The chapter's closing bullets, from the measured costs and fronts."""
    if costs.empty:
        raise ValueError("costs is empty: no quantized variant was measured")
    sparse = costs[costs.sparsity > 0]
    worst = sparse.loc[sparse.points.idxmax()] if not sparse.empty else costs.loc[costs.points.idxmax()]
    per_route = sparse.groupby("route", sort=False).points.mean()
    smallest = "; ".join(f"{task}: {front.iloc[0].variant} ({front.iloc[0].bytes_per_weight:.3f} B/weight)"
                         for task, front in fronts.items())
    kept = int((sparse.points <= within).sum())
    lines = [f"* int4 on the fine-tuned sparse students stays within {within:g} point of the same student "
             f"unquantized in {kept} of {len(sparse)} (task, sparsity, route) cases; the largest cost is "
             f"{worst.points:+.2f} points ({worst.task}, {worst.variant})."]
    if len(per_route):
        lines.append("* Mean int4 cost per route on the sparse students: "
                     + ", ".join(f"{route} {value:+.2f}" for route, value in per_route.items()) + " points.")
    lines.append(f"* Smallest variant on each task's Pareto front: {smallest}.")
    return "\n".join(lines)
