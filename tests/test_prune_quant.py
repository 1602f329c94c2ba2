"""prune_model(..., quant=...): joint SparseGPT + GPTQ and quantization after pruning, on tiny models."""

import pytest
import torch
from test_prune_model import BATCHES, dense_model

from sparsekit.blocks import prunable_linears, weight_out_in
from sparsekit.masks import is_nm_mask
from sparsekit.prune import prune_model
from sparsekit.quant import QuantConfig, code_range


def check_quantized_model(model, report, quant, sparsity):
    assert list(report["layer"]) == [name for name, _ in prunable_linears(model)]
    for (name, linear), layer in zip(prunable_linears(model), report["quantized"]):
        W = weight_out_in(linear)
        q = layer.quantized
        assert q.bits == quant.bits and q.symmetric == quant.symmetric
        low, high = code_range(quant.bits, quant.symmetric)
        assert int(q.codes.min()) >= low and int(q.codes.max()) <= high, name
        assert torch.equal(W, q.dequantize()), name  # the model holds the grid's values
        assert bool((W[~layer.mask] == 0).all()), name  # pruned weights exactly zero
        assert float((~layer.mask).float().mean()) == pytest.approx(sparsity, abs=0.02), name
    assert report["sparsity"].tolist() == pytest.approx([sparsity] * len(report), abs=0.02)


@pytest.mark.parametrize("kind, method, quant", [
    ("mpt", "sparsegpt", QuantConfig(bits=4, group_size=16)),                   # joint
    ("t5", "sparsegpt", QuantConfig(bits=8, method="rtn")),
    ("llama", "wanda", QuantConfig(bits=4, group_size=32, act_order=True)),     # prune, then GPTQ
    ("whisper", "magnitude", QuantConfig(bits=8, symmetric=False)),
])
def test_prune_model_quantizes_every_layer_and_keeps_masks(kind, method, quant):
    model = dense_model(kind)
    options = {"blocksize": 16} if method == "sparsegpt" else {}
    report = prune_model(model, BATCHES[kind](True), method, 0.5, quant=quant, progress=False, **options)
    check_quantized_model(model, report, quant, 0.5)


def test_joint_report_compresses_exactly_into_the_bitmask_format():
    joint_model = dense_model("mpt")
    joint = prune_model(joint_model, BATCHES["mpt"](False), "sparsegpt", 0.6,
                        quant={"bits": 4, "group_size": 16}, blocksize=16, progress=False)
    for (name, linear), layer in zip(prunable_linears(joint_model), joint["quantized"]):
        weight = layer.compress("bitmask")
        assert weight.bits == 4 and torch.equal(weight.mask(), layer.mask), name
        assert torch.equal(weight.to_dense(), linear.weight.detach()), name


@pytest.mark.parametrize("kwargs, error, match", [
    ({"quant": {"bits": 3}}, ValueError, "bits must be one of"),
    ({"quant": {"bits": 4, "group_size": 24}}, ValueError, "group_size=24 must divide in_features=32"),
    ({"quant": {"bits": 4, "act_order": True}}, ValueError, "act_order=True cannot run jointly"),
    ({"quant": {"bits": 4, "awq": True}}, ValueError, "unknown keys \\['awq'\\]"),
    ({"quant": {"bits": 8}, "quantizer": lambda c, i, w: c}, ValueError, "either quant .* custom quantizer"),
    ({"quant": {"bits": 8}, "method": "magnitude", "calib_batches": None}, ValueError, "needs calib_batches"),
])
def test_bad_quant_arguments_raise_before_touching_the_model(kwargs, error, match):
    args = {"calib_batches": BATCHES["mpt"](False), "method": "sparsegpt", "sparsity": 0.5, "progress": False}
    args.update(kwargs)
    model = dense_model("mpt")
    with pytest.raises(error, match=match):
        prune_model(model, **args)
    for (name, param), dense in zip(model.named_parameters(), dense_model("mpt").parameters()):
        assert torch.equal(param, dense), name


def test_magnitude_with_rtn_needs_no_calibration():
    model = dense_model("mpt")
    report = prune_model(model, None, "magnitude", 0.5, quant={"bits": 8, "method": "rtn"}, progress=False)
    check_quantized_model(model, report, QuantConfig(bits=8, method="rtn"), 0.5)


def test_nm_joint_int8_keeps_the_pattern_and_stores_as_nm():
    model = dense_model("mpt")
    report = prune_model(model, BATCHES["mpt"](False), "sparsegpt", nm=(2, 4), quant={"bits": 8},
                         blocksize=16, progress=False)
    for (name, linear), layer in zip(prunable_linears(model), report["quantized"]):
        assert is_nm_mask(layer.mask, (2, 4)), name
        weight = layer.compress("nm", nm=(2, 4))
        assert torch.equal(weight.to_dense(), linear.weight.detach()), name
