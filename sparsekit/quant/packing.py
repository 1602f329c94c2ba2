"""Two int4 codes per byte: two's complement nibbles, low nibble first.

``pack_int4(q)`` for int8 codes ``q`` in ``[−8, 7]`` along the last dimension (length ``k``) returns uint8
``[..., ceil(k/2)]`` with byte ``j`` = ``(q[2j] & 0xF) | (q[2j+1] & 0xF) << 4``; an odd ``k`` is padded with
a 0 nibble. ``unpack_int4(packed, k)`` inverts it (sign-extending each nibble). This is the layout of the
int4 ``values`` of :class:`~sparsekit.formats.BitmaskWeight` and :class:`~sparsekit.formats.NMWeight`.
"""

from __future__ import annotations

import torch

__all__ = ["pack_int4", "unpack_int4", "INT4_MIN", "INT4_MAX"]

INT4_MIN, INT4_MAX = -8, 7


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 ``[..., k]`` in ``[−8, 7]`` -> uint8 ``[..., ceil(k/2)]``, low nibble first, pad nibble 0."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        raise TypeError(f"q must be an int8 tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError(f"int4 codes must lie in [{INT4_MIN}, {INT4_MAX}], "
                         f"got [{int(q.min())}, {int(q.max())}]")
    k = q.shape[-1]
    nibbles = torch.zeros(*q.shape[:-1], k + k % 2, dtype=torch.uint8, device=q.device)
    nibbles[..., :k] = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 ``[..., ceil(k/2)]`` -> int8 ``[..., k]`` (inverse of :func:`pack_int4`)."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        kind = getattr(packed, "dtype", type(packed).__name__)
        raise TypeError(f"packed must be a uint8 tensor, got {kind}")
    if packed.shape[-1] != -(-k // 2):
        raise ValueError(f"packed holds {packed.shape[-1]} bytes per row, but k={k} codes need {-(-k // 2)}")
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)[..., :k]
    return (nibbles.to(torch.int8) ^ 8) - 8  # sign-extend: 0..7 stay, 8..15 become −8..−1
