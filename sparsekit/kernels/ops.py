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

When the extension cannot be built (:mod:`sparsekit.kernels.extension`), the same schemas are registered
here with the torch reference implementations of :mod:`sparsekit.kernels.reference`.
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


def _reference_ops() -> dict:
    def bitmask_linear(x, bitmask, values, row_offsets, in_features, scales=None, group_size=0, isa="auto",
                       x_int8=False):
        x = reference.quantize_x(x) if x_int8 else x
        return reference.linear(x, reference.bitmask_dense(bitmask, values, row_offsets, in_features, scales,
                                                           group_size))

    def nm_linear(x, bitmask, values, in_features, scales=None, group_size=0, isa="auto", x_int8=False):
        x = reference.quantize_x(x) if x_int8 else x
        return reference.linear(x, reference.bitmask_dense(bitmask, values, None, in_features, scales,
                                                           group_size))

    def csr_linear(x, indptr, indices, values, in_features, isa="auto"):
        rows = indptr.numel() - 1
        dense = torch.zeros(rows, in_features, dtype=torch.float32)
        counts = indptr[1:] - indptr[:-1]
        dense[torch.repeat_interleave(torch.arange(rows), counts), indices.to(torch.int64)] = values.float()
        return reference.linear(x, dense)

    def dense_linear(x, weight, scales=None, group_size=0, isa="auto", x_int8=False):
        x = reference.quantize_x(x) if x_int8 else x
        dense = weight if scales is None else reference.dequantize_dense(weight, scales, group_size)
        return reference.linear(x, dense)

    def bitmask_to_dense(bitmask, values, row_offsets, in_features):
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
