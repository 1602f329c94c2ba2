"""Torch reference implementations of the sparse ops: decompress (and dequantize), then dense matmul.

They define what every kernel computes, serve as the ops when the C++ extension cannot be built, and give
the dense weight behind ``SparseLinear``'s dense path for quantized values. Layouts as in
:mod:`sparsekit.formats`; quantized values (the shared spec): int8 ``q`` or int4 nibbles (two per uint8,
low nibble first) with fp16 ``scales [rows, in_features // group_size]``, dense value
``q · scales[r, c // group_size]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["unpack_int4", "pack_int4", "unpack_mask", "bitmask_dense", "dequantize_dense", "linear",
           "quantize_x"]


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` int4 values of a uint8 nibble stream (low nibble first) as int8."""
    nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
    q = nibbles[..., :count].to(torch.int8)
    return torch.where(q >= 8, q - 16, q)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7] ``[..., n]`` -> uint8 ``[..., ceil(n/2)]`` (low nibble first, pad nibble 0)."""
    q = q.to(torch.int16)
    if q.shape[-1] % 2:
        q = torch.cat([q, q.new_zeros(*q.shape[:-1], 1)], dim=-1)
    nibbles = (q & 15).to(torch.uint8).reshape(*q.shape[:-1], -1, 2)
    return nibbles[..., 0] | (nibbles[..., 1] << 4)


def unpack_mask(bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(bitmask.shape[0], -1)[:, :in_features].bool()


def dequantize_dense(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """``q [rows, in] · scales`` expanded over each group of ``group_size`` columns, fp32."""
    return q.float() * scales.float().repeat_interleave(group_size, dim=1)


def bitmask_dense(bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor | None,
                  in_features: int, scales: torch.Tensor | None = None, group_size: int = 0) -> torch.Tensor:
    """The dense ``[rows, in_features]`` weight: the values' dtype for float values, fp32 for quantized ones.

    ``row_offsets=None`` is the N:M layout (``values [rows, per row]``; int4: ``ceil(kept/2)`` bytes a row).
    """
    mask = unpack_mask(bitmask, in_features)
    rows = mask.shape[0]
    if values.dtype == torch.uint8:
        if row_offsets is not None:
            kept = unpack_int4(values, int(row_offsets[-1]))
        else:
            per_row = int(mask[0].sum()) if rows else 0
            kept = unpack_int4(values.reshape(rows, -1), per_row).reshape(-1)
    else:
        kept = values.reshape(-1)
    dense = torch.zeros(rows, in_features, dtype=kept.dtype, device=kept.device)
    dense[mask] = kept
    if scales is None:
        return dense
    return dequantize_dense(dense, scales, group_size)


def linear(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` computed in fp32 and returned in x's dtype (what the kernels return)."""
    return F.linear(x.float(), dense.float()).to(x.dtype)


def quantize_x(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per row and back (the ops' ``x_int8``): ``s · round(x / s)``,
    ``s = max|x| / 127``."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30)
    return (torch.round(xf / scale).clamp(-127, 127) * scale).to(x.dtype)
