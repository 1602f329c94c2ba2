"""The integer grid of a quantized weight: ranges, per-row group scales, codes, and ``QuantizedWeight``.

A weight ``W [rows, cols]`` is cut along its input dimension into groups of ``group_size`` consecutive
columns (``group_size = cols``: one group per row, "per-channel"). Each (row, group) has a scale
``s > 0`` (and, asymmetric, an integer zero point ``z``):

* symmetric, ``b`` bits: ``q = clamp(round(w / s), q_min, q_max)`` with ``s = 2·max|w| / (q_max − q_min)``
  over the group; ``ŵ = q · s``. int4 uses all 16 codes, ``[−8, 7]`` (``s = max|w| / 7.5``), as GPTQ's
  reference quantizer does (its grid is ``s = 2·max|w| / (2^b − 1)``, zero point ``2^(b−1)``); int8 uses
  ``[−127, 127]`` (``s = max|w| / 127``), because the int8 format keeps −128 out of its codes
  (:mod:`sparsekit.formats.quantized`) and a 256th level changes int8's error by less than 1 %;
* asymmetric: ``q = clamp(round(w / s) + z, 0, 2^b − 1)``, ``s = (max(w, 0) − min(w, 0)) / (2^b − 1)``,
  ``z = round(−min(w, 0) / s)``; ``ŵ = (q − z) · s``.

Both grids hold 0 exactly (``q = 0``, resp. ``q = z``), so a pruned weight stays exactly 0. Scales are
rounded *up* to the nearest float16 (the precision the sparse formats store them in; rounding up never
clips the group's largest value), so ``ŵ`` computed here equals what a compressed weight dequantizes to.
A group whose weights are all 0 gets ``s = 1`` (any positive scale represents it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsekit import _validate

__all__ = ["BITS", "QuantizedWeight", "check_bits", "check_group_size", "code_range", "fit_scales",
           "quantize_codes", "dequantize_codes", "expand_groups", "SYMMETRIC_RANGES"]

BITS = (8, 4)
_FP16_MAX = float(torch.finfo(torch.float16).max)


def check_bits(bits) -> int:
    allowed = f"one of {BITS}"
    return _validate.choice(_validate.integer(bits, "bits", allowed=allowed), "bits", BITS)


def check_group_size(group_size, cols: int) -> int:
    """``group_size`` as a positive int dividing ``cols``; ``None`` means per-channel (``cols``)."""
    if group_size is None:
        return max(cols, 1)
    group_size = _validate.integer(group_size, "group_size", low=1,
                                   allowed="a positive integer or None (per-channel)")
    if cols % group_size:
        raise ValueError(f"group_size must divide in_features={cols}, got group_size={group_size}")
    return group_size


SYMMETRIC_RANGES = {8: (-127, 127), 4: (-8, 7)}  # int4: all 16 codes; int8: the format's [−127, 127]


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(q_min, q_max)``: :data:`SYMMETRIC_RANGES` symmetric, ``(0, 2^b − 1)`` asymmetric."""
    if symmetric:
        return SYMMETRIC_RANGES[bits]
    return 0, 2**bits - 1


def expand_groups(per_group: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[rows, groups]`` -> ``[rows, groups · group_size]``: each group's entry repeated over its columns."""
    return per_group.repeat_interleave(group_size, dim=1)


def _float16_up(scale: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value ``>= scale`` (positive scales), as float32."""
    if bool((scale > _FP16_MAX).any()):
        raise ValueError(f"a quantization scale exceeds float16's range ({_FP16_MAX}): the weights are too "
                         f"large (max |w| = {float(scale.max()):.3g} × 2^bits)")
    half = scale.to(torch.float16)
    up = torch.nextafter(half, torch.full_like(half, float("inf")))
    half = torch.where(half.float() < scale, up, half)
    return half.float()


def fit_scales(W: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) of one group per row: ``W [rows, cols]`` -> ``s [rows]``, ``z [rows] | None``.

    The whole of ``W``'s columns (at least one) is one group; see the module docstring for the formulas.
    """
    W = W.float()
    q_min, q_max = code_range(bits, symmetric)
    if symmetric:  # max|w| maps to the middle of the range's width: (q_max − q_min) / 2 steps from 0
        scale = 2 * W.abs().amax(dim=1) / (q_max - q_min)
    else:
        low, high = W.amin(dim=1).clamp(max=0), W.amax(dim=1).clamp(min=0)
        scale = (high - low) / q_max
    scale = _float16_up(torch.where(scale > 0, scale, torch.ones_like(scale)))
    if symmetric:
        return scale, None
    zero = torch.round(-low / scale).clamp(q_min, q_max).to(torch.uint8)
    return scale, zero


def quantize_codes(W: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bits: int) -> torch.Tensor:
    """Codes of ``W [rows, cols]`` on the grid ``scales, zeros`` (broadcast, e.g. ``[rows, 1]``).

    int8 symmetric codes in :func:`code_range` when ``zeros`` is None, else uint8 codes in ``[0, 2^b − 1]``.
    """
    q_min, q_max = code_range(bits, zeros is None)
    q = torch.round(W.float() / scales)
    if zeros is not None:
        q = q + zeros.float()
    return q.clamp(q_min, q_max).to(torch.int8 if zeros is None else torch.uint8)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """``(q − z) · s`` (``z = 0`` symmetric), float32; exact: a code has ≤ 8 bits and a scale 11."""
    q = codes.float()
    if zeros is not None:
        q = q - zeros.float()
    return q * scales.float()


@dataclass(eq=False)  # tensors: compared by identity, never element-wise by ==
class QuantizedWeight:
    """A weight ``[rows, cols]`` on a group-wise integer grid.

    * ``codes [rows, cols]``: int8 in :func:`code_range` (symmetric) or uint8 in ``[0, 2^b − 1]``
      (asymmetric);
    * ``scales [rows, cols // group_size]`` float32 (each a float16 value), > 0;
    * ``zeros [rows, cols // group_size]`` uint8 zero points, or None (symmetric);
    * ``bits`` (8 or 4), ``group_size`` (divides ``cols``; ``cols`` = per-channel).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """``ŵ = (q − z) · s`` ``[rows, cols]`` float32."""
        zeros = None if self.zeros is None else expand_groups(self.zeros, self.group_size)
        return dequantize_codes(self.codes, expand_groups(self.scales, self.group_size), zeros)
