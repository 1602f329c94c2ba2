"""Compressed sparse weight formats and their safetensors (de)serialisation.

``BitmaskWeight`` (packed keep-bits + packed values + row offsets), ``NMWeight`` (n of every m: values
``[rows, cols·n/m]`` + per-group occupancy bits) and ``CSRWeight`` (int32 or uint16 column indices) all
convert exactly to and from dense, report their ``nbytes``, and round-trip through
``save_sparse``/``load_sparse``. ``compress(W, format)`` picks the class by name. The bitmask and N:M
formats also hold int8/int4 values with float16 group scales (``bits=8|4``, ``group_size``;
:mod:`sparsekit.formats.quantized`).
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
             index_dtype: torch.dtype | None = None, bits: int | None = None,
             group_size: int | None = None) -> SparseWeight:
    """``W`` in the named format (``"bitmask"``, ``"nm"`` with ``nm=(n, m)``, or ``"csr"``); ``bits=8|4``
    quantizes the values (bitmask and N:M) with one float16 scale per row and ``group_size`` inputs."""
    if bits is not None or group_size is not None:
        if format not in ("bitmask", "nm"):
            raise ValueError(f"bits={bits!r}: only the 'bitmask' and 'nm' formats hold quantized values, "
                             f"got format={format!r}")
        cls = BitmaskWeight if format == "bitmask" else NMWeight
        extra = {} if format == "bitmask" else {"nm": nm}
        if format == "nm" and nm is None:
            raise ValueError("format='nm' needs nm=(n, m), e.g. nm=(2, 4)")
        return cls.from_dense(W, mask=mask, dtype=dtype, bits=bits, group_size=group_size, **extra)
    if format == "bitmask":
        return BitmaskWeight.from_dense(W, mask=mask, dtype=dtype)
    if format == "nm":
        if nm is None:
            raise ValueError("format='nm' needs nm=(n, m), e.g. nm=(2, 4)")
        return NMWeight.from_dense(W, nm=nm, mask=mask, dtype=dtype)
    if format == "csr":
        return CSRWeight.from_dense(W, mask=mask, dtype=dtype, index_dtype=index_dtype)
    raise ValueError(f"format must be one of 'bitmask', 'nm', 'csr', got {format!r}")
