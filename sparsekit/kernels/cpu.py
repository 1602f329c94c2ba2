"""CPU kernels ``y = x Wᵀ`` for compressed weights, calling the C library (or torch when it is absent).

Each function takes the format's parts as tensors (so that the torch custom ops in
:mod:`sparsekit.kernels.ops` can call them) and ``x [B, cols]``; it returns ``y [B, rows]`` in fp32.
x is converted to fp32 and zero-padded to a multiple of 8 columns (the bitmask kernels read x 8 columns
per mask byte); accumulation is fp32 whatever the values' dtype. Work is split over output rows on
``torch.get_num_threads()`` threads (OpenMP). ``simd=False`` forces the portable scalar C path.
"""

from __future__ import annotations

import torch

from sparsekit.kernels.cpu_build import load_library

__all__ = ["bitmask_matmul", "csr_matmul", "bitmask_to_dense", "VALUE_CODES", "INDEX_CODES", "backend"]

VALUE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INDEX_CODES = {torch.int32: 0, torch.uint16: 1}
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def backend() -> str:
    """``"c-avx2"``, ``"c-scalar"`` or ``"torch"`` (no compiler): what the CPU kernels run on."""
    lib = load_library()
    if lib is None:
        return "torch"
    return "c-avx2" if lib.simd else "c-scalar"


def check_x(x: torch.Tensor, cols: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != cols:
        raise ValueError(f"{name} must be [batch, {cols}] (in_features={cols}), got shape {tuple(x.shape)}")
    if x.dtype not in X_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous())")
    if x.device.type != "cpu":
        raise ValueError(f"{name} is on {x.device}; the CPU kernels need CPU tensors")


def _padded_fp32(x: torch.Tensor, cols_padded: int) -> torch.Tensor:
    if x.dtype == torch.float32 and x.shape[1] == cols_padded:
        return x
    out = torch.zeros(x.shape[0], cols_padded, dtype=torch.float32)
    out[:, : x.shape[1]] = x
    return out


def _use_simd(lib, simd: bool | None) -> int:
    return int(lib.simd if simd is None else (simd and lib.simd))


def bitmask_matmul(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor,
                   row_offsets: torch.Tensor | None, cols: int, simd: bool | None = None) -> torch.Tensor:
    """``x [B, cols]`` times the bitmask weight ``[rows, cols]`` transposed -> ``[B, rows]`` fp32.

    ``row_offsets=None`` means every row keeps ``values.numel() / rows`` values (the N:M format).
    """
    check_x(x, cols)
    rows, bytes_per_row = bitmask.shape
    lib = load_library()
    if lib is None:
        return x.float() @ _bitmask_to_dense_torch(bitmask, values, row_offsets, cols).float().T
    xp = _padded_fp32(x, 8 * bytes_per_row)
    y = torch.empty(x.shape[0], rows, dtype=torch.float32)
    stride = 0 if row_offsets is not None else (values.numel() // rows if rows else 0)
    lib.sk_bitmask_matmul(bitmask.data_ptr(), bytes_per_row, values.data_ptr(), VALUE_CODES[values.dtype],
                          row_offsets.data_ptr() if row_offsets is not None else None, stride, values.numel(),
                          rows, xp.data_ptr(), x.shape[0], xp.shape[1], y.data_ptr(), torch.get_num_threads(),
                          _use_simd(lib, simd))
    return y


def csr_matmul(x: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, cols: int,
               simd: bool | None = None) -> torch.Tensor:
    """``x [B, cols]`` times the CSR weight transposed -> ``[B, rows]`` fp32."""
    check_x(x, cols)
    rows = indptr.numel() - 1
    lib = load_library()
    if lib is None:
        dense = torch.zeros(rows, cols, dtype=torch.float32)
        counts = indptr[1:] - indptr[:-1]
        dense[torch.repeat_interleave(torch.arange(rows), counts), indices.to(torch.int64)] = values.float()
        return x.float() @ dense.T
    xp = _padded_fp32(x, cols)
    y = torch.empty(x.shape[0], rows, dtype=torch.float32)
    lib.sk_csr_matmul(indptr.data_ptr(), indices.data_ptr(), INDEX_CODES[indices.dtype], values.data_ptr(),
                      VALUE_CODES[values.dtype], rows, cols, xp.data_ptr(), x.shape[0], xp.shape[1],
                      y.data_ptr(), torch.get_num_threads(), _use_simd(lib, simd))
    return y


def _bitmask_to_dense_torch(bitmask, values, row_offsets, cols) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    mask = ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(bitmask.shape[0], -1)[:, :cols].bool()
    dense = torch.zeros(bitmask.shape[0], cols, dtype=values.dtype)
    dense[mask] = values.reshape(-1)
    return dense


def bitmask_to_dense(bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor | None, cols: int,
                     simd: bool | None = None) -> torch.Tensor:
    """The dense ``[rows, cols]`` weight in the values' dtype (the fast path behind the dense fallback)."""
    lib = load_library()
    if lib is None:
        return _bitmask_to_dense_torch(bitmask, values, row_offsets, cols)
    rows, bytes_per_row = bitmask.shape
    out = torch.empty(rows, cols, dtype=values.dtype)
    stride = 0 if row_offsets is not None else (values.numel() // rows if rows else 0)
    offsets = row_offsets.data_ptr() if row_offsets is not None else None
    lib.sk_bitmask_to_dense(bitmask.data_ptr(), bytes_per_row, values.data_ptr(), VALUE_CODES[values.dtype],
                            offsets, stride, values.numel(), rows, cols, out.data_ptr(),
                            torch.get_num_threads(), _use_simd(lib, simd))
    return out
