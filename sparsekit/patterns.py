"""How sparsity patterns compare: output error against sparsity, and bytes each storage format needs.

Used by the first chapter of the book. The byte counts are the analytic sizes of the formats in
``sparsekit.formats`` (tests check that the two agree):

* dense: ``r·c·b`` for ``b`` bytes per value;
* CSR: ``nnz·(b + i) + 8·(r + 1)`` with ``i`` bytes per column index (2 for uint16, 4 for int32) and
  an int64 pointer per row;
* bitmask: ``nnz·b + r·⌈c/8⌉ + 8·(r + 1)`` (values, one bit per weight, an int64 offset per row);
* N:M: ``nnz·b + r·⌈c/8⌉`` (values, and each group's occupancy as ``m`` bits; row offsets are implied).

Quantized values (``bits`` = 8 or 4, with ``group_size``): ``b = bits/8`` (int4 rounded up to whole bytes:
``⌈nnz/2⌉`` for the bitmask's flat stream, ``r·⌈(c·n/m)/2⌉`` for N:M rows, ``r·⌈c/2⌉`` dense) plus float16
scales ``2·r·c/group_size``; CSR has no quantized form.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from sparsekit.masks import nm_sparsity, validate_nm, validate_sparsity
from sparsekit.prune.magnitude import magnitude_prune

__all__ = ["relative_output_error", "error_against_sparsity", "storage_bytes", "FORMATS"]

FORMATS = ("dense", "csr", "bitmask", "nm")


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """``‖X Wᵀ − X Ŵᵀ‖²_F / ‖X Wᵀ‖²_F`` for ``W, Ŵ`` ``[out, in]`` and inputs ``X`` ``[n, in]``."""
    reference = X @ W.T
    return float((X @ (W - W_hat).T).pow(2).sum() / reference.pow(2).sum())


def error_against_sparsity(W: torch.Tensor, X: torch.Tensor, sparsities, nms, prune=magnitude_prune):
    """Relative output error of ``prune(W, ...)`` for unstructured ``sparsities`` and ``n:m`` patterns.

    Returns a DataFrame with columns ``pattern`` ("unstructured" or "n:m"), ``sparsity``, ``rel_error``.
    """
    rows = []
    for s in sparsities:
        W_hat, _ = prune(W, s)
        error = relative_output_error(W, W_hat, X)
        rows.append({"pattern": "unstructured", "sparsity": s, "rel_error": error})
    for nm in nms:
        W_hat, _ = prune(W, nm=nm)
        rows.append({"pattern": f"{nm[0]}:{nm[1]}", "sparsity": nm_sparsity(nm),
                     "rel_error": relative_output_error(W, W_hat, X)})
    return pd.DataFrame(rows)


def storage_bytes(rows: int, cols: int, sparsity: float, fmt: str, value_bytes: float = 2,
                  index_bytes: int = 2, nm=None, bits: int | None = None,
                  group_size: int | None = None) -> float:
    """Bytes a ``[rows, cols]`` weight with the given ``sparsity`` needs in format ``fmt``.

    ``fmt`` is one of :data:`FORMATS`; ``nm`` is required for ``"nm"`` (and fixes the sparsity).
    ``bits`` (8 or 4) stores quantized values with float16 scales per ``group_size`` inputs (default
    per-channel) instead of ``value_bytes`` per value.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if bits is not None:
        return _quantized_bytes(rows, cols, sparsity, fmt, nm, bits, group_size)
    if fmt == "nm":
        if nm is None:
            raise ValueError("fmt='nm' needs nm=(n, m)")
        n, m = validate_nm(nm)
        sparsity = 1 - n / m
    validate_sparsity(sparsity)
    nnz = round((1 - sparsity) * rows * cols)
    if fmt == "dense":
        return rows * cols * value_bytes
    if fmt == "csr":
        return nnz * (value_bytes + index_bytes) + 8 * (rows + 1)
    if fmt == "bitmask":
        return nnz * value_bytes + rows * math.ceil(cols / 8) + 8 * (rows + 1)
    return nnz * value_bytes + rows * math.ceil(cols / 8)


def _quantized_bytes(rows, cols, sparsity, fmt, nm, bits, group_size) -> int:
    from sparsekit.quant.grid import check_bits, check_group_size

    bits, group_size = check_bits(bits), check_group_size(group_size, cols)
    if fmt == "csr":
        raise ValueError("fmt='csr' has no quantized values; use 'bitmask', 'nm' or 'dense' with bits")
    scales = 2 * rows * (cols // group_size)
    if fmt == "dense":
        return rows * math.ceil(cols * bits / 8) + scales
    if fmt == "nm":
        if nm is None:
            raise ValueError("fmt='nm' needs nm=(n, m)")
        n, m = validate_nm(nm, cols)
        return rows * math.ceil(cols * n // m * bits / 8) + rows * math.ceil(cols / 8) + scales
    validate_sparsity(sparsity)
    nnz = round((1 - sparsity) * rows * cols)
    return math.ceil(nnz * bits / 8) + rows * math.ceil(cols / 8) + 8 * (rows + 1) + scales
