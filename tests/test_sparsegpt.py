"""SparseGPT: agreement with a loop-by-loop implementation, exact patterns, robustness, quality."""

import pytest
import torch

from sparsekit.masks import is_nm_mask
from sparsekit.prune import HessianError, magnitude_prune, sparsegpt_prune, wanda_prune


def correlated_layer(seed, out=32, inp=64, tokens=256):
    """A weight and ``H = 2/n XᵀX`` for inputs with a decaying spectrum and unequal per-input scales."""
    g = torch.Generator().manual_seed(seed)
    spectrum = 0.85 ** torch.arange(inp, dtype=torch.float32)
    rotation, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g))
    scale = torch.exp(torch.randn(inp, generator=g))
    X = (torch.randn(tokens, inp, generator=g) * spectrum) @ rotation * scale
    W = torch.randn(out, inp, generator=g)
    return W, 2 / tokens * X.t() @ X


def rel_error(W, W_pruned, H):
    delta = (W - W_pruned).double()
    H = H.double()
    return float(((delta @ H) * delta).sum() / ((W.double() @ H) * W.double()).sum())


def loop_sparsegpt(W, H, sparsity, nm, blocksize, percdamp):
    """SparseGPT written element by element in float64, following the published algorithm literally."""
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    for j in range(cols):
        if H[j, j] == 0:
            H[j, j] = 1.0
            for r in range(rows):
                W[r, j] = 0.0
    mean_diag = sum(H[j, j] for j in range(cols)) / cols
    for j in range(cols):
        H[j, j] += percdamp * mean_diag
    U = torch.linalg.cholesky(torch.linalg.inv(H)).t()  # upper factor of H⁻¹
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        if nm is None:
            entries = [(float(W[r, j] ** 2 / U[j, j] ** 2), j, r) for j in range(b0, b1) for r in range(rows)]
            entries.sort(key=lambda e: e[0])
            for _, j, r in entries[: int(round(sparsity * len(entries)))]:
                keep[r, j] = False
        errors = torch.zeros(rows, b1 - b0, dtype=torch.float64)
        for j in range(b0, b1):
            if nm is not None and (j - b0) % nm[1] == 0:
                for r in range(rows):
                    group = sorted(range(j, j + nm[1]), key=lambda c: float(W[r, c] ** 2 / U[c, c] ** 2))
                    for c in group[: nm[1] - nm[0]]:
                        keep[r, c] = False
            for r in range(rows):
                q = W[r, j] if keep[r, j] else 0.0
                err = (W[r, j] - q) / U[j, j]
                errors[r, j - b0] = err
                for c in range(j, b1):
                    W[r, c] -= err * U[j, c]
                W[r, j] = q
        for r in range(rows):
            for c in range(b1, cols):
                W[r, c] -= sum(errors[r, k - b0] * U[k, c] for k in range(b0, b1))
    return W, keep


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_agrees_with_loop_by_loop_implementation(nm):
    W, H = correlated_layer(3, out=6, inp=16, tokens=64)
    H[5, :] = H[:, 5] = 0.0  # one dead input
    expected, expected_keep = loop_sparsegpt(W, H, 0.5, nm, blocksize=8, percdamp=0.01)
    pruned, keep = sparsegpt_prune(W, H, 0.5, nm=nm, blocksize=8, percdamp=0.01)
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(pruned.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_error_sparsegpt_below_wanda_below_magnitude(nm):
    for seed in range(20):
        W, H = correlated_layer(seed, out=16, inp=32, tokens=128)
        sparsegpt = rel_error(W, sparsegpt_prune(W, H, 0.5, nm=nm, blocksize=16)[0], H)
        wanda = rel_error(W, wanda_prune(W, torch.diagonal(H), 0.5, nm=nm)[0], H)
        magnitude = rel_error(W, magnitude_prune(W, 0.5, nm=nm)[0], H)
        assert sparsegpt < wanda < magnitude, (seed, sparsegpt, wanda, magnitude)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_unstructured_sparsity_exact_per_block(sparsity):
    W, H = correlated_layer(1, out=16, inp=96)
    pruned, keep = sparsegpt_prune(W, H, sparsity, blocksize=32)
    for start in range(0, 96, 32):
        block = keep[:, start:start + 32]
        assert int((~block).sum()) == round(sparsity * block.numel())
    assert torch.equal(pruned == 0, ~keep)


def test_last_partial_block_is_exact_too():
    W, H = correlated_layer(2, out=8, inp=40)
    _, keep = sparsegpt_prune(W, H, 0.5, blocksize=32)
    assert int((~keep[:, :32]).sum()) == 128 and int((~keep[:, 32:]).sum()) == 32


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (16, 32)])
def test_nm_groups_valid(nm):
    W, H = correlated_layer(4, out=16, inp=64)
    pruned, keep = sparsegpt_prune(W, H, nm=nm, blocksize=32)
    groups = keep.reshape(16, -1, nm[1]).sum(-1)
    assert bool((groups == nm[0]).all())
    assert is_nm_mask(pruned != 0, nm)


def test_sparsity_zero_leaves_weight_unchanged():
    W, H = correlated_layer(5)
    pruned, keep = sparsegpt_prune(W, H, 0.0)
    assert bool(keep.all())
    torch.testing.assert_close(pruned, W, rtol=0, atol=0)


def test_dead_inputs_are_zeroed_and_do_not_break_the_solver():
    W, H = correlated_layer(6, out=8, inp=32)
    H[[3, 17], :] = 0.0
    H[:, [3, 17]] = 0.0
    pruned, _ = sparsegpt_prune(W, H, 0.5, blocksize=16)
    assert bool(torch.isfinite(pruned).all())
    assert bool((pruned[:, [3, 17]] == 0).all())
    alive = [j for j in range(32) if j not in (3, 17)]
    sub = rel_error(W[:, alive], pruned[:, alive], H[alive][:, alive])
    assert sub < rel_error(W, magnitude_prune(W, 0.5)[0], H)


def test_not_positive_definite_h_succeeds_through_dampening_retry():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(8, 32, generator=g)
    H = 2 / 8 * X.t() @ X
    noise = torch.randn(32, 32, generator=g)
    noise = (noise + noise.t()).fill_diagonal_(0)
    H = H + 0.005 * torch.diagonal(H).mean() * noise  # smallest eigenvalue ≈ -0.06 · mean(diag H)
    W = torch.randn(8, 32, generator=g)
    assert int(torch.linalg.cholesky_ex(H + 0.01 * torch.diagonal(H).mean() * torch.eye(32)).info) != 0
    with pytest.warns(UserWarning, match="my.layer.*percdamp=0.1"):
        pruned, keep = sparsegpt_prune(W, H, 0.5, blocksize=16, name="my.layer")
    assert bool(torch.isfinite(pruned).all()) and int((~keep).sum()) == 128


def test_singular_h_without_dampening_retries():
    W, H = correlated_layer(8, out=8, inp=32, tokens=8)  # rank 8 < 32: singular
    with pytest.warns(UserWarning, match="percdamp"):
        pruned, _ = sparsegpt_prune(W, H, 0.5, percdamp=0.0)
    assert bool(torch.isfinite(pruned).all())


def test_hopeless_h_raises_naming_the_layer():
    W = torch.randn(4, 2)
    H = torch.tensor([[1.0, 100.0], [100.0, 1.0]])  # an eigenvalue of -99
    with pytest.raises(HessianError, match=r"decoder.7.fc1.*not positive definite even with dampening 10·"):
        sparsegpt_prune(W, H, 0.5, name="decoder.7.fc1")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_statistics_raise_naming_the_layer(bad):
    W, H = correlated_layer(9, out=8, inp=16)
    H[2, 3] = bad
    with pytest.raises(ValueError, match="'blocks.0.attn'.*NaN/Inf"):
        sparsegpt_prune(W, H, 0.5, name="blocks.0.attn")
    W[0, 0] = bad
    with pytest.raises(ValueError, match="W of layer 'blocks.0.attn'"):
        sparsegpt_prune(W, torch.eye(16), 0.5, name="blocks.0.attn")


def test_negative_diagonal_raises():
    with pytest.raises(HessianError, match="negative diagonal"):
        sparsegpt_prune(torch.randn(4, 4), -torch.eye(4), 0.5)


def test_deterministic():
    W, H = correlated_layer(10)
    a = sparsegpt_prune(W, H, 0.6, blocksize=16)
    b = sparsegpt_prune(W, H, 0.6, blocksize=16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_low_precision_weight_cast_back_and_inputs_untouched():
    W, H = correlated_layer(11)
    W16, H_copy = W.to(torch.bfloat16), H.clone()
    pruned, keep = sparsegpt_prune(W16, H, 0.5)
    assert pruned.dtype == torch.bfloat16 and keep.dtype == torch.bool
    assert torch.equal(H, H_copy) and torch.equal(W16, W.to(torch.bfloat16))
    assert torch.equal(pruned == 0, ~keep)


def test_quantizer_is_called_per_column_and_its_error_compensated():
    W, H = correlated_layer(12, out=8, inp=32)
    seen = []

    def round_to_quarter(column, index, weight):
        seen.append(index)
        assert column.shape == (8,) and weight.shape == (8, 32)
        kept = column != 0
        assert torch.equal(weight[:, index][kept], column[kept])  # weight is the working matrix
        return torch.round(column * 4) / 4

    pruned, keep = sparsegpt_prune(W, H, 0.5, blocksize=16, quantizer=round_to_quarter)
    assert seen == list(range(32))
    assert torch.equal(torch.round(pruned * 4) / 4, pruned)  # every weight on the grid
    assert bool((pruned[~keep] == 0).all())
    naive = torch.round(sparsegpt_prune(W, H, 0.5, blocksize=16)[0] * 4) / 4
    assert rel_error(W, pruned, H) < rel_error(W, naive, H)


def test_quantizer_cannot_revive_pruned_weights():
    W, H = correlated_layer(13, out=8, inp=16)
    pruned, keep = sparsegpt_prune(W, H, 0.5, quantizer=lambda column, index, weight: column + 1.0)
    assert bool((pruned[~keep] == 0).all()) and bool((pruned[keep] != 0).all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"W": torch.randn(4)}, "W must be a 2-D"),
        ({"H": torch.eye(3)}, r"H must be a \[8, 8\]"),
        ({"sparsity": 1.0}, "sparsity must be in"),
        ({"sparsity": -0.1}, "sparsity must be in"),
        ({"nm": (4, 2)}, "nm"),
        ({"nm": (2, 3)}, "divisible by m=3"),
        ({"nm": (2, 4), "blocksize": 6}, "blocksize must be a multiple of m=4"),
        ({"blocksize": 0}, "blocksize must be a positive int"),
        ({"percdamp": -1.0}, "percdamp must be"),
        ({"percdamp": float("nan")}, "percdamp must be"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    args = {"W": torch.randn(4, 8), "H": torch.eye(8), "sparsity": 0.5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sparsegpt_prune(**args)


def test_quantizer_must_be_callable():
    with pytest.raises(TypeError, match="quantizer must be callable"):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(8), 0.5, quantizer=3)
