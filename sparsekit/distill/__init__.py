"""Sparse fine-tuning: CE, logit KD and SquareHead losses, a mask-keeping Trainer, LoRA that stays sparse."""

from sparsekit.distill.guards import NonFiniteLossError
from sparsekit.distill.lora import add_lora, merge_lora
from sparsekit.distill.losses import block_outputs, ce_loss, kd_loss, shift_labels, squarehead_loss
from sparsekit.distill.trainer import (
                                       LOSS_MIXES,
                                       SparseTrainer,
                                       loss_spikes,
                                       parse_loss_mix,
                                       stability_summary,
)

__all__ = ["ce_loss", "kd_loss", "squarehead_loss", "shift_labels", "block_outputs", "SparseTrainer",
           "LOSS_MIXES", "parse_loss_mix", "loss_spikes", "stability_summary", "add_lora", "merge_lora",
           "NonFiniteLossError"]
