"""``MaskedLoraLinear``: a peft LoRA ``Linear`` whose update is ``(B A) ⊙ M · α / r``.

The math and its use: :mod:`sparsekit.distill.lora`.

Kept apart from :mod:`sparsekit.distill.lora` so that importing ``sparsekit.distill`` does not import peft.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.other import transpose

__all__ = ["MaskedLoraLinear"]


class MaskedLoraLinear(LoraLinear):
    """A peft LoRA ``Linear`` whose update is ``(B A) ⊙ M · scaling``, ``M`` = the base weight's non-zeros.

    ``lora_mask`` (bool, the base weight's layout: ``[out, in]``, or ``[in, out]`` for a ``Conv1D``) is a
    non-persistent buffer taken when the layer is created; merging never changes it.
    """

    def __init__(self, base_layer, adapter_name: str, config, **kwargs) -> None:
        from transformers.pytorch_utils import Conv1D

        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        is_conv1d = isinstance(base, Conv1D)
        super().__init__(base_layer, adapter_name, config=config, is_target_conv_1d_layer=is_conv1d, **kwargs)
        self.fan_in_fan_out = is_conv1d  # Conv1D stores its weight as [in, out]
        if self.lora_variant:
            raise ValueError(f"MaskedLoraLinear supports plain LoRA only, got variants "
                             f"{sorted(self.lora_variant)}")
        self.register_buffer("lora_mask", self.get_base_layer().weight.detach() != 0, persistent=False)

    def get_delta_weight(self, adapter) -> torch.Tensor:
        """``(B A) ⊙ M · scaling`` in the base weight's layout (what peft's merge adds to the weight)."""
        delta = super().get_delta_weight(adapter)
        return delta * self.lora_mask.to(delta.device)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``W x`` plus, for each active adapter, ``((B A) ⊙ M) · scaling`` applied to ``dropout(x)``."""
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("MaskedLoraLinear does not support mixed-adapter batches (adapter_names)")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A.keys():
                continue
            dropout = self.lora_dropout[adapter]
            x_lora = self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype)
            delta = transpose(self.get_delta_weight(adapter), self.fan_in_fan_out)  # [out, in]
            result = result + F.linear(dropout(x_lora), delta.to(x_lora.dtype))
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "masked_" + super().__repr__()
