"""NaN and Inf in x: every kernel path gives the finite/non-finite pattern of the dense product (issue 19).

The rule (``sparsekit.kernels.ops``): a pruned weight is a stored zero and ``0 · NaN = 0 · Inf = NaN``, so
each op returns what ``F.linear`` returns with the decompressed weight. Checked on every instruction-set path
this CPU has (forced with ``isa=``, as ``tests/test_cpu_kernels.py`` does), for bitmask / N:M / CSR / dense
ops, float, int8 and int4 values and ``x_int8``, against the torch reference ops (the fallback without a
compiler) and through ``SparseLinear``. The Triton kernels get the same cases under Triton's interpreter in
``tests/triton_interpreted.py``.
"""

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsekit.formats import BitmaskWeight, CSRWeight, NMWeight
from sparsekit.kernels import SparseLinear, ops, reference
from sparsekit.prune import magnitude_prune

OPS = torch.ops.sparsekit
PATHS = ops.isa_paths() + ["torch"]  # "torch": the reference ops registered when the C++ cannot be built
REFERENCE_OPS = ops._reference_ops()
NAN, INF = float("nan"), float("inf")


def run(op: str, isa: str, *args, **kwargs):
    if isa == "torch":
        return REFERENCE_OPS[op](*args, **kwargs)
    return getattr(OPS, op)(*args, **kwargs, isa=isa)


def kernels(W: torch.Tensor, group_size: int):
    """``(name, fn(x, isa) -> y, dense weight, x_int8)`` for every op and value type of the 2:4 weight W."""
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        b = BitmaskWeight.from_dense(W, dtype=dtype)
        out.append((f"bitmask {dtype}", lambda x, isa, b=b: run(
            "bitmask_linear", isa, x, b.bitmask, b.values, b.row_offsets, b.shape[1]), b.to_dense(), False))
    nm = NMWeight.from_dense(W, nm=(2, 4))
    out.append(("nm fp32", lambda x, isa: run("nm_linear", isa, x, nm.bitmask, nm.values, nm.shape[1]),
                nm.to_dense(), False))
    for index_dtype in (torch.int32, torch.uint16):
        c = CSRWeight.from_dense(W, index_dtype=index_dtype)
        out.append((f"csr {index_dtype}", lambda x, isa, c=c: run(
            "csr_linear", isa, x, c.indptr, c.indices, c.values, c.shape[1]), c.to_dense(), False))
    out.append(("dense fp32", lambda x, isa: run("dense_linear", isa, x, W), W, False))
    for bits in (8, 4):
        for x_int8 in (False, True):
            qb = BitmaskWeight.from_dense(W, bits=bits, group_size=group_size)
            out.append((f"bitmask int{bits} x_int8={x_int8}", lambda x, isa, q=qb, xi=x_int8: run(
                "bitmask_linear", isa, x, q.bitmask, q.values, q.row_offsets, q.shape[1], q.scales,
                q.group_size, x_int8=xi), qb.to_dense(), x_int8))
            qn = NMWeight.from_dense(W, nm=(2, 4), bits=bits, group_size=group_size)
            out.append((f"nm int{bits} x_int8={x_int8}", lambda x, isa, q=qn, xi=x_int8: run(
                "nm_linear", isa, x, q.bitmask, q.values, q.shape[1], q.scales, q.group_size, x_int8=xi),
                qn.to_dense(), x_int8))
    q8 = BitmaskWeight.from_dense(W.abs() + 0.5, bits=8, group_size=group_size)  # every position stored
    dense_q = q8.codes().reshape(W.shape)
    out.append(("dense int8", lambda x, isa: run("dense_linear", isa, x, dense_q, q8.scales, q8.group_size),
                q8.to_dense(), False))
    return out


def dense_product(x, W, x_int8=False):
    """The dense torch product the kernels must agree with (x rounded to int8 first for ``x_int8``)."""
    x = reference.quantize_x(x) if x_int8 else x
    return F.linear(x.float(), W.float()).to(x.dtype)


def assert_same_pattern(y, ref, label, x=None, W=None):
    """Equal NaN and Inf positions; finite outputs close (to the 16-bit roundings of x, y and x_int8)."""
    assert y.shape == ref.shape and y.dtype == ref.dtype, label
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), f"{label}: NaN pattern\n{y}\n{ref}"
    assert torch.equal(torch.isinf(y), torch.isinf(ref)), f"{label}: Inf pattern\n{y}\n{ref}"
    if x is not None:
        finite = torch.isfinite(ref)
        scale = x.float().abs().nan_to_num(0.0, 0.0, 0.0) @ W.float().abs().T
        assert bool(((y.float() - ref.float()).abs() <= 2e-2 * scale + 1e-3)[finite].all()), label


# Column 1 pruned in every row (2:4: row 0 keeps columns 0, 2; row 1 keeps 2, 3)
W_SMALL = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 3.0, 4.0]])
X_SMALL = torch.tensor([
    [1.0, NAN, 1.0, 1.0],    # NaN in the pruned column
    [1.0, INF, 1.0, 1.0],    # Inf in the pruned column: 0·Inf = NaN
    [1.0, -INF, 1.0, 1.0],
    [NAN, 1.0, 1.0, 1.0],    # NaN in a column row 0 keeps and row 1 prunes
    [INF, 1.0, 1.0, 1.0],    # row 0: Inf·1; row 1: 0·Inf
    [1.0, 1.0, INF, -INF],   # Inf − Inf
    [1.0, 1.0, 1.0, 1.0],    # finite: finite
])


def test_the_dense_product_the_kernels_follow():
    ref = dense_product(X_SMALL, W_SMALL)
    assert bool(torch.isnan(ref[:4]).all()) and bool(torch.isfinite(ref[-1]).all())
    assert ref[4, 0] == INF and bool(torch.isnan(ref[4, 1])) and bool(torch.isnan(ref[5]).all())


def test_nan_and_inf_in_pruned_columns_propagate_on_every_path_and_format():
    for isa in PATHS:
        for name, fn, dense, x_int8 in kernels(W_SMALL, group_size=4):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = X_SMALL.to(dtype)
                assert_same_pattern(fn(x, isa), dense_product(x, dense, x_int8), f"{isa} {name} x {dtype}", x,
                                    dense)
                # each row alone too: batch 1 takes other kernels than a batch
                for row in range(x.shape[0]):
                    assert_same_pattern(fn(x[row:row + 1], isa), dense_product(x[row:row + 1], dense, x_int8),
                                        f"{isa} {name} x {dtype} row {row}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 40), groups=st.integers(1, 40), batch=st.integers(1, 20),
       isa=st.sampled_from(PATHS), seed=st.integers(0, 2**16), data=st.data())
def test_random_nonfinite_x_matches_the_dense_pattern(rows, groups, batch, isa, seed, data):
    cols = 8 * groups
    g = torch.Generator().manual_seed(seed)
    W = magnitude_prune(torch.randn(rows, cols, generator=g), nm=(2, 4))[0]
    W[:, data.draw(st.integers(0, cols - 1))] = 0.0  # a column pruned everywhere, plus 2:4
    x = torch.randn(batch, cols, generator=g)
    for _ in range(data.draw(st.integers(1, 2 * batch))):
        x[data.draw(st.integers(0, batch - 1)), data.draw(st.integers(0, cols - 1))] = data.draw(
            st.sampled_from([NAN, INF, -INF]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    x = x.to(dtype)
    for name, fn, dense, x_int8 in kernels(W, group_size=8 if groups % 2 else 16):
        assert_same_pattern(fn(x, isa), dense_product(x, dense, x_int8), f"{isa} {name}", x, dense)


def test_sparse_linear_keeps_the_dense_layers_nan_pattern():
    linear = torch.nn.Linear(4, 2, bias=True)
    with torch.no_grad():
        linear.weight.copy_(W_SMALL)
    for format in ("bitmask", "nm", "csr"):
        sparse = SparseLinear.from_linear(linear, format=format, nm=(2, 4) if format == "nm" else None)
        for x in (X_SMALL[:1], X_SMALL, X_SMALL.repeat(20, 1)):  # kernel batches and the dense fallback
            assert_same_pattern(sparse(x), linear(x).detach(), format, x, W_SMALL)
