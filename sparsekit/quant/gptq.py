"""GPTQ (Frantar et al., 2023): quantize a layer column by column, compensating each rounding error.

For a Linear layer ``y = W x`` with calibration inputs ``x`` and ``H = 2/n Σ x xᵀ`` ``[in, in]``, GPTQ
minimises ``‖W X − Ŵ X‖²`` over ``Ŵ`` on the quantization grid, greedily in column order. With
``U = chol(H⁻¹)ᵀ`` (upper Cholesky factor of the damped inverse Hessian), for each column ``j``:

    q_j   = quant(w_j)                           (the grid of j's group; masked weights stay 0)
    e_j   = (w_j − q_j) / U_jj
    w_k  −= e_j · U_jk      for every column k > j not yet quantized

(the Optimal Brain Surgeon update restricted to the remaining columns). Updates inside a block of
``blocksize`` columns are applied at once per column; the later columns get one matrix product per block
(lazy batch updates). ``act_order`` visits the columns by decreasing ``H_jj`` (the most active inputs
first, while the most columns remain to absorb their error); its groups are then fitted up front on the
original weight ("static groups") so that group ``g`` still covers inputs ``g·group_size ...``.

Zeros of ``W`` (a pruned weight) stay exactly zero: each column is masked before and after rounding, and
its full error, pruned entries included, is compensated. Dead inputs (``H_jj = 0``) are zeroed, and the
dampening is that of SparseGPT (:func:`sparsekit.prune.sparsegpt.inverse_hessian_factor`: retried ×10
when ``H`` is not positive definite, then :class:`~sparsekit.prune.HessianError`).
"""

from __future__ import annotations

import torch

from sparsekit import _validate
from sparsekit.prune.sparsegpt import HessianError, inverse_hessian_factor
from sparsekit.quant.grid import QuantizedWeight, check_bits, check_group_size
from sparsekit.quant.quantizer import GroupQuantizer
from sparsekit.quant.rtn import check_symmetric, check_weight

__all__ = ["gptq_quantize"]


def _check_options(W, H, blocksize, percdamp, act_order, name) -> None:
    cols = W.shape[1]
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (cols, cols):
        raise ValueError(f"H must be a [{cols}, {cols}] tensor (in × in of W {tuple(W.shape)}), "
                         f"got {getattr(H, 'shape', type(H).__name__)}")
    if not bool(torch.isfinite(H).all()):
        raise HessianError(f"H of layer {name!r} has NaN/Inf entries; refusing to quantize it")
    if bool((torch.diagonal(H) < 0).any()):
        raise HessianError(f"H of layer {name!r} has negative diagonal entries; H = 2/n Σ x xᵀ cannot")
    _validate.integer(blocksize, "blocksize", low=1)
    _validate.real(percdamp, "percdamp", low=0.0, allowed="a finite number >= 0 (dampening, a fraction of "
                   "the mean diagonal of H)")
    if not isinstance(act_order, bool):
        raise TypeError(f"act_order must be a bool, got {type(act_order).__name__}")


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int | None = None,
                  symmetric: bool = True, act_order: bool = False, blocksize: int = 128,
                  percdamp: float = 0.01, name: str = "layer") -> tuple[torch.Tensor, QuantizedWeight]:
    """GPTQ-quantize ``W [out, in]`` to ``bits`` (8 or 4) given ``H = 2/n Σ x xᵀ`` ``[in, in]``.

    ``group_size``: inputs per grid (``None`` = per-channel); ``symmetric``: grid without zero point.
    Returns ``(Ŵ, quantized)``: ``Ŵ`` dequantized in ``W``'s dtype (exactly
    ``quantized.dequantize()`` for float32 ``W``), zero wherever ``W`` is zero or the input is dead.
    ``name`` labels the layer in errors.
    """
    W = check_weight(W)
    bits = check_bits(bits)
    symmetric = check_symmetric(symmetric)
    rows, cols = W.shape
    group_size = check_group_size(group_size, cols)
    _check_options(W, H, blocksize, percdamp, act_order, name)
    H = H.detach().to(device=W.device, dtype=torch.float32, copy=True)
    keep = W != 0
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    keep[:, dead] = False
    quantizer = GroupQuantizer((rows, cols), bits, group_size, symmetric, device=W.device)
    order = torch.arange(cols, device=W.device)
    if act_order:
        order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        quantizer.fit_all(W.float() * keep)
    H = H[order][:, order]
    U = inverse_hessian_factor(H, percdamp, name)
    Wt = (W.float() * keep).t()[order].contiguous()  # [in, out] in visiting order: a column is a row
    keep_t = keep.t()[order].contiguous()
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        errors = _quantize_block(Wt, U, keep_t, order, start, end, quantizer)
        if end < cols:
            Wt[end:].addmm_(U[start:end, end:].t(), errors, alpha=-1.0)
    W_hat = torch.empty_like(Wt)
    W_hat[order] = Wt
    return W_hat.t().to(W.dtype).contiguous(), quantizer.result()


def _quantize_block(Wt, U, keep_t, order, start, end, quantizer) -> torch.Tensor:
    """Quantize rows ``start:end`` of ``Wt`` in place; return the scaled errors ``[count, out]``."""
    block = Wt[start:end]  # a view: updates land in Wt
    U_block = U[start:end, start:end]
    errors = torch.empty_like(block)
    for i in range(end - start):
        j = int(order[start + i])
        w = block[i]
        # The grid of a group not yet fitted is fitted on its current columns, in input order: only
        # reached without act_order, where the visiting order is the input order.
        q = quantizer(w * keep_t[start + i], j, Wt.t()) * keep_t[start + i]
        err = (w - q) / U_block[i, i]
        block[i:].addr_(U_block[i, i:], err, alpha=-1.0)
        block[i] = q
        errors[i] = err
    return errors
