"""N:M format: every group of ``m`` consecutive inputs of a row keeps exactly ``n`` values.

For ``W [rows, cols]`` (``cols % m == 0``):

* ``values [rows, cols·n/m]``: the kept values of each row in column order (group ``g`` owns
  ``values[:, g·n:(g+1)·n]``), fp32/bf16/fp16;
* ``bitmask [rows, ceil(cols/8)]`` uint8: the in-group positions, stored as an ``m``-bit occupancy mask
  per group in the packed-bit layout of :class:`~sparsekit.formats.BitmaskWeight`.

The occupancy mask is the compact index: ``m`` bits per group against ``n·ceil(log2 m)`` bits for a list
of positions, so it is never larger for the patterns used here (2:4: 4 vs 4 bits, 4:8: 8 vs 12, 16:32:
32 vs 80, 16:64: 64 vs 96) and every CPU kernel shared with the bitmask format applies, with row offsets
implied (``r·cols·n/m``). A group with fewer than ``n`` non-zeros (a kept weight that happens to be 0)
stores explicit zeros at its first free positions, so ``to_dense()`` stays exact.

Quantized (``bits=8`` or ``4``, :mod:`sparsekit.formats.quantized`): ``values`` holds int8 codes
``[rows, cols·n/m]``, or int4 codes two per byte ``[rows, ceil(cols·n/m / 2)]`` (each row packed on its
own), plus ``scales [rows, cols/group_size]`` float16. 2:4 with int4 and group 128: 0.25 + 0.125 +
0.016 = 0.39 bytes per weight.
"""

from __future__ import annotations

import torch

from sparsekit import _validate
from sparsekit.formats import quantized as quant
from sparsekit.formats.base import (
    VALUE_DTYPES,
    SparseWeight,
    check_shape,
    check_values_dtype,
    check_weight,
    dense_mask,
    pack_bits,
    register_format,
    unpack_bits,
)

__all__ = ["NMWeight"]


def _fill_groups(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Add kept positions (first free ones) to groups holding fewer than ``n``, so each holds exactly n."""
    rows, cols = mask.shape
    groups = mask.reshape(rows, cols // m, m)
    missing = n - groups.sum(-1, keepdim=True)
    if missing.numel() == 0 or int(missing.max()) <= 0:
        return mask
    free_rank = torch.cumsum(~groups, dim=-1)  # 1 for the first free slot of a group, 2 for the next...
    return (groups | (~groups & (free_rank <= missing))).reshape(rows, cols)


@register_format
class NMWeight(SparseWeight):
    """``n`` of every ``m``: values ``[rows, cols·n/m]`` + per-group occupancy bits (module docstring).

    Quantized when ``bits`` is 8 or 4: then ``group_size`` and the ``scales`` part are set too.
    """

    format = "nm"
    parts = ("bitmask", "values")

    def __init__(self, shape, nm, bitmask: torch.Tensor, values: torch.Tensor, validate: bool = True, *,
                 bits: int | None = None, group_size: int | None = None, scales: torch.Tensor | None = None):
        self.shape = check_shape(shape)
        self.n, self.m = _validate.nm_pair(nm, "nm", in_features=self.shape[1])
        self.bitmask, self.values = bitmask, values
        self.bits, self.group_size = quant.check_quant_attributes(bits, group_size, scales, self.shape[1])
        self.scales = scales
        if self.bits is not None and scales is None:
            raise ValueError("a quantized N:M weight needs its 'scales' part")
        if validate:
            self.validate()

    @property
    def nm(self) -> tuple[int, int]:
        return self.n, self.m

    @property
    def kept_per_row(self) -> int:
        """``cols·n/m``: the values of each row."""
        return self.shape[1] * self.n // self.m

    @classmethod
    def from_dense(cls, W: torch.Tensor, nm=(2, 4), mask: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None, bits: int | None = None, group_size: int | None = None,
                   scales: torch.Tensor | None = None) -> NMWeight:
        """Compress ``W`` whose mask (default ``W != 0``) keeps at most ``n`` of every ``m``.

        Raises ``ValueError`` when a group keeps more than ``n`` (the pattern is violated) or when
        ``cols % m != 0``. ``bits=8|4`` stores the kept weights quantized (symmetric, groups of
        ``group_size`` inputs, default per-channel) on ``scales`` if given, else fitted by round-to-nearest.
        """
        W = check_weight(W)
        n, m = _validate.nm_pair(nm, "nm", in_features=W.shape[1])
        mask = _full_nm_mask(dense_mask(W, mask), n, m, "W")
        if bits is None:
            quant.check_quant_attributes(bits, group_size, scales, W.shape[1])
            return cls._build(mask, (n, m), W[mask].to(check_values_dtype(dtype or W.dtype)))
        if dtype is not None:
            raise ValueError(f"dtype={dtype} applies to float values; a quantized weight (bits={bits}) "
                             "stores integer codes")
        bits, group_size = quant.check_quant_attributes(bits, group_size or W.shape[1], None, W.shape[1])
        codes, scales = quant.grid_codes(W, mask, bits, group_size, scales)
        return cls._build(mask, (n, m), codes[mask], bits, group_size, scales)

    @classmethod
    def from_quantized(cls, quantized, nm=(2, 4), mask: torch.Tensor | None = None) -> NMWeight:
        """Store a symmetric :class:`~sparsekit.quant.QuantizedWeight` whose mask (default: its non-zero
        codes) keeps at most ``n`` of every ``m``."""
        codes, mask = quant.codes_of_quantized(quantized, mask)
        n, m = _validate.nm_pair(nm, "nm", in_features=codes.shape[1])
        mask = _full_nm_mask(mask, n, m, "quantized")
        return cls._build(mask, (n, m), codes[mask], quantized.bits, quantized.group_size,
                          quantized.scales.to(torch.float16))

    @classmethod
    def _build(cls, mask, nm, kept, bits=None, group_size=None, scales=None) -> NMWeight:
        """From a full N:M keep-mask and the kept values (floats, or int8 codes) in row-major order."""
        rows, cols = mask.shape
        kept = kept.reshape(rows, cols * nm[0] // nm[1])
        values = quant.encode_codes(kept, bits) if bits is not None else kept.contiguous()
        return cls((rows, cols), nm, pack_bits(mask), values, bits=bits, group_size=group_size,
                   scales=None if scales is None else scales.contiguous())

    @classmethod
    def from_parts(cls, shape, tensors, extra=None, validate=True) -> NMWeight:
        extra = extra or {}
        if "n" not in extra or "m" not in extra:
            raise ValueError(f"nm format needs n and m in its metadata, got {extra!r}")
        return cls(shape, (extra["n"], extra["m"]), tensors["bitmask"], tensors["values"], validate=validate,
                   bits=extra.get("bits"), group_size=extra.get("group_size"), scales=tensors.get("scales"))

    @classmethod
    def part_names(cls, extra: dict | None = None) -> tuple[str, ...]:
        return cls.parts + (("scales",) if (extra or {}).get("bits") is not None else ())

    def extra(self) -> dict:
        quantized = {} if self.bits is None else {"bits": self.bits, "group_size": self.group_size}
        return {"n": self.n, "m": self.m, **quantized}

    @property
    def nnz(self) -> int:
        return self.shape[0] * self.kept_per_row

    def mask(self) -> torch.Tensor:
        return unpack_bits(self.bitmask, self.shape[1])

    def codes(self) -> torch.Tensor:
        """The int8 codes ``[rows, cols·n/m]`` of the kept weights (quantized weights only)."""
        if self.bits is None:
            raise ValueError("codes() needs a quantized weight (bits=8 or 4); this one stores floats")
        return quant.decode_codes(self.values, self.bits, self.kept_per_row)

    def to_dense(self) -> torch.Tensor:
        """Dense ``[rows, cols]``: the values' dtype, or float32 dequantized ``q·scale`` when quantized."""
        if self.bits is not None:
            return quant.dequantize_kept(self.mask(), self.codes(), self.scales, self.group_size)
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        dense[self.mask()] = self.values.reshape(-1)
        return dense

    def validate(self) -> None:
        rows, cols = self.shape
        n, m = self.n, self.m
        bits = self._check_part("bitmask", (torch.uint8,), shape=(rows, -(-cols // 8)))
        values_dtypes = {None: VALUE_DTYPES, 8: (torch.int8,), 4: (torch.uint8,)}[self.bits]
        values = self._check_part("values", values_dtypes,
                                  shape=(rows, quant.values_length(self.kept_per_row, self.bits)))
        if cols % 8 and bits.numel() and int((bits[:, -1] >> (cols % 8)).sum()):
            raise ValueError("bitmask has bits set beyond the last column (padding bits must be 0)")
        counts = self.mask().reshape(rows, cols // m, m).sum(-1)
        if counts.numel() and not bool((counts == n).all()):
            raise ValueError(f"bitmask violates the {n}:{m} pattern: each group of {m} must keep exactly {n}")
        if self.bits is not None:
            self._check_part("scales", (torch.float16,), shape=(rows, cols // self.group_size))
            quant.validate_scales(self.scales, rows, cols, self.group_size)
            quant.validate_quantized_values(values, self.bits, self.kept_per_row, self.format)


def _full_nm_mask(mask: torch.Tensor, n: int, m: int, name: str) -> torch.Tensor:
    """``mask`` checked to keep at most ``n`` of every ``m``, then filled to exactly ``n`` per group."""
    rows, cols = mask.shape
    worst = int(mask.reshape(rows, cols // m, m).sum(-1).max()) if mask.numel() else 0
    if worst > n:
        raise ValueError(f"{name} violates the {n}:{m} pattern: a group of {m} consecutive inputs keeps "
                         f"{worst} > {n} weights")
    return _fill_groups(mask, n, m)
