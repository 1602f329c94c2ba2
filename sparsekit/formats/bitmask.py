"""Bitmask format: one bit per weight says "kept", followed by the kept values packed row by row.

For ``W [rows, cols]`` with keep-mask ``M``:

* ``bitmask [rows, ceil(cols/8)]`` uint8: bit ``t`` (least significant first) of byte ``j`` of row ``r``
  is ``M[r, 8j+t]`` (``numpy.packbits(M, axis=-1, bitorder="little")``); padding bits are 0;
* ``values [nnz]``: ``W[M]`` in row-major order, fp32/bf16/fp16;
* ``row_offsets [rows+1]`` int64: row ``r``'s values are ``values[row_offsets[r]:row_offsets[r+1]]``.

Bytes per weight: ``(1-s)·sizeof(value) + 1/8``; a 70%-sparse bf16 weight takes 0.725 B instead of 2 B.
"""

from __future__ import annotations

import torch

from sparsekit.formats.base import (
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
    """Row-wise packed bitmask + packed non-zero values + row offsets (see module docstring)."""

    format = "bitmask"
    parts = ("bitmask", "values", "row_offsets")

    def __init__(self, shape, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                 validate: bool = True):
        self.shape = check_shape(shape)
        self.bitmask, self.values, self.row_offsets = bitmask, values, row_offsets
        if validate:
            self.validate()

    @classmethod
    def from_dense(cls, W: torch.Tensor, mask: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> BitmaskWeight:
        """Compress ``W``; ``mask`` (default ``W != 0``) may keep explicit zeros; values cast to ``dtype``."""
        W = check_weight(W)
        dtype = check_values_dtype(dtype or W.dtype)
        mask = dense_mask(W, mask)
        counts = mask.sum(-1)
        row_offsets = torch.zeros(W.shape[0] + 1, dtype=torch.int64, device=W.device)
        torch.cumsum(counts, 0, out=row_offsets[1:])
        return cls(tuple(W.shape), pack_bits(mask), W[mask].to(dtype).contiguous(), row_offsets)

    @classmethod
    def from_parts(cls, shape, tensors, extra=None, validate=True) -> BitmaskWeight:
        return cls(shape, tensors["bitmask"], tensors["values"], tensors["row_offsets"], validate=validate)

    def mask(self) -> torch.Tensor:
        return unpack_bits(self.bitmask, self.shape[1])

    def to_dense(self) -> torch.Tensor:
        mask = self.mask()
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        dense[mask] = self.values
        return dense

    def validate(self) -> None:
        rows, cols = self.shape
        bits = self._check_part("bitmask", (torch.uint8,), shape=(rows, -(-cols // 8)))
        offsets = self._check_part("row_offsets", (torch.int64,), shape=(rows + 1,))
        values = self._check_part("values", (torch.float32, torch.bfloat16, torch.float16), dim=1)
        if cols % 8 and bits.numel() and int((bits[:, -1] >> (cols % 8)).sum()):
            raise ValueError("bitmask has bits set beyond the last column (padding bits must be 0)")
        counts = row_popcounts(bits)
        if int(offsets[0]) != 0 or not torch.equal(offsets[1:] - offsets[:-1], counts):
            raise ValueError("row_offsets do not match the bitmask: row_offsets[r+1]-row_offsets[r] must be "
                             "the number of set bits of row r, starting at 0")
        if values.numel() != int(offsets[-1]):
            raise ValueError(f"values has {values.numel()} entries but the bitmask keeps {int(offsets[-1])}")
