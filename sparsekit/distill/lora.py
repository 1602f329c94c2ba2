"""LoRA on a sparse model (peft), and a merge that keeps the sparsity mask.

LoRA trains a low-rank update ``ΔW = (α / r) · B A`` beside each frozen weight ``W``. A plain merge
``W + ΔW`` is dense: it would undo the pruning. :func:`merge_lora` merges the *masked* update,

    W' = W + M ⊙ ΔW,      M = (W ≠ 0),

so the merged model has exactly the zeros of the pruned one. The base weights never change during
LoRA training (peft freezes them), so their zeros are the mask.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sparsekit.blocks import prunable_linears

__all__ = ["add_lora", "merge_lora"]


def add_lora(model, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: Iterable[str] | None = None):
    """``model`` wrapped by peft with LoRA adapters of rank ``r`` on its prunable Linear layers.

    ``targets``: as in :func:`sparsekit.blocks.prunable_linears` (default: every Linear inside the
    transformer blocks). Only the adapters are trainable.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r (the LoRA rank) must be a positive int, got {r!r}")
    names = [name for name, _ in prunable_linears(model, targets)]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    return get_peft_model(model, config)


def merge_lora(peft_model):
    """The base model with every LoRA update merged through its layer's mask: ``W ← W + (W ≠ 0) ⊙ ΔW``."""
    from peft.tuners.lora import LoraLayer

    masks = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            masks[name] = module.get_base_layer().weight.detach() != 0
    if not masks:
        raise ValueError("peft_model holds no LoRA layer to merge")
    merged = peft_model.merge_and_unload()
    modules = dict(merged.named_modules())
    prefix = "base_model.model."
    with torch.no_grad():
        for name, mask in masks.items():
            module = modules[name[len(prefix):] if name.startswith(prefix) else name]
            module.weight.mul_(mask.to(module.weight.dtype))
    return merged
