"""The CPU kernels as torch ops: ``torch.ops.sparsekit.{bitmask,nm,csr,dense}_linear`` and helpers.

Schemas (defined in C++ with ``TORCH_LIBRARY``, ``csrc/ops.cpp``)::

    bitmask_linear(x, bitmask, values, row_offsets, in_features, scales=None, group_size=0, isa="auto")
    nm_linear(x, bitmask, values, in_features, scales=None, group_size=0, isa="auto")
    csr_linear(x, indptr, indices, values, in_features, isa="auto")
    dense_linear(x, weight, scales=None, group_size=0, isa="auto")     # our dense baseline, same kernels
    bitmask_to_dense(bitmask, values, row_offsets, in_features)       # row_offsets=None: N:M
    read_sum(buffer) -> 0-d float64                                   # read-bandwidth probe
    supported_isas() -> int                                           # bit 0 scalar, 1 avx2, 2 avx512

Each ``*_linear`` computes ``y = x Wᵀ`` for ``x [..., in_features]`` (fp32/bf16/fp16) and returns
``y [..., out]`` in x's dtype with fp32 accumulation. Values are fp32/bf16/fp16, or int8 / int4 (uint8,
two per byte) with fp16 ``scales [out, in_features // group_size]``. The ops validate their parts and raise
``ValueError`` naming the bad one (``TypeError`` for a non-float ``x``). ``isa`` forces an instruction set
(``"avx512"``, ``"avx2"``, ``"scalar"``; ``"auto"`` = the best available, or ``$SPARSEKIT_ISA``).
``x_int8=True`` (int8/int4 values) rounds x to int8 per row first (``x ≈ s_b · round(x / s_b)``,
``s_b = max|x_b| / 127``, as torch's dynamic int8 Linear does), which the AVX-512 path multiplies in int8
with VNNI (``vpdpbusd``); off by default, so that ``SparseLinear`` stays exact in x. A fake
implementation gives each output's shape, so ``torch.compile`` traces through them; there is no autograd
formula (inference only).

NaN and Inf follow IEEE arithmetic on the dense product, the same on every ISA path, in every format and in
the torch fallback: a pruned weight is a stored zero, and ``0 · NaN = 0 · Inf = NaN``. So an output is NaN,
±Inf or finite exactly where ``F.linear(x, W)`` with the decompressed (dequantized) weight ``W`` is (and
equal to it up to the order of the fp32 sums); in particular a batch row of x holding a NaN or an infinity
makes *every* output of that row non-finite, also where its column is pruned. Paths that skip pruned
weights (that is their speed: the scalar and AVX2 bitmask kernels, CSR) would lose that NaN, so every op
scans x once for non-finite values (``O(batch · in)``, nothing next to the ``O(out · in)`` weight stream)
and computes just those rows by the dense product with ``W``; finite rows take the fast kernels unchanged.
With ``x_int8=True`` such a row rounds to NaN (its scale ``max|x| / 127`` is not finite), as
:func:`~sparsekit.kernels.reference.quantize_x` rounds it.

Parts are checked as in :mod:`sparsekit.formats`: ``in_features`` and the rows (out features) at least 1,
CSR column indices strictly increasing within a row (a duplicate is refused, not summed), int8/int4 scales
finite and ``> 0``, each part of its rank (``bitmask_to_dense`` values 1-D with ``row_offsets``, 2-D without).

When the extension cannot be built (:mod:`sparsekit.kernels.extension`), the same schemas are registered
here with the torch reference implementations of :mod:`sparsekit.kernels.reference` (with the checks above).
"""

from __future__ import annotations

import os

import torch

from sparsekit.kernels import reference
from sparsekit.kernels.extension import load_extension

__all__ = ["backend", "isa_paths", "active_isa", "ISAS", "SCHEMAS"]

ISAS = ("scalar", "avx2", "avx512")
SCHEMAS = {
    "bitmask_linear": "bitmask_linear(Tensor x, Tensor bitmask, Tensor values, Tensor row_offsets, "
                      "int in_features, Tensor? scales=None, int group_size=0, str isa=\"auto\", "
                      "bool x_int8=False) -> Tensor",
    "nm_linear": "nm_linear(Tensor x, Tensor bitmask, Tensor values, int in_features, Tensor? scales=None, "
                 "int group_size=0, str isa=\"auto\", bool x_int8=False) -> Tensor",
    "csr_linear": "csr_linear(Tensor x, Tensor indptr, Tensor indices, Tensor values, int in_features, "
                  "str isa=\"auto\") -> Tensor",
    "dense_linear": "dense_linear(Tensor x, Tensor weight, Tensor? scales=None, int group_size=0, "
                    "str isa=\"auto\", bool x_int8=False) -> Tensor",
    "bitmask_to_dense": "bitmask_to_dense(Tensor bitmask, Tensor values, Tensor? row_offsets, "
                        "int in_features) -> Tensor",
    "read_sum": "read_sum(Tensor buffer) -> Tensor",
    "supported_isas": "supported_isas() -> int",
}


def _check_reference_parts(op: str, rows: int, in_features: int, scales=None, values=None,
                           rank: int | None = None) -> None:
    """The checks of the C++ ops that the reference ops need too (the rest fails inside torch)."""
    if in_features < 1:
        raise ValueError(f"sparsekit.{op}: in_features must be >= 1, got {in_features}")
    if rows < 1:
        raise ValueError(f"sparsekit.{op}: the weight must have >= 1 row (out_features >= 1), got {rows}")
    if values is not None and rank is not None and values.dim() != rank:
        raise ValueError(f"sparsekit.{op}: 'values' must be {rank}-D, got shape {list(values.shape)}")
    if scales is not None and not bool((torch.isfinite(scales) & (scales > 0)).all()):
        bad = scales.reshape(-1)[~(torch.isfinite(scales) & (scales > 0)).reshape(-1)][0]
        raise ValueError(f"sparsekit.{op}: 'scales' must be finite and > 0, got {float(bad)}")


def _check_csr_indices(indptr: torch.Tensor, indices: torch.Tensor, in_features: int) -> None:
    columns = indices.to(torch.int64)
    if columns.numel() and (int(columns.min()) < 0 or int(columns.max()) >= in_features):
        raise ValueError(f"sparsekit.csr_linear: 'indices' has a column index outside [0, in_features="
                         f"{in_features})")
    row_start = torch.zeros(columns.numel(), dtype=torch.bool)
    row_start[indptr[:-1][indptr[:-1] < columns.numel()]] = True
    rising = torch.ones_like(row_start)
    rising[1:] = columns[1:] > columns[:-1]
    if not bool((rising | row_start).all()):
        raise ValueError("sparsekit.csr_linear: 'indices' must be strictly increasing within each row (no "
                         "duplicate or unsorted columns; a duplicate would be summed)")


def _reference_ops() -> dict:
    def bitmask_linear(x, bitmask, values, row_offsets, in_features, scales=None, group_size=0, isa="auto",
                       x_int8=False):
        _check_reference_parts("bitmask_linear", bitmask.shape[0], in_features, scales, values, 1)
        x = reference.quantize_x(x) if x_int8 else x
        return reference.linear(x, reference.bitmask_dense(bitmask, values, row_offsets, in_features, scales,
                                                           group_size))

    def nm_linear(x, bitmask, values, in_features, scales=None, group_size=0, isa="auto", x_int8=False):
        _check_reference_parts("nm_linear", bitmask.shape[0], in_features, scales, values, 2)
        x = reference.quantize_x(x) if x_int8 else x
        return reference.linear(x, reference.bitmask_dense(bitmask, values, None, in_features, scales,
                                                           group_size))

    def csr_linear(x, indptr, indices, values, in_features, isa="auto"):
        _check_reference_parts("csr_linear", indptr.numel() - 1, in_features, values=values, rank=1)
        _check_csr_indices(indptr, indices, in_features)
        rows = indptr.numel() - 1
        dense = torch.zeros(rows, in_features, dtype=torch.float32)
        counts = indptr[1:] - indptr[:-1]
        dense[torch.repeat_interleave(torch.arange(rows), counts), indices.to(torch.int64)] = values.float()
        return reference.linear(x, dense)

    def dense_linear(x, weight, scales=None, group_size=0, isa="auto", x_int8=False):
        _check_reference_parts("dense_linear", weight.shape[0], weight.shape[-1], scales)
        x = reference.quantize_x(x) if x_int8 else x
        dense = weight if scales is None else reference.dequantize_dense(weight, scales, group_size)
        return reference.linear(x, dense)

    def bitmask_to_dense(bitmask, values, row_offsets, in_features):
        _check_reference_parts("bitmask_to_dense", bitmask.shape[0], in_features, values=values,
                               rank=1 if row_offsets is not None else 2)
        return reference.bitmask_dense(bitmask, values, row_offsets, in_features)

    def read_sum(buffer):
        return buffer.sum(dtype=torch.float64)

    return {"bitmask_linear": bitmask_linear, "nm_linear": nm_linear, "csr_linear": csr_linear,
            "dense_linear": dense_linear, "bitmask_to_dense": bitmask_to_dense, "read_sum": read_sum}


_EXTENSION = load_extension()
if _EXTENSION is None:
    _LIBRARY = torch.library.Library("sparsekit", "FRAGMENT")
    for _name, _impl in _reference_ops().items():
        _LIBRARY.define(SCHEMAS[_name])
        _LIBRARY.impl(_name, _impl, "CPU")
    _LIBRARY.define(SCHEMAS["supported_isas"])
    _LIBRARY.impl("supported_isas", lambda: 0, "CompositeExplicitAutograd")


def _linear_fake(x, rows):
    return x.new_empty(*x.shape[:-1], rows)


@torch.library.register_fake("sparsekit::bitmask_linear")
def _(x, bitmask, values, row_offsets, in_features, scales=None, group_size=0, isa="auto", x_int8=False):
    return _linear_fake(x, bitmask.shape[0])


@torch.library.register_fake("sparsekit::nm_linear")
def _(x, bitmask, values, in_features, scales=None, group_size=0, isa="auto", x_int8=False):
    return _linear_fake(x, bitmask.shape[0])


@torch.library.register_fake("sparsekit::csr_linear")
def _(x, indptr, indices, values, in_features, isa="auto"):
    return _linear_fake(x, indptr.shape[0] - 1)


@torch.library.register_fake("sparsekit::dense_linear")
def _(x, weight, scales=None, group_size=0, isa="auto", x_int8=False):
    return _linear_fake(x, weight.shape[0])


@torch.library.register_fake("sparsekit::bitmask_to_dense")
def _(bitmask, values, row_offsets, in_features):
    return values.new_empty(bitmask.shape[0], in_features)


@torch.library.register_fake("sparsekit::read_sum")
def _(buffer):
    return buffer.new_empty((), dtype=torch.float64)


def backend() -> str:
    """``"c++"`` when the compiled kernels are loaded, ``"torch"`` for the reference fallback."""
    return "torch" if _EXTENSION is None else "c++"


def isa_paths() -> list[str]:
    """The instruction sets the kernels can run here, best first (empty for the torch fallback)."""
    bits = int(torch.ops.sparsekit.supported_isas())
    return [name for i, name in reversed(list(enumerate(ISAS))) if bits >> i & 1]


def active_isa() -> str:
    """What ``isa="auto"`` runs: ``$SPARSEKIT_ISA`` if set, else the best path ("torch" without the
    extension)."""
    paths = isa_paths()
    if not paths:
        return "torch"
    return os.environ.get("SPARSEKIT_ISA") or paths[0]
