"""GPT-2's ``Conv1D`` (``y = x W + b``, ``W`` stored ``[in, out]``) is a linear layer everywhere: pruned as
``Wᵀ`` row by row, its mask kept in its own layout, compressed into a SparseLinear with the same output;
and no function answers "0 layers changed" in silence (issue 19, item 6)."""

import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from sparsekit.blocks import capture_linear_inputs
from sparsekit.kernels import SparseLinear, sparsify_linears
from sparsekit.masks import freeze_masks, sparsity_report
from sparsekit.prune import magnitude_prune, prune_model, wanda_prune

VOCAB = 50


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=16)
    return GPT2LMHeadModel(config).eval()


def batches():
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def conv1d_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, Conv1D)}


def test_magnitude_prunes_each_output_of_a_conv1d_as_a_row_of_its_transpose():
    model = tiny_gpt2()
    dense = {name: layer.weight.detach().clone() for name, layer in conv1d_layers(model).items()}
    report = prune_model(model, None, "magnitude", 0.5, progress=False)
    assert len(report) == len(dense) == 8
    for name, layer in conv1d_layers(model).items():
        expected, _ = magnitude_prune(dense[name].t(), 0.5)  # [out, in]: one threshold per output
        assert torch.equal(layer.weight.detach(), expected.t()), name
        nx, nf = layer.weight.shape
        assert report.set_index("layer").loc[name, "shape"] == (nf, nx)


def test_wanda_uses_the_conv1d_inputs_statistics_on_the_transposed_weight():
    model = tiny_gpt2()
    layer = model.transformer.h[0].attn.c_attn  # block 0: its inputs do not depend on any pruned layer
    X = capture_linear_inputs(model, layer, batches())
    expected, _ = wanda_prune(layer.weight.detach().t().clone(), (X**2).sum(0), 0.5)
    prune_model(model, batches(), "wanda", 0.5, progress=False)
    torch.testing.assert_close(layer.weight.detach(), expected.t())


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_nm_patterns_run_along_the_inputs_of_a_conv1d(method):
    model = tiny_gpt2()
    prune_model(model, batches(), method, nm=(2, 4), progress=False)
    for name, layer in conv1d_layers(model).items():
        kept = (layer.weight.detach().t() != 0).reshape(layer.nf, -1, 4).sum(-1)  # groups of 4 inputs
        assert bool((kept <= 2).all()), name


def test_masks_of_conv1d_layers_stay_in_their_layout_through_adamw_and_the_report_is_out_in():
    model = tiny_gpt2()
    prune_model(model, None, "magnitude", 0.5, progress=False)
    masks = freeze_masks(model)
    assert set(masks) == set(conv1d_layers(model))
    for name, layer in conv1d_layers(model).items():
        assert masks[name].shape == layer.weight.shape  # [in, out], the layer's own layout
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        loss = model(**batches()[0], labels=batches()[0]["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, layer in conv1d_layers(model).items():
        assert not bool(layer.weight.detach()[~masks[name]].any()), name
    report = sparsity_report(model).set_index("layer")
    c_fc = model.transformer.h[0].mlp.c_fc
    assert report.loc["transformer.h.0.mlp.c_fc", "shape"] == (c_fc.nf, c_fc.weight.shape[0])  # (128, 32)


@pytest.mark.parametrize("format, nm", [("bitmask", None), ("csr", None), ("nm", (2, 4)), ("auto", None)])
def test_sparsify_linears_turns_every_conv1d_into_a_sparse_linear_with_the_same_output(format, nm):
    model = tiny_gpt2()
    prune_model(model, None, "magnitude", 0.9 if format == "csr" else 0.5, nm=nm, progress=False)
    ids = batches()[0]["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        layer = model.transformer.h[1].mlp.c_proj
        x = torch.randn(3, 5, layer.weight.shape[0])
        single = SparseLinear.from_linear(layer, format="bitmask")
        torch.testing.assert_close(single(x), layer(x), rtol=1e-5, atol=1e-6)
    names = set(conv1d_layers(model))
    report = sparsify_linears(model, format=format, nm=nm)
    assert set(report["layer"]) == names and bool(report["replaced"].all())
    assert not conv1d_layers(model)
    sparse = dict(model.named_modules())["transformer.h.0.attn.c_attn"]
    assert isinstance(sparse, SparseLinear) and (sparse.in_features, sparse.out_features) == (32, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_sparsify_linears_warns_loudly_when_it_replaces_nothing():
    model = tiny_gpt2()
    with pytest.warns(UserWarning, match=r"replaced no layer of GPT2LMHeadModel.*8 linear layers.*Conv1D"):
        report = sparsify_linears(model)
    assert not bool(report["replaced"].any()) and len(conv1d_layers(model)) == 8


def test_a_model_without_linear_layers_is_refused_naming_its_class_and_layer_types():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    for call in (lambda: sparsify_linears(model), lambda: prune_model(model, None, "magnitude", 0.5),
                 lambda: freeze_masks(model)):
        with pytest.raises(ValueError, match=r"Sequential.*layer types: \['Embedding', 'LayerNorm'\]"):
            call()


def test_from_linear_refuses_what_is_not_a_linear_layer():
    with pytest.raises(TypeError, match="nn.Linear or transformers' Conv1D, got Embedding"):
        SparseLinear.from_linear(nn.Embedding(4, 4))
    assert copy.deepcopy(SparseLinear.from_linear(Conv1D(6, 4))).out_features == 6
