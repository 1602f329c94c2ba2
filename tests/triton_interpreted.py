"""The Triton kernels under Triton's CPU interpreter, against dense ``F.linear``.

Run by ``tests/test_triton_kernels.py`` in a subprocess with ``TRITON_INTERPRET=1``: the interpreter must be
on when Triton itself is imported (its ``tl.zeros``, ``tl.cumsum`` ... are ``triton.jit`` functions too), so
it cannot be switched on inside a pytest process that may already have imported Triton, and it must not
be set for the other tests. Shapes are tiny: the interpreter's cost grows with the grid and the K tiles.
"""

import os

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run this file with TRITON_INTERPRET=1 (tests/test_triton_kernels.py does)")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from sparsekit.formats import BitmaskWeight, NMWeight  # noqa: E402
from sparsekit.kernels import triton_bitmask as tb  # noqa: E402
from sparsekit.kernels import triton_dispatch as dispatch  # noqa: E402
from sparsekit.kernels import triton_launch as launch  # noqa: E402
from sparsekit.kernels import triton_nm as tnm  # noqa: E402
from sparsekit.kernels.triton_testing import pack_nibbles, quantize_sparse, random_sparse  # noqa: E402

TOL = {torch.float16: dict(atol=1e-2, rtol=1e-2), torch.bfloat16: dict(atol=4e-2, rtol=3e-2)}
SHAPES = ((64, 128), (96, 160))


def _x(batch, cols, dtype, seed=1):
    return torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _check(y, x, W_dense):
    ref = F.linear(x.float(), W_dense.float())
    assert y.dtype == x.dtype and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref, **TOL[x.dtype])


def test_kernels_are_interpreted():
    assert launch.is_interpreted(tb._bitmask_kernel) and launch.is_interpreted(tnm._nm_kernel)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 5, 40])
def test_bitmask_float(dtype, shape, batch):
    W = random_sparse(*shape, sparsity=0.7, dtype=dtype, seed=batch)
    tiles = tb.BitmaskTiles.from_weight(BitmaskWeight.from_dense(W), tile_k=64)
    _check(tb.bitmask_matmul(_x(batch, shape[1], dtype), tiles), _x(batch, shape[1], dtype), W)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (16, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5, 40])
def test_nm_float(nm, dtype, batch):
    shape = SHAPES[batch % 2]
    W = random_sparse(*shape, nm=nm, dtype=dtype, seed=batch)
    x = _x(batch, shape[1], dtype)
    _check(tnm.nm_linear(x, NMWeight.from_dense(W, nm=nm)), x, W)


@pytest.mark.parametrize("format,nm", [("bitmask", None), ("nm", (2, 4)), ("nm", (16, 32))])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [32, 160])
def test_quantized(format, nm, bits, group_size):
    W = random_sparse(96, 160, sparsity=0.6, nm=nm, dtype=torch.float32, seed=bits)
    quantized = quantize_sparse(W, format, bits, group_size, nm=nm)
    for batch, dtype in ((1, torch.float16), (5, torch.bfloat16)):
        x = _x(batch, 160, dtype)
        _check(dispatch.triton_linear(x, quantized), x, quantized.to_dense())


@pytest.mark.parametrize("tile_k", [32, 128])
def test_bitmask_tile_offsets(tile_k):
    W = random_sparse(64, 200, sparsity=0.5, seed=3)  # 200 columns: a ragged last tile and last mask byte
    weight = BitmaskWeight.from_dense(W)
    tiles = tb.BitmaskTiles.from_weight(weight, tile_k=tile_k)
    mask = weight.mask()
    expected = torch.stack([weight.row_offsets[:-1] + mask[:, :t * tile_k].sum(-1)
                            for t in range(-(-200 // tile_k))], dim=1)
    assert tiles.tile_offsets.dtype == torch.int32 and torch.equal(tiles.tile_offsets.long(), expected)
    assert tiles.nnz == weight.nnz and tiles.bitmask is weight.bitmask and tiles.values is weight.values
    x = _x(3, 200, torch.float16)
    _check(tb.bitmask_matmul(x, tiles), x, W)


@pytest.mark.parametrize("config", [launch._config(1, 16, 8, 4, 2), launch._config(16, 32, 4, 4, 3),
                                    launch._config(32, 64, 1, 4, 3)])
def test_explicit_configs_split_k(config):
    """FMA with an 8-way K split (atomic partial sums), tl.dot with split-K, and a prefill tile."""
    W = random_sparse(96, 160, sparsity=0.8, seed=4)
    batch = {1: 1, 16: 7, 32: 33}[config.kwargs["BLOCK_M"]]
    x = _x(batch, 160, torch.float16)
    tiles = tb.BitmaskTiles.from_weight(BitmaskWeight.from_dense(W), tile_k=32)
    _check(tb.bitmask_matmul(x, tiles, config=config), x, W)
    nm_config = triton.Config(dict(config.kwargs, BLOCK_K=32), num_warps=4)
    Wn = random_sparse(96, 160, nm=(2, 4), seed=4)
    _check(tnm.nm_linear(x, NMWeight.from_dense(Wn, nm=(2, 4)), config=nm_config), x, Wn)


def test_every_config_belongs_to_one_regime():
    for configs in (tb.CONFIGS, tnm.CONFIGS):
        for batch in (1, 2, 16, 17, 300):
            kept = launch.prune_by_batch(configs, {"M": batch})
            assert kept and all(c.kwargs["BLOCK_M"] == {1: 1, 2: 16, 16: 16}.get(batch, c.kwargs["BLOCK_M"])
                                for c in kept)
        assert all(c.kwargs["BLOCK_M"] in (1,) or c.kwargs["BLOCK_M"] >= 16 for c in configs)


def test_sparse_linear_cuda_dispatch_runs_the_triton_kernels():
    from sparsekit.kernels import select_kernel

    W = random_sparse(64, 128, sparsity=0.7, seed=5)
    Wn = random_sparse(64, 128, nm=(2, 4))
    for weight in (BitmaskWeight.from_dense(W), NMWeight.from_dense(Wn, nm=(2, 4))):
        entry = select_kernel(weight, "cuda", torch.float16, 1)
        assert entry is not None and entry.name == f"triton-{weight.format}"
        assert select_kernel(weight, "cuda", torch.float32, 1) is None  # fp32 x: dense cuBLAS
        assert select_kernel(weight, "cuda", torch.float16, 64) is None  # prefill: dense cuBLAS
        x = _x(2, 128, torch.float16)
        _check(entry.run(x, weight), x, weight.to_dense())


def test_fp32_values_run_with_fp16_x():
    """SparseLinear keeps the values' dtype; an fp32-valued weight still runs (cast on chip)."""
    W = random_sparse(64, 128, sparsity=0.7, dtype=torch.float32, seed=6)
    x = _x(3, 128, torch.float16)
    _check(dispatch.triton_linear(x, BitmaskWeight.from_dense(W)), x, W)
    Wn = random_sparse(64, 128, nm=(2, 4), dtype=torch.float32, seed=6)
    _check(dispatch.triton_linear(x, NMWeight.from_dense(Wn, nm=(2, 4))), x, Wn)


def test_reference_packer():
    q = torch.tensor([[-8, 7, 3], [0, -1, 5]], dtype=torch.int8)
    assert pack_nibbles(q).tolist() == [[0x78, 0x03], [0xF0, 0x05]]
    W = random_sparse(8, 64, sparsity=0.5, dtype=torch.float32)
    for bits in (8, 4):
        quantized = quantize_sparse(W, "bitmask", bits, 16)
        dense = quantized.to_dense()
        assert bool(((dense != 0) <= (W != 0)).all())  # nothing outside the mask
        err = (dense - W).abs().reshape(8, 4, 16).amax(-1)
        assert bool((err <= quantized.scales.float() * 0.5 + 1e-6).all())


def test_invalid_inputs_raise():
    W = random_sparse(64, 128, sparsity=0.5)
    weight = BitmaskWeight.from_dense(W)
    tiles = tb.BitmaskTiles.from_weight(weight, tile_k=64)
    x = _x(2, 128, torch.float16)
    with pytest.raises(ValueError, match="x must have dtype"):
        tb.bitmask_matmul(x.float(), tiles)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, 128\]"):
        tb.bitmask_matmul(x[:, :64], tiles)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        tb.bitmask_matmul(x.numpy(), tiles)
    with pytest.raises(TypeError, match="tiles must be a BitmaskTiles"):
        tb.bitmask_matmul(x, weight)
    with pytest.raises(ValueError, match="tile_k must be one of"):
        tb.BitmaskTiles.from_weight(weight, tile_k=48)
    with pytest.raises(ValueError, match="values must have dtype"):
        tb.BitmaskTiles.from_parts((64, 128), weight.bitmask, weight.values.double(), weight.row_offsets)
    nm_weight = NMWeight.from_dense(random_sparse(64, 128, nm=(2, 4)), nm=(2, 4))
    with pytest.raises(ValueError, match="nm must be"):
        tnm.nm_matmul(x, nm_weight.bitmask, nm_weight.values, (64, 128), (2, 3))
    with pytest.raises(ValueError, match="values must be contiguous of shape"):
        tnm.nm_matmul(x, nm_weight.bitmask, nm_weight.values[:, :10], (64, 128), (2, 4))
    quantized = quantize_sparse(W.float(), "bitmask", 4, 32)
    bad = [(dict(bits=3), "bits must be 8 or 4"), (dict(group_size=48), "group_size must be"),
           (dict(scales=quantized.scales.float()), "scales must be float16"),
           (dict(values=quantized.values.view(torch.int8)), "bits=4 values must be")]
    for change, message in bad:
        parts = {**vars(quantized), **change}
        with pytest.raises(ValueError, match=message):
            dispatch.triton_linear(x, type(quantized)(**parts))


# ---- NaN and Inf in x (issue 19): the pattern of the dense product, as on every CPU path
# (tests/test_kernel_nonfinite.py): a pruned weight is a stored zero and 0·NaN = 0·Inf = NaN.


def _nonfinite_weights():
    pruned = 5  # a column no row keeps
    W = random_sparse(64, 128, sparsity=0.7, dtype=torch.float32, seed=8)
    Wn = random_sparse(64, 128, nm=(2, 4), dtype=torch.float32, seed=8)
    W[:, pruned] = 0.0
    Wn[:, pruned] = 0.0
    kept = int(W[0].nonzero()[0])
    return pruned, kept, [BitmaskWeight.from_dense(W.half()), NMWeight.from_dense(Wn.half(), nm=(2, 4)),
                          BitmaskWeight.from_dense(W, bits=8, group_size=32),
                          NMWeight.from_dense(Wn, nm=(2, 4), bits=4, group_size=64)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5])
def test_nonfinite_x_gives_the_dense_pattern(dtype, batch):
    pruned, kept, weights = _nonfinite_weights()
    x = _x(batch, 128, dtype, seed=9)
    x[0, pruned] = float("nan")
    if batch > 1:
        x[1, pruned], x[2, pruned], x[3, kept] = float("inf"), -float("inf"), float("nan")  # row 4 finite
    for weight in weights:
        y = dispatch.triton_linear(x, weight)
        ref = F.linear(x.float(), weight.to_dense().float()).to(dtype)
        assert bool(torch.isnan(ref[:min(batch, 4)]).all()) and bool(torch.isfinite(ref[4:]).all())
        assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
