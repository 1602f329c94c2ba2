"""`sparsekit prune --bits/--group-size`: pruned and quantized model plus its compressed int weights."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_cli_prune import run, saved  # noqa: F401  (saved: the module's fixture of tiny saved models)

from sparsekit.formats import BitmaskWeight, NMWeight, load_sparse


@pytest.mark.parametrize("extra, cls, bits", [
    (["--sparsity", "0.5", "--bits", "4", "--group-size", "16"], BitmaskWeight, 4),
    (["--nm", "2:4", "--bits", "8", "--quant-method", "rtn"], NMWeight, 8),
])
def test_prune_with_bits_saves_quantized_weights_equal_to_the_model(saved, tmp_path, capsys, extra, cls,  # noqa: F811
                                                                     bits):
    out = tmp_path / "pruned"
    assert run(saved, "mpt", out, *extra) == 0
    assert "quantized (int" in capsys.readouterr().out
    dense = load_file(out / "model.safetensors")
    compressed = load_sparse(out / "quantized_weights.safetensors")
    assert compressed
    for name, weight in compressed.items():
        assert isinstance(weight, cls) and weight.bits == bits, name
        assert torch.equal(weight.to_dense(), dense[name]), name
        assert abs(weight.sparsity - 0.5) < 0.02, name
    report = json.loads((out / "prune_report.json").read_text())
    assert report["quant"]["bits"] == bits


@pytest.mark.parametrize("extra, match", [
    (["--bits", "3"], "invalid choice: 3"),
    (["--group-size", "16"], "--group-size 16 needs --bits"),
    (["--bits", "4", "--group-size", "24"], "group_size=24 must divide in_features"),
])
def test_bad_quant_arguments_exit_with_usage_error(saved, tmp_path, capsys, extra, match):  # noqa: F811
    with pytest.raises(SystemExit) as exit_info:
        run(saved, "mpt", tmp_path / "x", *extra)
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err
