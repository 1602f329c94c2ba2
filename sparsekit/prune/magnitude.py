"""Magnitude pruning: keep the largest ``|W_ij|``.

Two thresholds, for unstructured sparsity ``s`` of a weight ``[out, in]``:

* ``scope="row"`` (the default): in each output row the ``round(s · in)`` smallest-magnitude weights are
  zeroed, so every row has exactly the same sparsity (as Wanda does);
* ``scope="layer"``: one threshold for the whole layer, the ``round(s · out · in)`` smallest magnitudes
  of the layer are zeroed, so rows end up with different sparsities. This is the magnitude baseline of
  both SparseGPT's and Wanda's papers and code (theirs zeroes ``|W| <= sort(|W|)[int(s · out · in)]``, one
  more weight when that value is unique; we zero exactly ``round(s · numel)``).

``n:m``: in each group of ``m`` consecutive inputs of a row, the ``m - n`` smallest are zeroed (``nm=(n, m)``
keeps ``n``; the references' ``prunen`` is the number *pruned*, ``m - n``).
"""

from __future__ import annotations

import torch

from sparsekit import _validate

__all__ = ["magnitude_prune", "mask_from_scores", "SCOPES"]

SCOPES = ("row", "layer")


def mask_from_scores(scores: torch.Tensor, sparsity: float = 0.0, nm=None,
                     scope: str = "row") -> torch.Tensor:
    """Boolean keep-mask from importance ``scores`` ``[out, in]``: the lowest scores are pruned.

    Unstructured, ``scope="row"``: per row, exactly ``round(sparsity · in)`` entries pruned;
    ``scope="layer"``: exactly ``round(sparsity · out · in)`` entries of the whole matrix pruned.
    ``nm=(n, m)`` (overrides ``sparsity`` and ``scope``): per row, the ``m - n`` lowest of every ``m``
    consecutive columns pruned. Ties are broken by position (``torch.sort`` is stable), so the result is
    deterministic. NaN scores are refused (they would sort as the largest and always be kept).
    """
    _validate.tensor(scores, "scores", dim=2, what="a 2-D tensor [out, in]")
    _validate.choice(scope, "scope", SCOPES)
    if torch.isnan(scores).any():
        raise ValueError(f"scores must not be NaN; got {int(torch.isnan(scores).sum())} NaN entries "
                         "(a NaN weight or statistic would always be kept)")
    rows, cols = scores.shape
    mask = torch.ones_like(scores, dtype=torch.bool)
    if nm is not None:
        n, m = _validate.nm_pair(nm, "nm", in_features=cols)
        groups = scores.reshape(rows, cols // m, m)
        pruned = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]
        mask.view(rows, cols // m, m).scatter_(-1, pruned, False)
        return mask
    sparsity = _validate.sparsity(sparsity)
    if scope == "layer":
        k = int(round(sparsity * scores.numel()))
        if k:
            mask.view(-1)[torch.sort(scores.flatten(), stable=True).indices[:k]] = False
        return mask
    k = int(round(sparsity * cols))
    if k:
        pruned = torch.sort(scores, dim=-1, stable=True).indices[:, :k]
        mask.scatter_(-1, pruned, False)
    return mask


def magnitude_prune(W: torch.Tensor, sparsity: float = 0.5, nm=None,
                    scope: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` ``[out, in]`` by magnitude; returns ``(W ⊙ mask, mask)`` with ``mask`` True = kept.

    ``scope``: ``"row"`` (``round(sparsity · in)`` zeros in every row) or ``"layer"`` (one threshold,
    ``round(sparsity · out · in)`` zeros in the layer: the papers' baseline). ``nm=(n, m)`` keeps ``n`` of
    every ``m`` consecutive inputs and overrides ``sparsity`` (``n:m`` implies ``1 - n/m``). Raises
    ``TypeError`` for a non-tensor ``W``, ``ValueError`` for a wrong shape or NaN/Inf weights.
    """
    _validate.tensor(W, "W", dim=2, what="a 2-D tensor [out, in]")
    if not torch.isfinite(W).all():  # as wanda and sparsegpt: a pruned model never keeps a NaN/Inf weight
        raise ValueError(f"W must be finite; got {int((~torch.isfinite(W)).sum())} NaN/Inf weights of "
                         f"{W.numel()} (they would sort as the largest and be kept)")
    mask = mask_from_scores(W.detach().abs().float(), sparsity, nm, scope)
    return W * mask, mask
