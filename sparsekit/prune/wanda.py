"""Wanda (Sun et al., 2023): prune by weight magnitude times input activation norm.

The score of weight ``W_ij`` is ``|W_ij| · ‖X_j‖₂ = |W_ij| · sqrt(Σ_tokens x_j²)``; the lowest scores are
pruned within each output row (unstructured, exact per row) or within each group of ``m`` consecutive
inputs of a row (``n:m``). The kept weights are not updated.
"""

from __future__ import annotations

import torch

from sparsekit.prune.magnitude import mask_from_scores

__all__ = ["wanda_prune"]


def wanda_prune(W: torch.Tensor, act_sq_norm: torch.Tensor, sparsity: float = 0.5,
                nm=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` ``[out, in]`` given ``act_sq_norm`` ``[in]`` = ``Σ x²`` over calibration tokens.

    Returns ``(W ⊙ mask, mask)`` with ``mask`` bool ``[out, in]``, True = kept; ``nm=(n, m)`` overrides
    ``sparsity``. Raises ``ValueError`` for a wrong shape, NaN/Inf or negative ``act_sq_norm``.
    """
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"W must be a 2-D tensor [out, in], got {getattr(W, 'shape', type(W))}")
    if not isinstance(act_sq_norm, torch.Tensor) or tuple(act_sq_norm.shape) != (W.shape[1],):
        raise ValueError(f"act_sq_norm must be a [{W.shape[1]}] tensor (Σ x² per input of W "
                         f"{tuple(W.shape)}), got {getattr(act_sq_norm, 'shape', type(act_sq_norm))}")
    act = act_sq_norm.detach().to(device=W.device, dtype=torch.float32)
    if not torch.isfinite(act).all() or (act < 0).any():
        raise ValueError("act_sq_norm must be finite and >= 0 (a sum of squares); got "
                         f"{int((~torch.isfinite(act)).sum())} NaN/Inf and {int((act < 0).sum())} negative")
    if not torch.isfinite(W).all():
        raise ValueError("W has NaN/Inf entries; refusing to prune it")
    scores = W.detach().abs().float() * act.sqrt()[None, :]
    mask = mask_from_scores(scores, sparsity, nm)
    return W * mask, mask
