"""Quantized sparse formats: int8/int4 codes + float16 group scales in the bitmask and N:M formats."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsekit import patterns
from sparsekit.formats import BitmaskWeight, NMWeight, load_sparse, save_sparse
from sparsekit.kernels import SparseLinear
from sparsekit.prune import magnitude_prune
from sparsekit.quant import gptq_quantize, pack_int4, quantize_rtn

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sparse_weight(rows, cols, sparsity, seed, nm=None):
    """A pruned W and its mask; a few kept weights are tiny so that they quantize to code 0."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    pruned, mask = magnitude_prune(W, sparsity, nm=nm)
    tiny = mask & (torch.rand(rows, cols, generator=g) < 0.1)
    return torch.where(tiny, pruned * 1e-4, pruned), mask


def assert_same(a, b):
    assert type(a) is type(b) and a.shape == b.shape and a.extra() == b.extra()
    assert a.tensors().keys() == b.tensors().keys()
    for part, tensor in a.tensors().items():
        assert tensor.dtype == b.tensors()[part].dtype and torch.equal(tensor, b.tensors()[part]), part


@SETTINGS
@given(rows=st.integers(1, 7), groups=st.integers(1, 4), group_size=st.sampled_from([4, 8, 12]),
       sparsity=st.sampled_from([0.0, 0.5, 0.75]), bits=st.sampled_from([8, 4]), seed=st.integers(0, 2**16))
def test_bitmask_quantized_round_trip_keeps_mask_and_saves_exactly(rows, groups, group_size, sparsity, bits,
                                                                   seed, tmp_path_factory):
    cols = groups * group_size
    W, mask = sparse_weight(rows, cols, sparsity, seed)
    weight = BitmaskWeight.from_dense(W, mask=mask, bits=bits, group_size=group_size)
    expected, quantized = quantize_rtn(W * mask, bits, group_size)
    assert weight.bits == bits and weight.group_size == group_size and weight.nnz == int(mask.sum())
    assert torch.equal(weight.mask(), mask)  # kept weights with code 0 stay kept
    assert torch.equal(weight.to_dense(), expected)
    assert torch.equal(weight.codes(), quantized.codes[mask])
    assert weight.scales.dtype == torch.float16 and weight.scales.shape == (rows, groups)
    assert weight.values.numel() == (weight.nnz if bits == 8 else (weight.nnz + 1) // 2)
    path = tmp_path_factory.mktemp("q") / "w.safetensors"
    save_sparse(path, {"layer.weight": weight})
    assert_same(load_sparse(path)["layer.weight"], weight)


@SETTINGS
@given(rows=st.integers(1, 6), groups=st.integers(1, 5), nm=st.sampled_from([(2, 4), (1, 4), (4, 8)]),
       bits=st.sampled_from([8, 4]), per_channel=st.booleans(), seed=st.integers(0, 2**16))
def test_nm_quantized_round_trip_and_file(rows, groups, nm, bits, per_channel, seed, tmp_path_factory):
    n, m = nm
    cols = groups * 8
    W, mask = sparse_weight(rows, cols, 0, seed, nm=nm)
    group_size = None if per_channel else 8
    weight = NMWeight.from_dense(W, nm=nm, mask=mask, bits=bits, group_size=group_size)
    expected, _ = quantize_rtn(W, bits, group_size)
    assert weight.group_size == (cols if per_channel else 8)
    assert torch.equal(weight.mask(), mask)
    assert torch.equal(weight.to_dense(), expected)
    kept = cols * n // m
    assert tuple(weight.values.shape) == (rows, kept if bits == 8 else (kept + 1) // 2)
    path = tmp_path_factory.mktemp("q") / "w.safetensors"
    save_sparse(path, {"w": weight})
    assert_same(load_sparse(path)["w"], weight)


def test_int4_layouts_follow_the_spec():
    W = torch.tensor([[7.0, 0.0, -7.5, 2.0], [0.0, 0.0, 3.5, -3.75]])
    weight = BitmaskWeight.from_dense(W, bits=4, group_size=4)  # scales 2·max|w|/15: 1 and 0.5
    codes = torch.tensor([7, -8, 2, 7, -8], dtype=torch.int8)  # row-major kept values; all 16 codes
    assert torch.equal(weight.codes(), codes)
    assert torch.equal(weight.to_dense(), torch.tensor([[7.0, 0.0, -8.0, 2.0], [0.0, 0.0, 3.5, -4.0]]))
    assert torch.equal(weight.values, pack_int4(codes))  # one flat stream, 3 bytes, pad nibble 0
    assert weight.values.tolist() == [0x87, 0x72, 0x08]
    row = torch.tensor([[7.0, 0, 0, -7.5, 0, 2.0, 2.0, 0]])
    nm = NMWeight.from_dense(row, nm=(2, 4), bits=4, group_size=8)
    assert nm.values.tolist() == [[0x87, 0x22]]  # per row: 7, -8, 2, 2


def test_from_quantized_stores_gptq_output_exactly_and_sizes_match_patterns():
    g = torch.Generator().manual_seed(0)
    W, _ = magnitude_prune(torch.randn(32, 128, generator=g), 0.75)
    X = torch.randn(256, 128, generator=g)
    W_hat, quantized = gptq_quantize(W, 2 / 256 * X.t() @ X, bits=4, group_size=64)
    weight = BitmaskWeight.from_quantized(quantized, mask=W != 0)
    assert torch.equal(weight.to_dense(), W_hat) and torch.equal(weight.mask(), W != 0)
    assert weight.nbytes == patterns.storage_bytes(32, 128, 0.75, "bitmask", bits=4, group_size=64)
    W24, mask24 = magnitude_prune(torch.randn(32, 128, generator=g), nm=(2, 4))
    W24_hat, q24 = gptq_quantize(W24, 2 / 256 * X.t() @ X, bits=8, group_size=None)
    nm = NMWeight.from_quantized(q24, nm=(2, 4), mask=mask24)
    assert torch.equal(nm.to_dense(), W24_hat)
    assert nm.nbytes == patterns.storage_bytes(32, 128, 0.5, "nm", nm=(2, 4), bits=8)
    assert nm.dense_nbytes == 32 * 128
    with pytest.raises(ValueError, match="mask drops"):
        BitmaskWeight.from_quantized(quantized, mask=torch.zeros(32, 128, dtype=torch.bool))
    with pytest.raises(ValueError, match="symmetric"):
        BitmaskWeight.from_quantized(quantize_rtn(W, 8, symmetric=False)[1])


def test_sparse_linear_runs_quantized_weights_on_the_dequantized_fallback():
    W, mask = sparse_weight(24, 32, 0.5, seed=4)
    bias = torch.randn(24)
    for weight in (BitmaskWeight.from_dense(W, mask=mask, bits=4, group_size=16),
                   NMWeight.from_dense(magnitude_prune(W, nm=(2, 4))[0], nm=(2, 4), bits=8)):
        layer = SparseLinear(weight, bias)
        x = torch.randn(3, 32)
        assert torch.allclose(layer(x), F.linear(x, weight.to_dense(), bias), atol=1e-5)
        assert "bits=" in repr(layer)
        copy = SparseLinear(weight, bias)
        copy.load_state_dict(layer.state_dict())
        assert_same(copy.weight_sparse, weight)
        assert torch.equal(layer.to_linear().weight, weight.to_dense())


def test_given_scales_are_used_and_never_clip():
    W = torch.tensor([[0.5, -1.0, 0.0, 0.25]])
    weight = BitmaskWeight.from_dense(W, bits=8, group_size=2, scales=torch.tensor([[0.125, 0.25]]).half())
    assert weight.codes().tolist() == [4, -8, 1] and torch.equal(weight.to_dense(), W)
    with pytest.raises(ValueError, match="scales are too small"):
        BitmaskWeight.from_dense(W, bits=4, group_size=4, scales=torch.tensor([[0.01]]).half())


def _bitmask8():
    W, mask = sparse_weight(4, 16, 0.5, seed=1)
    return BitmaskWeight.from_dense(W, mask=mask, bits=8, group_size=8)


def _bitmask4():
    W, mask = sparse_weight(3, 16, 0.5, seed=2)
    mask[0, int((~mask[0]).nonzero()[0, 0])] = True  # keep one zero too: 25 kept, an odd count
    weight = BitmaskWeight.from_dense(W, mask=mask, bits=4, group_size=16)
    assert weight.nnz == 25
    return weight


def _nm4():
    W, mask = sparse_weight(2, 12, 0, seed=3, nm=(1, 4))  # 3 kept per row: 2 bytes per row, one pad nibble
    return NMWeight.from_dense(W, nm=(1, 4), mask=mask, bits=4, group_size=4)


def _replace(weight, **parts):
    tensors = {**weight.tensors(), **parts}
    return lambda: type(weight).from_parts(weight.shape, tensors, weight.extra())


@pytest.mark.parametrize("make, match", [
    (lambda: _replace(_bitmask8(), values=_bitmask8().values[:-1])(), "values has"),
    (lambda: _replace(_bitmask8(), scales=_bitmask8().scales[:, :1])(), "'scales' must have shape"),
    (lambda: _replace(_bitmask8(), scales=_bitmask8().scales.float())(), "'scales' must have dtype"),
    (lambda: _replace(_bitmask8(), values=_bitmask8().values.float())(), "'values' must have dtype"),
    (lambda: _replace(_bitmask8(), values=torch.full_like(_bitmask8().values, -128))(), "-128"),
    (lambda: _replace(_bitmask8(), scales=torch.full_like(_bitmask8().scales, float("inf")))(), "finite"),
    (lambda: _replace(_bitmask4(), values=_bitmask4().values[:-1])(), "values has"),
    (lambda: _replace(_bitmask4(), values=_bitmask4().values | 0xF0)(), "pad nibble"),
    (lambda: _replace(_nm4(), values=_nm4().values[:, :-1].contiguous())(), "'values' must have shape"),
    (lambda: _replace(_nm4(), values=_nm4().values | 0xF0)(), "pad nibble"),
    (lambda: BitmaskWeight.from_parts(_bitmask8().shape, _bitmask8().tensors(), {"bits": 3, "group_size": 8}),
     "bits must be one of"),
    (lambda: BitmaskWeight.from_parts(_bitmask8().shape, _bitmask8().tensors(), {"bits": 8, "group_size": 5}),
     "group_size must divide in_features=16"),
    (lambda: BitmaskWeight.from_parts(_bitmask8().shape, {**_bitmask8().tensors(), "scales": None},
                                      {"bits": 8, "group_size": 8}), "needs its 'scales'"),
    (lambda: BitmaskWeight.from_dense(torch.randn(2, 8), bits=3), "bits must be one of"),
    (lambda: BitmaskWeight.from_dense(torch.randn(2, 8), bits=8, group_size=3), "group_size must divide"),
    (lambda: BitmaskWeight.from_dense(torch.randn(2, 8), group_size=4), "need bits"),
    (lambda: BitmaskWeight.from_dense(torch.randn(2, 8), bits=8, dtype=torch.bfloat16), "dtype"),
    (lambda: NMWeight.from_dense(torch.randn(2, 8), nm=(2, 4), bits=4), "violates the 2:4"),
    (lambda: _bitmask8().to(dtype=torch.float16), "integer codes"),
])
def test_bad_quantized_parts_and_arguments_raise_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_load_refuses_a_quantized_file_without_scales(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = save_sparse(tmp_path / "w.safetensors", {"w": _bitmask8()})
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(path))
    del tensors["w.scales"]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="scales"):
        load_sparse(path)


def test_compress_passes_bits_through_and_refuses_csr():
    from sparsekit.formats import compress

    W, mask = sparse_weight(4, 16, 0, seed=5, nm=(2, 4))
    assert compress(W, "bitmask", bits=8).bits == 8
    nm = compress(W, "nm", nm=(2, 4), bits=4, group_size=8)
    assert nm.bits == 4 and nm.group_size == 8 and torch.equal(nm.mask(), mask)
    with pytest.raises(ValueError, match="only the 'bitmask' and 'nm' formats"):
        compress(W, "csr", bits=8)


@pytest.mark.parametrize("fmt, bits, nm", [("bitmask", 8, None), ("bitmask", 4, None), ("nm", 8, (2, 4)),
                                           ("nm", 4, (2, 4))])
def test_layout_matches_the_triton_kernels_stand_in(fmt, bits, nm):
    """The shared spec, byte for byte: the GPU kernels' test weights (written before these formats) and
    the formats agree on values and scales."""
    from sparsekit.kernels.triton_testing import quantize_sparse

    W, _ = sparse_weight(6, 32, 0.0 if nm else 0.6, seed=7, nm=nm)
    W = W * (W.abs() > 1e-3)  # the stand-in keeps W's non-zeros
    theirs = quantize_sparse(W, fmt, bits, 16, nm=nm)
    cls = BitmaskWeight if fmt == "bitmask" else NMWeight
    extra = {} if nm is None else {"nm": nm}
    ours = cls.from_dense(W, bits=bits, group_size=16, scales=theirs.scales, **extra)
    assert torch.equal(ours.bitmask, theirs.bitmask) and torch.equal(ours.values, theirs.values)
    assert torch.equal(ours.scales, theirs.scales)
