"""Triton kernel for ``y = x Wᵀ`` with W in the bitmask format (unstructured sparsity), fp16/bf16/int8/int4.

The GPU tiling (:class:`BitmaskTiles`) is :class:`~sparsekit.formats.BitmaskWeight` as stored (the packed
keep-bits ``[rows, ceil(cols/8)]`` and the value stream, row-major) plus one int32 per row and tile of
``tile_k`` columns: ``tile_offsets[r, t]`` = the stream position of row r's first kept value in columns
``[t·tile_k, (t+1)·tile_k)``, i.e. ``row_offsets[r] + popcount(keep[r, :t·tile_k])``. With it any program
can start at any tile (split-K) without counting the bits before it; it costs ``4 / tile_k`` bytes per
weight (1/32 B at ``tile_k = 128``, next to the mask's 1/8 B). For int4 values positions count nibbles.
The kernel expands each tile on chip (:mod:`sparsekit.kernels.triton_expand`).
"""

from __future__ import annotations

from dataclasses import dataclass

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

__all__ = ["BitmaskTiles", "bitmask_matmul", "bitmask_linear", "TILE_KS", "CONFIGS"]

TILE_KS = (32, 64, 128, 256)
CONFIGS = configs_for(with_block_k=False)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


@dataclass
class BitmaskTiles:
    """A bitmask weight laid out for the Triton kernel (module docstring). Build with :meth:`from_weight`."""

    shape: tuple[int, int]
    bitmask: torch.Tensor       # uint8 [rows, ceil(cols/8)]
    values: torch.Tensor        # fp16/bf16 [nnz] | int8 [nnz] | uint8 [ceil(nnz/2)]
    tile_offsets: torch.Tensor  # int32 [rows, ceil(cols/tile_k)]
    tile_k: int
    nnz: int                    # kept weights
    quant: Quant | None = None

    @classmethod
    def from_weight(cls, weight, tile_k: int = 128) -> BitmaskTiles:
        """The tiling of a :class:`~sparsekit.formats.BitmaskWeight` (float, or quantized with ``.bits``,
        ``.group_size``, ``.scales``); the parts are shared, only ``tile_offsets`` is new."""
        for part in ("bitmask", "values", "row_offsets"):
            if not isinstance(getattr(weight, part, None), torch.Tensor):
                raise TypeError(f"weight must be a BitmaskWeight (parts bitmask, values, row_offsets), got "
                                f"{type(weight).__name__}")
        return cls.from_parts(weight.shape, weight.bitmask, weight.values, weight.row_offsets, tile_k,
                              quant_of(weight))

    @classmethod
    def from_parts(cls, shape, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                   tile_k: int = 128, quant: Quant | None = None) -> BitmaskTiles:
        """From the raw parts of the bitmask format (``row_offsets [rows+1]`` int64)."""
        if tile_k not in TILE_KS:
            raise ValueError(f"tile_k must be one of {TILE_KS}, got {tile_k!r}")
        rows, cols = shape
        if int(row_offsets[-1]) >= 2**31:
            raise ValueError(f"the weight keeps {int(row_offsets[-1])} values; int32 tile offsets need "
                             "fewer than 2**31")
        n_tiles = -(-cols // tile_k)
        per_byte = _POPCOUNT.to(bitmask.device)[bitmask.long()]
        padded = torch.zeros(rows, n_tiles * tile_k // 8, dtype=torch.int32, device=bitmask.device)
        padded[:, :per_byte.shape[1]] = per_byte
        per_tile = padded.view(rows, n_tiles, tile_k // 8).sum(-1)
        before = torch.cumsum(per_tile, dim=1) - per_tile
        tile_offsets = (row_offsets[:-1, None] + before).to(torch.int32).contiguous()
        tiles = cls((rows, cols), bitmask, values, tile_offsets, tile_k, int(row_offsets[-1]), quant)
        tiles.validate()
        return tiles

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams: mask, values, tile offsets and scales."""
        parts = [self.bitmask, self.values, self.tile_offsets] + ([self.quant.scales] if self.quant else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def validate(self) -> None:
        rows, cols = self.shape
        if self.bitmask.dtype != torch.uint8 or tuple(self.bitmask.shape) != (rows, -(-cols // 8)):
            raise ValueError(f"bitmask must be uint8 of shape {(rows, -(-cols // 8))}, got "
                             f"{self.bitmask.dtype} {tuple(self.bitmask.shape)}")
        check_quant(self.quant, self.values, rows, cols)
        n_tiles = -(-cols // self.tile_k)
        if self.tile_offsets.dtype != torch.int32 or tuple(self.tile_offsets.shape) != (rows, n_tiles):
            raise ValueError(f"tile_offsets must be int32 of shape {(rows, n_tiles)}, got "
                             f"{self.tile_offsets.dtype} {tuple(self.tile_offsets.shape)}")
        nnz = self.nnz
        need = -(-nnz // 2) if self.quant is not None and self.quant.bits == 4 else nnz
        if self.values.dim() != 1 or self.values.numel() != need:
            raise ValueError(f"values must be 1-D with {need} entries for {nnz} kept weights, got "
                             f"{tuple(self.values.shape)}")
        for name in ("bitmask", "values", "tile_offsets"):
            tensor = getattr(self, name)
            if tensor.device != self.bitmask.device or not tensor.is_contiguous():
                raise ValueError(f"{name} must be contiguous and on the bitmask's device")


@triton.jit
def _bitmask_kernel(x_ptr, bits_ptr, values_ptr, offsets_ptr, scales_ptr, y_ptr,
                    M, N, K, M_BUCKET, row_bytes, n_tiles, n_groups,
                    BLOCK_K: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                    DOT_FP32: tl.constexpr):
    """``y[M, N] (+)= x[M, K] · Wᵀ`` for one (BLOCK_M, BLOCK_N) tile and the K tiles ``pid_k::SPLIT_K``."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k, n_tiles, SPLIT_K):
        cols = t * BLOCK_K + rk
        keep = load_keep(bits_ptr, rn, cols, N, K, row_bytes)
        start = tl.load(offsets_ptr + rn * n_tiles + t, mask=rn < N, other=0)
        j = start[:, None] + tl.cumsum(keep, axis=1) - keep
        w = load_weight(values_ptr, 0, j, keep, scales_ptr, rn, cols, n_groups, GROUP_SIZE, BITS)
        x = tl.load(x_ptr + rm[:, None] * K + cols[None, :], mask=(rm < M)[:, None] & (cols < K)[None, :],
                    other=0.0)
        acc = accumulate(acc, x, w, BLOCK_M >= 16, DOT_FP32)
    store_tile(y_ptr, acc, rm, rn, M, N, SPLIT_K)


_bitmask_tuned = autotuned(_bitmask_kernel, CONFIGS,
                           key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "BLOCK_K"])


def bitmask_matmul(x: torch.Tensor, tiles: BitmaskTiles, config: triton.Config | None = None) -> torch.Tensor:
    """``y = x Wᵀ`` ``[M, rows]`` in x's dtype (fp32 accumulation); ``x [M, cols]`` fp16/bf16.

    ``config`` fixes the tile configuration (else autotuned on a GPU; see
    :mod:`sparsekit.kernels.triton_launch`).
    """
    if not isinstance(tiles, BitmaskTiles):
        raise TypeError(f"tiles must be a BitmaskTiles (BitmaskTiles.from_weight(w)), got "
                        f"{type(tiles).__name__}")
    rows, cols = tiles.shape
    x = check_x(x, cols, tiles.bitmask.device)
    bits, group = check_quant(tiles.quant, tiles.values, rows, cols)
    M = x.shape[0]
    y = torch.zeros(M, rows, dtype=torch.float32, device=x.device)
    if M == 0 or rows == 0:
        return y.to(x.dtype)
    scales = tiles.quant.scales if tiles.quant is not None else tiles.values
    args = (x, tiles.bitmask, tiles.values, tiles.tile_offsets, scales, y, M, rows, cols,
            triton.next_power_of_2(M), tiles.bitmask.shape[1], tiles.tile_offsets.shape[1], cols // group)
    meta = {"BLOCK_K": tiles.tile_k, "BITS": bits, "GROUP_SIZE": group}
    launch(_bitmask_kernel, _bitmask_tuned, args, meta, M, rows, CONFIGS, config)
    return y.to(x.dtype)


def bitmask_linear(x: torch.Tensor, weight, tile_k: int = 128) -> torch.Tensor:
    """``y = x Wᵀ`` for a :class:`~sparsekit.formats.BitmaskWeight` (tiled on each call: cache the
    :class:`BitmaskTiles` and call :func:`bitmask_matmul` in a loop)."""
    return bitmask_matmul(x, BitmaskTiles.from_weight(weight, tile_k))
