"""CSR format with narrow column indices.

For ``W [rows, cols]`` with keep-mask ``M``: ``indptr [rows+1]`` int64, ``indices [nnz]`` (int32, or uint16
when ``cols <= 65536``: 2 bytes instead of torch's default 8) strictly increasing within a row, and
``values [nnz]`` = ``W[M]`` in row-major order. Bytes per weight: ``(1-s)·(sizeof(value)+sizeof(index))``,
which beats the bitmask's ``(1-s)·sizeof(value) + 1/8`` once ``(1-s)·sizeof(index) < 1/8``, i.e. above
~94% sparsity with uint16 indices; its kernel's work grows with the non-zeros only.
"""

from __future__ import annotations

import torch

from sparsekit.formats.base import (
    SparseWeight,
    check_shape,
    check_values_dtype,
    check_weight,
    dense_mask,
    register_format,
)

__all__ = ["CSRWeight"]

INDEX_DTYPES = (torch.int32, torch.uint16)


@register_format
class CSRWeight(SparseWeight):
    """Compressed sparse rows with int32 or uint16 column indices (module docstring)."""

    format = "csr"
    parts = ("indptr", "indices", "values")

    def __init__(self, shape, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                 validate: bool = True):
        self.shape = check_shape(shape)
        self.indptr, self.indices, self.values = indptr, indices, values
        if validate:
            self.validate()

    @classmethod
    def from_dense(cls, W: torch.Tensor, mask: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                   index_dtype: torch.dtype | None = None) -> CSRWeight:
        """Compress ``W``; ``index_dtype`` defaults to uint16 when ``cols <= 65536`` else int32."""
        W = check_weight(W)
        dtype = check_values_dtype(dtype or W.dtype)
        cols = W.shape[1]
        index_dtype = index_dtype or (torch.uint16 if cols <= 65536 else torch.int32)
        check_values_dtype(index_dtype, INDEX_DTYPES, name="index_dtype")
        if index_dtype == torch.uint16 and cols > 65536:
            raise ValueError(f"index_dtype=torch.uint16 holds columns < 65536, but W has {cols} columns")
        mask = dense_mask(W, mask)
        indptr = torch.zeros(W.shape[0] + 1, dtype=torch.int64, device=W.device)
        torch.cumsum(mask.sum(-1), 0, out=indptr[1:])
        columns = mask.nonzero()[:, 1]  # row-major order
        return cls(tuple(W.shape), indptr, columns.to(torch.int32).to(index_dtype).contiguous(),
                   W[mask].to(dtype).contiguous())

    @classmethod
    def from_parts(cls, shape, tensors, extra=None, validate=True) -> CSRWeight:
        return cls(shape, tensors["indptr"], tensors["indices"], tensors["values"], validate=validate)

    def _rows(self) -> torch.Tensor:
        counts = self.indptr[1:] - self.indptr[:-1]
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.indptr.device), counts)

    def mask(self) -> torch.Tensor:
        mask = torch.zeros(self.shape, dtype=torch.bool, device=self.values.device)
        mask[self._rows(), self.indices.to(torch.int64)] = True
        return mask

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        dense[self._rows(), self.indices.to(torch.int64)] = self.values
        return dense

    def validate(self) -> None:
        rows, cols = self.shape
        indptr = self._check_part("indptr", (torch.int64,), shape=(rows + 1,))
        indices = self._check_part("indices", INDEX_DTYPES, dim=1)
        values = self._check_part("values", (torch.float32, torch.bfloat16, torch.float16), dim=1)
        counts = indptr[1:] - indptr[:-1]
        if int(indptr[0]) != 0 or bool((counts < 0).any()) or int(indptr[-1]) != indices.numel():
            raise ValueError(f"indptr must rise from 0 to nnz={indices.numel()} without decreasing")
        if values.numel() != indices.numel():
            raise ValueError(f"values ({values.numel()}) and indices ({indices.numel()}) differ in length")
        if indices.numel():
            columns = indices.to(torch.int64)
            if int(columns.min()) < 0 or int(columns.max()) >= cols:
                raise ValueError(f"csr part 'indices': column indices must lie in [0, cols={cols}), got "
                                 f"[{int(columns.min())}, {int(columns.max())}]")
            rising = columns[1:] > columns[:-1]
            row_starts = torch.zeros_like(rising)
            starts = indptr[1:-1]
            starts = starts[(starts > 0) & (starts < indices.numel())] - 1
            row_starts[starts] = True
            if not bool((rising | row_starts).all()):
                i = int((~(rising | row_starts)).nonzero()[0]) + 1
                row = int(torch.searchsorted(indptr, torch.tensor(i, dtype=indptr.dtype), right=True)) - 1
                raise ValueError(f"csr part 'indices' must increase strictly within each row (no duplicate "
                                 f"or unsorted columns; a duplicate would be summed): row {row} has column "
                                 f"{int(columns[i])} after {int(columns[i - 1])}")
