"""Sparsity masks: validating patterns, accounting for zeros, and keeping masks frozen.

A *mask* is a boolean tensor shaped like the weight it applies to, ``True`` where a weight is kept.
Two kinds of pattern are supported everywhere in sparsekit:

* unstructured sparsity ``s`` (``0 <= s < 1``): a fraction ``s`` of the weights is zero;
* ``n:m`` semi-structured sparsity (``0 < n < m``): of every ``m`` consecutive inputs of a row,
  exactly ``n`` are kept (2:4 keeps half).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from sparsekit import _validate
from sparsekit.blocks import prunable_linears, weight_out_in

__all__ = [
    "validate_sparsity",
    "validate_nm",
    "nm_sparsity",
    "is_nm_mask",
    "sparsity_report",
    "freeze_masks",
    "unfreeze_masks",
    "apply_masks",
    "mask_gradients",
    "layout_mask",
]


def validate_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float after checking ``0 <= sparsity < 1``.

    Any real number is accepted (numpy scalars and 0-d tensors too); ``TypeError`` for non-numbers
    (booleans included), ``ValueError`` naming ``name`` for NaN, infinities or values outside ``[0, 1)``.
    """
    return _validate.sparsity(sparsity, name)


def validate_nm(nm, in_features: int | None = None, name: str = "nm") -> tuple[int, int]:
    """Return ``(n, m)`` as ints after checking ``0 < n < m`` and, if given, ``in_features % m == 0``.

    ``nm=(n, m)`` *keeps* ``n`` of every ``m`` consecutive inputs of a row (2:4 keeps half, 1:4 is 75 %
    sparse). The reference code's ``prunen``/``prunem`` arguments *prune* ``prunen`` of every ``prunem``:
    our ``(n, m)`` is their ``(m - n, m)``. ``TypeError`` when ``nm`` is not a pair of integers,
    ``ValueError`` for a pair outside ``0 < n < m`` or an ``m`` that does not divide ``in_features``.
    """
    return _validate.nm_pair(nm, name, in_features)


def nm_sparsity(nm: tuple[int, int]) -> float:
    """The fraction of zeros that an ``n:m`` pattern implies, ``1 - n/m``."""
    n, m = validate_nm(nm)
    return 1.0 - n / m


def is_nm_mask(mask: torch.Tensor, nm: tuple[int, int]) -> bool:
    """True when every group of ``m`` consecutive inputs of every row keeps at most ``n`` weights."""
    _validate.tensor(mask, "mask", what="a bool tensor [..., in]")
    n, m = validate_nm(nm, mask.shape[-1])
    groups = mask.reshape(*mask.shape[:-1], -1, m)
    return bool((groups.sum(-1) <= n).all())


def sparsity_report(model: nn.Module, targets: Iterable[str] | None = None):
    """A table of zeros per prunable linear layer of ``model``, with an ``overall`` row last.

    Columns: ``layer``, ``shape`` (``[out, in]``, also for transformers' ``Conv1D``, which stores the
    transpose), ``params``, ``zeros``, ``sparsity`` (zeros / params).
    Returns a ``pandas.DataFrame``.
    """
    import pandas as pd

    rows = []
    for name, linear in prunable_linears(model, targets):
        weight = weight_out_in(linear).detach()
        zeros = int((weight == 0).sum())
        rows.append(
            {"layer": name, "shape": tuple(weight.shape), "params": weight.numel(), "zeros": zeros,
             "sparsity": zeros / weight.numel()}
        )
    total = sum(r["params"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    rows.append({"layer": "overall", "shape": None, "params": total, "zeros": zeros,
                 "sparsity": zeros / total if total else 0.0})
    return pd.DataFrame(rows)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor`` (FSDP2's sharded parameters and gradients), else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def layout_mask(module: nn.Module) -> torch.Tensor:
    """``module.weight_mask`` laid out like ``module.weight``: once FSDP has sharded the weight (a
    ``DTensor``), the bool mask is sharded the same way (same device mesh and placements; each rank keeps
    only its own rows) and stored back, so a rank never holds more of a mask than of its weight."""
    mask, weight = module.weight_mask, module.weight
    if isinstance(weight, DTensor) and not isinstance(mask, DTensor):
        # every rank holds the same full mask: each takes its own shard, no communication
        mask = distribute_tensor(mask.to(_local(weight).device), weight.device_mesh, weight.placements,
                                 src_data_rank=None)
        module._buffers["weight_mask"] = mask
    return mask


def _mask_weight(module: nn.Module, _inputs) -> None:
    # Under FSDP the forward sees the all-gathered weight while the mask is sharded: the shards were masked
    # after the last optimizer step, so the gathered weight is already exact; nothing to do then.
    if isinstance(module.weight_mask, DTensor) and not isinstance(module.weight, DTensor):
        return
    with torch.no_grad():
        module.weight.mul_(module.weight_mask)


def _mask_grad(mask: torch.Tensor):
    return lambda grad: grad * mask


def _masked_modules(model: nn.Module):
    return (module for module in model.modules() if "weight_mask" in getattr(module, "_buffers", {}))


def freeze_masks(model: nn.Module, targets: Iterable[str] | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """Fix the current zero pattern of every prunable Linear so that nothing can regrow it.

    For each layer (``nn.Linear`` or transformers' ``Conv1D``), ``mask = weight != 0`` (bool, one byte per
    weight), in the layer's own weight layout (``[in, out]`` for a Conv1D), is stored as the non-persistent
    buffer ``weight_mask`` (so checkpoints keep the familiar keys; zeros are saved as zeros and the mask is
    recovered from them on load). Three guards keep ``W = W ⊙ M``:

    * gradients are multiplied by the mask (Adam moments of pruned weights stay zero);
    * if ``optimizer`` is given, ``W ← W ⊙ M`` after every ``optimizer.step()`` (weight decay,
      momentum from elsewhere);
    * a forward pre-hook re-applies the mask, so outputs never see a regrown weight.

    Under FSDP2 (``fully_shard``) the parameters are replaced by sharded ``DTensor``s, which the gradient
    hook does not see: there :func:`mask_gradients` (after backward) and :func:`apply_masks` (after the
    optimizer step) work on each rank's shard, with the mask sharded like its weight (:func:`layout_mask`).

    Returns ``{layer name: mask}``. Calling it twice replaces the earlier hooks.
    """
    unfreeze_masks(model)
    masks = {}
    for name, linear in prunable_linears(model, targets):
        mask = linear.weight.detach() != 0
        linear.register_buffer("weight_mask", mask, persistent=False)
        linear._sparsekit_hooks = [
            linear.register_forward_pre_hook(_mask_weight),
            linear.weight.register_hook(_mask_grad(linear.weight_mask)),
        ]
        masks[name] = mask
    if optimizer is not None:
        handle = optimizer.register_step_post_hook(lambda *_: apply_masks(model))
        model._sparsekit_optimizer_hook = handle
    return masks


def apply_masks(model: nn.Module) -> None:
    """``W ← W ⊙ M`` for every layer that carries a frozen mask (each rank's own shard under FSDP)."""
    with torch.no_grad():
        for module in _masked_modules(model):
            _local(module.weight).mul_(_local(layout_mask(module)))


def mask_gradients(model: nn.Module) -> None:
    """``∇W ← ∇W ⊙ M`` for every masked layer whose weight has a gradient (each rank's own shard under
    FSDP, where the gradient hook of :func:`freeze_masks` cannot reach the sharded gradient)."""
    with torch.no_grad():
        for module in _masked_modules(model):
            grad = module.weight.grad
            if grad is not None:
                _local(grad).mul_(_local(layout_mask(module)))


def unfreeze_masks(model: nn.Module) -> None:
    """Remove the hooks and buffers that :func:`freeze_masks` installed."""
    for module in model.modules():
        for handle in getattr(module, "_sparsekit_hooks", []):
            handle.remove()
        if hasattr(module, "_sparsekit_hooks"):
            del module._sparsekit_hooks
        if "weight_mask" in getattr(module, "_buffers", {}):
            del module._buffers["weight_mask"]
    handle = getattr(model, "_sparsekit_optimizer_hook", None)
    if handle is not None:
        handle.remove()
        del model._sparsekit_optimizer_hook
