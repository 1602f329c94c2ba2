"""Accumulating the statistics of a Linear layer's inputs over the calibration tokens.

SparseGPT needs ``H = 2/n Σ x xᵀ`` over the ``n`` real (non-padding) tokens a layer sees, Wanda its
diagonal ``Σ x²``, and the report's reconstruction error ``‖W X − Ŵ X‖²`` is ``tr(ΔW H ΔWᵀ) · n/2``.
Padding tokens are told apart by the calibration batch's attention masks: the stack's own tokens by
``attention_mask`` (or, for an encoder-decoder's decoder, ``decoder_attention_mask``, else
``labels != -100``), the encoder's tokens (the keys and values of cross-attention) by the encoder's.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekit.prune.capture import BlockCall

__all__ = ["HessianStats", "TokenMasks", "token_masks", "real_tokens", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # the label of padding positions in Hugging Face models


class HessianStats:
    """Running ``H = 2/n Σ x xᵀ`` over the ``n`` tokens seen so far (float32), and ``n``."""

    def __init__(self, features: int, device):
        self.H = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the tokens ``x`` ``[tokens, features]``."""
        t = x.shape[0]
        if t == 0:
            return
        self.H.mul_(self.tokens / (self.tokens + t))
        self.tokens += t
        x = x.float() * (2.0 / self.tokens) ** 0.5
        self.H.addmm_(x.t(), x)

    @property
    def act_sq_norm(self) -> torch.Tensor:
        """``Σ x²`` per input feature."""
        return torch.diagonal(self.H) * (self.tokens / 2.0)


TokenMasks = dict
"""``{"self": mask of the stack's tokens, "encoder": mask of the encoder's tokens, "encoder_states": the
encoder hidden states of the call}``; masks are ``[batch, length]`` (1 = real token) or None."""


def token_masks(model: nn.Module, stack_name: str, batch: dict, call: BlockCall,
                block: nn.Module) -> TokenMasks:
    """Which tokens of ``batch`` are real, for the Linear layers of ``block`` of stack ``stack_name``."""
    is_decoder_stack = bool(getattr(model.config, "is_encoder_decoder", False)) and "decoder" in stack_name
    if not is_decoder_stack:
        return {"self": batch.get("attention_mask")}
    decoder_mask = batch.get("decoder_attention_mask")
    if decoder_mask is None and isinstance(batch.get("labels"), torch.Tensor):
        decoder_mask = batch["labels"] != IGNORE_INDEX  # positions without a target are padding
    return {"self": decoder_mask, "encoder": batch.get("attention_mask"),
            "encoder_states": call.argument(block, "encoder_hidden_states")}


def real_tokens(x: torch.Tensor, masks: TokenMasks, layer: str) -> torch.Tensor:
    """The real (non-padding) tokens of a Linear's input ``x`` ``[..., features]`` as ``[tokens, features]``.

    ``x`` is the encoder's states (cross-attention keys and values) when it is the very tensor passed as
    ``encoder_hidden_states``. A mask that marks every token real is not needed. A mask with padding
    whose shape does not match ``x``'s tokens raises ``ValueError`` naming ``layer``: padding would
    otherwise enter the statistics unnoticed.
    """
    mask = masks.get("self")
    states = masks.get("encoder_states")
    if states is not None and x.shape == states.shape and x.data_ptr() == states.data_ptr():
        mask = masks.get("encoder")
    if mask is None or bool(mask.bool().all()):
        return x.reshape(-1, x.shape[-1])
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"the attention mask {tuple(mask.shape)} of the calibration batch does not match "
                         f"the tokens {tuple(x.shape[:-1])} that layer {layer!r} sees, so its padding "
                         "cannot be excluded from the statistics; calibrate with unpadded batches "
                         "(attention_mask of ones) or prune other targets")
    return x[mask.to(device=x.device, dtype=torch.bool)]
