"""The CPU kernels as torch custom ops: ``torch.ops.sparsekit.{bitmask,nm,csr}_linear``.

Each op computes ``y = x Wᵀ`` for ``x [..., in_features]`` and a compressed ``W [out, in]`` given by its
parts, returning ``y [..., out]`` in x's dtype (fp32 accumulation). A fake (meta) implementation gives
the output shape, so ``torch.compile`` traces through them; they have no autograd formula (inference
only). Checks on x (shape, dtype, contiguity) raise ``ValueError``; the weight's structure is validated
once when its format object is built, not on every call.

Eager callers that do not need the dispatcher (``SparseLinear`` outside ``torch.compile``) call the
plain ``*_impl`` functions: a custom op's Python dispatch costs tens of microseconds per call, which
adds up over the hundreds of Linear calls of one decoded token.
"""

from __future__ import annotations

import torch

from sparsekit.kernels import cpu

__all__ = ["bitmask_linear", "nm_linear", "csr_linear", "bitmask_linear_impl", "nm_linear_impl",
           "csr_linear_impl"]


def _flat(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must be [..., {in_features}] (in_features={in_features}), got shape "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (call .contiguous())")
    return x.reshape(-1, in_features)


def _out(y: torch.Tensor, x: torch.Tensor, rows: int) -> torch.Tensor:
    return y.to(x.dtype).reshape(*x.shape[:-1], rows)


def bitmask_linear_impl(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor,
                        row_offsets: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x Wᵀ`` for a :class:`~sparsekit.formats.BitmaskWeight` given as (bitmask, values, row_offsets)."""
    y = cpu.bitmask_matmul(_flat(x, in_features), bitmask, values, row_offsets, in_features)
    return _out(y, x, bitmask.shape[0])


def nm_linear_impl(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor,
                   in_features: int) -> torch.Tensor:
    """``x Wᵀ`` for an :class:`~sparsekit.formats.NMWeight` given as (bitmask, values ``[out, in·n/m]``)."""
    y = cpu.bitmask_matmul(_flat(x, in_features), bitmask, values, None, in_features)
    return _out(y, x, bitmask.shape[0])


def csr_linear_impl(x: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                    in_features: int) -> torch.Tensor:
    """``x Wᵀ`` for a :class:`~sparsekit.formats.CSRWeight` given as (indptr, indices, values)."""
    y = cpu.csr_matmul(_flat(x, in_features), indptr, indices, values, in_features)
    return _out(y, x, indptr.numel() - 1)


@torch.library.custom_op("sparsekit::bitmask_linear", mutates_args=(), device_types="cpu")
def bitmask_linear(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                   in_features: int) -> torch.Tensor:
    """``x Wᵀ`` for a :class:`~sparsekit.formats.BitmaskWeight` given as (bitmask, values, row_offsets)."""
    return bitmask_linear_impl(x, bitmask, values, row_offsets, in_features)


@bitmask_linear.register_fake
def _(x, bitmask, values, row_offsets, in_features):
    return x.new_empty(*x.shape[:-1], bitmask.shape[0])


@torch.library.custom_op("sparsekit::nm_linear", mutates_args=(), device_types="cpu")
def nm_linear(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x Wᵀ`` for an :class:`~sparsekit.formats.NMWeight` given as (bitmask, values ``[out, in·n/m]``)."""
    return nm_linear_impl(x, bitmask, values, in_features)


@nm_linear.register_fake
def _(x, bitmask, values, in_features):
    return x.new_empty(*x.shape[:-1], bitmask.shape[0])


@torch.library.custom_op("sparsekit::csr_linear", mutates_args=(), device_types="cpu")
def csr_linear(x: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
               in_features: int) -> torch.Tensor:
    """``x Wᵀ`` for a :class:`~sparsekit.formats.CSRWeight` given as (indptr, indices, values)."""
    return csr_linear_impl(x, indptr, indices, values, in_features)


@csr_linear.register_fake
def _(x, indptr, indices, values, in_features):
    return x.new_empty(*x.shape[:-1], indptr.shape[0] - 1)
