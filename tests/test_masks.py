import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import MptConfig, MptForCausalLM, T5Config, T5ForConditionalGeneration

from sparsekit.blocks import prunable_linears, transformer_blocks
from sparsekit.masks import (
    apply_masks,
    freeze_masks,
    is_nm_mask,
    mask_gradients,
    nm_sparsity,
    sparsity_report,
    unfreeze_masks,
    validate_nm,
    validate_sparsity,
)
from sparsekit.prune import magnitude_prune


def tiny_mpt():
    torch.manual_seed(0)
    cfg = MptConfig(d_model=32, n_heads=2, n_layers=2, expansion_ratio=2, max_seq_len=16, vocab_size=50)
    return MptForCausalLM(cfg)


def tiny_t5():
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=2, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), float("inf"), 1.5])
def test_bad_sparsity_raises_naming_the_argument(bad):
    with pytest.raises(ValueError, match="sparsity"):
        validate_sparsity(bad)


@pytest.mark.parametrize("bad", ["0.5", None, True])
def test_non_numeric_sparsity_raises_type_error(bad):
    with pytest.raises(TypeError, match="sparsity"):
        validate_sparsity(bad)


@pytest.mark.parametrize("nm", [(4, 2), (2, 2), (0, 4), (-1, 4), (2,)])
def test_bad_nm_raises_naming_the_argument(nm):
    with pytest.raises(ValueError, match="nm"):
        validate_nm(nm)


@pytest.mark.parametrize("nm", [(2.0, 4), "2:4", (True, 4), 2])
def test_nm_of_the_wrong_type_raises_type_error(nm):
    with pytest.raises(TypeError, match="nm"):
        validate_nm(nm)


def test_nm_needs_in_features_divisible_by_m():
    with pytest.raises(ValueError, match="in_features=6"):
        validate_nm((2, 4), in_features=6)
    assert validate_nm((2, 4), in_features=8) == (2, 4)
    assert math.isclose(nm_sparsity((2, 4)), 0.5)
    assert math.isclose(nm_sparsity((16, 32)), 0.5)


def test_magnitude_bad_inputs_raise():
    W = torch.randn(4, 6)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            magnitude_prune(W, bad)
    with pytest.raises(ValueError, match="nm"):
        magnitude_prune(W, nm=(4, 2))
    with pytest.raises(ValueError, match="in_features=6"):
        magnitude_prune(W, nm=(2, 4))
    with pytest.raises(ValueError, match="2-D"):
        magnitude_prune(torch.randn(4), 0.5)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 40), sparsity=st.floats(0, 0.99),
       seed=st.integers(0, 999))
def test_magnitude_exact_sparsity_per_row_and_keeps_the_largest(rows, cols, sparsity, seed):
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    pruned, mask = magnitude_prune(W, sparsity)
    k = round(sparsity * cols)
    assert mask.dtype == torch.bool and mask.shape == W.shape
    assert (mask.sum(1) == cols - k).all()
    assert torch.equal(pruned, W * mask)
    if 0 < k < cols:  # every kept weight is at least as large as every pruned one in its row
        kept_min = W.abs().masked_fill(~mask, math.inf).min(1).values
        pruned_max = W.abs().masked_fill(mask, -math.inf).max(1).values
        assert (kept_min >= pruned_max).all()


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4), (16, 32)])
def test_magnitude_nm_every_group_valid(nm):
    n, m = nm
    W = torch.randn(7, 4 * m)
    pruned, mask = magnitude_prune(W, nm=nm)
    assert is_nm_mask(mask, nm)
    assert (mask.reshape(7, -1, m).sum(-1) == n).all()  # exactly n kept, not fewer
    groups = W.abs().reshape(7, -1, m)
    gmask = mask.reshape(7, -1, m)
    assert (groups.masked_fill(~gmask, math.inf).min(-1).values
            >= groups.masked_fill(gmask, -math.inf).max(-1).values).all()


def test_is_nm_mask_detects_violation():
    mask = torch.tensor([[True, True, True, False, True, False, False, False]])
    assert not is_nm_mask(mask, (2, 4))
    assert is_nm_mask(mask, (3, 4))


def test_blocks_found_in_execution_order():
    names = [n for n, _ in transformer_blocks(tiny_t5())]
    assert names == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
    names = [n for n, _ in transformer_blocks(tiny_mpt())]
    assert names == ["transformer.blocks.0", "transformer.blocks.1"]


def test_prunable_linears_exclude_embeddings_and_head():
    model = tiny_mpt()
    names = [n for n, _ in prunable_linears(model)]
    assert names and all(n.startswith("transformer.blocks.") for n in names)
    assert "lm_head" not in names
    assert [n for n, _ in prunable_linears(model, ["ffn.up_proj"])] == [
        "transformer.blocks.0.ffn.up_proj", "transformer.blocks.1.ffn.up_proj"]
    with pytest.raises(ValueError, match="targets"):
        prunable_linears(model, ["no_such_layer"])


def test_sparsity_report_counts_zeros():
    model = tiny_mpt()
    linears = prunable_linears(model)
    with torch.no_grad():
        for _, lin in linears:
            lin.weight.copy_(magnitude_prune(lin.weight, 0.75)[0])
    report = sparsity_report(model)
    assert list(report["layer"][:-1]) == [n for n, _ in linears]
    assert report["sparsity"].iloc[:-1].between(0.74, 0.76).all()
    overall = report.iloc[-1]
    assert overall["layer"] == "overall"
    assert overall["zeros"] == report["zeros"].iloc[:-1].sum()


def test_frozen_masks_survive_adamw_and_save_load(tmp_path):
    model = tiny_mpt()
    with torch.no_grad():
        for _, lin in prunable_linears(model):
            lin.weight.copy_(magnitude_prune(lin.weight, 0.6)[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    masks = freeze_masks(model, optimizer=optimizer)
    ids = torch.randint(0, 50, (4, 12))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, lin in prunable_linears(model):
        assert torch.equal(lin.weight != 0, masks[name]), name  # no pruned weight regrew, none died
    model.save_pretrained(tmp_path)
    loaded = MptForCausalLM.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(prunable_linears(model), prunable_linears(loaded)):
        assert torch.equal(a.weight, b.weight), name
    unfreeze_masks(model)
    assert not any(hasattr(m, "weight_mask") for m in model.modules())


def test_masks_are_stored_as_bool_and_keep_a_bf16_model_bf16():
    """One byte per weight whatever the weights' precision (not a second copy of the weights)."""
    model = tiny_mpt().to(torch.bfloat16)
    with torch.no_grad():
        for _, lin in prunable_linears(model):
            lin.weight.copy_(magnitude_prune(lin.weight, 0.5)[0])
    masks = freeze_masks(model)
    for name, lin in prunable_linears(model):
        assert lin.weight_mask.dtype == torch.bool and torch.equal(lin.weight_mask, masks[name])
        with torch.no_grad():
            lin.weight.add_(1.0)  # regrow everything, as an optimizer step with momentum could
        lin.weight.grad = torch.ones_like(lin.weight)
    apply_masks(model)
    mask_gradients(model)
    for name, lin in prunable_linears(model):
        assert lin.weight.dtype == torch.bfloat16
        assert torch.equal(lin.weight != 0, masks[name]), name
        assert torch.equal(lin.weight.grad != 0, masks[name]), name


def test_without_freezing_adamw_regrows_weights():
    """The control for the test above: the guards are what keeps the zeros."""
    model = tiny_mpt()
    with torch.no_grad():
        for _, lin in prunable_linears(model):
            lin.weight.copy_(magnitude_prune(lin.weight, 0.6)[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 50, (4, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert float(sparsity_report(model)["sparsity"].iloc[-1]) < 0.5


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 40), sparsity=st.floats(0, 0.99),
       seed=st.integers(0, 999))
def test_magnitude_layer_scope_one_threshold_for_the_whole_layer(rows, cols, sparsity, seed):
    scales = torch.logspace(-2, 1, rows)[:, None]  # rows of different scales
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scales
    pruned, mask = magnitude_prune(W, sparsity, scope="layer")
    k = round(sparsity * W.numel())
    assert int((~mask).sum()) == k and torch.equal(pruned, W * mask)
    if 0 < k < W.numel():
        assert float(W.abs()[mask].min()) >= float(W.abs()[~mask].max())


def test_magnitude_layer_scope_is_the_papers_baseline_once_counts_match():
    """SparseGPT's and Wanda's magnitude baseline: zero |W| <= sort(|W|)[int(s · numel)], one threshold."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 64, generator=g) * torch.logspace(-1, 1, 16)[:, None]  # rows of different scales
    s = 0.5
    threshold = torch.sort(W.abs().flatten()).values[int(W.numel() * s)]
    reference = W.abs() > threshold  # kept
    pruned_count = int((~reference).sum())  # int(s · numel) + 1: the reference's count
    mask = magnitude_prune(W, pruned_count / W.numel(), scope="layer")[1]
    assert torch.equal(mask, reference)
    per_row = (~mask).float().mean(1)
    assert float(per_row.max() - per_row.min()) > 0.5  # rows of different scales: very different sparsities
    assert not torch.equal(magnitude_prune(W, s, scope="row")[1], magnitude_prune(W, s, scope="layer")[1])


def test_magnitude_refuses_nan_weights_and_unknown_scope():
    W = torch.randn(4, 8)
    W[1, 2] = float("nan")
    with pytest.raises(ValueError, match="W must be finite"):
        magnitude_prune(W, 0.5)
    with pytest.raises(ValueError, match="scope must be one of"):
        magnitude_prune(torch.randn(4, 8), 0.5, scope="global")
