"""prune_model replays every block with its own call: tiny decoders that mix full and sliding attention.

Qwen2/Qwen3/Gemma 2/Gemma 3 give each layer the attention mask of its ``layer_types`` entry (and Gemma 3
its own rotary embeddings). The statistics the driver accumulates for every layer must equal those of a
full forward of the model with the earlier blocks pruned.
"""

import copy
import functools

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from sparsekit.blocks import prunable_linears, transformer_blocks, weight_out_in
from sparsekit.prune import SOLVERS, Solver, magnitude_prune, prune_model

VOCAB = 100
LAYER_TYPES = ["full_attention", "sliding_attention", "sliding_attention", "full_attention", "full_attention"]
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=len(LAYER_TYPES), num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=64,
             layer_types=LAYER_TYPES, sliding_window=4)
MODELS = {
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SIZES, use_sliding_window=True)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SIZES, use_sliding_window=True)),
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**SIZES)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**SIZES)),
}


@functools.cache
def _dense(kind):
    torch.manual_seed(0)
    model = MODELS[kind]().eval()
    assert list(model.config.layer_types) == LAYER_TYPES  # the config really mixes the attention types
    return model


def dense_model(kind):
    return copy.deepcopy(_dense(kind))


def batches(padding):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        mask = torch.ones(3, 16, dtype=torch.long)
        if padding:
            mask[-1, 11:] = 0  # right padding on the last sequence
        out.append({"input_ids": torch.randint(1, VOCAB, (3, 16), generator=g), "attention_mask": mask})
    return out


def hessian(inputs):
    X = torch.cat(inputs).double()
    return (2.0 / X.shape[0]) * X.t() @ X


@pytest.fixture
def recorded(monkeypatch):
    """A solver that prunes by magnitude (independent of the statistics) and records every layer's H."""
    seen = {}

    def record(W, stats, sparsity, nm, name):
        seen[name] = stats.H.double().clone()
        return magnitude_prune(W, sparsity, nm)

    monkeypatch.setitem(SOLVERS, "record", Solver(record, needs_calibration=True))
    return seen


@pytest.mark.parametrize("padding", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_every_layer_sees_the_inputs_of_a_full_forward_with_earlier_blocks_pruned(kind, padding, recorded):
    calib = batches(padding)
    prune_model(dense_model(kind), calib, "record", 0.5, progress=False)
    model = dense_model(kind)
    blocks = transformer_blocks(model)
    targets = prunable_linears(model)
    assert set(recorded) == {name for name, _ in targets}
    current = {}
    for block_name, _ in blocks:
        layers = {name: linear for name, linear in targets if name.startswith(block_name + ".")}
        inputs = {name: [] for name in layers}
        hooks = [linear.register_forward_hook(
            lambda _m, x, _y, into=inputs[name], real=current: into.append(x[0][real["mask"]]))
            for name, linear in layers.items()]
        with torch.no_grad():
            for batch in calib:
                current["mask"] = batch["attention_mask"].bool()
                model(**batch)
        for hook in hooks:
            hook.remove()
        for name, linear in layers.items():
            expected = hessian(inputs[name])
            error = float((recorded[name] - expected).norm() / expected.norm())
            assert error <= 1e-5, (name, error)
            with torch.no_grad():  # prune this layer as the driver did, before the next block
                weight_out_in(linear).copy_(magnitude_prune(weight_out_in(linear), 0.5)[0])
