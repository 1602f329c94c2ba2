"""Chapter 08's logic: costs, fronts, grid choice, headline rows and sentences from measured rows."""

import pandas as pd
import pytest
import torch

from sparsekit import tasks
from sparsekit.quant import report


def _frame(values, sparsity=0.8, model="80% fine-tuned"):
    """Rows of one task: the model as is, then int4 RTN and GPTQ, with the given metric values."""
    rows = []
    for (bits, route), value, size in zip([(0, ""), (4, "rtn"), (4, "gptq")], values, [1.1, 0.35, 0.35]):
        name = report.quant_label(bits or None, 16, route)
        rows.append({"variant": f"{model} + {name}" if name else model, "model": model, "sparsity": sparsity,
                     "bits": bits, "route": route, "bytes_per_weight": size, "value": value})
    dense = {"variant": "dense", "model": "dense", "sparsity": 0.0, "bits": 0, "route": "",
             "bytes_per_weight": 2.0, "value": max(values) + 0.05}
    return pd.DataFrame([dense, *rows])


def test_loss_vs_is_signed_by_the_metric_direction_and_names_missing_variants():
    frame = _frame([0.30, 0.25, 0.28])
    rtn = "80% fine-tuned + int4 g16 RTN"
    assert report.loss_vs(frame, "80% fine-tuned", rtn, True) == pytest.approx(0.05)
    assert report.loss_vs(frame, "80% fine-tuned", rtn, False) == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="'nope'"):
        report.loss_vs(frame, "80% fine-tuned", "nope", True)


def test_costs_sentences_and_findings_follow_the_measurements():
    metrics, higher = {"math": "accuracy"}, {"math": True}
    texts = []
    for values in ([0.30, 0.25, 0.28], [0.30, 0.10, 0.295]):
        frames = {"math": _frame(values)}
        costs = report.quantization_costs(frames, metrics, higher)
        assert costs.points.tolist() == pytest.approx([100 * (values[0] - values[1]),
                                                       100 * (values[0] - values[2])])
        fronts = report.pareto_fronts(frames, higher)
        assert fronts["math"].bytes_per_weight.is_monotonic_increasing
        texts.append(report.cost_lines(costs, metrics) + report.findings(costs, fronts))
    assert texts[0] != texts[1]
    assert "RTN +5.00" in texts[0] and "RTN +20.00" in texts[1] and "GPTQ +0.50" in texts[1]
    assert "0 of 2" in texts[0] and "1 of 2" in texts[1] and "largest cost is +20.00" in texts[1]


def test_choose_symmetric_on_validation():
    better, worse = _frame([0.30, 0.28, 0.29]), _frame([0.30, 0.20, 0.21])
    assert report.choose_symmetric(better, worse, higher_is_better=True) is True
    assert report.choose_symmetric(worse, better, higher_is_better=True) is False
    assert report.choose_symmetric(worse, better, higher_is_better=False) is True  # WER: lower wins
    assert report.choose_symmetric(better, better, higher_is_better=True) is True  # a tie keeps symmetric
    with pytest.raises(ValueError, match="quantized rows"):
        report.choose_symmetric(better[better.bits == 0], better, True)


def test_headline_table_takes_the_route_and_each_storage_speed():
    frame = _frame([0.30, 0.25, 0.28])
    speeds = pd.DataFrame([{"sparsity": 0.0, "bits": 0, "storage": "dense fp32", "tokens_per_s": 1.0},
                           {"sparsity": 0.0, "bits": 0, "storage": "dense bf16", "tokens_per_s": 2.0},
                           {"sparsity": 0.8, "bits": 0, "storage": "bitmask bf16", "tokens_per_s": 3.0},
                           {"sparsity": 0.8, "bits": 4, "storage": "bitmask int4 g16", "tokens_per_s": 4.0}])
    table = report.headline_table(frame, speeds, route="gptq")
    assert list(table.index) == ["dense", "80% fine-tuned", "80% fine-tuned + int4 g16 GPTQ"]
    assert table["decode tokens/s"].tolist() == [2.0, 3.0, 4.0]


def test_quantize_students_keeps_sizes_ordered_and_measures_each_variant():
    task = tasks.get("translation")
    teacher = task.teacher("smoke", progress=False)
    sparse = task.student_like(teacher).eval()
    from sparsekit.prune import prune_model

    prune_model(sparse, None, "magnitude", 0.5, progress=False)
    calib = task.calibration_batches(4, 4, "smoke")
    frame = report.quantize_students(task, {"dense": (teacher, 0.0), "50%": (sparse, 0.5)}, calib, bits=(4,),
                                     group_size=16, routes=("gptq",), scale="smoke", limit=2)
    assert frame.variant.tolist() == ["dense", "dense + int4 g16 GPTQ", "50%", "50% + int4 g16 GPTQ"]
    size = frame.set_index("variant").bytes_per_weight
    assert size["50% + int4 g16 GPTQ"] < size["50%"] < size["dense"]
    error = frame.mean_rel_error
    assert (error[frame.bits > 0] > 0).all() and (error[frame.bits == 0] == 0).all()
    asym = report.quantize_students(task, {"50%": (sparse, 0.5)}, calib, bits=(4,), group_size=16,
                                    routes=("rtn",), symmetric=False, scale="smoke", limit=2)
    assert asym.bytes_per_weight.iloc[1] == pytest.approx(size["50% + int4 g16 GPTQ"] + 1 / 16)  # zero points
    with pytest.raises(ValueError, match="routes"):
        report.quantize_students(task, {}, calib, routes=("joint",))


def test_decode_speeds_times_every_storage_of_the_table():
    torch.manual_seed(0)
    speeds = report.decode_speeds([0.0, 0.5], bits=(8, 4), group_size=32, d_model=64, vocab_size=64,
                                  new_tokens=2, repeats=1)
    assert speeds.storage.tolist() == ["dense fp32", "dense bf16", "bitmask int8", "bitmask int4 g32",
                                       "bitmask bf16", "bitmask int8", "bitmask int4 g32"]
    assert speeds.sparsity.tolist() == [0.0] * 4 + [0.5] * 3
    assert (speeds.tokens_per_s > 0).all()
