"""Magnitude pruning: keep the largest ``|W_ij|``.

Unstructured: in each output row, the ``round(sparsity · in)`` smallest-magnitude weights are zeroed,
so every row has exactly the same sparsity. ``n:m``: in each group of ``m`` consecutive inputs of a
row, the ``m - n`` smallest are zeroed.
"""

from __future__ import annotations

import torch

from sparsekit.masks import validate_nm, validate_sparsity

__all__ = ["magnitude_prune", "mask_from_scores"]


def mask_from_scores(scores: torch.Tensor, sparsity: float = 0.0, nm=None) -> torch.Tensor:
    """Boolean keep-mask from importance ``scores`` ``[out, in]``: the lowest scores are pruned.

    Unstructured: per row, exactly ``round(sparsity · in)`` entries pruned. ``nm=(n, m)``: per row,
    the ``m - n`` lowest of every ``m`` consecutive columns pruned. Ties are broken by position
    (``torch.sort`` is stable), so the result is deterministic.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    mask = torch.ones_like(scores, dtype=torch.bool)
    if nm is not None:
        n, m = validate_nm(nm, cols)
        groups = scores.reshape(rows, cols // m, m)
        pruned = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]
        mask.view(rows, cols // m, m).scatter_(-1, pruned, False)
        return mask
    k = int(round(validate_sparsity(sparsity) * cols))
    if k:
        pruned = torch.sort(scores, dim=-1, stable=True).indices[:, :k]
        mask.scatter_(-1, pruned, False)
    return mask


def magnitude_prune(W: torch.Tensor, sparsity: float = 0.5, nm=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` ``[out, in]`` by magnitude; returns ``(W ⊙ mask, mask)`` with ``mask`` True = kept.

    ``nm`` overrides ``sparsity`` (``n:m`` implies ``1 - n/m``).
    """
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"W must be a 2-D tensor [out, in], got {getattr(W, 'shape', type(W))}")
    mask = mask_from_scores(W.detach().abs().float(), sparsity, nm)
    return W * mask, mask
