"""Round-to-nearest (RTN) quantization: every weight to the nearest point of its group's grid.

``ŵ = (clamp(round(w/s) + z, q_min, q_max) − z) · s`` with the scales fitted on the weight itself
(:mod:`sparsekit.quant.grid`). No data is needed; the error of each weight is at most ``s/2``. It is
the baseline that GPTQ improves on by compensating each column's rounding error in the columns not yet
quantized.
"""

from __future__ import annotations

import torch

from sparsekit.quant.grid import (
    QuantizedWeight,
    check_bits,
    check_group_size,
    expand_groups,
    fit_scales,
    quantize_codes,
)

__all__ = ["quantize_rtn"]


def check_weight(W, name: str = "W") -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [out, in], got {type(W).__name__}")
    if W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"{name} must be a 2-D floating tensor [out, in], got {W.dtype} {tuple(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name} has NaN/Inf entries; cannot quantize it")
    return W.detach()


def check_symmetric(symmetric) -> bool:
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    return symmetric


def quantize_rtn(W: torch.Tensor, bits: int = 8, group_size: int | None = None,
                 symmetric: bool = True) -> tuple[torch.Tensor, QuantizedWeight]:
    """Quantize ``W [out, in]`` to ``bits`` (8 or 4) per row and group of ``group_size`` inputs.

    ``group_size=None`` (or ``in``) is per-channel. Returns ``(Ŵ, quantized)``: ``Ŵ`` the dequantized
    weight in ``W``'s dtype, ``quantized`` its :class:`~sparsekit.quant.grid.QuantizedWeight`. Zeros of
    ``W`` stay exactly 0 (both grids represent 0).
    """
    W = check_weight(W)
    bits = check_bits(bits)
    symmetric = check_symmetric(symmetric)
    rows, cols = W.shape
    group_size = check_group_size(group_size, cols)
    groups = cols // group_size
    scales, zeros = fit_scales(W.float().reshape(rows * groups, group_size), bits, symmetric)
    scales = scales.reshape(rows, groups)
    zeros = None if zeros is None else zeros.reshape(rows, groups)
    codes = quantize_codes(W, expand_groups(scales, group_size),
                           None if zeros is None else expand_groups(zeros, group_size), bits)
    quantized = QuantizedWeight(codes, scales, zeros, bits, group_size)
    return quantized.dequantize().to(W.dtype), quantized
