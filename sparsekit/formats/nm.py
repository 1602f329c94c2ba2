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
"""

from __future__ import annotations

import torch

from sparsekit import _validate
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
    """``n`` of every ``m``: values ``[rows, cols·n/m]`` + per-group occupancy bits (module docstring)."""

    format = "nm"
    parts = ("bitmask", "values")

    def __init__(self, shape, nm, bitmask: torch.Tensor, values: torch.Tensor, validate: bool = True):
        self.shape = check_shape(shape)
        self.n, self.m = _validate.nm_pair(nm, "nm", in_features=self.shape[1])
        self.bitmask, self.values = bitmask, values
        if validate:
            self.validate()

    @property
    def nm(self) -> tuple[int, int]:
        return self.n, self.m

    @classmethod
    def from_dense(cls, W: torch.Tensor, nm=(2, 4), mask: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> NMWeight:
        """Compress ``W`` whose mask (default ``W != 0``) keeps at most ``n`` of every ``m``.

        Raises ``ValueError`` when a group keeps more than ``n`` (the pattern is violated) or when
        ``cols % m != 0``.
        """
        W = check_weight(W)
        dtype = check_values_dtype(dtype or W.dtype)
        n, m = _validate.nm_pair(nm, "nm", in_features=W.shape[1])
        mask = dense_mask(W, mask)
        rows, cols = W.shape
        worst = int(mask.reshape(rows, cols // m, m).sum(-1).max()) if mask.numel() else 0
        if worst > n:
            raise ValueError(f"W violates the {n}:{m} pattern: a group of {m} consecutive inputs keeps "
                             f"{worst} > {n} weights")
        mask = _fill_groups(mask, n, m)
        values = W[mask].to(dtype).reshape(rows, cols * n // m).contiguous()
        return cls(tuple(W.shape), (n, m), pack_bits(mask), values)

    @classmethod
    def from_parts(cls, shape, tensors, extra=None, validate=True) -> NMWeight:
        extra = extra or {}
        if "n" not in extra or "m" not in extra:
            raise ValueError(f"nm format needs n and m in its metadata, got {extra!r}")
        return cls(shape, (extra["n"], extra["m"]), tensors["bitmask"], tensors["values"], validate=validate)

    def extra(self) -> dict:
        return {"n": self.n, "m": self.m}

    def mask(self) -> torch.Tensor:
        return unpack_bits(self.bitmask, self.shape[1])

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        dense[self.mask()] = self.values.reshape(-1)
        return dense

    def validate(self) -> None:
        rows, cols = self.shape
        n, m = self.n, self.m
        bits = self._check_part("bitmask", (torch.uint8,), shape=(rows, -(-cols // 8)))
        self._check_part("values", VALUE_DTYPES, shape=(rows, cols * n // m))
        if cols % 8 and bits.numel() and int((bits[:, -1] >> (cols % 8)).sum()):
            raise ValueError("bitmask has bits set beyond the last column (padding bits must be 0)")
        counts = self.mask().reshape(rows, cols // m, m).sum(-1)
        if counts.numel() and not bool((counts == n).all()):
            raise ValueError(f"bitmask violates the {n}:{m} pattern: each group of {m} must keep exactly {n}")
