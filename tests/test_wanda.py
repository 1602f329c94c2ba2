"""Wanda: |W| · ‖x‖ scores, exact per-row sparsity, N:M groups, validation."""

import pytest
import torch

from sparsekit.masks import is_nm_mask
from sparsekit.prune import magnitude_prune, wanda_prune


def test_scores_weight_by_input_norm():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    act_sq_norm = torch.tensor([100.0, 1.0, 1.0, 0.01])  # |W|·‖x‖ = 10, 2, 3, 0.4
    pruned, keep = wanda_prune(W, act_sq_norm, 0.5)
    assert keep.tolist() == [[True, False, True, False]]
    assert pruned.tolist() == [[1.0, 0.0, 3.0, 0.0]]


def test_uniform_activations_equal_magnitude_pruning():
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(wanda_prune(W, torch.full((32,), 3.0), 0.5)[1], magnitude_prune(W, 0.5)[1])


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_exact_sparsity_per_row(sparsity):
    g = torch.Generator().manual_seed(1)
    W, act = torch.randn(16, 40, generator=g), torch.rand(40, generator=g)
    _, keep = wanda_prune(W, act, sparsity)
    assert bool(((~keep).sum(1) == round(sparsity * 40)).all())


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_groups(nm):
    g = torch.Generator().manual_seed(2)
    W, act = torch.randn(16, 64, generator=g), torch.rand(64, generator=g)
    pruned, keep = wanda_prune(W, act, nm=nm)
    assert bool((keep.reshape(16, -1, nm[1]).sum(-1) == nm[0]).all())
    assert is_nm_mask(pruned != 0, nm)


def test_dtype_kept():
    W = torch.randn(4, 8).to(torch.bfloat16)
    pruned, keep = wanda_prune(W, torch.rand(8), 0.5)
    assert pruned.dtype == torch.bfloat16 and keep.dtype == torch.bool


@pytest.mark.parametrize(
    "act, match",
    [
        (torch.rand(7), r"act_sq_norm must be a \[8\]"),
        (torch.tensor([1.0] * 7 + [float("nan")]), "finite"),
        (torch.tensor([1.0] * 7 + [-1.0]), ">= 0"),
    ],
)
def test_bad_statistics_raise(act, match):
    with pytest.raises(ValueError, match=match):
        wanda_prune(torch.randn(4, 8), act, 0.5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="W must be a 2-D"):
        wanda_prune(torch.randn(8), torch.rand(8), 0.5)
    with pytest.raises(ValueError, match="sparsity must be in"):
        wanda_prune(torch.randn(4, 8), torch.rand(8), 1.5)
    with pytest.raises(ValueError, match="divisible by m=3"):
        wanda_prune(torch.randn(4, 8), torch.rand(8), nm=(1, 3))
