"""Triton kernel for ``y = x Wᵀ`` with W in the N:M format (2:4, 4:8, 16:32, ...), fp16/bf16/int8/int4.

It reads :class:`~sparsekit.formats.NMWeight` as stored: the compact values ``[rows, cols·n/m]`` and the
per-group occupancy bits (``m`` bits per group of ``m`` inputs). No offsets are needed: every group keeps
exactly ``n``, so a tile of ``BLOCK_K`` columns (a multiple of ``m``) starting at column ``k0`` begins at
value ``k0·n/m`` of its row, and the kept weight at column ``c`` of the tile is value
``k0·n/m + Σ_{k0 <= c' < c} keep[c']``. The kernel expands the tile on chip
(:mod:`sparsekit.kernels.triton_expand`). Quantized values follow the shared spec: int8 in the same
layout, or int4 as ``[rows, ceil(cols·n/m / 2)]`` bytes, nibble ``j`` of row r = its j-th kept value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekit.kernels.triton_expand import accumulate, load_keep, load_weight, store_tile
from sparsekit.kernels.triton_launch import (
    Quant,
    autotuned,
    check_quant,
    check_x,
    configs_for,
    launch,
    quant_of,
)

__all__ = ["nm_matmul", "nm_linear", "CONFIGS"]

CONFIGS = configs_for(with_block_k=True)


@triton.jit
def _nm_kernel(x_ptr, bits_ptr, values_ptr, scales_ptr, y_ptr,
               M, N, K, M_BUCKET, row_bytes, row_stride, n_groups,
               N_KEEP: tl.constexpr, M_GROUP: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
               DOT_FP32: tl.constexpr):
    """``y[M, N] (+)= x[M, K] · Wᵀ`` for one (BLOCK_M, BLOCK_N) tile and the K tiles ``pid_k::SPLIT_K``."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    base = rn[:, None] * row_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        cols = t * BLOCK_K + rk
        keep = load_keep(bits_ptr, rn, cols, N, K, row_bytes)
        j = t * (BLOCK_K // M_GROUP * N_KEEP) + tl.cumsum(keep, axis=1) - keep
        w = load_weight(values_ptr, base, j, keep, scales_ptr, rn, cols, n_groups, GROUP_SIZE, BITS)
        x = tl.load(x_ptr + rm[:, None] * K + cols[None, :], mask=(rm < M)[:, None] & (cols < K)[None, :],
                    other=0.0)
        acc = accumulate(acc, x, w, BLOCK_M >= 16, DOT_FP32)
    store_tile(y_ptr, acc, rm, rn, M, N, SPLIT_K)


_nm_tuned = autotuned(_nm_kernel, CONFIGS,
                      key=["M_BUCKET", "N", "K", "N_KEEP", "M_GROUP", "BITS", "GROUP_SIZE"])


def nm_matmul(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, shape, nm,
              quant: Quant | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """``y = x Wᵀ`` ``[M, rows]`` in x's dtype from the raw N:M parts; ``x [M, cols]`` fp16/bf16.

    ``bitmask`` uint8 ``[rows, ceil(cols/8)]``; ``values`` as in the module docstring; ``nm = (n, m)`` with
    ``m`` a power of two dividing ``cols`` and at most 64. ``config`` fixes the tile configuration.
    """
    rows, cols = shape
    n, m = nm
    if not (0 < n < m <= 64 and m & (m - 1) == 0) or cols % m:
        raise ValueError(f"nm must be (n, m) with 0 < n < m <= 64, m a power of two dividing "
                         f"in_features={cols}, got {nm!r}")
    x = check_x(x, cols, bitmask.device)
    bits, group = check_quant(quant, values, rows, cols)
    per_row = cols * n // m
    stride = -(-per_row // 2) if bits == 4 else per_row
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, -(-cols // 8)):
        raise ValueError(f"bitmask must be uint8 of shape {(rows, -(-cols // 8))}, got {bitmask.dtype} "
                         f"{tuple(bitmask.shape)}")
    if tuple(values.shape) != (rows, stride) or not values.is_contiguous() or values.device != bitmask.device:
        raise ValueError(f"values must be contiguous of shape {(rows, stride)} on the bitmask's device, got "
                         f"{tuple(values.shape)}")
    if config is not None and config.kwargs.get("BLOCK_K", 0) % m:
        raise ValueError(f"config BLOCK_K must be a multiple of m={m}, got {config.kwargs.get('BLOCK_K')}")
    M = x.shape[0]
    y = torch.zeros(M, rows, dtype=torch.float32, device=x.device)
    if M == 0 or rows == 0:
        return y.to(x.dtype)
    scales = quant.scales if quant is not None else values
    args = (x, bitmask, values, scales, y, M, rows, cols, triton.next_power_of_2(M), bitmask.shape[1], stride,
            cols // group)
    launch(_nm_kernel, _nm_tuned, args, {"N_KEEP": n, "M_GROUP": m, "BITS": bits, "GROUP_SIZE": group},
           M, rows, CONFIGS, config)
    return y.to(x.dtype)


def nm_linear(x: torch.Tensor, weight, config: triton.Config | None = None) -> torch.Tensor:
    """``y = x Wᵀ`` for an :class:`~sparsekit.formats.NMWeight` (float, or quantized with ``.bits``,
    ``.group_size``, ``.scales``)."""
    for attr in ("bitmask", "values", "n", "m"):
        if not hasattr(weight, attr):
            raise TypeError(f"weight must be an NMWeight (bitmask, values, n, m), got "
                            f"{type(weight).__name__}")
    return nm_matmul(x, weight.bitmask, weight.values, weight.shape, (weight.n, weight.m), quant_of(weight),
                     config)
