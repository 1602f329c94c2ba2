"""Tiny models and data for the sparse fine-tuning tests (also imported by the distributed test script)."""

from __future__ import annotations

import copy

import torch

from sparsekit.blocks import prunable_linears
from sparsekit.prune import magnitude_prune

VOCAB = 64


def tiny_mpt(seed: int = 0):
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(seed)
    config = MptConfig(d_model=32, n_heads=2, n_layers=2, expansion_ratio=2, max_seq_len=32, vocab_size=VOCAB)
    return MptForCausalLM(config)


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(config)


def pruned_copy(model, sparsity: float = 0.5):
    """A deep copy of ``model`` with every prunable Linear magnitude-pruned to ``sparsity``."""
    student = copy.deepcopy(model)
    with torch.no_grad():
        for _, linear in prunable_linears(student):
            pruned, _ = magnitude_prune(linear.weight, sparsity)
            linear.weight.copy_(pruned)
    return student.train()


def masks_of(model) -> dict[str, torch.Tensor]:
    return {name: linear.weight.detach() != 0 for name, linear in prunable_linears(model)}


def causal_rows(n: int = 32, length: int = 12, seed: int = 0) -> list[dict]:
    """Sequences that repeat a short random motif (learnable), right-padded to different lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        motif = torch.randint(2, VOCAB, (3,), generator=g)
        ids = motif.repeat(length // 3 + 1)[:length]
        keep = length - (i % 4)
        mask = torch.zeros(length, dtype=torch.long)
        mask[:keep] = 1
        ids = ids.masked_fill(mask == 0, 0)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def seq2seq_rows(n: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        src = torch.randint(2, VOCAB, (8,), generator=g)
        mask = torch.ones(8, dtype=torch.long)
        mask[8 - i % 3:] = 0
        labels = src.flip(0)[:6].clone()
        labels[6 - i % 2:] = -100
        rows.append({"input_ids": src.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels})
    return rows


def stack_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def training_args(output_dir, **overrides):
    from transformers import TrainingArguments

    options = dict(output_dir=str(output_dir), per_device_train_batch_size=8, learning_rate=3e-3,
                   max_steps=6, warmup_steps=1, lr_scheduler_type="linear", logging_steps=1,
                   save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=0,
                   remove_unused_columns=False, dataloader_num_workers=0)
    options.update(overrides)
    return TrainingArguments(**options)
