"""Reference inputs for checking the Triton kernels (tests, ``kernels/gpu_check.py``, notebook 07).

:func:`quantize_sparse` packs a pruned weight into the shared quantized-value spec by round to nearest
(symmetric, one float16 scale per group of ``group_size`` inputs of a row) and returns the raw parts with
their exact dense meaning, so that the kernels can be checked without any other quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsekit.formats import BitmaskWeight, NMWeight
from sparsekit.prune import magnitude_prune

__all__ = ["QuantizedSparse", "quantize_sparse", "pack_nibbles", "random_sparse", "QMAX"]

QMAX = {8: 127, 4: 7}  # int4 q is in [-8, 7]; symmetric scaling uses [-7, 7]


@dataclass
class QuantizedSparse:
    """Raw parts of a quantized bitmask or N:M weight; the attribute names of the shared spec."""

    format: str                # "bitmask" or "nm"
    shape: tuple[int, int]
    bitmask: torch.Tensor
    values: torch.Tensor       # int8, or uint8 nibble pairs (low nibble first)
    bits: int
    group_size: int
    scales: torch.Tensor       # float16 [rows, cols // group_size]
    row_offsets: torch.Tensor | None = None  # bitmask only
    n: int | None = None       # N:M only
    m: int | None = None

    def to_dense(self) -> torch.Tensor:
        """``W[r, c] = q · scales[r, c // group_size]`` at kept positions, 0 elsewhere (fp32)."""
        rows, cols = self.shape
        mask = _unpack_mask(self.bitmask, cols)
        q = self.values
        if self.bits == 4:
            q = _unpack_nibbles(q.reshape(-1) if self.format == "bitmask" else q)
        if self.format == "bitmask":
            kept = q.reshape(-1)[: int(mask.sum())]
        else:
            kept = q.reshape(rows, -1)[:, : cols * self.n // self.m].reshape(-1)
        dense = torch.zeros(rows, cols, device=self.values.device)
        dense[mask] = kept.float()
        return dense * self.scales.float().repeat_interleave(self.group_size, dim=1)


def _unpack_mask(bits: torch.Tensor, cols: int) -> torch.Tensor:
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits.unsqueeze(-1) >> shifts) & 1).reshape(bits.shape[0], -1)[:, :cols].bool()


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Int ``q [..., L]`` in [-8, 7] -> uint8 ``[..., ceil(L/2)]``, ``q[2i]`` in byte i's low nibble."""
    if q.shape[-1] % 2:
        q = torch.cat([q, torch.zeros_like(q[..., :1])], dim=-1)
    u = (q.to(torch.int16) & 15).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = (packed & 15).to(torch.int8), (packed >> 4).to(torch.int8)
    q = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)
    return torch.where(q >= 8, q - 16, q)


def quantize_sparse(W: torch.Tensor, format: str, bits: int, group_size: int, nm=None) -> QuantizedSparse:
    """Round ``W``'s non-zeros to ``bits``-bit integers with a per-group float16 scale ``max|w| / QMAX``."""
    if bits not in QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    rows, cols = W.shape
    if group_size <= 0 or cols % group_size:
        raise ValueError(f"group_size must divide in_features={cols}, got {group_size!r}")
    groups = W.float().reshape(rows, cols // group_size, group_size)
    scales = (groups.abs().amax(-1) / QMAX[bits]).clamp_min(1e-8).to(torch.float16)
    q = torch.round(groups / scales.float().unsqueeze(-1)).clamp(-QMAX[bits], QMAX[bits]).reshape(rows, cols)
    if format == "bitmask":
        w = BitmaskWeight.from_dense(W)
        kept = q[w.mask()].to(torch.int8)
        values = pack_nibbles(kept) if bits == 4 else kept.contiguous()
        return QuantizedSparse("bitmask", (rows, cols), w.bitmask, values, bits, group_size,
                               scales.contiguous(), row_offsets=w.row_offsets)
    if format == "nm":
        w = NMWeight.from_dense(W, nm=nm)
        kept = q[w.mask()].to(torch.int8).reshape(rows, -1)
        values = pack_nibbles(kept) if bits == 4 else kept.contiguous()
        return QuantizedSparse("nm", (rows, cols), w.bitmask, values, bits, group_size, scales.contiguous(),
                               n=w.n, m=w.m)
    raise ValueError(f"format must be 'bitmask' or 'nm', got {format!r}")


def random_sparse(rows: int, cols: int, sparsity: float = 0.0, nm=None, dtype=torch.float16, device="cpu",
                  seed: int = 0) -> torch.Tensor:
    """A Gaussian ``[rows, cols]`` weight (std ``cols**-0.5``) magnitude-pruned to ``sparsity`` or ``nm``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    W = torch.randn(rows, cols, generator=generator, device=device) / cols ** 0.5
    if nm is not None or sparsity > 0:
        W, _ = magnitude_prune(W, 1 - nm[0] / nm[1] if nm is not None else sparsity, nm=nm)
    return W.to(dtype)
