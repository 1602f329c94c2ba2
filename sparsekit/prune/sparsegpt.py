"""SparseGPT (Frantar & Alistarh, 2023): prune a layer and compensate the error with the inverse Hessian.

For a Linear layer ``y = W x`` and calibration inputs ``x``, the layer-wise objective is
``‖W X − Ŵ X‖²`` whose Hessian (per output row) is ``H = 2/n Σ x xᵀ``. The solver:

1. dead inputs (``H_jj = 0``, never active) get ``W[:, j] = 0`` and ``H_jj = 1``;
2. dampening: ``H += percdamp · mean(diag H) · I``;
3. ``U = chol(H⁻¹)ᵀ``, the upper Cholesky factor of the inverse (its rows are the OBS update directions);
4. for each block of ``blocksize`` columns, choose the mask from the score ``w² / U_jj²``
   (unstructured: the ``sparsity`` fraction of lowest scores of the whole block, all rows together;
   ``n:m``: per row, the ``m − n`` lowest of every group of ``m``, chosen when the loop reaches the group);
   then column by column ``q = mask ⊙ w`` (then ``quantizer``), ``err = (w − q) / U_jj``,
   ``W[:, j:] −= err · U[j, j:]`` inside the block;
5. after the block, the lazy update ``W[:, end:] −= Err · U[block, end:]``.

All rows are processed at once (the loop is over the columns of a block only). Internally the weight is
held transposed, ``[in, out]``, so that a column of ``W`` is a contiguous row.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from sparsekit import _validate

__all__ = ["sparsegpt_prune", "inverse_hessian_factor", "HessianError", "Quantizer"]

Quantizer = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
"""``quantizer(column, index, weight) -> quantized column``.

* ``column``: float32 ``[out]``, column ``index`` of the working weight after the mask is applied
  (pruned entries are 0);
* ``index``: the column's position in ``W`` (``0 <= index < in``), e.g. to pick a quantization group;
* ``weight``: the float32 working weight ``[out, in]`` (read only): columns ``< index`` hold their final
  values, columns ``>= index`` their current error-compensated values (columns after the current block
  still wait for that block's lazy update, as in the reference). A group-wise quantizer (GPTQ) fits the
  per-row scales of a group on ``weight[:, index:index + groupsize]`` when ``index % groupsize == 0``.

It returns the quantized ``[out]`` column; its error is compensated like the pruning error. Entries
that the mask pruned are forced back to 0 afterwards, so the mask always survives quantization.
"""

MAX_PERCDAMP = 10.0  # beyond this the solver is effectively magnitude pruning: fail instead


class HessianError(ValueError):
    """The Hessian statistics of a layer are unusable (NaN/Inf, negative diagonal, not positive definite)."""


def _check_finite(tensor: torch.Tensor, what: str, name: str) -> None:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise HessianError(f"{what} of layer {name!r} has {bad} NaN/Inf entries; refusing to prune it")


def inverse_hessian_factor(H: torch.Tensor, percdamp: float = 0.01, name: str = "layer") -> torch.Tensor:
    """``U = chol((H + λ·mean(diag H)·I)⁻¹)ᵀ``, the upper Cholesky factor of the damped inverse Hessian.

    ``H`` is float32 ``[in, in]`` without dead inputs (positive diagonal). When a factorisation fails
    (``H`` not positive definite: tiny or duplicated calibration data, overflow), the dampening is
    retried ×10 (from 0.01 when ``percdamp`` is 0) up to ``MAX_PERCDAMP``, with a warning; then
    :class:`HessianError` names the layer.
    """
    scale = float(torch.diagonal(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = percdamp
    while True:
        lower, info = torch.linalg.cholesky_ex(H + (damp * scale) * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                if damp != percdamp:
                    warnings.warn(f"SparseGPT: H of layer {name!r} is not positive definite with "
                                  f"percdamp={percdamp}; used percdamp={damp:g}", stacklevel=3)
                return upper
        if (0.01 if damp == 0 else damp * 10) > MAX_PERCDAMP * (1 + 1e-9):
            raise HessianError(
                f"H of layer {name!r} is not positive definite even with dampening "
                f"{damp:g}·mean(diag H); its calibration statistics are broken "
                "(too few or duplicated calibration inputs, overflow in low precision?)"
            )
        damp = 0.01 if damp == 0 else damp * 10


def _check_arguments(W, H, sparsity, nm, blocksize, percdamp, quantizer):
    """The arguments of :func:`sparsegpt_prune`, checked and normalised."""
    _validate.tensor(W, "W", dim=2, what="a 2-D tensor [out, in]")
    cols = W.shape[1]
    _validate.tensor(H, "H", shape=(cols, cols),
                     what=f"a [{cols}, {cols}] tensor (in × in of W {tuple(W.shape)})")
    sparsity = _validate.sparsity(sparsity)
    if quantizer is not None and not callable(quantizer):
        raise TypeError(f"quantizer must be callable (column, index, weight) -> column or None, "
                        f"got {type(quantizer).__name__}")
    return (sparsity, *solver_options(blocksize, percdamp, nm, cols))


def solver_options(blocksize, percdamp, nm=None, in_features: int | None = None):
    """Check SparseGPT's ``blocksize`` (an int >= 1, a multiple of ``m`` for ``n:m``) and ``percdamp``
    (a finite number >= 0); return ``(blocksize, percdamp, (n, m) or None)`` as Python numbers."""
    blocksize = _validate.integer(blocksize, "blocksize", low=1)
    percdamp = _validate.real(percdamp, "percdamp", low=0.0,
                              allowed="a finite number >= 0 (the dampening fraction)")
    if nm is None:
        return blocksize, percdamp, None
    n, m = _validate.nm_pair(nm, "nm", in_features=in_features)
    if blocksize % m:
        raise ValueError(f"blocksize must be a multiple of m={m} for nm={n}:{m}, got blocksize={blocksize}")
    return blocksize, percdamp, (n, m)


def _block_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of a block ``[count, out]``: the ``round(sparsity · numel)`` lowest scores pruned."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    k = int(round(sparsity * scores.numel()))
    if k:
        keep[torch.sort(scores.flatten(), stable=True).indices[:k]] = False
    return keep.view_as(scores)


def _group_mask(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Keep-mask of one ``n:m`` group ``[m, out]``: per output, the ``m − n`` lowest scores pruned."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(0, torch.sort(scores, dim=0, stable=True).indices[: scores.shape[0] - n], False)
    return keep


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    nm=None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    quantizer: Quantizer | None = None,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` ``[out, in]`` with SparseGPT given ``H = 2/n Σ x xᵀ`` ``[in, in]``.

    Returns ``(W_pruned, mask)``: ``W_pruned`` in ``W``'s dtype and device, ``mask`` bool ``[out, in]``,
    True = kept, ``W_pruned == 0`` wherever ``mask`` is False. Unstructured sparsity is exact per block
    of ``blocksize`` columns: ``round(sparsity · out · count)`` weights of a block of ``count`` columns
    are pruned (the reference code prunes the scores ``<=`` the ``int(sparsity · numel)``-th smallest,
    i.e. ``int(sparsity · numel) + 1`` when that score is unique). ``nm=(n, m)`` (overrides ``sparsity``)
    *keeps* n of every m inputs of a row; the reference's ``prunen:prunem`` *prunes* ``prunen``.
    Dead inputs are zeroed in ``W_pruned`` whatever the mask says. ``quantizer``: see :data:`Quantizer`.
    ``name`` labels the layer in errors. Raises :class:`HessianError` (a ``ValueError``) for NaN/Inf in
    ``W`` or ``H``, a negative diagonal of ``H``, or an ``H`` that dampening cannot make positive definite.
    """
    sparsity, blocksize, percdamp, nm_pair = _check_arguments(W, H, sparsity, nm, blocksize, percdamp,
                                                              quantizer)
    _check_finite(W, "W", name)
    _check_finite(H, "H", name)
    H = H.detach().to(device=W.device, dtype=torch.float32, copy=True)
    diag = torch.diagonal(H)
    if (diag < 0).any():
        raise HessianError(f"H of layer {name!r} has negative diagonal entries; H = 2/n Σ x xᵀ cannot")
    Wt = W.detach().t().to(torch.float32, copy=True).contiguous()  # [in, out]: column j of W is row j
    dead = diag == 0
    H[dead, dead] = 1.0
    Wt[dead] = 0.0
    U = inverse_hessian_factor(H, percdamp, name)
    keep_t = torch.ones_like(Wt, dtype=torch.bool)
    cols = Wt.shape[0]
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        errors = _prune_block(Wt, U, keep_t, start, end, sparsity, nm_pair, quantizer)
        if end < cols:
            Wt[end:].addmm_(U[start:end, end:].t(), errors, alpha=-1.0)
    return Wt.t().to(W.dtype).contiguous(), keep_t.t().contiguous()


def _prune_block(Wt, U, keep_t, start, end, sparsity, nm_pair, quantizer) -> torch.Tensor:
    """Prune rows ``start:end`` of ``Wt`` in place; return the scaled errors ``[count, out]``."""
    block = Wt[start:end]  # a view: updates land in Wt
    U_block = U[start:end, start:end]
    d = torch.diagonal(U_block)
    keep = keep_t[start:end]
    if nm_pair is None:
        keep.copy_(_block_mask(block.square() / d.square()[:, None], sparsity))
    errors = torch.empty_like(block)
    for i in range(end - start):
        if nm_pair is not None and i % nm_pair[1] == 0:
            group = slice(i, i + nm_pair[1])
            keep[group] = _group_mask(block[group].square() / d[group].square()[:, None], nm_pair[0])
        w = block[i]
        q = w * keep[i]
        if quantizer is not None:
            q = quantizer(q, start + i, Wt.t()).to(torch.float32) * keep[i]
        err = (w - q) / d[i]
        block[i:].addr_(U_block[i, i:], err, alpha=-1.0)
        block[i] = q  # exact, instead of w − err·U_ii up to rounding
        errors[i] = err
    return errors
