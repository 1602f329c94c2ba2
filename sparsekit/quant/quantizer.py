"""``GroupQuantizer``: quantize a weight one column at a time, fitting each group's grid on first use.

The column loop of GPTQ and of SparseGPT's joint mode (:data:`sparsekit.prune.sparsegpt.Quantizer`)
quantizes column ``j`` after the error of columns ``< j`` has been compensated into it. The grid of
column ``j``'s group (per row) is fitted when the loop first reaches that group, on the group's current
(already compensated) weights, as in the GPTQ reference; or up front on the original weight
(:meth:`GroupQuantizer.fit_all`, "static groups", which act-order needs since it visits a group's
columns out of order). The quantizer records every column's codes, so after the loop
:meth:`GroupQuantizer.result` holds the :class:`~sparsekit.quant.grid.QuantizedWeight` of the output.
"""

from __future__ import annotations

import torch

from sparsekit.quant.grid import (
    QuantizedWeight,
    check_bits,
    check_group_size,
    dequantize_codes,
    fit_scales,
    quantize_codes,
)
from sparsekit.quant.rtn import check_symmetric

__all__ = ["GroupQuantizer"]


class GroupQuantizer:
    """Column-wise quantizer of a ``[rows, cols]`` weight to ``bits`` with groups of ``group_size`` inputs.

    Callable as ``quantizer(column [rows], index, weight [rows, cols]) -> dequantized column``: the
    protocol of ``sparsegpt_prune(..., quantizer=...)``. ``weight[:, group]`` is read only when the
    group's grid is not fitted yet.
    """

    def __init__(self, shape: tuple[int, int], bits: int = 8, group_size: int | None = None,
                 symmetric: bool = True, device=None):
        rows, cols = shape
        self.bits = check_bits(bits)
        self.symmetric = check_symmetric(symmetric)
        self.group_size = check_group_size(group_size, cols)
        groups = cols // self.group_size
        self.scales = torch.ones(rows, groups, device=device)
        self.zeros = None if symmetric else torch.zeros(rows, groups, dtype=torch.uint8, device=device)
        self.fitted = torch.zeros(groups, dtype=torch.bool)
        self.codes = torch.zeros(rows, cols, dtype=torch.int8 if symmetric else torch.uint8, device=device)

    def _fit(self, group: int, weight: torch.Tensor) -> None:
        columns = slice(group * self.group_size, (group + 1) * self.group_size)
        scale, zero = fit_scales(weight[:, columns], self.bits, self.symmetric)
        self.scales[:, group] = scale
        if zero is not None:
            self.zeros[:, group] = zero
        self.fitted[group] = True

    def fit_all(self, weight: torch.Tensor) -> None:
        """Fit every group's grid now, on ``weight [rows, cols]`` (static groups)."""
        for group in range(self.fitted.numel()):
            self._fit(group, weight)

    def __call__(self, column: torch.Tensor, index: int, weight: torch.Tensor) -> torch.Tensor:
        group = index // self.group_size
        if not self.fitted[group]:
            self._fit(group, weight)
        scale = self.scales[:, group]
        zero = None if self.zeros is None else self.zeros[:, group]
        codes = quantize_codes(column, scale, zero, self.bits)
        self.codes[:, index] = codes
        return dequantize_codes(codes, scale, zero)

    def result(self) -> QuantizedWeight:
        """The codes and grids recorded so far (all columns once the loop has run)."""
        return QuantizedWeight(self.codes, self.scales, self.zeros, self.bits, self.group_size)
