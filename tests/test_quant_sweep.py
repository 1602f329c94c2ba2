"""The sparsity × quantization sweep: variants, sizes, Pareto front, and a run on a tiny fake task."""

import pytest
import torch
from test_prune_model import BATCHES, dense_model

from sparsekit import patterns
from sparsekit.quant.sweep import (
    Variant,
    bytes_per_weight,
    fitting_group_size,
    pareto_front,
    quant_sweep,
    quant_variants,
)


def test_variants_cover_dense_sparse_quantized_and_joint():
    labels = [v.label for v in quant_variants([0.5, 0.7], [8, 4], 64)]
    assert labels[:5] == ["dense", "dense + int8 RTN", "dense + int8 GPTQ", "dense + int4 RTN",
                          "dense + int4 GPTQ"]
    assert labels[5:12] == ["50%", "50% + int8 RTN", "50% + int8 GPTQ", "50% + int8 joint",
                            "50% + int4 RTN", "50% + int4 GPTQ", "50% + int4 joint"]
    assert len(labels) == 5 + 2 * 7
    int4 = [v for v in quant_variants([0.5], [8, 4], 64) if v.quant and v.quant.bits == 4]
    assert {v.quant.group_size for v in int4} == {64}
    assert [v.label for v in quant_variants([0.5], [4], 32, hows=["joint"])] == [
        "dense", "dense + int4 GPTQ", "50%", "50% + int4 joint"]
    with pytest.raises(ValueError, match="hows must be among"):
        quant_variants(hows=["awq"])


def test_bytes_per_weight_follow_the_formats():
    shapes = [(64, 128), (128, 64)]
    variants = quant_variants([0.5], [8, 4], 32)
    size = {v.label: bytes_per_weight(shapes, v) for v in variants}
    assert size["dense"] == 2.0
    assert size["dense + int8 RTN"] == pytest.approx(1 + 2 * (64 + 128) / (2 * 64 * 128))  # per-row scales
    assert size["dense + int4 GPTQ"] == pytest.approx(0.5 + 2 / 32)
    expected = sum(patterns.storage_bytes(r, c, 0.5, "bitmask", bits=4, group_size=32) for r, c in shapes)
    assert size["50% + int4 joint"] == pytest.approx(expected / (2 * 64 * 128))
    assert size["50% + int4 joint"] < size["dense + int4 GPTQ"] < size["50%"] < size["dense"]


def test_pareto_front():
    sizes, scores = [2.0, 1.0, 1.0, 0.5, 0.6], [10, 9, 8, 5, 4]
    assert pareto_front(sizes, scores) == [True, True, False, True, False]
    lower = [-s for s in scores]
    assert pareto_front(sizes, lower, higher_is_better=False) == [True, True, False, True, False]


def test_fitting_group_size_divides_every_layer():
    model = dense_model("mpt")  # in_features 32 and 128
    assert fitting_group_size(model, 128) == 32
    assert fitting_group_size(model, 24) == 16


class TinyTask:
    """The driver's interface of a task, on a tiny MPT: score = minus the mean LM loss."""

    name = "tiny"

    def calibration_batches(self, n, batch_size, scale):
        return BATCHES["mpt"](False)

    def student_like(self, model):
        import copy
        return copy.deepcopy(model)

    def evaluate(self, model, split, limit, scale):
        with torch.no_grad():
            loss = sum(float(model(**b, labels=b["input_ids"]).loss) for b in BATCHES["mpt"](False, seed=5))
        return {"score": -loss}


def test_quant_sweep_runs_every_variant_and_reports_sizes_and_errors():
    teacher = dense_model("mpt")
    variants = [Variant(0.0)] + quant_variants([0.5], [4], 16, hows=["rtn", "joint"])[1:]
    frame = quant_sweep(TinyTask(), teacher, variants, progress=False)
    assert frame["variant"].tolist() == [v.label for v in variants]
    assert frame.loc[0, "mean_rel_error"] == 0 and (frame["mean_rel_error"][1:] > 0).all()
    shapes = [(96, 32), (32, 32), (128, 32), (32, 128)] * 2  # MPT: Wqkv, out_proj, up, down per block
    assert frame.loc[0, "bytes_per_weight"] == 2.0
    assert frame["bytes_per_weight"].nunique() == 4  # dense, dense int4, 50%, 50% int4
    assert set(frame["quant_method"]) == {"", "rtn", "gptq", "joint"}
    assert frame.loc[0, "score"] == TinyTask().evaluate(teacher, "test", None, "smoke")["score"]
    assert frame.loc[frame.variant == "50% + int4 RTN", "bytes_per_weight"].item() == pytest.approx(
        bytes_per_weight(shapes, variants[-2]))
