"""Wanda (Sun et al., 2023): prune by weight magnitude times input activation norm.

The score of weight ``W_ij`` is ``|W_ij| · ‖X_j‖₂ = |W_ij| · sqrt(Σ_tokens x_j²)``; the lowest scores are
pruned within each output row (unstructured, exact per row) or within each group of ``m`` consecutive
inputs of a row (``n:m``). The kept weights are not updated.
"""

from __future__ import annotations

import torch

from sparsekit import _validate
from sparsekit.prune.magnitude import mask_from_scores

__all__ = ["wanda_prune"]


def wanda_prune(W: torch.Tensor, act_sq_norm: torch.Tensor, sparsity: float = 0.5,
                nm=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` ``[out, in]`` given ``act_sq_norm`` ``[in]`` = ``Σ x²`` over calibration tokens.

    Returns ``(W ⊙ mask, mask)`` with ``mask`` bool ``[out, in]``, True = kept; ``nm=(n, m)`` overrides
    ``sparsity``; ``round(sparsity · in)`` weights are pruned per row (the reference prunes
    ``int(sparsity · in)``). Raises ``TypeError`` for a non-tensor ``W`` or ``act_sq_norm``, ``ValueError``
    for a wrong shape, NaN/Inf in ``W``, or NaN/Inf or negative ``act_sq_norm``.
    """
    _validate.tensor(W, "W", dim=2, what="a 2-D tensor [out, in]")
    _validate.tensor(act_sq_norm, "act_sq_norm", shape=(W.shape[1],),
                     what=f"a [{W.shape[1]}] tensor (Σ x² per input of W {tuple(W.shape)})")
    act = act_sq_norm.detach().to(device=W.device, dtype=torch.float32)
    if not torch.isfinite(act).all() or (act < 0).any():
        raise ValueError("act_sq_norm must be finite and >= 0 (a sum of squares); got "
                         f"{int((~torch.isfinite(act)).sum())} NaN/Inf and {int((act < 0).sum())} negative")
    if not torch.isfinite(W).all():
        raise ValueError(f"W must be finite; got {int((~torch.isfinite(W)).sum())} NaN/Inf weights, "
                         "refusing to prune it")
    scores = W.detach().abs().float() * act.sqrt()[None, :]
    mask = mask_from_scores(scores, sparsity, nm)
    return W * mask, mask
