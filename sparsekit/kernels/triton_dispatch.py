"""``SparseLinear``'s CUDA path: a bitmask or N:M weight (float or quantized) through its Triton kernel.

The bitmask tiling (:class:`~sparsekit.kernels.triton_bitmask.BitmaskTiles`) is built once per weight
object and kept on it, so a module pays the popcount only on its first call.
"""

from __future__ import annotations

import torch

from sparsekit.kernels.triton_bitmask import BitmaskTiles, bitmask_matmul
from sparsekit.kernels.triton_nm import nm_linear

__all__ = ["triton_linear"]


def triton_linear(x: torch.Tensor, weight) -> torch.Tensor:
    """``y = x Wᵀ`` ``[M, rows]`` for a ``BitmaskWeight``/``NMWeight`` (``weight.format``); x fp16/bf16."""
    if weight.format == "nm":
        return nm_linear(x, weight)
    if weight.format == "bitmask":
        tiles = weight.__dict__.get("_triton_tiles")
        if tiles is None or tiles.values is not weight.values:
            tiles = weight.__dict__["_triton_tiles"] = BitmaskTiles.from_weight(weight)
        return bitmask_matmul(x, tiles)
    raise ValueError(f"weight.format must be 'bitmask' or 'nm' for the Triton kernels, got {weight.format!r}")
