"""CPU kernels (AVX2 and portable scalar C, torch fallback) against dense F.linear."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsekit.formats import BitmaskWeight, CSRWeight, NMWeight
from sparsekit.kernels import cpu, cpu_build, ops

torch.set_num_threads(2)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIMD = [False, True] if cpu_build.simd_available() else [False]


def sparse_weight(rows, cols, density, seed, empty_rows=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    W[:empty_rows] = 0
    return W


def reference(x, W_values):
    """``x Wᵀ`` in float64 from the values as stored (after their dtype cast)."""
    return (x.double() @ W_values.double().T).float()


def assert_matches(y, x, W_values):
    ref = reference(x, W_values)
    scale = (x.double().abs() @ W_values.double().abs().T).float() + 1e-6
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert bool(((y - ref).abs() <= 1e-5 * scale + 1e-6).all()), (y - ref).abs().max()


def run_all(x, W, dtype, simd, nm=None):
    """Every kernel on W (values cast to dtype) -> list of (name, y)."""
    bitmask = BitmaskWeight.from_dense(W, dtype=dtype)
    out = [("bitmask", cpu.bitmask_matmul(x, bitmask.bitmask, bitmask.values, bitmask.row_offsets, W.shape[1],
                                          simd=simd))]
    for index_dtype in (torch.uint16, torch.int32):
        csr = CSRWeight.from_dense(W, dtype=dtype, index_dtype=index_dtype)
        out.append((f"csr {index_dtype}", cpu.csr_matmul(x, csr.indptr, csr.indices, csr.values, W.shape[1],
                                                         simd=simd)))
    if nm is not None:
        weight = NMWeight.from_dense(W, nm=nm, dtype=dtype)
        out.append(("nm", cpu.bitmask_matmul(x, weight.bitmask, weight.values, None, W.shape[1], simd=simd)))
    return out


@SETTINGS
@given(rows=st.integers(1, 40), cols=st.integers(1, 80), batch=st.integers(1, 16),
       density=st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.9, 1.0]), empty_rows=st.integers(0, 3),
       dtype=st.sampled_from(DTYPES), simd=st.sampled_from(SIMD), seed=st.integers(0, 2**16))
def test_unstructured_kernels_match_dense(rows, cols, batch, density, empty_rows, dtype, simd, seed):
    W = sparse_weight(rows, cols, density, seed, empty_rows)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed + 1))
    for name, y in run_all(x, W, dtype, simd):
        assert_matches(y, x, W.to(dtype)), name


@SETTINGS
@given(rows=st.integers(1, 24), groups=st.integers(1, 12),
       nm=st.sampled_from([(2, 4), (4, 8), (1, 4), (16, 32)]),
       batch=st.integers(1, 16), dtype=st.sampled_from(DTYPES), simd=st.sampled_from(SIMD),
       seed=st.integers(0, 2**16))
def test_nm_kernel_matches_dense(rows, groups, nm, batch, dtype, simd, seed):
    from sparsekit.prune import magnitude_prune

    g = torch.Generator().manual_seed(seed)
    W = magnitude_prune(torch.randn(rows, groups * nm[1], generator=g), nm=nm)[0]
    x = torch.randn(batch, W.shape[1], generator=g)
    for name, y in run_all(x, W, dtype, simd, nm=nm):
        assert_matches(y, x, W.to(dtype)), name


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("batch", [1, 3, 9, 17])
def test_larger_shapes_use_the_vector_paths(simd, batch, cols=1030):
    """Enough rows and columns that the SIMD bodies, the 8-byte unrolled loop, the K tiles and the
    batch chunks (and the > 16 batch split) all run, with the scalar tail rows at the end."""
    W = sparse_weight(40, cols, 0.35, seed=batch, empty_rows=2)
    x = torch.randn(batch, cols)
    for dtype in DTYPES:
        for name, y in run_all(x, W, dtype, simd):
            assert_matches(y, x, W.to(dtype)), (name, dtype)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [8, 45, 1030])
def test_bitmask_to_dense_is_exact(simd, dtype, cols):
    W = sparse_weight(33, cols, 0.4, seed=cols, empty_rows=1)
    weight = BitmaskWeight.from_dense(W, dtype=dtype)
    dense = cpu.bitmask_to_dense(weight.bitmask, weight.values, weight.row_offsets, cols, simd=simd)
    assert torch.equal(dense, W.to(dtype))
    from sparsekit.prune import magnitude_prune

    nm_W = magnitude_prune(torch.randn(33, cols // 8 * 8), nm=(4, 8))[0]
    nm = NMWeight.from_dense(nm_W, nm=(4, 8), dtype=dtype)
    assert torch.equal(cpu.bitmask_to_dense(nm.bitmask, nm.values, None, nm_W.shape[1], simd=simd),
                       nm_W.to(dtype))


def test_torch_fallback_without_compiler_matches(monkeypatch):
    W = sparse_weight(20, 30, 0.4, seed=0)
    x = torch.randn(3, 30)
    monkeypatch.setattr(cpu, "load_library", lambda: None)
    assert cpu.backend() == "torch"
    for dtype in DTYPES:
        for name, y in run_all(x, W, dtype, simd=None, nm=None):
            assert_matches(y, x, W.to(dtype)), name
        weight = BitmaskWeight.from_dense(W, dtype=dtype)
        assert torch.equal(cpu.bitmask_to_dense(weight.bitmask, weight.values, weight.row_offsets, 30),
                           W.to(dtype))


def test_no_compiler_warns_and_returns_none(monkeypatch):
    monkeypatch.setattr(cpu_build, "_compiler", lambda: None)
    cpu_build.load_library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C compiler"):
            assert cpu_build.load_library() is None
    finally:
        cpu_build.load_library.cache_clear()


def test_build_is_cached_by_source_hash(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEKIT_CACHE", str(tmp_path))
    cpu_build.load_library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lib = cpu_build.load_library()
        assert lib is not None and lib.path.parent == tmp_path / "kernels"
        assert lib.path.exists() and lib.path.name.startswith("sparse_cpu_")
    finally:
        cpu_build.load_library.cache_clear()


def test_custom_ops_match_linear_and_keep_leading_dims():
    W = sparse_weight(24, 40, 0.3, seed=1)
    x = torch.randn(2, 3, 40)
    bitmask = BitmaskWeight.from_dense(W)
    csr = CSRWeight.from_dense(W)
    expected = F.linear(x, W)
    for y in (torch.ops.sparsekit.bitmask_linear(x, bitmask.bitmask, bitmask.values, bitmask.row_offsets, 40),
              torch.ops.sparsekit.csr_linear(x, csr.indptr, csr.indices, csr.values, 40)):
        assert y.shape == (2, 3, 24)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y16 = ops.bitmask_linear(x.bfloat16(), bitmask.bitmask, bitmask.values, bitmask.row_offsets, 40)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), F.linear(x.bfloat16().float(), W), rtol=2e-2, atol=2e-2)


def test_custom_ops_pass_opcheck():
    from sparsekit.prune import magnitude_prune

    W = sparse_weight(16, 24, 0.3, seed=2)
    x = torch.randn(3, 24)
    bitmask = BitmaskWeight.from_dense(W)
    csr = CSRWeight.from_dense(W, index_dtype=torch.int32)
    nm = NMWeight.from_dense(magnitude_prune(W, nm=(2, 4))[0], nm=(2, 4))
    torch.library.opcheck(ops.bitmask_linear, (x, bitmask.bitmask, bitmask.values, bitmask.row_offsets, 24))
    torch.library.opcheck(ops.csr_linear, (x, csr.indptr, csr.indices, csr.values, 24))
    torch.library.opcheck(ops.nm_linear, (x, nm.bitmask, nm.values, 24))


@pytest.mark.parametrize("bad_x", [
    lambda x: x[:, :-1],                   # wrong in-features
    lambda x: x.to(torch.float64),         # dtype
    lambda x: x.to(torch.int32),           # dtype
    lambda x: x.T.contiguous().T,          # non-contiguous, right shape
])
def test_invalid_x_raises_value_error(bad_x):
    W = sparse_weight(8, 16, 0.5, seed=0)
    bitmask = BitmaskWeight.from_dense(W)
    csr = CSRWeight.from_dense(W)
    x = bad_x(torch.randn(4, 16))
    with pytest.raises(ValueError):
        cpu.bitmask_matmul(x, bitmask.bitmask, bitmask.values, bitmask.row_offsets, 16)
    with pytest.raises(ValueError):
        cpu.csr_matmul(x, csr.indptr, csr.indices, csr.values, 16)
    with pytest.raises(ValueError):
        ops.bitmask_linear(x, bitmask.bitmask, bitmask.values, bitmask.row_offsets, 16)
