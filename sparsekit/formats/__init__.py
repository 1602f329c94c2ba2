"""Compressed sparse weight formats and their safetensors (de)serialisation.

``BitmaskWeight`` (packed keep-bits + packed values + row offsets), ``NMWeight`` (n of every m: values
``[rows, cols·n/m]`` + per-group occupancy bits) and ``CSRWeight`` (int32 or uint16 column indices) all
convert exactly to and from dense, report their ``nbytes``, and round-trip through
``save_sparse``/``load_sparse``. ``compress(W, format)`` picks the class by name.
"""

from __future__ import annotations

import torch

from sparsekit.formats.base import FORMATS, VALUE_DTYPES, SparseWeight, pack_bits, unpack_bits
from sparsekit.formats.bitmask import BitmaskWeight
from sparsekit.formats.csr import CSRWeight
from sparsekit.formats.io import load_sparse, save_sparse
from sparsekit.formats.nm import NMWeight

__all__ = ["BitmaskWeight", "NMWeight", "CSRWeight", "SparseWeight", "FORMATS", "VALUE_DTYPES", "compress",
           "save_sparse", "load_sparse", "pack_bits", "unpack_bits"]


def compress(W: torch.Tensor, format: str = "bitmask", mask: torch.Tensor | None = None,
             dtype: torch.dtype | None = None, nm=None,
             index_dtype: torch.dtype | None = None) -> SparseWeight:
    """``W`` in the named format (``"bitmask"``, ``"nm"`` with ``nm=(n, m)``, or ``"csr"``)."""
    if format == "bitmask":
        return BitmaskWeight.from_dense(W, mask=mask, dtype=dtype)
    if format == "nm":
        if nm is None:
            raise ValueError("format='nm' needs nm=(n, m), e.g. nm=(2, 4)")
        return NMWeight.from_dense(W, nm=nm, mask=mask, dtype=dtype)
    if format == "csr":
        return CSRWeight.from_dense(W, mask=mask, dtype=dtype, index_dtype=index_dtype)
    raise ValueError(f"format must be one of 'bitmask', 'nm', 'csr', got {format!r}")
