"""Bitmask format: one bit per weight says "kept", followed by the kept values packed row by row.

For ``W [rows, cols]`` with keep-mask ``M``:

* ``bitmask [rows, ceil(cols/8)]`` uint8: bit ``t`` (least significant first) of byte ``j`` of row ``r``
  is ``M[r, 8j+t]`` (``numpy.packbits(M, axis=-1, bitorder="little")``); padding bits are 0;
* ``values [nnz]``: ``W[M]`` in row-major order, fp32/bf16/fp16;
* ``row_offsets [rows+1]`` int64: row ``r``'s values are ``values[row_offsets[r]:row_offsets[r+1]]``.

Bytes per weight: ``(1-s)·sizeof(value) + 1/8``; a 70%-sparse bf16 weight takes 0.725 B instead of 2 B.

Quantized (``bits=8`` or ``4``, :mod:`sparsekit.formats.quantized`): ``values`` holds int8 codes, or int4
codes two per byte in one flat stream of length ``ceil(nnz/2)``, plus ``scales [rows, cols/group_size]``
float16: ``(1-s)·bits/8 + 1/8 + 2/group_size`` bytes per weight (plus the row offsets): 0.43 B at 70%
with int8 and one scale per row, 0.29 B with int4 and group 128.
"""

from __future__ import annotations

import torch

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

__all__ = ["BitmaskWeight"]

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def row_popcounts(bits: torch.Tensor) -> torch.Tensor:
    """Number of set bits in each row of a ``[rows, bytes]`` uint8 tensor, int64 ``[rows]``."""
    return _POPCOUNT.to(bits.device)[bits.long()].sum(-1)


@register_format
class BitmaskWeight(SparseWeight):
    """Row-wise packed bitmask + packed non-zero values + row offsets (see module docstring).

    Quantized when ``bits`` is 8 or 4: then ``group_size`` and the ``scales`` part are set too.
    """

    format = "bitmask"
    parts = ("bitmask", "values", "row_offsets")

    def __init__(self, shape, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                 validate: bool = True, *, bits: int | None = None, group_size: int | None = None,
                 scales: torch.Tensor | None = None):
        self.shape = check_shape(shape)
        self.bitmask, self.values, self.row_offsets = bitmask, values, row_offsets
        self.bits, self.group_size = quant.check_quant_attributes(bits, group_size, scales, self.shape[1])
        self.scales = scales
        if self.bits is not None and scales is None:
            raise ValueError("a quantized bitmask weight needs its 'scales' part")
        if validate:
            self.validate()

    @classmethod
    def from_dense(cls, W: torch.Tensor, mask: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                   bits: int | None = None, group_size: int | None = None,
                   scales: torch.Tensor | None = None) -> BitmaskWeight:
        """Compress ``W``; ``mask`` (default ``W != 0``) may keep explicit zeros; values cast to ``dtype``.

        ``bits=8|4`` stores the kept weights quantized (symmetric, groups of ``group_size`` inputs, default
        per-channel) on ``scales`` if given, else on scales fitted by round-to-nearest.
        """
        W = check_weight(W)
        mask = dense_mask(W, mask)
        if bits is None:
            quant.check_quant_attributes(bits, group_size, scales, W.shape[1])
            return cls._build(mask, W[mask].to(check_values_dtype(dtype or W.dtype)))
        if dtype is not None:
            raise ValueError(f"dtype={dtype} applies to float values; a quantized weight (bits={bits}) "
                             "stores integer codes")
        bits, group_size = quant.check_quant_attributes(bits, group_size or W.shape[1], None, W.shape[1])
        codes, scales = quant.grid_codes(W, mask, bits, group_size, scales)
        return cls._build(mask, codes[mask], bits, group_size, scales)

    @classmethod
    def from_quantized(cls, quantized, mask: torch.Tensor | None = None) -> BitmaskWeight:
        """Store a symmetric :class:`~sparsekit.quant.QuantizedWeight` (e.g. from ``gptq_quantize``) as is;
        ``mask`` (default: its non-zero codes) keeps the pruning mask, zero codes included."""
        codes, mask = quant.codes_of_quantized(quantized, mask)
        return cls._build(mask, codes[mask], quantized.bits, quantized.group_size,
                          quantized.scales.to(torch.float16))

    @classmethod
    def _build(cls, mask, kept, bits=None, group_size=None, scales=None) -> BitmaskWeight:
        """From the keep-mask and the kept values (floats, or int8 codes) in row-major order."""
        row_offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
        torch.cumsum(mask.sum(-1), 0, out=row_offsets[1:])
        values = quant.encode_codes(kept, bits) if bits is not None else kept.contiguous()
        return cls(tuple(mask.shape), pack_bits(mask), values, row_offsets, bits=bits, group_size=group_size,
                   scales=None if scales is None else scales.contiguous())

    @classmethod
    def from_parts(cls, shape, tensors, extra=None, validate=True) -> BitmaskWeight:
        extra = extra or {}
        return cls(shape, tensors["bitmask"], tensors["values"], tensors["row_offsets"], validate=validate,
                   bits=extra.get("bits"), group_size=extra.get("group_size"), scales=tensors.get("scales"))

    @classmethod
    def part_names(cls, extra: dict | None = None) -> tuple[str, ...]:
        return cls.parts + (("scales",) if (extra or {}).get("bits") is not None else ())

    def extra(self) -> dict:
        return {} if self.bits is None else {"bits": self.bits, "group_size": self.group_size}

    @property
    def nnz(self) -> int:
        # the values' length where it is the count (a static shape under torch.compile); int4 packs two
        return int(self.row_offsets[-1]) if self.bits == 4 else self.values.numel()

    def mask(self) -> torch.Tensor:
        return unpack_bits(self.bitmask, self.shape[1])

    def codes(self) -> torch.Tensor:
        """The int8 codes of the kept weights ``[nnz]`` in row-major order (quantized weights only)."""
        if self.bits is None:
            raise ValueError("codes() needs a quantized weight (bits=8 or 4); this one stores floats")
        return quant.decode_codes(self.values, self.bits, self.nnz)

    def to_dense(self) -> torch.Tensor:
        """Dense ``[rows, cols]``: the values' dtype, or float32 dequantized ``q·scale`` when quantized."""
        mask = self.mask()
        if self.bits is not None:
            return quant.dequantize_kept(mask, self.codes(), self.scales, self.group_size)
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        dense[mask] = self.values
        return dense

    def validate(self) -> None:
        rows, cols = self.shape
        bits = self._check_part("bitmask", (torch.uint8,), shape=(rows, -(-cols // 8)))
        offsets = self._check_part("row_offsets", (torch.int64,), shape=(rows + 1,))
        values_dtypes = {None: VALUE_DTYPES, 8: (torch.int8,), 4: (torch.uint8,)}[self.bits]
        values = self._check_part("values", values_dtypes, dim=1)
        if cols % 8 and bits.numel() and int((bits[:, -1] >> (cols % 8)).sum()):
            raise ValueError("bitmask has bits set beyond the last column (padding bits must be 0)")
        counts = row_popcounts(bits)
        if int(offsets[0]) != 0 or not torch.equal(offsets[1:] - offsets[:-1], counts):
            raise ValueError("row_offsets do not match the bitmask: row_offsets[r+1]-row_offsets[r] must be "
                             "the number of set bits of row r, starting at 0")
        nnz = int(offsets[-1])
        if values.numel() != quant.values_length(nnz, self.bits):
            raise ValueError(f"values has {values.numel()} entries but the bitmask keeps {nnz} "
                             f"{'' if self.bits is None else f'int{self.bits} '}values "
                             f"({quant.values_length(nnz, self.bits)} entries)")
        if self.bits is not None:
            self._check_part("scales", (torch.float16,), shape=(rows, cols // self.group_size))
            quant.validate_scales(self.scales, rows, cols, self.group_size)
            quant.validate_quantized_values(values, self.bits, nnz, self.format)
