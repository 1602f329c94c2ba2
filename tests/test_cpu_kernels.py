"""The C++ CPU kernels (every instruction-set path this CPU has) against dense / dequantized references."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsekit.formats import BitmaskWeight, CSRWeight, NMWeight
from sparsekit.kernels import extension, ops, reference

torch.set_num_threads(2)
OPS = torch.ops.sparsekit
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ISAS = ops.isa_paths()


def test_the_extension_is_built_and_reports_this_cpus_paths():
    assert ops.backend() == "c++"
    assert "scalar" in ISAS
    flags = open("/proc/cpuinfo").read()
    if " avx2" in flags:
        assert "avx2" in ISAS
    if all(f in flags for f in (" avx512bw", " avx512_vbmi2", " avx512_bf16")):
        assert ISAS[0] == "avx512"


def test_one_openmp_runtime_torchs():
    maps = {line.split()[-1] for line in open("/proc/self/maps") if "gomp" in line}
    assert len(maps) == 1, maps


def sparse_weight(rows, cols, density, seed, empty_rows=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    W[:empty_rows] = 0
    return W


def tolerance(x, dense):
    """fp32 accumulation (products of fp32/bf16/fp16 numbers are exact in fp32; the sums round)."""
    scale = (x.double().abs() @ dense.double().abs().T).float()
    return 2e-5 * scale + 1e-5


def assert_matches(y, x, dense):
    ref = (x.double() @ dense.double().T).float()
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref).abs()
    rounding = 0.0 if y.dtype == torch.float32 else 8e-3 * ref.abs()  # y returned in x's 16-bit dtype
    assert bool((err <= tolerance(x, dense) + rounding).all()), err.max()


@SETTINGS
@given(rows=st.integers(1, 40), cols=st.integers(1, 200), batch=st.integers(1, 18),
       density=st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.9, 1.0]), empty_rows=st.integers(0, 3),
       dtype=st.sampled_from(FLOATS), isa=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
def test_float_kernels_match_dense(rows, cols, batch, density, empty_rows, dtype, isa, seed):
    W = sparse_weight(rows, cols, density, seed, empty_rows).to(dtype)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed + 1))
    bitmask = BitmaskWeight.from_dense(W)
    y = OPS.bitmask_linear(x, bitmask.bitmask, bitmask.values, bitmask.row_offsets, cols, isa=isa)
    assert_matches(y, x, W)
    for index_dtype in (torch.uint16, torch.int32):
        csr = CSRWeight.from_dense(W, index_dtype=index_dtype)
        assert_matches(OPS.csr_linear(x, csr.indptr, csr.indices, csr.values, cols, isa=isa), x, W)
    assert_matches(OPS.dense_linear(x, W, isa=isa), x, W)


@SETTINGS
@given(rows=st.integers(1, 24), groups=st.integers(1, 20),
       nm=st.sampled_from([(2, 4), (4, 8), (1, 4), (16, 32)]), batch=st.integers(1, 16),
       dtype=st.sampled_from(FLOATS), isa=st.sampled_from(ISAS),
       seed=st.integers(0, 2**16))
def test_nm_kernel_matches_dense(rows, groups, nm, batch, dtype, isa, seed):
    from sparsekit.prune import magnitude_prune

    g = torch.Generator().manual_seed(seed)
    W = magnitude_prune(torch.randn(rows, groups * nm[1], generator=g), nm=nm)[0].to(dtype)
    x = torch.randn(batch, W.shape[1], generator=g).to(torch.bfloat16 if seed % 2 else torch.float32)
    weight = NMWeight.from_dense(W, nm=nm)
    y = OPS.nm_linear(x, weight.bitmask, weight.values, W.shape[1], isa=isa)
    assert_matches(y, x, W)


# ---- quantized values, packed here by a small reference packer that follows the shared spec exactly


def quantize(W, bits, group_size):
    """Symmetric RTN: q = round(W / s), s = max|W| of the group / qmax (fp16); pruned zeros stay 0."""
    qmax = 127 if bits == 8 else 7
    rows, cols = W.shape
    groups = W.reshape(rows, cols // group_size, group_size)
    scales = (groups.abs().amax(-1) / qmax).clamp_min(1e-4).half()
    q = torch.round(groups / scales.float().unsqueeze(-1)).clamp(-qmax - (bits == 4), qmax)
    q = q.reshape(rows, cols)
    return q.to(torch.int8), scales


def pack_quantized(W, bits, group_size, nm=None):
    """(format parts, dense dequantized weight) of W stored as ``bits``-bit values."""
    q, scales = quantize(W, bits, group_size)
    dense = reference.dequantize_dense(q, scales, group_size) * (W != 0)
    if nm is None:
        parts = BitmaskWeight.from_dense(W)
        kept = q[parts.mask()]
        values = kept if bits == 8 else reference.pack_int4(kept)
        return {"bitmask": parts.bitmask, "values": values, "row_offsets": parts.row_offsets,
                "scales": scales}, dense
    parts = NMWeight.from_dense(W, nm=nm)
    kept = q[parts.mask()].reshape(W.shape[0], -1)
    values = kept if bits == 8 else reference.pack_int4(kept)
    return {"bitmask": parts.bitmask, "values": values.contiguous(), "scales": scales}, dense


def run_quantized(x, parts, cols, group_size, isa):
    if "row_offsets" in parts:
        return OPS.bitmask_linear(x, parts["bitmask"], parts["values"], parts["row_offsets"], cols,
                                  parts["scales"], group_size, isa=isa)
    return OPS.nm_linear(x, parts["bitmask"], parts["values"], cols, parts["scales"], group_size, isa=isa)


@SETTINGS
@given(rows=st.integers(1, 30), group_size=st.sampled_from([8, 16, 24, 64, 128, None]),
       groups=st.integers(1, 4), ragged=st.integers(1, 150), bits=st.sampled_from([8, 4]),
       nm=st.sampled_from([None, None, (2, 4), (1, 4)]), batch=st.integers(1, 17),
       density=st.sampled_from([0.1, 0.3, 0.5, 1.0]), isa=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
def test_quantized_kernels_match_the_dequantized_reference(rows, group_size, groups, ragged, bits, nm, batch,
                                                           density, isa, seed):
    # group_size=None: per channel, at a ragged width (any in_features, also not a multiple of 8)
    cols = ragged * (nm[1] if nm else 1) if group_size is None else group_size * groups
    group_size = cols if group_size is None else group_size
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    if nm is None:
        W = W * (torch.rand(rows, cols, generator=g) < density)
    else:
        from sparsekit.prune import magnitude_prune

        W = magnitude_prune(W, nm=nm)[0]
    parts, dense = pack_quantized(W, bits, group_size, nm)
    x = torch.randn(batch, cols, generator=g)
    assert_matches(run_quantized(x, parts, cols, group_size, isa), x, dense)
    if nm is None and bits == 8:  # the dense int8 kernel: every position stored
        q, scales = quantize(W, 8, group_size)
        dense_q = reference.dequantize_dense(q, scales, group_size)
        assert_matches(OPS.dense_linear(x, q, scales, group_size, isa=isa), x, dense_q)


@SETTINGS
@given(rows=st.integers(1, 20), group_size=st.sampled_from([64, 128, None]), groups=st.integers(1, 3),
       ragged=st.integers(1, 200), bits=st.sampled_from([8, 4]), nm=st.sampled_from([None, (2, 4)]),
       batch=st.integers(1, 17), isa=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
def test_int8_x_matches_the_reference_on_the_rounded_x(rows, group_size, groups, ragged, bits, nm, batch, isa,
                                                      seed):
    cols = ragged * 4 if group_size is None else group_size * groups
    group_size = cols if group_size is None else group_size
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    if nm is None:
        W = W * (torch.rand(rows, cols, generator=g) < 0.4)
    else:
        from sparsekit.prune import magnitude_prune

        W = magnitude_prune(W, nm=nm)[0]
    parts, dense = pack_quantized(W, bits, group_size, nm)
    x = torch.randn(batch, cols, generator=g) * torch.rand(batch, 1, generator=g) * 3
    args = (x, parts["bitmask"], parts["values"], *([parts["row_offsets"]] if nm is None else []), cols,
            parts["scales"], group_size, isa, True)
    y = (OPS.bitmask_linear if nm is None else OPS.nm_linear)(*args)
    x_rounded = reference.quantize_x(x)
    assert_matches(y, x_rounded, dense)
    assert (x_rounded - x).abs().max() <= x.abs().amax() / 254 + 1e-6
    with pytest.raises(ValueError, match="x_int8=True quantizes x for int8/int4 values"):
        OPS.dense_linear(x, W, isa=isa, x_int8=True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch", [1, 3, 16, 21])
def test_larger_shapes_run_in_parallel_on_every_path(isa, batch, rows=300, cols=1030):
    W = sparse_weight(rows, cols, 0.3, seed=batch)
    x = torch.randn(batch, cols)
    for dtype in FLOATS:
        weight = BitmaskWeight.from_dense(W, dtype=dtype)
        y = OPS.bitmask_linear(x, weight.bitmask, weight.values, weight.row_offsets, cols, isa=isa)
        assert_matches(y, x, W.to(dtype))
    for bits in (8, 4):
        parts, dense = pack_quantized(W[:, :1024], bits, 128)
        y = run_quantized(x[:, :1024].contiguous(), parts, 1024, 128, isa)
        assert_matches(y, x[:, :1024], dense)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("cols", [1, 7, 64, 1030])
def test_bitmask_to_dense_is_exact(dtype, cols):
    W = sparse_weight(37, cols, 0.4, seed=cols).to(dtype)
    weight = BitmaskWeight.from_dense(W)
    assert torch.equal(OPS.bitmask_to_dense(weight.bitmask, weight.values, weight.row_offsets, cols), W)


def test_isa_can_be_forced_by_environment_and_unknown_isas_are_named():
    W = sparse_weight(8, 16, 0.5, seed=0)
    weight = BitmaskWeight.from_dense(W)
    args = (torch.randn(1, 16), weight.bitmask, weight.values, weight.row_offsets, 16)
    with pytest.raises(ValueError, match="isa must be .*got 'sse9'"):
        OPS.bitmask_linear(*args, isa="sse9")
    if "avx512" not in ISAS:
        with pytest.raises(ValueError, match="isa='avx512' is not supported"):
            OPS.bitmask_linear(*args, isa="avx512")
    env = {**os.environ, "SPARSEKIT_ISA": "scalar", "PYTHONPATH": os.getcwd()}
    code = "from sparsekit.kernels import ops; print(ops.active_isa())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


# ---- bad parts: each raises ValueError (TypeError for x) naming the part, before any kernel reads it


def bitmask_case(**change):
    W = sparse_weight(6, 20, 0.5, seed=3)
    W[:, 0] = 1.0  # every row keeps something
    weight = BitmaskWeight.from_dense(W)
    args = {"x": torch.randn(2, 20), "bitmask": weight.bitmask, "values": weight.values,
            "row_offsets": weight.row_offsets, "in_features": 20}
    args.update(change)
    return args


def _bad_offsets():
    offsets = bitmask_case()["row_offsets"].clone()
    offsets[3] = offsets[2] - 1
    return offsets


def _shifted_offsets():
    offsets = bitmask_case()["row_offsets"].clone()
    offsets[1] += 1  # monotone, same total, but rows 0 and 1 disagree with the mask
    return offsets


def _padding_bits():
    bits = bitmask_case()["bitmask"].clone()
    bits[1, -1] |= 0x80
    return bits


BAD_BITMASK = [
    ("truncated values", lambda: {"values": bitmask_case()["values"][:-3]}, "'values' has"),
    ("non-monotone offsets", lambda: {"row_offsets": _bad_offsets()}, "'row_offsets' must be non-decreasing"),
    ("offsets disagree with the mask", lambda: {"row_offsets": _shifted_offsets()},
     "row 0 of 'bitmask' keeps"),
    ("offsets of the wrong length", lambda: {"row_offsets": bitmask_case()["row_offsets"][:-1]},
     "'row_offsets'"),
    ("float64 values", lambda: {"values": bitmask_case()["values"].double()}, "'values' must have dtype"),
    ("in_features disagrees", lambda: {"in_features": 40, "x": torch.randn(2, 40)}, "'bitmask' has 3 bytes"),
    ("padding bits set", lambda: {"bitmask": _padding_bits()}, "bits set past in_features"),
    ("x of another width", lambda: {"x": torch.randn(2, 21)}, "'x' must be"),
    ("int8 values without scales", lambda: {"values": bitmask_case()["values"].to(torch.int8)},
     "need 'scales'"),
    ("scales for float values", lambda: {"scales": torch.ones(6, 1, dtype=torch.float16), "group_size": 20},
     "'scales' given"),
]


@pytest.mark.parametrize("name,change,message", BAD_BITMASK, ids=[c[0] for c in BAD_BITMASK])
def test_bad_bitmask_parts_raise_value_error_naming_them(name, change, message):
    args = bitmask_case(**change())
    with pytest.raises(ValueError, match=message):
        OPS.bitmask_linear(**args)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64])
def test_non_float32_16_x_is_a_type_error(dtype):
    with pytest.raises(TypeError, match="'x' must be float32, bfloat16 or float16"):
        OPS.bitmask_linear(**bitmask_case(x=torch.ones(2, 20, dtype=dtype)))


def test_bad_quantized_parts_are_named():
    W = sparse_weight(4, 32, 0.5, seed=1)
    parts, _ = pack_quantized(W, 8, 16)
    x = torch.randn(1, 32)
    args = (x, parts["bitmask"], parts["values"], parts["row_offsets"], 32)
    with pytest.raises(ValueError, match="group_size must be a positive divisor of in_features=32, got 12"):
        OPS.bitmask_linear(*args, parts["scales"], 12)
    with pytest.raises(ValueError, match=r"'scales' must have shape \[4, 2\]"):
        OPS.bitmask_linear(*args, parts["scales"][:, :1].contiguous(), 16)
    with pytest.raises(ValueError, match="'scales' must have dtype"):
        OPS.bitmask_linear(*args, parts["scales"].float(), 16)
    dense24 = (W.abs() + 1) * torch.tensor([True, False] * 16)
    nm_parts, _ = pack_quantized(dense24, 4, 16, nm=(2, 4))
    with pytest.raises(ValueError, match="'values' has 7 bytes per row but the bitmask keeps 16"):
        OPS.nm_linear(x, nm_parts["bitmask"], nm_parts["values"][:, :7].contiguous(), 32, nm_parts["scales"],
                      16)


def test_bad_csr_and_nm_parts_are_named():
    W = sparse_weight(5, 16, 0.5, seed=2)
    csr = CSRWeight.from_dense(W, index_dtype=torch.int32)
    x = torch.randn(1, 16)
    indices = csr.indices.clone()
    indices[-1] = 16
    with pytest.raises(ValueError, match="'indices' has a column index outside"):
        OPS.csr_linear(x, csr.indptr, indices, csr.values, 16)
    with pytest.raises(ValueError, match="'indptr' ends at"):
        OPS.csr_linear(x, csr.indptr, csr.indices[:-1], csr.values[:-1], 16)
    nm = NMWeight.from_dense(torch.ones(3, 16) * torch.tensor([True, False] * 8), nm=(2, 4))
    with pytest.raises(ValueError, match="row 0 of 'bitmask' keeps 8 values but 'values' give it 7"):
        OPS.nm_linear(x, nm.bitmask, nm.values[:, :7].contiguous(), 16)


# ---- the torch dispatcher: opcheck and torch.compile on every op


def op_samples():
    W = sparse_weight(12, 40, 0.4, seed=5)
    x = torch.randn(3, 40)
    bitmask = BitmaskWeight.from_dense(W, dtype=torch.bfloat16)
    q8, _ = pack_quantized(W, 8, 40)
    q4, _ = pack_quantized(W, 4, 8, nm=None)
    from sparsekit.prune import magnitude_prune

    nm = NMWeight.from_dense(magnitude_prune(W, nm=(2, 4))[0], nm=(2, 4))
    nm4, _ = pack_quantized(magnitude_prune(W, nm=(2, 4))[0], 4, 8, nm=(2, 4))
    csr = CSRWeight.from_dense(W)
    dq, dscales = quantize(W, 8, 8)
    return [
        (OPS.bitmask_linear, (x, bitmask.bitmask, bitmask.values, bitmask.row_offsets, 40)),
        (OPS.bitmask_linear, (x, q8["bitmask"], q8["values"], q8["row_offsets"], 40, q8["scales"], 40)),
        (OPS.bitmask_linear, (x.bfloat16(), q4["bitmask"], q4["values"], q4["row_offsets"], 40, q4["scales"],
                              8)),
        (OPS.nm_linear, (x.unsqueeze(0), nm.bitmask, nm.values, 40)),
        (OPS.nm_linear, (x, nm4["bitmask"], nm4["values"], 40, nm4["scales"], 8)),
        (OPS.csr_linear, (x, csr.indptr, csr.indices, csr.values, 40)),
        (OPS.dense_linear, (x, W.bfloat16())),
        (OPS.dense_linear, (x, dq, dscales, 8)),
        (OPS.bitmask_linear, (x, q8["bitmask"], q8["values"], q8["row_offsets"], 40, q8["scales"], 40, "auto",
                              True)),
        (OPS.bitmask_to_dense, (bitmask.bitmask, bitmask.values, bitmask.row_offsets, 40)),
        (OPS.bitmask_to_dense, (nm.bitmask, nm.values, None, 40)),
        (OPS.read_sum, (torch.randn(1000),)),
    ]


@pytest.mark.parametrize("index", range(12))
def test_every_op_passes_opcheck_and_compiles(index):
    op, args = op_samples()[index]
    torch._dynamo.reset()
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    compiled = torch.compile(lambda *a: op(*a), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), op(*args))


# ---- building


def test_without_tools_the_loader_warns_and_the_reference_ops_are_used(monkeypatch, tmp_cache):
    # an empty cache: a verified library in the cache would load without any compiler
    monkeypatch.setattr(extension, "_missing_tools", lambda: ["a C++ compiler (c++; set $CXX)"])
    with pytest.warns(RuntimeWarning, match="cannot build the C\\+\\+ kernels without a C\\+\\+ compiler"):
        assert extension.load_extension.__wrapped__() is None
    env = {**os.environ, "SPARSEKIT_NO_EXT": "1", "PYTHONPATH": os.getcwd()}
    code = """
import torch
from sparsekit.kernels import ops
from sparsekit.formats import BitmaskWeight
W = torch.randn(5, 12) * (torch.rand(5, 12) < 0.5)
w = BitmaskWeight.from_dense(W)
x = torch.randn(2, 12)
y = torch.ops.sparsekit.bitmask_linear(x, w.bitmask, w.values, w.row_offsets, 12)
assert ops.backend() == "torch" and ops.active_isa() == "torch"
torch.testing.assert_close(y, x @ W.T)
print("ok")
"""
    with warnings.catch_warnings():
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_build_key_follows_the_sources(monkeypatch, tmp_path):
    key = extension.build_key()
    copy = tmp_path / "ops.cpp"
    copy.write_text(extension.SOURCES[1].read_text() + "\n// edited\n")
    monkeypatch.setattr(extension, "SOURCES", (extension.SOURCES[0], copy))
    assert extension.build_key() != key
