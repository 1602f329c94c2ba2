"""On-chip expansion of a compressed weight tile, shared by the Triton bitmask and N:M kernels.

A kernel program owns the output tile ``y[rm, rn]`` (``BLOCK_M`` rows of x by ``BLOCK_N`` output features)
and walks the input features in tiles of ``BLOCK_K`` columns. For each tile it

1. reads the tile's keep-bits ``keep[n, k]`` from the packed bitmask (bit ``c % 8`` of byte ``c // 8``);
2. numbers the kept positions of each row in column order: ``j[n, k] = start[n] + Σ_{k' < k} keep[n, k']``
   (an exclusive prefix sum), where ``start[n]`` is where row ``n``'s values of this tile begin in the value
   stream (the bitmask kernel reads it from per-tile offsets, the N:M kernel computes it: every group of
   ``m`` holds exactly ``n``);
3. gathers ``W[n, k] = values[j[n, k]]`` where kept and 0 elsewhere, dequantizing int8/int4 values with
   their group scale on the way (``W = q · scales[n, k // group_size]``);
4. accumulates ``acc[m, n] += Σ_k x[m, k] · W[n, k]`` in fp32: ``tl.dot`` (tensor cores) for
   ``BLOCK_M >= 16``, a broadcast multiply-and-sum (FMA) for a single row of x (batch-1 decoding).

Only the compressed bytes cross the memory bus; the dense tile lives in registers/shared memory. Pruned
positions are zeros of the tile, so a NaN or Inf in x meets them as in the dense product (``0 · NaN = NaN``):
the kernels follow the IEEE rule of :mod:`sparsekit.kernels.ops` without a special case.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["load_keep", "load_weight", "accumulate", "store_tile"]


@triton.jit
def load_keep(bits_ptr, rn, cols, N, K, row_bytes):
    """Keep-bits ``[BLOCK_N, BLOCK_K]`` (int32 0/1) of rows ``rn`` and columns ``cols``; 0 outside W."""
    inside = (rn < N)[:, None] & (cols < K)[None, :]
    byte = tl.load(bits_ptr + rn[:, None] * row_bytes + (cols >> 3)[None, :], mask=inside, other=0)
    return (byte.to(tl.int32) >> (cols & 7)[None, :]) & 1


@triton.jit
def load_weight(values_ptr, base, j, keep, scales_ptr, rn, cols, n_groups,
                GROUP_SIZE: tl.constexpr, BITS: tl.constexpr):
    """The dense weight tile: ``values`` at stream position ``base + j`` where kept, else 0.

    ``BITS`` 16: float values (fp16/bf16, or fp32), as stored. 8: int8 ``q``; 4: two ``q`` per byte, low
    nibble first (position ``i`` is byte ``i // 2``); both returned as fp32 ``q · scale`` with
    ``scale = scales[n, col // GROUP_SIZE]``. ``base`` counts storage units (elements, or bytes for int4).
    """
    kept = keep != 0
    if BITS == 4:
        byte = tl.load(values_ptr + base + (j >> 1), mask=kept, other=0).to(tl.int32)
        q = (byte >> ((j & 1) * 4)) & 15
        w = tl.where(q >= 8, q - 16, q).to(tl.float32)  # two's complement nibble
    else:
        w = tl.load(values_ptr + base + j, mask=kept, other=0)
    if BITS < 16:
        group = (cols // GROUP_SIZE)[None, :]
        scale = tl.load(scales_ptr + rn[:, None] * n_groups + group, mask=kept, other=0)
        w = w.to(tl.float32) * scale.to(tl.float32)
    return w


@triton.jit
def accumulate(acc, x, w, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    """``acc[m, n] += Σ_k x[m, k] · w[n, k]`` in fp32.

    ``DOT_FP32`` feeds ``tl.dot`` fp32 operands: only for Triton's CPU interpreter, whose bf16 ``tl.dot``
    is wrong (it multiplies the raw bits); on a GPU the operands stay in x's dtype (tensor cores).
    """
    if USE_DOT:
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    else:
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def store_tile(y_ptr, acc, rm, rn, M, N, SPLIT_K: tl.constexpr):
    """Write the fp32 tile into ``y [M, N]`` (fp32, zeroed when split-K adds partial sums atomically)."""
    inside = (rm < M)[:, None] & (rn < N)[None, :]
    ptrs = y_ptr + rm[:, None] * N + rn[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc, mask=inside)
    else:
        tl.atomic_add(ptrs, acc, mask=inside)
