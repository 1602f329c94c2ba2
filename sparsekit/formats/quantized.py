"""Quantized values inside the sparse formats: int8 or int4 codes of the kept weights plus group scales.

Shared by :class:`~sparsekit.formats.BitmaskWeight` and :class:`~sparsekit.formats.NMWeight` (the spec
that the kernels read). A quantized weight has ``bits`` (8 or 4), ``group_size`` (divides ``cols``;
``cols`` = per-channel) and one more part, ``scales``: float16 ``[rows, cols // group_size]``. The grid
is symmetric: the kept weight at ``(r, c)`` is ``q · scales[r, c // group_size]`` with

* ``bits=8``: ``values`` int8, ``q ∈ [−127, 127]``, one per kept weight, in the float layout;
* ``bits=4``: ``q ∈ [−8, 7]``, two's complement nibbles, two per uint8 byte, low nibble first
  (:func:`sparsekit.quant.pack_int4`); the bitmask format packs one flat stream (kept value ``k`` is
  nibble ``k``), the N:M format packs each row (``[rows, ceil(cols·n/m / 2)]``); a pad nibble is 0.

Pruned weights are not stored, so they are exactly 0; a kept weight whose code is 0 stays kept. Scales are
finite and ``> 0`` (a zero, negative or non-finite scale is refused).
"""

from __future__ import annotations

import torch

from sparsekit.quant.grid import QuantizedWeight, check_bits, check_group_size, code_range, expand_groups
from sparsekit.quant.packing import pack_int4, unpack_int4
from sparsekit.quant.rtn import quantize_rtn

__all__ = ["check_quant_attributes", "grid_codes", "encode_codes", "decode_codes", "dequantize_kept",
           "validate_quantized_values", "validate_scales", "values_length", "codes_of_quantized"]


def check_quant_attributes(bits, group_size, scales, cols: int) -> tuple[int | None, int | None]:
    """``(bits, group_size)`` checked together: all of bits, group_size, scales given, or none."""
    if bits is None:
        if group_size is not None or scales is not None:
            raise ValueError(f"group_size={group_size!r} and scales need bits=8 or bits=4 (got bits=None)")
        return None, None
    bits = check_bits(bits)
    if group_size is None:
        raise ValueError("a quantized weight needs group_size (in_features for per-channel)")
    return bits, check_group_size(group_size, cols)


def values_length(count: int, bits: int | None) -> int:
    """Stored entries for ``count`` kept values: ``count`` (float, int8) or ``ceil(count/2)`` bytes (int4)."""
    return -(-count // 2) if bits == 4 else count


def encode_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes along the last dim -> the ``values`` part (int8 as is; int4 packed two per byte)."""
    return pack_int4(codes) if bits == 4 else codes.contiguous()


def decode_codes(values: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``values`` part -> int8 codes, ``count`` along the last dim."""
    return unpack_int4(values, count) if bits == 4 else values


def grid_codes(W: torch.Tensor, mask: torch.Tensor, bits: int, group_size: int,
               scales: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes ``[rows, cols]`` (0 off the mask) and float16 scales of ``W``'s kept weights.

    ``scales=None`` fits them by round-to-nearest (:func:`sparsekit.quant.quantize_rtn`); given scales
    ``[rows, cols // group_size]`` are used as they are (``ValueError`` when a kept weight would fall
    outside the code range times its scale: nothing is clipped).
    """
    rows, cols = W.shape
    kept = W.float() * mask
    if scales is None:
        _, quantized = quantize_rtn(kept, bits, group_size, symmetric=True)
        return quantized.codes, quantized.scales.to(torch.float16)
    validate_scales(scales, rows, cols, group_size, part="scales")
    low, high = code_range(bits, True)
    q = torch.round(kept / expand_groups(scales.float(), group_size))
    if q.numel() and (float(q.min()) < low or float(q.max()) > high):
        raise ValueError(f"scales are too small for W: a kept weight needs q in [{float(q.min()):.0f}, "
                         f"{float(q.max()):.0f}], outside [{low}, {high}] at bits={bits}")
    return q.to(torch.int8), scales.to(torch.float16).contiguous()


def codes_of_quantized(quantized: QuantizedWeight,
                       mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and keep-mask of a symmetric :class:`QuantizedWeight`; ``mask`` (default: codes != 0) must
    hold every non-zero code."""
    if not isinstance(quantized, QuantizedWeight):
        raise TypeError(f"quantized must be a QuantizedWeight, got {type(quantized).__name__}")
    if not quantized.symmetric:
        raise ValueError("the sparse formats store symmetric grids only; quantize with symmetric=True")
    codes = quantized.codes
    if mask is None:
        mask = codes != 0
    elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != codes.shape:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(codes.shape)}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    dropped = int(((codes != 0) & ~mask).sum())
    if dropped:
        raise ValueError(f"mask drops {dropped} non-zero code(s): every non-zero weight must be kept")
    return codes, mask


def dequantize_kept(mask: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """Dense float32 ``[rows, cols]``: ``codes`` (flat, row-major over the kept positions) times scales."""
    dense = torch.zeros(mask.shape, dtype=torch.float32, device=codes.device)
    dense[mask] = codes.reshape(-1).float() * expand_groups(scales.float(), group_size)[mask]
    return dense


def validate_scales(scales, rows: int, cols: int, group_size: int, part: str = "scales",
                    dtypes=(torch.float16,)) -> None:
    if not isinstance(scales, torch.Tensor):
        raise ValueError(f"part {part!r} must be a tensor, got {type(scales).__name__}")
    if dtypes is not None and scales.dtype not in dtypes:
        raise ValueError(f"part {part!r} must have dtype float16, got {scales.dtype}")
    expected = (rows, cols // group_size if cols else 0)
    if tuple(scales.shape) != expected:
        raise ValueError(f"part {part!r} must have shape {expected} for a weight of shape {(rows, cols)} "
                         f"and group_size={group_size}, got {tuple(scales.shape)}")
    if not scales.is_floating_point():
        raise ValueError(f"part {part!r} must hold floating scales, got {scales.dtype}")
    bad = ~(torch.isfinite(scales) & (scales > 0))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"part {part!r} must hold finite scales > 0, got {float(scales[where])} at {where} "
                         f"({int(bad.sum())} bad of {scales.numel()})")


def validate_quantized_values(values: torch.Tensor, bits: int, count: int, fmt: str) -> None:
    """``values`` (one row, or the flat stream) holds ``count`` codes in range; int4 pad nibble 0."""
    if bits == 8:
        if values.numel() and int(values.min()) < -127:
            raise ValueError(f"{fmt} part 'values' holds -128; int8 codes must lie in [-127, 127]")
        return
    if count % 2 and values.numel() and bool((values[..., -1] >> 4).any()):
        raise ValueError(f"{fmt} part 'values' has a non-zero pad nibble after its last int4 code")
