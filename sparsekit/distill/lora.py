"""LoRA on a sparse model (peft) that trains the masked update, so its merge is the trained model.

LoRA trains a low-rank update ``ΔW = (α / r) · B A`` (``B [out, r]``, ``A [r, in]``) beside each frozen
weight ``W [out, in]``. A plain merge ``W + ΔW`` is dense: it would undo the pruning, and merging only
the kept part of an update that was trained dense throws away what the pruned positions contributed.
Here the adapters train the masked update itself: every LoRA layer computes

    y = W x + ((B A) ⊙ M) x · α / r,      M = (W ≠ 0)  (fixed when the adapter is added),

so the merged weight ``W' = W + ((B A) ⊙ M) · α / r`` has exactly the zeros of the pruned one and
gives the same outputs as the trained adapters (up to float rounding of the two products).

:class:`~sparsekit.distill.masked_lora.MaskedLoraLinear` is a peft LoRA ``Linear`` (registered as a
custom module for ``nn.Linear`` and transformers' ``Conv1D``) whose ``get_delta_weight`` and
``forward`` apply the mask; peft's own ``merge_and_unload`` therefore merges the masked update. Its
forward forms the ``[out, in]`` product ``B A`` each call: one dense matmul per layer more than plain
LoRA, and (for the backward) one ``[out, in]`` activation per layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sparsekit.blocks import prunable_linears

__all__ = ["add_lora", "load_lora", "merge_lora"]


def add_lora(model, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: Iterable[str] | None = None):
    """``model`` wrapped by peft with masked LoRA adapters of rank ``r``
    (:class:`~sparsekit.distill.masked_lora.MaskedLoraLinear`).

    ``targets``: as in :func:`sparsekit.blocks.prunable_linears` (default: every Linear inside the
    transformer blocks). Only the adapters are trainable; each adapter's mask is its base weight's
    non-zeros at this moment.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r (the LoRA rank) must be a positive int, got {r!r}")
    names = [name for name, _ in prunable_linears(model, targets)]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    _register_masked(config)
    return get_peft_model(model, config)


def _register_masked(config) -> None:
    from transformers.pytorch_utils import Conv1D

    from sparsekit.distill.masked_lora import MaskedLoraLinear

    config._register_custom_module({torch.nn.Linear: MaskedLoraLinear, Conv1D: MaskedLoraLinear})


def load_lora(model, adapter_dir, is_trainable: bool = False):
    """``model`` with the masked adapters that ``peft_model.save_pretrained(adapter_dir)`` wrote.

    peft's own ``PeftModel.from_pretrained`` would rebuild them as plain (dense-update) LoRA layers;
    here they are :class:`~sparsekit.distill.masked_lora.MaskedLoraLinear` again, with the masks of
    ``model``'s weights (the pruned model the adapters were trained on).
    """
    from peft import LoraConfig, PeftModel

    config = LoraConfig.from_pretrained(str(adapter_dir))
    _register_masked(config)
    return PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=is_trainable)


def merge_lora(peft_model):
    """The base model with every masked LoRA update merged: ``W ← W + ((B A) ⊙ M) · α / r``.

    The merged model computes what the trained adapters computed, and keeps every zero of ``M``
    (checked). A LoRA layer that is not a ``MaskedLoraLinear`` (its update was trained dense) is
    refused: merging its masked part alone would not give the model it was trained as.
    """
    from peft.tuners.lora import LoraLayer

    from sparsekit.distill.masked_lora import MaskedLoraLinear

    masks = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            if not isinstance(module, MaskedLoraLinear):
                raise ValueError(f"layer {name!r} is a {type(module).__name__} trained with a dense update; "
                                 "only adapters added by sparsekit.distill.add_lora (masked) merge exactly")
            masks[name] = module.lora_mask
    if not masks:
        raise ValueError("peft_model holds no LoRA layer to merge")
    merged = peft_model.merge_and_unload()
    modules = dict(merged.named_modules())
    prefix = "base_model.model."
    for name, mask in masks.items():
        weight = modules[name[len(prefix):] if name.startswith(prefix) else name].weight
        if bool((weight.detach()[~mask.to(weight.device)] != 0).any()):
            raise RuntimeError(f"layer {name!r}: the merge wrote into a pruned weight")
    return merged
