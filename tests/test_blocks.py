import pytest
import torch
from transformers import MptConfig, MptForCausalLM

from sparsekit.blocks import capture_linear_inputs, prunable_linears


def test_capture_linear_inputs_are_what_the_layer_sees():
    torch.manual_seed(0)
    model = MptForCausalLM(MptConfig(d_model=32, n_heads=2, n_layers=2, expansion_ratio=2, vocab_size=50))
    name, layer = prunable_linears(model, ["blocks.1.ffn.up_proj"])[0]
    batches = [{"input_ids": torch.randint(0, 50, (3, 7))} for _ in range(2)]
    outputs = []
    handle = layer.register_forward_hook(lambda _m, _i, out: outputs.append(out.reshape(-1, out.shape[-1])))
    X = capture_linear_inputs(model, layer, batches)
    handle.remove()
    assert X.shape == (2 * 3 * 7, 32)
    torch.testing.assert_close(layer(X), torch.cat(outputs))
    assert capture_linear_inputs(model, layer, batches, max_tokens=5).shape == (5, 32)
    with pytest.raises(ValueError, match="batches"):
        capture_linear_inputs(model, layer, [])
